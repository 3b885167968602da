"""The profile with the torch quantizers (kernels/torch_quant.py) equals the profile with the numba
kernels: the same written types and sizes, and the same errors, bit for bit for every type whose
torch blocks are bit-identical (all of them so far) and within 1e-6 relative for a type in
``torch_quant.NOT_BIT_IDENTICAL`` (the reason is recorded there). The torch path is forced on the
CPU here (``quantizer="torch"``); on CUDA, where present, ``auto`` takes it on the GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dynsearch.kernels import torch_quant as tq
from dynsearch.objectives.stats.store import TensorStats
from dynsearch.search import profile as profile_mod
from dynsearch.search.profile import profile_tensor

# every torch type, two the torch path lacks (numba then), and one written as its fallback below
TYPES = [*tq.torch_quantizable(), "IQ3_S", "F16"]  # IQ3_S, F16: no torch quantizer (numba)


def _stats(kind: str, n_rows: int, n_cols: int, seed: int, n_mat: int = 1) -> TensorStats:
    rng = np.random.default_rng(seed)
    imp = (rng.lognormal(0.0, 1.5, n_mat * n_cols)).astype(np.float32)
    if kind == "linear":  # a matrix with calibration statistics (as objectives/stats collects them)
        x = rng.standard_normal((200, n_cols))
        return TensorStats(xtx=torch.from_numpy(x.T @ x / 200).float(), fisher_out=rng.random(n_rows),
                           importance=imp)
    if kind == "lookup":  # an embedding: rows by frequency, columns by the Fisher they feed
        return TensorStats(row_weight=rng.dirichlet(np.ones(n_rows)), fisher_col=rng.random(n_cols),
                           importance=imp)
    if kind == "moe":  # an expert stack: per-expert diagonal second moments and importance vectors
        return TensorStats(xdiag=rng.random((n_mat, n_cols)), fisher_out=rng.random((n_mat, n_rows // n_mat)),
                           importance=imp)
    if kind == "plain":  # nothing measured, no imatrix: the weight MSE
        return TensorStats()
    raise ValueError(kind)


def _assert_same_rows(got, want):
    assert got[0] == want[0]  # written types (fallbacks included)
    np.testing.assert_array_equal(got[1], want[1])  # sizes
    for t, e_got, e_want in zip(got[0], got[2], want[2]):
        if t in tq.NOT_BIT_IDENTICAL:
            assert e_got == pytest.approx(e_want, rel=1e-6), (t, tq.NOT_BIT_IDENTICAL[t])
        else:
            assert e_got == e_want, t  # the same blocks, the same error computation: the same bits


@pytest.mark.parametrize("kind", ["linear", "lookup", "moe", "plain"])
def test_torch_profile_equals_numba_profile(kind):
    rng = np.random.default_rng(3)
    n_mat = 3 if kind == "moe" else 1
    w = (rng.standard_t(3.0, (n_mat, 12, 512)) * 0.05).astype(np.float32)
    w[0, 0, :64] = 0.0  # a zero row start: zero blocks
    if n_mat == 1:
        w = w[0]
    stats = _stats(kind, 12 * n_mat, 512, seed=4, n_mat=n_mat)
    want = profile_tensor(w, TYPES, stats, "cpu", quantizer="numba")
    got = profile_tensor(w, TYPES, stats, "cpu", quantizer="torch")
    assert all(np.isfinite(want[2])) and min(want[2]) > 0
    _assert_same_rows(got, want)


def test_torch_profile_with_fallback_types():
    """Rows of 96 fit no 256-block: IQ4_XS is written as IQ4_NL, Q4_K as Q5_0, Q6_K as Q8_0."""
    w = np.random.default_rng(5).standard_normal((16, 96)).astype(np.float32)
    stats = _stats("linear", 16, 96, seed=6)
    want = profile_tensor(w, ["IQ4_XS", "Q4_K", "Q6_K", "Q4_1"], stats, "cpu", quantizer="numba")
    got = profile_tensor(w, ["IQ4_XS", "Q4_K", "Q6_K", "Q4_1"], stats, "cpu", quantizer="torch")
    assert got[0] == ["IQ4_NL", "Q5_0", "Q8_0", "Q4_1"]
    _assert_same_rows(got, want)


def test_auto_takes_numba_on_the_cpu_and_torch_when_forced(monkeypatch):
    calls = []
    real = profile_mod.quantize_rows
    monkeypatch.setattr(profile_mod, "quantize_rows", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    w = np.random.default_rng(7).standard_normal((4, 64)).astype(np.float32)
    profile_tensor(w, ["Q4_0", "Q8_0"], TensorStats(), "cpu")
    assert calls == []
    profile_tensor(w, ["Q4_0", "Q8_0", "Q4_K"], TensorStats(), "cpu", quantizer="torch")
    assert calls == ["Q4_0", "Q8_0", "Q5_0"]  # Q4_K's rows of 64 are written as Q5_0
    with pytest.raises(ValueError, match="quantizer"):
        profile_tensor(w, ["Q4_0"], TensorStats(), "cpu", quantizer="gpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_profile_equals_numba_profile():
    """On a GPU ``auto`` quantizes there; the error term's product runs there either way."""
    rng = np.random.default_rng(8)
    w = (rng.standard_t(3.0, (24, 512)) * 0.05).astype(np.float32)
    stats = _stats("linear", 24, 512, seed=9)
    _assert_same_rows(profile_tensor(w, TYPES, stats, "cuda"),
                      profile_tensor(w, TYPES, stats, "cuda", quantizer="numba"))
