"""bench scale: the real shapes, the full-depth estimate from K layers, the padded tokenizer, and
the whole rehearsal at a tiny size on the CPU."""

from __future__ import annotations

import argparse

import pytest

from dynsearch.bench import scale
from dynsearch.bench.synthetic import Shape, write_synthetic_model
from dynsearch.errors import DynsearchError
from dynsearch.objectives.io.gguf_source import GGUFSource
from dynsearch.objectives.tokenizer import Tokenizer
from dynsearch.search.run.config import RunConfig
from dynsearch.search.run.cost import BlockPace, Throughput, estimate


def test_real_shapes_have_the_published_sizes():
    # Llama-3.1-8B: 8.03B parameters (its model card)
    assert scale.SHAPES["llama3-8b"].n_params() == pytest.approx(8.03e9, rel=2e-3)
    # Llama-4-Scout's text model (the published 109B include the vision encoder), by hand: per
    # layer attention 2 d^2 + 2 d kv, 16 routed experts and a shared one of 3 d fe each, the
    # router 16 d, two norms; the embedding and the output head
    d, kv, fe = 5120, 8 * 128, 8192
    layer = 2 * d * d + 2 * d * kv + 17 * 3 * d * fe + 16 * d + 2 * d
    assert scale.SHAPES["llama4-scout"].n_params() == 48 * layer + 2 * 202048 * d + d
    small = scale.bench_shape("llama4-scout", layers=2, shrink=8, vocab=50_000)
    assert (small.n_layer, small.n_embd, small.n_head, small.n_head_kv, small.n_ff_exp, small.n_expert,
            small.head_dim, small.n_vocab) == (2, 640, 5, 1, 1024, 16, 128, 50_000)
    with pytest.raises(DynsearchError, match="--shrink 16"):
        scale.bench_shape("llama3-8b", shrink=16)  # 8 kv heads
    with pytest.raises(DynsearchError, match="--layers 33"):
        scale.bench_shape("llama3-8b", layers=33)


@pytest.mark.parametrize("arch", ["llama", "llama4"])
def test_full_depth_estimate_equals_the_deeper_model(tmp_path, arch):
    """The estimate of K layers' shapes repeated is the estimate of the model with every layer."""
    moe = dict(arch="llama4", n_expert=4, n_expert_used=1, n_ff_exp=128) if arch == "llama4" else {}
    shape = Shape(n_layer=2, n_embd=128, n_ff=256, n_head=2, n_head_kv=1, n_vocab=300, tied=False, **moe)
    two = GGUFSource(write_synthetic_model(tmp_path / "2.gguf", shape))
    five = GGUFSource(write_synthetic_model(tmp_path / "5.gguf", Shape(**{**shape.__dict__, "n_layer": 5})))
    cfg = RunConfig.parse("x", ["5bpw"], ["Q4_0", "Q8_0", "Q6_K"], workers=1)
    deep = scale.Deeper(two, 5)
    assert sorted(deep.names()) == sorted(five.names())
    assert all(deep.shape(n) == five.shape(n) for n in five.names())
    tp = Throughput({(t, n): 1e-8 for t in ("Q4_0", "Q8_0", "Q6_K") for n in (128, 256)}, 1e10)
    got, want = estimate(deep, cfg, tp, BlockPace(2.0, 3.0)), estimate(five, cfg, tp, BlockPace(2.0, 3.0))
    assert got == want and got.n_params > estimate(two, cfg, tp, BlockPace(2.0, 3.0)).n_params


def test_padded_tokenizer_tokenizes_as_the_demo(tmp_path, demo_model):
    padded = scale.padded_tokenizer(tmp_path / "tok.gguf", demo_model, 50_000)
    text = "The quick brown fox jumps over the lazy dog; x = f(y) + 1."
    a, b = Tokenizer.from_gguf(demo_model), Tokenizer.from_gguf(padded)
    assert b.encode(text) == a.encode(text)
    assert len(scale.GGUFHeader(padded).get("tokenizer.ggml.tokens")) == 50_000
    with pytest.raises(DynsearchError, match="--vocab 1000"):
        scale.padded_tokenizer(tmp_path / "small.gguf", demo_model, 1000)


@pytest.mark.slow
def test_rehearsal_runs_on_cpu_at_a_tiny_size(tmp_path, demo_model, capsys):
    """The whole command: one layer of Llama-3.1-8B's layout at an eighth of its width, the demo's
    vocabulary size padded by 64 tokens, 512 tokens per phase, one trial (about 2-4 minutes on 2 cores)."""
    ap = argparse.ArgumentParser()
    scale.add_arguments(ap)
    args = ap.parse_args(["--shape", "llama3-8b", "--layers", "1", "--shrink", "8", "--vocab", "49216",
                          "--tokens", "512", "--trials", "1", "--types", "Q4_0,Q8_0", "--workdir", str(tmp_path)])
    assert scale.main(args) == 0
    out = capsys.readouterr().out
    for phase in ("statistics", "profiling", "search", "GGUF", "total"):
        assert any(line.startswith(phase) and len(line.split()) >= 5 for line in out.splitlines()), phase
    assert "peak RSS" in out and "full depth estimate (32 layers" in out
    assert len([p for p in (tmp_path / "runs").rglob("*.gguf") if p.name != "imatrix.gguf"]) == 1
