"""K-quant kernels (Q2_K..Q6_K) against ggml's C quantizers and gguf-py's numpy dequantizers."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from conftest import DATA_KINDS, make_imatrix, make_rows

from dynsearch import kernels as K
from dynsearch.kernels import QT

KQUANTS = (QT.Q6_K, QT.Q4_K, QT.Q5_K, QT.Q3_K, QT.Q2_K)
SHAPES = ((1, 256), (3, 1536), (8, 4096))

# Relative RMS round-trip error ||x - deq(q(x))|| / ||x|| on Gaussian rows (16 x 4096). A b-bit
# uniform grid over a block's range has RMS error ~ step/sqrt(12) and each extra bit halves the
# step. Measured (seeds 0..2, worst of the ref and imatrix paths): Q2_K 0.299, Q3_K 0.157,
# Q4_K 0.077, Q5_K 0.038, Q6_K 0.019. The bounds leave ~15% headroom, so a real regression (a wrong
# scale, a lost bit) fails while seed noise (< 1%) does not.
RMS_BOUND = {QT.Q2_K: 0.34, QT.Q3_K: 0.18, QT.Q4_K: 0.088, QT.Q5_K: 0.044, QT.Q6_K: 0.022}


def _row_bytes(qt: QT) -> int:
    return K.type_info(qt).type_size


@pytest.mark.parametrize("qt", KQUANTS, ids=lambda t: t.name)
@pytest.mark.parametrize("kind", DATA_KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("use_imatrix", [False, True], ids=["ref", "imatrix"])
def test_quantize_matches_ggml(ggml, qt, kind, shape, use_imatrix):
    for seed in (0, 1):
        x = make_rows(kind, *shape, seed)
        im = make_imatrix(shape[1], seed) if use_imatrix else None
        ours = K.quantize(x, qt, im)
        ref = ggml.quantize(x, qt, im)
        if not np.array_equal(ours, ref):
            blocks = np.nonzero((ours.reshape(-1, _row_bytes(qt)) != ref.reshape(-1, _row_bytes(qt)))
                                .any(axis=1))[0]
            pytest.fail(f"{qt.name} {kind} seed {seed}: {blocks.size} super-blocks differ "
                        f"from ggml, first {blocks[:5]}")


@pytest.mark.parametrize("qt", KQUANTS, ids=lambda t: t.name)
def test_imatrix_changes_the_result(ggml, qt):
    """The imatrix path is really taken (a uniform-weight imatrix is not the ref path)."""
    x = make_rows("normal", 4, 1024, 7)
    im = make_imatrix(1024, 7)
    assert not np.array_equal(K.quantize(x, qt, im), K.quantize(x, qt))
    np.testing.assert_array_equal(K.quantize(x, qt, im), ggml.quantize(x, qt, im))


@pytest.mark.parametrize("qt", KQUANTS, ids=lambda t: t.name)
def test_large_magnitudes_match_ggml(ggml, qt):
    """Values whose scales overflow fp16 (d = inf, NaN levels) follow ggml's exact nearest_int."""
    x = make_rows("normal", 2, 512, 3) * np.float32(1e6)
    x[1, :16] = 6e9
    for im in (None, make_imatrix(512, 3)):
        np.testing.assert_array_equal(K.quantize(x, qt, im), ggml.quantize(x, qt, im))


def _assert_same_floats(a: np.ndarray, b: np.ndarray) -> None:
    """Bit-identical floats, except that NaN payloads may differ (NaN positions must agree)."""
    nan_a, nan_b = np.isnan(a), np.isnan(b)
    np.testing.assert_array_equal(nan_a, nan_b)
    np.testing.assert_array_equal(a[~nan_a].view(np.uint32), b[~nan_b].view(np.uint32))


@pytest.mark.parametrize("qt", KQUANTS, ids=lambda t: t.name)
@pytest.mark.parametrize("kind", DATA_KINDS)
def test_dequantize_matches_gguf_py_on_our_blocks(qt, kind):
    x = make_rows(kind, 5, 1024, 11)
    for im in (None, make_imatrix(1024, 11)):
        q = K.quantize(x, qt, im)
        ours = K.dequantize(q, qt, 1024)
        ref = gguf.quants.dequantize(q, qt).reshape(ours.shape)
        np.testing.assert_array_equal(ours.view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("qt", KQUANTS, ids=lambda t: t.name)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dequantize_matches_gguf_py_on_random_bytes(qt, seed):
    n_rows, n_per_row = 16, 2048
    raw = np.random.default_rng(seed).integers(
        0, 256, (n_rows, n_per_row // 256 * _row_bytes(qt)), dtype=np.uint8)
    ours = K.dequantize(raw, qt, n_per_row)
    with np.errstate(invalid="ignore", over="ignore"):
        ref = gguf.quants.dequantize(raw, qt).reshape(ours.shape)
    _assert_same_floats(ours, ref)


@pytest.mark.parametrize("qt", KQUANTS, ids=lambda t: t.name)
def test_dequantize_matches_ggml_to_float(ggml, qt):
    raw = np.random.default_rng(5).integers(0, 256, (4, 8 * _row_bytes(qt)), dtype=np.uint8)
    _assert_same_floats(K.dequantize(raw, qt, 2048), ggml.dequantize(raw, qt, 2048))


@pytest.mark.parametrize("qt", KQUANTS, ids=lambda t: t.name)
def test_round_trip_error_bound(qt):
    x = make_rows("normal", 16, 4096, 0)
    for im in (None, make_imatrix(4096, 0)):
        y = K.dequantize(K.quantize(x, qt, im), qt, 4096)
        rel = np.sqrt(np.mean((x - y) ** 2) / np.mean(x**2))
        assert rel < RMS_BOUND[qt], f"{qt.name} relative RMS error {rel:.4f}"


def test_error_decreases_with_bits():
    x = make_rows("heavy", 8, 2048, 4)
    errs = [np.mean((x - K.dequantize(K.quantize(x, qt), qt, 2048)) ** 2)
            for qt in (QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K)]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs


@pytest.mark.parametrize("qt", KQUANTS, ids=lambda t: t.name)
def test_zero_rows_give_zero_blocks_that_decode_to_zero(qt):
    x = np.zeros((2, 512), dtype=np.float32)
    q = K.quantize(x, qt)
    assert not K.dequantize(q, qt, 512).any()
