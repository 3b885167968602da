"""Devices: every tensor of a pass on the run's device, and CUDA giving the CPU's results (forward,
true KL, the statistics and the error term profiling uses, ``dynsearch run --device cuda``).

The 'meta' tests run everywhere: torch's meta device holds shapes without data and refuses a CPU
tensor mixed into an operation, as CUDA does, so a host/device mix-up in the block math fails here
without a GPU. The CUDA tests are skipped without a CUDA device (CI has none); run them on a GPU
machine with ``pytest tests/objectives/test_cuda.py``. The models are small random ones written
as GGUF (the end-to-end run borrows the demo model's tokenizer).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dynsearch.bench.synthetic import Shape, write_synthetic_model
from dynsearch.cli import main
from dynsearch.objectives.evaluate import KLEvaluator, QuantizedWeights
from dynsearch.objectives.forward import BlockwiseForward, to_device
from dynsearch.objectives.io.gguf_source import GGUFSource
from dynsearch.objectives.stats.collect import collect_statistics
from dynsearch.objectives.stats.store import TensorStats
from dynsearch.search.profile import profile_tensor, quant_error

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

SHAPE = Shape(n_layer=3, n_embd=256, n_ff=512, n_head=4, n_head_kv=2, n_vocab=3000, tied=False)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_synthetic_model(tmp_path_factory.mktemp("cuda") / "m.gguf", SHAPE, seed=3)


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, SHAPE.n_vocab, (4, 256))


def _logprobs(fwd, tokens):
    return torch.cat([lp.double().cpu() for _, lp in fwd.logits(tokens, log_probs=True)])


@cuda
def test_forward_cuda_equals_cpu(model, tokens):
    src = GGUFSource(model)
    cpu = _logprobs(BlockwiseForward(src, "cpu", batch_size=2), tokens)
    gpu = _logprobs(BlockwiseForward(src, "cuda", batch_size=2), tokens)
    kl = float((cpu.exp() * (cpu - gpu)).sum(-1).mean())
    assert kl < 1e-6, kl


@cuda
def test_true_kl_cuda_equals_cpu(model, tokens):
    src = GGUFSource(model)
    assign = {n: ("Q4_0" if "ffn" in n else "Q8_0") for n in src.names() if len(src.shape(n)) == 2}
    kl = {d: KLEvaluator(BlockwiseForward(src, d, batch_size=2), tokens).mean_kl(QuantizedWeights(src, assign))
          for d in ("cpu", "cuda")}
    assert kl["cpu"] > 1e-4  # a real difference is measured
    assert abs(kl["cuda"] - kl["cpu"]) <= 1e-3 * kl["cpu"], kl


@cuda
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


def test_blocks_and_head_run_on_the_run_device(model):
    """Weights (the model's and numpy overrides), hidden states and logits all on 'meta'; a CPU
    tensor handed to the block math is refused, as CUDA refuses it."""
    src = GGUFSource(model)
    fwd = BlockwiseForward(src, "meta", batch_size=2)
    name = "blk.1.ffn_up.weight"
    h = to_device(torch.randn(3, 16, SHAPE.n_embd), fwd.device)
    for il in range(SHAPE.n_layer):
        fwd.run_block(il, h, overrides={name: np.zeros(src.shape(name), np.float32)})
    assert h.device.type == "meta"
    logits = [lp for _, lp in fwd.head_rows(h.reshape(-1, SHAPE.n_embd), log_probs=True)]
    assert {lp.device.type for lp in logits} == {"meta"} and sum(len(lp) for lp in logits) == 3 * 16
    with pytest.raises(RuntimeError, match="device"):
        fwd.run_block(0, torch.randn(1, 16, SHAPE.n_embd))


@cuda
def test_error_term_cuda_equals_cpu():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((96, 256)).astype(np.float32)
    dq = w + 0.01 * rng.standard_normal(w.shape).astype(np.float32)
    x = rng.standard_normal((512, 256))
    st = TensorStats(xtx=torch.from_numpy(x.T @ x / 512).float(), fisher_out=rng.random(96))
    cpu, gpu = quant_error(w, dq, st), quant_error(w, dq, st, "cuda")
    assert cpu > 0 and gpu == pytest.approx(cpu, rel=1e-9)  # float64 on both


@cuda
def test_run_on_cuda_end_to_end(tmp_path, demo_model, capsys):
    """``dynsearch run --device cuda``, the estimate included (it crashed there first), writes a
    recipe and a GGUF whose held-out KL is close to the same run's on the CPU."""
    src = write_synthetic_model(tmp_path / "tiny.gguf", Shape(n_layer=2, n_embd=256, n_ff=512, n_head=4,
                                                               n_head_kv=2, n_vocab=49152, tied=True),
                                seed=5, tokenizer_from=demo_model)
    args = ["run", str(src), "--budget", "6bpw", "--types", "Q4_0,Q8_0", "--trials", "2",
            "--calib-tokens", "1024", "--fisher-tokens", "512", "--search-tokens", "512",
            "--eval-tokens", "512", "--quiet"]
    assert main([*args, "--device", "cuda", "--estimate"]) == 0
    assert "estimate (" in capsys.readouterr().out
    for device in ("cpu", "cuda"):
        assert main([*args, "--device", device, "--out", str(tmp_path / device)]) == 0
        out = capsys.readouterr().out
        assert "time: statistics" in out
    ggufs = {d: [p for p in (tmp_path / d).rglob("*.gguf") if p.name != "imatrix.gguf"] for d in ("cpu", "cuda")}
    assert len(ggufs["cuda"]) == 1 and len(ggufs["cpu"]) == 1
    assert list((tmp_path / "cuda").rglob("recipe*.yaml"))
