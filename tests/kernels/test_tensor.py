"""Whole tensors: quantize_tensor's per-expert importance split, and the GGUF padding of tensor data
(against gguf-py's writer)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from conftest import make_imatrix, make_rows
from hypothesis import given, settings
from hypothesis import strategies as st

from dynsearch import kernels as K


def test_expert_stack_uses_each_experts_own_vector():
    n_exp, rows, n = 3, 4, 64
    w = make_rows("heavy", n_exp * rows, n, 1).reshape(n_exp, rows, n)
    imp = np.stack([make_imatrix(n, s) for s in range(n_exp)])  # (n_exp, n), all different
    got = K.quantize_tensor(w, "IQ4_NL", imp.reshape(-1))
    expected = np.concatenate([K.quantize(w[e], "IQ4_NL", imp[e]) for e in range(n_exp)])
    assert got.dtype == np.uint8 and np.array_equal(got, expected)
    assert np.array_equal(K.quantize_tensor(w, "IQ4_NL", imp), got)  # (n_mat, n) is the same vector
    one_vector = K.quantize(w.reshape(-1, n), "IQ4_NL", imp[0])
    assert not np.array_equal(got, one_vector)  # the split matters on this data


def test_matrix_without_importance_is_plain_quantize():
    w = make_rows("normal", 6, 256, 2)
    assert np.array_equal(K.quantize_tensor(w, "Q4_K"), K.quantize(w, "Q4_K"))
    assert np.array_equal(K.quantize_tensor(w, "Q4_K", make_imatrix(256, 2)),
                          K.quantize(w, "Q4_K", make_imatrix(256, 2)))


def test_f32_is_stored_as_is_in_its_shape():
    w = make_rows("tiny", 3, 8, 3).reshape(3, 2, 4).astype(np.float64)
    got = K.quantize_tensor(w, "F32")
    assert got.dtype == np.float32 and got.shape == (3, 2, 4)
    assert np.array_equal(got, w.astype(np.float32))


@pytest.mark.parametrize("size", [0, 63, 65, 2 * 64 + 1, 5 * 64])
def test_importance_that_does_not_fit_is_refused(size):
    w = np.ones((2, 4, 64), np.float32)  # 8 rows: 1, 2, 4 or 8 matrices fit, 5 does not
    with pytest.raises(ValueError, match="does not fit a tensor of shape"):
        K.quantize_tensor(w, "Q8_0", np.ones(size, np.float32))


@settings(max_examples=200, deadline=None)
@given(nbytes=st.integers(0, 10**7), log_align=st.integers(0, 12))
def test_padded_matches_gguf_writer(nbytes, log_align):
    align = 1 << log_align
    assert K.padded(nbytes, align) == gguf.GGUFWriter.ggml_pad(nbytes, align)
    assert K.padded(nbytes) == gguf.GGUFWriter.ggml_pad(nbytes, gguf.GGUF_DEFAULT_ALIGNMENT)
