"""Profiling math against a brute-force computation, sizes with llama.cpp's fallback, the cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dynsearch import kernels as K
from dynsearch.objectives.stats.store import TensorStats
from dynsearch.search.profile import ProfileCache, profile_tensor, quant_error


def test_quant_error_matches_brute_force():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 64)).astype(np.float32)
    dq = w + rng.standard_normal(w.shape).astype(np.float32) * 0.01
    x = rng.standard_normal((500, 64))  # calibration inputs
    f = rng.uniform(0.1, 2.0, 6)  # output Fisher
    stats = TensorStats(xtx=torch.from_numpy(x.T @ x / len(x)), fisher_out=f)
    dy = x @ (dq - w).astype(np.float64).T  # (tokens, out) output perturbation
    brute = 0.5 * float((f * (dy**2).mean(0)).sum())
    assert quant_error(w, dq, stats) == pytest.approx(brute, rel=1e-4)
    # lookup part: rows weighted by frequency, columns by the Fisher of what they feed
    rw, fc = rng.dirichlet(np.ones(6)), rng.uniform(0, 1, 64)
    look = TensorStats(row_weight=rw, fisher_col=fc)
    brute = 0.5 * float(sum(rw[r] * ((dq[r] - w[r]).astype(np.float64) ** 2 * fc).sum() for r in range(6)))
    assert quant_error(w, dq, look) == pytest.approx(brute, rel=1e-6)


def test_profile_applies_fallback_and_orders_errors():
    w = np.random.default_rng(1).standard_normal((8, 576)).astype(np.float32)
    written, sizes, errors = profile_tensor(w, ["Q4_K", "Q6_K", "Q8_0", "Q2_K"], TensorStats())
    assert written == ["Q5_0", "Q8_0", "Q8_0", "Q4_0"]
    assert sizes.tolist() == [K.padded(K.tensor_nbytes(w.shape, t)) for t in written]
    assert errors[1] == errors[2]  # the same written type, measured once
    assert errors[2] < errors[0] < errors[3]


def test_cache_roundtrip_and_corruption(tmp_path):
    cache = ProfileCache(tmp_path, "model", "stats")
    types = ["Q4_0", "Q8_0"]
    assert cache.get("blk.0.attn_q.weight", types) is None
    cache.put("blk.0.attn_q.weight", types, ["Q4_0", "Q8_0"], np.array([64, 128]), np.array([0.5, 0.1]))
    written, sizes, errors = cache.get("blk.0.attn_q.weight", types)
    assert written == ["Q4_0", "Q8_0"] and sizes.tolist() == [64, 128] and errors.tolist() == [0.5, 0.1]
    assert ProfileCache(tmp_path, "other-model", "stats").get("blk.0.attn_q.weight", types) is None
    (entry,) = list(tmp_path.rglob("*.npz"))
    entry.write_bytes(entry.read_bytes()[:50])  # a torn write from some other tool
    assert cache.get("blk.0.attn_q.weight", types) is None  # recomputed, not trusted
    assert not entry.exists()
