"""I-quant kernels (kernels/iquants.py) against ggml (quantize, dequantize) and gguf-py (dequantize)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from conftest import DATA_KINDS, make_imatrix, make_rows

from dynsearch.kernels import QT, dequantize, kernel, quantize, row_nbytes, type_info

IQ_TYPES = (QT.IQ4_NL, QT.IQ4_XS, QT.IQ2_XXS, QT.IQ2_XS, QT.IQ2_S, QT.IQ3_XXS, QT.IQ3_S,
            QT.IQ1_S, QT.IQ1_M)
QUANTIZABLE = tuple(t for t in IQ_TYPES if kernel(t).quantize is not None)

# Relative RMS error of quantize -> dequantize on Gaussian rows with an imatrix. ggml measures
# 0.079 (IQ4_NL), 0.080 (IQ4_XS), 0.149 (IQ3_S), 0.215 (IQ3_XXS), 0.274 (IQ2_S), 0.340 (IQ2_XS),
# 0.378 (IQ2_XXS), 0.510 (IQ1_M), 0.539 (IQ1_S) on these rows; the bounds leave ~10% headroom.
RMSE_BOUND = {QT.IQ4_NL: 0.09, QT.IQ4_XS: 0.09, QT.IQ3_S: 0.165, QT.IQ3_XXS: 0.24,
              QT.IQ2_S: 0.30, QT.IQ2_XS: 0.375, QT.IQ2_XXS: 0.415, QT.IQ1_M: 0.56, QT.IQ1_S: 0.59}


def _shapes(qt: QT) -> list[tuple[int, int]]:
    return [(1, 32), (3, 96), (7, 576)] if type_info(qt).block_size == 32 else [(1, 256), (3, 1536),
                                                                               (8, 4096)]


def _same_floats(a: np.ndarray, b: np.ndarray) -> None:
    """Equal bit patterns, except that NaNs need only sit at the same positions."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32).reshape(a.shape)
    nan = np.isnan(a)
    np.testing.assert_array_equal(nan, np.isnan(b))
    np.testing.assert_array_equal(a.view(np.uint32)[~nan], b.view(np.uint32)[~nan])


@pytest.mark.parametrize("use_imatrix", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("kind", DATA_KINDS)
@pytest.mark.parametrize("qt", QUANTIZABLE, ids=lambda t: t.name)
def test_quantize_matches_ggml(ggml, qt, kind, use_imatrix):
    if not use_imatrix and type_info(qt).requires_imatrix:
        pytest.skip(f"ggml refuses {qt.name} without an imatrix")
    for seed, (n_rows, n_per_row) in enumerate(_shapes(qt)):
        x = make_rows(kind, n_rows, n_per_row, seed)
        imatrix = make_imatrix(n_per_row, seed) if use_imatrix else None
        ours = quantize(x, qt, imatrix)
        ref = ggml.quantize(x, qt, imatrix)
        assert ours.shape == (n_rows, row_nbytes(qt, n_per_row))
        np.testing.assert_array_equal(ours, ref, err_msg=f"{qt.name} {kind} {n_rows}x{n_per_row}")


@pytest.mark.parametrize("qt", QUANTIZABLE, ids=lambda t: t.name)
def test_dequantize_of_our_output_matches_gguf_py(qt):
    n_per_row = 4096 if type_info(qt).block_size == 256 else 576
    x = make_rows("heavy", 5, n_per_row, 3)
    q = quantize(x, qt, make_imatrix(n_per_row, 3))
    _same_floats(dequantize(q, qt, n_per_row), gguf.quants.dequantize(q, qt))


@pytest.mark.parametrize("qt", IQ_TYPES, ids=lambda t: t.name)
def test_dequantize_random_blocks_matches_gguf_py_and_ggml(ggml, qt):
    # Random bytes are valid blocks of every I-quant (all grid indices exist); random fp16
    # scales include NaN and inf, which must show up at the same places.
    rng = np.random.default_rng(int(qt))
    n_per_row = 1024
    raw = rng.integers(0, 256, (48, row_nbytes(qt, n_per_row)), dtype=np.uint8)
    ours = dequantize(raw, qt, n_per_row)
    assert ours.shape == (48, n_per_row)
    with np.errstate(invalid="ignore", over="ignore"):
        _same_floats(ours, gguf.quants.dequantize(raw, qt))
    _same_floats(ours, ggml.dequantize(raw, qt, n_per_row))


@pytest.mark.parametrize("qt", IQ_TYPES, ids=lambda t: t.name)
def test_roundtrip_error_is_bounded(ggml, qt):
    n_per_row = 4096 if type_info(qt).block_size == 256 else 576
    x = make_rows("normal", 4, n_per_row, 11)
    imatrix = make_imatrix(n_per_row, 11)
    q = quantize(x, qt, imatrix) if kernel(qt).quantize is not None else ggml.quantize(x, qt, imatrix)
    y = dequantize(q, qt, n_per_row)
    rel_rmse = np.sqrt(np.mean((y - x) ** 2) / np.mean(x**2))
    assert rel_rmse < RMSE_BOUND[qt], f"{qt.name}: relative RMSE {rel_rmse:.3f}"


def test_zero_rows_quantize_to_zero_scales():
    for qt in QUANTIZABLE:
        n_per_row = type_info(qt).block_size
        imatrix = np.ones(n_per_row, np.float32) if type_info(qt).requires_imatrix else None
        y = dequantize(quantize(np.zeros((2, n_per_row), np.float32), qt, imatrix), qt, n_per_row)
        assert not np.any(y), qt.name
