"""MoE in the search: per-expert statistics, never-routed experts, routers kept, a run end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dynsearch.bench.synthetic import Shape, write_synthetic_model
from dynsearch.kernels import dequantize, quantize, quantize_tensor
from dynsearch.objectives.forward import BlockwiseForward
from dynsearch.objectives.io.gguf_source import GGUFSource
from dynsearch.objectives.stats import moe
from dynsearch.objectives.stats.capture import ActivationStats, CaptureConfig
from dynsearch.objectives.stats.store import TensorStats
from dynsearch.search.profile import profile_tensor, tensor_error

TINY = Shape(n_layer=2, n_embd=64, n_ff=128, n_head=4, n_head_kv=2, n_vocab=49152, tied=True,
             arch="qwen3moe", n_expert=4, n_expert_used=2, n_ff_exp=64, dead_experts=(3,))


def test_expert_second_moment_and_dead_experts():
    rng = np.random.default_rng(0)
    s = rng.random((4, 8)) * 10
    counts = np.array([5, 0, 3, 2])
    h = moe.expert_second_moment(s, counts, n_tokens=5.0)
    assert np.allclose(h[[0, 2, 3]], s[[0, 2, 3]] / 5.0)
    live_mean = (s[[0, 2, 3]] / counts[[0, 2, 3], None]).mean(0)
    assert np.allclose(h[1], live_mean * moe.DEAD_EXPERT_TOKENS / 5.0) and (h[1] > 0).all()
    f = moe.fill_dead_experts(np.array([[1.0, 2.0], [0.0, 0.0], [3.0, 4.0]]), np.array([1, 0, 7]))
    assert f.tolist() == [[1.0, 2.0], [2.0, 3.0], [3.0, 4.0]]
    assert moe.is_expert_stack("blk.3.ffn_down_exps.weight") and not moe.is_expert_stack("blk.3.ffn_down.weight")
    assert moe.is_router("blk.0.ffn_gate_inp.weight") and not moe.is_router("blk.0.ffn_gate.weight")


def test_expert_error_equals_brute_force_over_routed_tokens():
    """With inputs whose per-expert second moment is diagonal (one-hot tokens), the proxy equals
    1/2 sum over tokens, over the experts they were routed to, of sum_o f_eo (dW_e x_t)_o^2 / N."""
    rng = np.random.default_rng(1)
    E, rows, cols, N = 3, 4, 32, 40
    w = rng.standard_normal((E, rows, cols)).astype(np.float32)
    ids = rng.integers(0, E - 1, N)  # expert E-1 never routed
    x = np.zeros((N, cols))
    x[np.arange(N), rng.integers(0, cols, N)] = rng.standard_normal(N) * 3
    stats = ActivationStats(CaptureConfig())
    stats.experts("blk.0.ffn_up_exps.weight", torch.from_numpy(x), torch.from_numpy(ids)[:, None], E)
    entry = stats.imatrix(["t"], N).entries["blk.0.ffn_up_exps.weight"]
    fisher = rng.random((E, rows))
    st = TensorStats(xdiag=moe.expert_second_moment(entry.in_sum2, entry.counts, N), fisher_out=fisher)
    dq = dequantize(quantize(w.reshape(-1, cols), "Q4_0"), "Q4_0", cols).reshape(E, rows, cols)
    brute = 0.0
    for t in range(N):
        dy = (dq[ids[t]] - w[ids[t]]).astype(np.float64) @ x[t]
        brute += 0.5 * float((fisher[ids[t]] * dy ** 2).sum()) / N
    live_err = tensor_error(w.reshape(-1, cols), dq.reshape(-1, cols),
                           TensorStats(xdiag=st.xdiag * np.array([1, 1, 0])[:, None], fisher_out=fisher))
    assert live_err == pytest.approx(brute, rel=1e-5)
    assert tensor_error(w.reshape(-1, cols), dq.reshape(-1, cols), st) > live_err  # the dead expert counts too


def test_stack_quantized_per_expert_with_its_own_importance():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((3, 4, 64)).astype(np.float32)
    imp = rng.random((3, 64)).astype(np.float32) + 0.1
    got = quantize_tensor(w, "IQ4_NL", imp.reshape(-1))
    want = np.concatenate([quantize(w[e], "IQ4_NL", imp[e]) for e in range(3)])
    assert np.array_equal(got, want)
    assert not np.array_equal(got, quantize(w.reshape(-1, 64), "IQ4_NL", imp[0]))
    with pytest.raises(ValueError, match="does not fit"):
        quantize_tensor(w, "IQ4_NL", np.ones(2 * 64 + 1, np.float32))
    written, sizes, errors = profile_tensor(w, ["Q4_0", "Q8_0"], TensorStats(importance=imp.reshape(-1)))
    assert written == ["Q4_0", "Q8_0"] and errors[0] > errors[1] > 0


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory, demo_model):
    return write_synthetic_model(tmp_path_factory.mktemp("m") / "tiny-qwen3moe.gguf", TINY, seed=3,
                                 tokenizer_from=demo_model)


def test_fisher_pass_gives_per_expert_output_fisher(tiny_moe):
    from dynsearch.objectives.stats.fisher import fisher_pass

    fwd = BlockwiseForward(GGUFSource(tiny_moe), batch_size=2)
    toks = np.random.default_rng(0).integers(0, 49152, (2, 64))
    sens = fisher_pass(fwd, toks, seed=0)
    f = sens.fisher_out["blk.1.ffn_down_exps.weight"]
    assert f.shape == (TINY.n_expert, TINY.n_embd) and np.isfinite(f).all()
    assert (f[3] > 0).any()  # the never-routed expert: the live experts' mean, not zero
    assert np.allclose(f[3], f[:3].mean(0))
    assert sens.fisher_out["blk.0.ffn_gate_exps.weight"].shape == (TINY.n_expert, TINY.n_ff_exp)


@pytest.mark.slow
def test_run_on_tiny_qwen3moe(tiny_moe, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    from dynsearch.recipes import schema
    from dynsearch.search.run.config import RunConfig
    from dynsearch.search.run.pipeline import run
    from dynsearch.search.run.prepare import RunModel

    cfg = RunConfig.parse(str(tiny_moe), ["5.5bpw"], calib_tokens=2048, fisher_tokens=512,
                          search_tokens=256, eval_tokens=512, seq_len=256, trials=2, out=str(tmp_path / "runs"))
    res = run(cfg, RunModel.open(cfg.model), progress=False)
    (rpath,), (gpath,) = res.recipe_paths, res.gguf_paths
    recipe = schema.load(rpath)
    for il in range(TINY.n_layer):
        assert recipe.tensors[f"blk.{il}.ffn_gate_inp.weight"] == "F32"  # routers kept as stored
        for k in ("gate", "up", "down"):
            assert recipe.tensors[f"blk.{il}.ffn_{k}_exps.weight"] not in ("F32", "F16")  # searched
    report = json.loads(res.report_path.read_text())
    routing = report[0]["moe_routing"]
    assert sorted(routing) == ["blk.0", "blk.1"]
    for layer in routing.values():
        assert 3 in layer["never_routed"]
        assert sum(layer["tokens_per_expert"]) == 2048 * TINY.n_expert_used
    # the bpw budget is on the searched tensors (routers and norms are fixed F32)
    from dynsearch.kernels import tensor_nbytes
    src = GGUFSource(tiny_moe)
    searched = [n for n, t in recipe.tensors.items() if len(src.shape(n)) >= 2 and not moe.is_router(n)]
    bits = 8 * sum(tensor_nbytes(src.shape(n), recipe.tensors[n]) for n in searched)
    assert bits / sum(int(np.prod(src.shape(n))) for n in searched) <= 5.5

    llm = llama_cpp.Llama(model_path=str(gpath), logits_all=True, n_ctx=128, n_batch=128, n_threads=2,
                          verbose=False)
    toks = np.random.default_rng(0).integers(0, 49152, 128).tolist()
    llm.eval(toks)
    logits = np.array(llm.scores[:128])
    assert np.isfinite(logits).all() and logits.std() > 0
