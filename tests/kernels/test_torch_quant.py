"""The torch quantizers give the numba kernels' blocks bit for bit (which are ggml's), on every
nasty input kind; run on the CPU here, and on CUDA where present."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import DATA_KINDS, make_imatrix, make_rows

from dynsearch.kernels import dequantize, quantize
from dynsearch.kernels.torch_quant import quantize_rows, torch_quantizable

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", DATA_KINDS)
@pytest.mark.parametrize("qtype", torch_quantizable())
def test_blocks_equal_the_kernels(qtype, kind, device):
    x = make_rows(kind, 7, 256, seed=11)
    # exact ties: scale 1 (Q8_0: max 127; Q4_0 / Q5_0: max -8 / -16), levels at k + 1/2
    halves = np.arange(-15, 16, dtype=np.float32) + np.float32(0.5)
    x[0, :32] = np.concatenate(([127.0], halves)) if qtype == "Q8_0" else np.concatenate(([-16.0], halves / 2))
    x[1, :32] = np.concatenate(([-8.0], np.clip(halves, -8, 7)))
    want = quantize(x, qtype)
    got = quantize_rows(torch.from_numpy(x).to(device), qtype).cpu().numpy()
    assert got.dtype == np.uint8 and got.shape == want.shape
    np.testing.assert_array_equal(got, want)


def test_q8_0_under_an_imatrix_is_the_profiles_quantizer():
    """ggml's Q8_0 ignores importance weights: the torch blocks are the profile's with an imatrix."""
    x = make_rows("heavy", 5, 512, seed=3)
    np.testing.assert_array_equal(quantize_rows(torch.from_numpy(x), "Q8_0").numpy(),
                                  quantize(x, "Q8_0", make_imatrix(512, 3)))


def test_dequantized_blocks_round_trip():
    x = make_rows("normal", 4, 64, seed=5)
    for t in torch_quantizable():
        dq = dequantize(quantize_rows(torch.from_numpy(x), t).numpy(), t, 64)
        assert np.abs(dq - x).max() < 0.2 * np.abs(x).max()


def test_unsupported_type_and_bad_rows_are_refused():
    with pytest.raises(NotImplementedError, match="Q4_K"):
        quantize_rows(torch.zeros(1, 256), "Q4_K")
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_rows(torch.zeros(2, 48), "Q8_0")
