"""Legacy quants (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, MXFP4) against ggml (ctypes) and gguf-py."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import DATA_KINDS, make_imatrix, make_rows
from gguf import quants as gguf_quants

from dynsearch.kernels import QT, dequantize, kernel, quantize, row_nbytes

TYPES = (QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.MXFP4)
SHAPES = ((1, 32), (3, 96), (7, 576), (16, 4096))

# Relative RMS error bound on N(0,1) rows. A uniform quantizer of step s has RMS error s/sqrt(12);
# per 32-block the step is about 2*amax/(levels) with amax ~ 2.2 sigma for 32 normals:
# Q4_0: 2*2.2/15 / sqrt(12) ~ 0.085 (asymmetric -8..7 grid wastes part of a level) -> 0.12;
# Q4_1: (max-min)/15/sqrt(12) ~ 0.085 -> 0.11; Q5_0/Q5_1: half of that -> 0.06 / 0.055;
# Q8_0: 2*2.2/254/sqrt(12) ~ 0.005 -> 0.008; MXFP4: E2M1 has relative spacing up to 1/3 with a
# power-of-two scale -> 0.16. (Measured with seed 5: 0.086, 0.078, 0.043, 0.038, 0.0053, 0.115.)
RMS_BOUND = {QT.Q4_0: 0.12, QT.Q4_1: 0.11, QT.Q5_0: 0.06, QT.Q5_1: 0.055, QT.Q8_0: 0.008, QT.MXFP4: 0.16}


def _same_floats(a: np.ndarray, b: np.ndarray) -> None:
    """Bit-identical float32 arrays, except that NaNs only need to sit at the same places."""
    nan_a, nan_b = np.isnan(a), np.isnan(b)
    np.testing.assert_array_equal(nan_a, nan_b)
    np.testing.assert_array_equal(a.view(np.uint32)[~nan_a], b.view(np.uint32)[~nan_b])


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("kind", DATA_KINDS)
def test_quantize_matches_ggml(ggml, qtype, kind):
    for n_rows, n_per_row in SHAPES:
        for seed in (0, 1):
            x = make_rows(kind, n_rows, n_per_row, seed)
            for imatrix in (None, make_imatrix(n_per_row, seed)):
                ours = quantize(x, qtype, imatrix)
                ref = ggml.quantize(x, qtype, imatrix)
                assert ours.shape == (n_rows, row_nbytes(qtype, n_per_row))
                np.testing.assert_array_equal(
                    ours, ref, err_msg=f"{qtype.name} {kind} {n_rows}x{n_per_row} seed {seed} "
                                       f"imatrix={imatrix is not None}")


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_quantize_matches_ggml_edge_cases(ggml, qtype):
    """Subnormal blocks (1/d overflows to inf), constant and positive blocks, huge values, every
    binade boundary of the MXFP4 exponent, and imatrices with zeros or huge entries."""
    rng = np.random.default_rng(7)
    n = 256
    bits = np.array([(e << 23) + dm for e in range(1, 255) for dm in (-3, -2, -1, 0, 1)], np.uint32)
    amax = bits.view(np.float32)[: (bits.size // 8) * 8]
    edge = rng.uniform(-1, 1, (amax.size, 32)).astype(np.float32) * amax[:, None]
    edge[:, 5] = amax
    edge[::2, 5] = -amax[::2]
    cases = [
        rng.standard_normal((8, n)) * 1e-40,
        np.where(rng.random((8, n)) < 0.5, rng.standard_normal((8, n)) * 1e-41, 0.0),
        np.repeat(rng.standard_normal((8, 1)), n, axis=1),
        np.abs(rng.standard_normal((8, n))) + 3,
        rng.standard_normal((8, n)) * 1e37,
        rng.integers(-8, 8, (8, n)).astype(float),
        rng.standard_normal((8, n)) * 1e-16,
        edge.reshape(-1, n),
    ]
    imatrices = [None, np.zeros(n, np.float32),
                 np.where(rng.random(n) < 0.3, 0, rng.lognormal(0, 2, n)).astype(np.float32),
                 rng.lognormal(0, 2, n).astype(np.float32) * 1e20]
    for i, x in enumerate(cases):
        x = x.astype(np.float32)
        for j, imatrix in enumerate(imatrices):
            np.testing.assert_array_equal(quantize(x, qtype, imatrix), ggml.quantize(x, qtype, imatrix),
                                          err_msg=f"{qtype.name} case {i} imatrix {j}")


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantize_matches_gguf_py(qtype):
    for n_rows, n_per_row in SHAPES:
        x = make_rows("heavy", n_rows, n_per_row, 3)
        for data in (quantize(x, qtype), quantize(x, qtype, make_imatrix(n_per_row, 3))):
            _same_floats(dequantize(data, qtype, n_per_row),
                         gguf_quants.dequantize(data, qtype).reshape(n_rows, n_per_row))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantize_random_bytes(ggml, qtype):
    """Every bit pattern decodes like gguf-py and ggml: NaN/inf fp16 scales, any e8m0 exponent."""
    rng = np.random.default_rng(11)
    n_per_row = 512
    data = rng.integers(0, 256, (64, row_nbytes(qtype, n_per_row)), dtype=np.uint8)
    ours = dequantize(data, qtype, n_per_row)
    with np.errstate(all="ignore"):  # NaN/inf scales are the point here
        ref = gguf_quants.dequantize(data, qtype).reshape(ours.shape)
    _same_floats(ours, ref)
    _same_floats(ours, ggml.dequantize(data, qtype, n_per_row))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_round_trip_error(qtype):
    x = make_rows("normal", 32, 1024, 5)
    for imatrix in (None, make_imatrix(1024, 5)):
        y = dequantize(quantize(x, qtype, imatrix), qtype, 1024)
        rel_rms = np.sqrt(np.mean((y - x) ** 2) / np.mean(x**2))
        assert rel_rms < RMS_BOUND[qtype], f"{qtype.name} imatrix={imatrix is not None}: {rel_rms:.4f}"


def test_imatrix_use_follows_ggml():
    """Q8_0 and MXFP4 ignore importance weights in ggml; the others use them."""
    assert not kernel(QT.Q8_0).uses_imatrix and not kernel(QT.MXFP4).uses_imatrix
    assert all(kernel(t).uses_imatrix for t in (QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1))
    x = make_rows("normal", 4, 256, 0)
    for qtype in (QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1):
        assert not np.array_equal(quantize(x, qtype), quantize(x, qtype, make_imatrix(256, 0)))


def test_non_finite_input_raises():
    x = make_rows("normal", 2, 64, 0)
    x[1, 7] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize(x, QT.Q4_0)
