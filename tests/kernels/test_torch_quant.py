"""The torch quantizers give the numba kernels' blocks bit for bit (which are ggml's), with and
without an importance vector, on every nasty input kind and on extreme values; the torch
dequantizers give the numba ones' floats bit for bit. Run on the CPU here, and on CUDA where
present.

Every type of :func:`torch_quantizable` is bit-identical, so every comparison here is exact. That
includes the *_impl paths of Q4_0 / Q4_1 / Q5_0 / Q5_1, whose weights use ``sigma2 = sum(x**2) /
n_per_row`` over the whole row: the torch code accumulates it sequentially in float32 as ggml does.
A type added later that cannot be bit-identical goes into ``torch_quant.NOT_BIT_IDENTICAL`` with
the reason; its blocks are then held to the profile's error within 1e-6 relative instead
(:func:`_assert_same_blocks`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import DATA_KINDS, make_imatrix, make_rows

from dynsearch.kernels import dequantize, quantize, type_info
from dynsearch.kernels import torch_quant as tq
from dynsearch.kernels.torch_quant import dequantize_rows, quantize_rows, torch_quantizable
from dynsearch.objectives.stats.store import TensorStats
from dynsearch.search.profile import quant_error

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]
TYPES = torch_quantizable()
N_PER_ROW = 512  # two IQ4_XS super-blocks, 16 blocks of 32

NOT_BIT_IDENTICAL = tq.NOT_BIT_IDENTICAL  # type -> why its blocks may differ (none so far)


def _run(x: np.ndarray, qtype: str, imp: np.ndarray | None, device: str) -> np.ndarray:
    t_imp = None if imp is None else torch.from_numpy(imp).to(device)
    got = quantize_rows(torch.from_numpy(x).to(device), qtype, t_imp)
    assert got.device.type == torch.device(device).type and got.dtype == torch.uint8
    return got.cpu().numpy()


def _assert_same_blocks(got: np.ndarray, want: np.ndarray, x: np.ndarray, qtype: str) -> None:
    assert got.shape == want.shape
    if qtype not in NOT_BIT_IDENTICAL:
        np.testing.assert_array_equal(got, want)
        return
    n = x.shape[1]
    rng = np.random.default_rng(0)
    inputs = rng.standard_normal((64, n))
    stats = TensorStats(xtx=torch.from_numpy(inputs.T @ inputs / 64), fisher_out=rng.random(x.shape[0]))
    e_got = quant_error(x, dequantize(got, qtype, n), stats)
    e_want = quant_error(x, dequantize(want, qtype, n), stats)
    assert e_got == pytest.approx(e_want, rel=1e-6, abs=1e-30), NOT_BIT_IDENTICAL[qtype]


def _with_ties(x: np.ndarray) -> np.ndarray:
    """Rows 0 and 1 start with blocks of exact ties: scale 1 (Q8_0: max 127; Q4_0 / Q5_0: max -8 /
    -16), levels at k + 1/2, and a block whose largest magnitude occurs with both signs."""
    x = x.copy()
    halves = np.arange(-15, 16, dtype=np.float32) + np.float32(0.5)
    x[0, :32] = np.concatenate(([127.0], halves))
    x[0, 32:64] = np.concatenate(([-16.0], halves / 2))
    x[1, :32] = np.concatenate(([-8.0], np.clip(halves, -8, 7)))
    x[1, 32:64] = np.tile(np.float32([3.0, -3.0, 1.5, -1.5]), 8)
    return x


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_imatrix", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("kind", DATA_KINDS)
@pytest.mark.parametrize("qtype", TYPES)
def test_blocks_equal_the_kernels(qtype, kind, with_imatrix, device):
    x = _with_ties(make_rows(kind, 7, N_PER_ROW, seed=11))
    imp = make_imatrix(N_PER_ROW, 3) if with_imatrix else None
    _assert_same_blocks(_run(x, qtype, imp, device), quantize(x, qtype, imp), x, qtype)


def _extreme_rows() -> np.ndarray:
    rng = np.random.default_rng(7)
    x = rng.standard_normal((10, N_PER_ROW)).astype(np.float32)
    x[0] = -0.0  # all negative zeros: the scales' signs of zero are C's
    x[1, ::2], x[1, 1::2] = -0.0, 0.0
    x[2] = np.float32(3e38) * np.sign(x[2])  # near FLT_MAX: x*x and the sums overflow
    x[3] *= np.float32(1e30)
    x[4] = np.float32(1e-45) * np.sign(x[4])  # the smallest subnormals: 1/d overflows
    x[5, :256], x[5, 256:] = 7.0, -3.25  # constant blocks
    x[6] = 0.0
    x[6, 5::32] = 1.0  # one non-zero per block
    x[7] = np.round(x[7] * 4) / 4  # many exact ties
    x[8, :32], x[8, 3], x[8, 32:64], x[8, 40] = -0.0, 0.0, 0.0, -0.0
    x[9] *= np.float32(65504.0)  # fp16 scales at and past their overflow
    return x.astype(np.float32)


def _extreme_importance(kind: str) -> np.ndarray | None:
    if kind == "none":
        return None
    imp = np.random.default_rng(1).lognormal(0, 1.5, N_PER_ROW).astype(np.float32)
    if kind == "zeros":  # zero weights: whole blocks and every third column
        imp[::3] = 0.0
        imp[:32] = 0.0
    elif kind == "huge":
        imp *= np.float32(1e30)
    return imp


@pytest.mark.parametrize("imatrix", ["none", "random", "zeros", "huge"])
@pytest.mark.parametrize("qtype", TYPES)
def test_extreme_values_equal_the_kernels(qtype, imatrix):
    """Signed zeros, overflowing squares and scales, subnormals, constant blocks, zero weights."""
    x, imp = _extreme_rows(), _extreme_importance(imatrix)
    _assert_same_blocks(_run(x, qtype, imp, "cpu"), quantize(x, qtype, imp), x, qtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", TYPES)
def test_dequantized_blocks_equal_the_kernels(qtype, device):
    """Real blocks, and random bytes (any scale, NaN and inf included): the same float32 bits."""
    x = make_rows("heavy", 6, N_PER_ROW, seed=2)
    info = type_info(qtype)
    n_bytes = N_PER_ROW // info.block_size * info.type_size
    junk = np.random.default_rng(4).integers(0, 256, (5, n_bytes), dtype=np.uint8)
    for blocks in (quantize(x, qtype), quantize(x, qtype, make_imatrix(N_PER_ROW, 1)), junk):
        got = dequantize_rows(torch.from_numpy(blocks).to(device), qtype, N_PER_ROW)
        assert got.dtype == torch.float32 and got.device.type == torch.device(device).type
        got, want = got.cpu().numpy(), dequantize(blocks, qtype, N_PER_ROW)
        nan = np.isnan(want)  # a NaN's payload is the hardware's (CUDA writes the canonical NaN)
        np.testing.assert_array_equal(np.isnan(got), nan)
        np.testing.assert_array_equal(got.view(np.uint32)[~nan], want.view(np.uint32)[~nan])


@pytest.mark.parametrize("qtype", TYPES)
def test_chunked_blocks_equal_one_chunk(qtype, monkeypatch):
    """Blocks processed a few at a time (a large tensor's chunks) are the same blocks."""
    x = make_rows("normal", 5, N_PER_ROW, seed=9)
    imp = make_imatrix(N_PER_ROW, 9)
    whole = [_run(x, qtype, i, "cpu") for i in (None, imp)]
    monkeypatch.setitem(tq.CHUNK_FLOATS, "cpu", 4000)
    np.testing.assert_array_equal(_run(x, qtype, None, "cpu"), whole[0])
    np.testing.assert_array_equal(_run(x, qtype, imp, "cpu"), whole[1])


def test_q8_0_ignores_importance():
    """ggml's Q8_0 ignores importance weights: the torch blocks are the same with or without."""
    x = make_rows("heavy", 5, N_PER_ROW, seed=3)
    imp = make_imatrix(N_PER_ROW, 3)
    np.testing.assert_array_equal(_run(x, "Q8_0", imp, "cpu"), quantize(x, "Q8_0", imp))
    np.testing.assert_array_equal(_run(x, "Q8_0", imp, "cpu"), _run(x, "Q8_0", None, "cpu"))


def test_round_trip_and_empty_rows():
    x = make_rows("normal", 4, 256, seed=5)
    for t in TYPES:
        dq = dequantize_rows(quantize_rows(torch.from_numpy(x), t), t, 256).numpy()
        assert np.abs(dq - x).max() < (0.35 if t == "Q2_K" else 0.2) * np.abs(x).max(), t  # Q2_K: 2 bits
        empty = quantize_rows(torch.zeros(0, 256), t)
        assert empty.shape == (0, 256 // type_info(t).block_size * type_info(t).type_size)
        assert dequantize_rows(empty, t, 256).shape == (0, 256)


def test_registry_is_a_plain_dict_others_can_extend(monkeypatch):
    """Another module's row functions join by updating QUANTIZERS and DEQUANTIZERS."""
    def fake_q(rows, importance):
        return torch.full((rows.shape[0], rows.shape[1] // 32 * 18), 7, dtype=torch.uint8)

    def fake_dq(blocks, n_per_row):
        return torch.zeros(blocks.shape[0], n_per_row)

    monkeypatch.setitem(tq.QUANTIZERS, "TQ2_0", fake_q)
    assert "TQ2_0" not in torch_quantizable()  # a type needs both
    monkeypatch.setitem(tq.DEQUANTIZERS, "TQ2_0", fake_dq)
    assert "TQ2_0" in torch_quantizable()


def test_unsupported_type_and_bad_inputs_are_refused():
    with pytest.raises(NotImplementedError, match="MXFP4"):
        quantize_rows(torch.zeros(1, 256), "MXFP4")
    with pytest.raises(NotImplementedError, match="MXFP4"):
        dequantize_rows(torch.zeros(1, 136, dtype=torch.uint8), "MXFP4", 256)
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_rows(torch.zeros(2, 48), "Q8_0")
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize_rows(torch.zeros(2, 96), "IQ4_XS")
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_rows(torch.tensor([[float("nan")] * 32]), "Q4_0")
    with pytest.raises(ValueError, match="32 entries"):
        quantize_rows(torch.zeros(2, 32), "Q4_0", torch.ones(64))
    with pytest.raises(ValueError, match="negative"):
        quantize_rows(torch.zeros(2, 32), "Q4_0", -torch.ones(32))
    with pytest.raises(ValueError, match="uint8"):
        dequantize_rows(torch.zeros(2, 17, dtype=torch.uint8), "Q4_0", 32)
