"""CUDA gives the CPU's results: forward, true KL, and the statistics profiling uses.

Skipped without a CUDA device (CI has none); run on a GPU machine with ``pytest tests/test_cuda.py``.
The models are small random ones written as GGUF, so the demo file is not needed there.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dynsearch.objectives.forward import BlockwiseForward
from dynsearch.objectives.io.gguf_source import GGUFSource
from dynsearch.bench.synthetic import Shape, write_synthetic_model
from dynsearch.objectives.evaluate import KLEvaluator, QuantizedWeights
from dynsearch.search.run.pipeline import collect_statistics
from dynsearch.search.profile import profile_tensor

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

SHAPE = Shape(n_layer=3, n_embd=256, n_ff=512, n_head=4, n_head_kv=2, n_vocab=3000, tied=False)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_synthetic_model(tmp_path_factory.mktemp("cuda") / "m.gguf", SHAPE, seed=3)


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, SHAPE.n_vocab, (4, 256))


def _logprobs(fwd, tokens):
    return torch.cat([lp.double().cpu() for _, lp in fwd.logits(tokens, log_probs=True)])


def test_forward_cuda_equals_cpu(model, tokens):
    src = GGUFSource(model)
    cpu = _logprobs(BlockwiseForward(src, "cpu", batch_size=2), tokens)
    gpu = _logprobs(BlockwiseForward(src, "cuda", batch_size=2), tokens)
    kl = float((cpu.exp() * (cpu - gpu)).sum(-1).mean())
    assert kl < 1e-6, kl


def test_true_kl_cuda_equals_cpu(model, tokens):
    src = GGUFSource(model)
    assign = {n: ("Q4_0" if "ffn" in n else "Q8_0") for n in src.names() if len(src.shape(n)) == 2}
    kl = {d: KLEvaluator(BlockwiseForward(src, d, batch_size=2), tokens).mean_kl(QuantizedWeights(src, assign))
          for d in ("cpu", "cuda")}
    assert kl["cpu"] > 1e-4  # a real difference is measured
    assert abs(kl["cuda"] - kl["cpu"]) <= 1e-3 * kl["cpu"], kl


def test_statistics_and_profile_cuda_equal_cpu(model, tokens):
    src = GGUFSource(model)
    stats = {d: collect_statistics(BlockwiseForward(src, d, batch_size=2), tokens, tokens[:2], 0, False)
             for d in ("cpu", "cuda")}
    for name in ("blk.0.attn_q.weight", "blk.2.ffn_down.weight", "output.weight"):
        c, g = stats["cpu"][name], stats["cuda"][name]
        assert g.xtx.device.type == "cpu"  # statistics come back to the host for profiling
        np.testing.assert_allclose(g.xtx.numpy(), c.xtx.numpy(), rtol=1e-4, atol=1e-6 * float(c.xtx.abs().max()))
        # Fisher: labels are sampled from the model's own distribution with the same generator;
        # float differences may flip a rare sample, so compare in aggregate
        rel = np.abs(g.fisher_out - c.fisher_out).mean() / np.abs(c.fisher_out).mean()
        assert rel < 2e-2, (name, rel)
        w = src.load(name)
        _, _, err_c = profile_tensor(w, ["Q4_0", "Q8_0"], c)
        _, _, err_g = profile_tensor(w, ["Q4_0", "Q8_0"], g)
        np.testing.assert_allclose(err_g, err_c, rtol=3e-2)
