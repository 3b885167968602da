"""The torch K-quants (kernels/torch_kquants.py) give the numba kernels' blocks bit for bit (which are
ggml's), with and without an importance vector, on every nasty input kind, exact ties, overflowing
scales and all-zero rows; the torch dequantizers give the numba ones' floats. Run on the CPU here, and
on CUDA where present.

Every type and path is bit-identical (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K; ref and imatrix): the sums the C
accumulates element by element (sigma2 over a super-block, the search sums) are accumulated in its
order, and sqrtf is the correctly rounded root (torch's own float32 sqrt on the CPU is not). So no
type needs the 1e-6 relative tolerance on the profile error allowed for one that is not identical:
test_profile_error_is_the_numba_paths asserts equality.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import DATA_KINDS, make_imatrix, make_rows

import dynsearch.kernels.torch_kquants as tk
from dynsearch.kernels import dequantize, quantize, row_nbytes, type_info
from dynsearch.kernels._fp import fp32_to_fp16, nearest_int
from dynsearch.kernels.torch_kquants import DEQUANTIZERS, QUANTIZERS
from dynsearch.objectives.stats.store import TensorStats
from dynsearch.search.profile import quant_error

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]
KTYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
PATHS = ("ref", "imatrix")


def _torch_blocks(x: np.ndarray, qtype: str, im: np.ndarray | None, device: str) -> np.ndarray:
    imt = None if im is None else torch.from_numpy(im).to(device)
    return QUANTIZERS[qtype](torch.from_numpy(x).to(device), imt).cpu().numpy()


def _assert_blocks_equal(got: np.ndarray, want: np.ndarray, qtype: str) -> None:
    assert got.dtype == np.uint8 and got.shape == want.shape
    if not np.array_equal(got, want):
        nb = type_info(qtype).type_size
        bad = np.nonzero((got.reshape(-1, nb) != want.reshape(-1, nb)).any(axis=1))[0]
        pytest.fail(f"{qtype}: {bad.size} of {got.size // nb} super-blocks differ from the numba "
                    f"kernel's, first {bad[:5]}")


def _check(x: np.ndarray, qtype: str, path: str, device: str, seed: int, im: np.ndarray | None = None) -> None:
    if path == "imatrix" and im is None:
        im = make_imatrix(x.shape[1], seed)
    elif path == "ref":
        im = None
    _assert_blocks_equal(_torch_blocks(x, qtype, im, device), quantize(x, qtype, im), qtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", DATA_KINDS)
@pytest.mark.parametrize("qtype", KTYPES)
def test_blocks_equal_the_kernels(qtype, kind, path, device):
    _check(make_rows(kind, 3, 512, seed=11), qtype, path, device, 11)


HALF_COLS = np.r_[5:512:16, 11:512:16]  # the tie rows' off-grid columns (zero importance)


def _tie_rows() -> np.ndarray:
    """Values on which nearest_int meets exact halves (ggml rounds them to even, roundf would not).

    Row 0: a half-integer grid, equal magnitudes of opposite sign (the first is the block's max),
    constant blocks, negative (make_qkx2_quants' ``max == min`` exit) and positive, a single nonzero,
    a zero sub-block. Rows 1-2: integers with max -32 (Q6_K) or -4 (Q3_K) in every sub-block, so the
    scale comes out exactly 1 and the final ``x / d`` of HALF_COLS' small half-integers ties (those
    columns have zero importance on the imatrix path, and move the scale too little to matter
    without it).
    Rows 3-5: an integer min and a range of 15, 31, 3 in every sub-block (Q4_K, Q5_K, Q2_K's first
    scale is 1) with half-integers in between. Rows 6-8 (Q4_K, Q5_K, Q2_K with an imatrix):
    non-negative sub-blocks on the grids (63/64) l and l/2 (Q2_K: (15/16) l and l/2) alternately,
    so that d is 1/64 (1/16) exactly, the second grid's scale byte is 32 (8), its d 1/2 and the
    mins 0; HALF_COLS of the second grid hold odd quarters, whose final ``x / d`` ties.
    Together the rows tell ggml's nearest_int from roundf on every type and path."""
    rng = np.random.default_rng(5)
    x = (rng.integers(-20, 21, (9, 512)) / 2).astype(np.float32)
    x[0, :16] = -3.0
    x[0, 16:32] = 3.0
    x[0, 32:48] = np.tile([3.0, -3.0], 8)
    x[0, 48:64] = np.tile([-3.0, 3.0], 8)
    x[0, 64:96] = 0.0
    x[0, 70] = 1.0
    x[0, 96:128] = -0.75
    x[0, 256:] = rng.integers(-2, 3, 256)
    for r, nmax in ((1, 32), (2, 4)):
        x[r] = rng.integers(1 - nmax, nmax, 512)
        x[r, ::16] = -nmax
        x[r, HALF_COLS] = rng.choice([-1.5, -0.5, 0.5, 1.5], HALF_COLS.size)
    for r, (lo, hi) in ((3, (-7, 8)), (4, (-15, 16)), (5, (-1, 2))):
        x[r] = rng.integers(lo, hi + 1, 512) + np.where(rng.random(512) < 0.3, 0.5, 0.0)
        x[r] = np.clip(x[r], lo, hi)
        x[r, ::16], x[r, 1::16] = lo, hi
    half = np.zeros(512, bool)
    half[HALF_COLS] = True
    for r, (nmax, size, a) in ((6, (15, 32, 63 / 64)), (7, (31, 32, 63 / 64)), (8, (3, 16, 15 / 16))):
        lv = rng.integers(0, nmax + 1, 512)
        lv[::size], lv[1::size] = 0, nmax
        second = (np.arange(512) // size) % 2 == 1
        x[r] = np.where(second, 0.5 * lv, a * lv)
        odd = second & half
        x[r, odd] = 0.25 * (2 * rng.integers(0, nmax, odd.sum()) + 1)
    return x


def _tie_imatrix() -> np.ndarray:
    im = make_imatrix(512, 2)
    im[HALF_COLS] = 0.0
    return im


def _large_rows() -> np.ndarray:
    """Scales that overflow fp16 (d = inf, NaN levels: ggml's nearest_int values for them)."""
    x = make_rows("normal", 2, 512, 3) * np.float32(1e6)
    x[1, :16] = 6e9
    return x


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", ["ties", "large", "zero_rows"])
@pytest.mark.parametrize("qtype", KTYPES)
def test_edge_cases_equal_the_kernels(qtype, case, path, device):
    x = {"ties": _tie_rows, "large": _large_rows, "zero_rows": lambda: np.zeros((2, 768), np.float32)}[case]()
    _check(x, qtype, path, device, 2, _tie_imatrix() if case == "ties" else None)
    if case == "zero_rows":  # every byte of an all-zero super-block is 0 on both paths
        assert not _torch_blocks(x, qtype, make_imatrix(768, 2) if path == "imatrix" else None, device).any()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("qtype", KTYPES)
def test_chunks_split_rows(qtype, path, monkeypatch):
    """Super-blocks are quantized CHUNK at a time; a chunk that splits a row still gets the
    importance of the right columns."""
    monkeypatch.setattr(tk, "CHUNK", 3)
    _check(make_rows("heavy", 3, 1024, seed=8), qtype, path, "cpu", 8)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", KTYPES)
def test_dequantizers_equal_the_kernels(qtype, device):
    """On quantized blocks of both paths, and on random bytes (any fp16 scale: subnormal, inf,
    NaN; any 6-bit scale); NaN outputs compare equal by position."""
    x = make_rows("heavy", 3, 512, seed=4)
    rng = np.random.default_rng(4)
    cases = [(quantize(x, qtype), 512), (quantize(x, qtype, make_imatrix(512, 4)), 512),
             (rng.integers(0, 256, (5, row_nbytes(qtype, 1024)), dtype=np.uint8), 1024)]
    for data, n in cases:
        got = DEQUANTIZERS[qtype](torch.from_numpy(data).to(device), n).cpu().numpy()
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, dequantize(data, qtype, n))


@pytest.mark.parametrize("qtype", KTYPES)
def test_profile_error_is_the_numba_paths(qtype):
    """The profile's error term of the torch blocks equals the numba path's, on both paths (the
    blocks are identical, so no 1e-6 tolerance is used)."""
    rng = np.random.default_rng(9)
    w = make_rows("heavy", 8, 512, seed=9)
    im = make_imatrix(512, 9)
    a = rng.standard_normal((512, 512))
    stats = TensorStats(xtx=torch.from_numpy((a @ a.T / 512).astype(np.float32)),
                        fisher_out=rng.uniform(0.5, 2.0, 8).astype(np.float32), importance=im)
    for imp in (None, im):
        want = quant_error(w, dequantize(quantize(w, qtype, imp), qtype, 512), stats)
        dq = DEQUANTIZERS[qtype](QUANTIZERS[qtype](torch.from_numpy(w), None if imp is None else torch.from_numpy(imp)),
                                 512).numpy()
        assert want > 0 and quant_error(w, dq, stats) == want


@pytest.mark.parametrize("device", DEVICES)
def test_scalar_steps_match_ggml(device):
    """nearest_int and GGML_FP32_TO_FP16 on halves, huge values, inf, subnormals; and a NaN of any
    payload (a GPU's canonical 0x7FFFFFFF included) as the x86 default NaN that C produces there."""
    v = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 4194303.0, 6e9, -6e9, np.inf, -np.inf, 1e-40,
                  65519.0, 65520.0, 6e-8, 3e-8, -0.0], np.float32)
    t = torch.from_numpy(v).to(device)
    assert tk._ni(t).tolist() == [int(nearest_int(a)) for a in v]
    assert tk._fp16(t)[0].tolist() == [int(fp32_to_fp16(a)) for a in v]
    x86_nan = np.array([0xFFC00000], np.uint32).view(np.float32)[0]
    nans = torch.from_numpy(np.array([0x7FFFFFFF, 0xFFC00000, 0x7FC00000], np.uint32).view(np.float32)).to(device)
    assert tk._ni(nans).tolist() == [int(nearest_int(x86_nan))] * 3
    assert tk._fp16(nans)[0].tolist() == [int(fp32_to_fp16(x86_nan))] * 3


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="multiple of 256"):
        QUANTIZERS["Q4_K"](torch.zeros(2, 320), None)
    with pytest.raises(ValueError, match="512 entries"):
        QUANTIZERS["Q6_K"](torch.zeros(2, 512), torch.ones(256))
    with pytest.raises(ValueError, match="whole number"):
        DEQUANTIZERS["Q2_K"](torch.zeros(100, dtype=torch.uint8), 256)
