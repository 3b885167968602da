"""`dynsearch eval` / compare_files: a file against itself is KL 0 exactly, a Q4_0 copy is not,
the scored positions and statistics equal a direct computation from full logits, mismatched models
are refused before any work, and the padded-bucket scoring equals running each sequence alone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFValueType as VT

from dynsearch.cli import main
from dynsearch.errors import ModelError
from dynsearch.objectives import compare
from dynsearch.objectives.calibration import CalibrationError
from dynsearch.objectives.forward import BlockwiseForward
from dynsearch.objectives.io.gguf_header import GGUFHeader
from dynsearch.objectives.io.gguf_source import GGUFSource
from dynsearch.objectives.io.gguf_write import write_model
from dynsearch.objectives.kl import kl_stats, perplexity_chunks, scored_positions, scored_targets
from dynsearch.objectives.scoring import gather_logprobs
from dynsearch.recipes import schema
from dynsearch.recipes.apply import apply_recipe

D, FF, N_LAYER = 64, 128, 2


def _tiny_tensors(n_vocab: int, seed: int = 0, d: int = D) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    t = {"token_embd.weight": (0.5 * rng.standard_normal((n_vocab, d))).astype(np.float32),
         "output_norm.weight": np.ones(d, np.float32)}
    for il in range(N_LAYER):
        p = f"blk.{il}."
        t[p + "attn_norm.weight"] = (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)
        for n, shape in (("attn_q", (d, d)), ("attn_k", (d // 2, d)), ("attn_v", (d // 2, d)),
                         ("attn_output", (d, d)), ("ffn_gate", (FF, d)), ("ffn_up", (FF, d)),
                         ("ffn_down", (d, FF))):
            t[p + n + ".weight"] = (0.2 * rng.standard_normal(shape)).astype(np.float32)
        t[p + "ffn_norm.weight"] = np.ones(d, np.float32)
    return t


def _write_tiny(path: Path, vocab_from: Path, seed: int = 0, d: int = D, swap_tokens: bool = False) -> Path:
    """A random 2-layer llama with the tokenizer of ``vocab_from`` (the demo model's; its
    vocabulary, optionally with two token strings swapped)."""
    header = GGUFHeader(vocab_from)
    tokens = list(header.get("tokenizer.ggml.tokens"))
    keep = lambda k: k.startswith("tokenizer.") and not (swap_tokens and k == "tokenizer.ggml.tokens")  # noqa: E731
    kv = {"llama.context_length": (512, VT.UINT32), "llama.embedding_length": (d, VT.UINT32),
          "llama.block_count": (N_LAYER, VT.UINT32), "llama.feed_forward_length": (FF, VT.UINT32),
          "llama.attention.head_count": (4, VT.UINT32), "llama.attention.head_count_kv": (2, VT.UINT32),
          "llama.attention.layer_norm_rms_epsilon": (1e-5, VT.FLOAT32), "general.name": ("tiny", VT.STRING)}
    if swap_tokens:
        tokens[100], tokens[101] = tokens[101], tokens[100]
        kv["tokenizer.ggml.tokens"] = ((tokens, VT.STRING), VT.ARRAY)
    return write_model(path, "llama", header, kv, _tiny_tensors(len(tokens), seed, d), keep=keep)


def _all_type_recipe(path: Path, qtype: str) -> schema.Recipe:
    src = GGUFSource(path)
    tensors = {n: ("F32" if len(src.shape(n)) < 2 else qtype) for n in src.names()}
    return schema.Recipe(name=f"all-{qtype}", model=schema.ModelInfo("m", src.config.arch), tensors=tensors)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, demo_model) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("tiny")
    f32 = _write_tiny(d / "tiny-f32.gguf", demo_model)
    q8 = apply_recipe(_all_type_recipe(f32, "Q8_0"), f32, d / "tiny-q8_0.gguf", progress=False)
    q4 = apply_recipe(_all_type_recipe(f32, "Q4_0"), f32, d / "tiny-q4_0.gguf", progress=False)
    return {"f32": f32, "q8": q8, "q4": q4, "dir": d}


# ------------------------------------------------------------------------------ tiny model, exact


def test_stats_equal_direct_computation_from_full_logits(tiny):
    tokens = np.random.default_rng(1).integers(0, 49152, 4 * 64).astype(np.int32)
    (res,) = compare.compare_files([tiny["q4"]], tiny["f32"], tokens, seq_len=64, progress=False)
    chunks = perplexity_chunks(tokens, 64, None)  # the demo vocab adds no BOS
    pos, tgt = scored_positions(64), scored_targets(chunks)
    full = []
    for p in (tiny["f32"], tiny["q4"]):
        fwd = BlockwiseForward(GGUFSource(p))
        full.append(torch.cat([lg for _, lg in fwd.logits(chunks)])[:, pos].reshape(-1, 49152))
    direct = kl_stats(full[0], full[1], torch.as_tensor(tgt.reshape(-1)))
    assert res.kl.n_tokens == 4 * 31 == direct.n_tokens
    for k, v in direct.to_dict().items():
        assert res.kl.to_dict()[k] == pytest.approx(v, rel=1e-6, abs=1e-9), k
    assert res.kl.kld_mean > 0
    assert res.file_bytes == tiny["q4"].stat().st_size
    n = sum(int(np.prod(s)) for s in (a.shape for a in _tiny_tensors(49152).values()))
    n_vec = sum(a.size for a in _tiny_tensors(49152).values() if a.ndim == 1)
    assert res.bpw == pytest.approx((4.5 * (n - n_vec) + 32 * n_vec) / n)  # Q4_0: 18 bytes per 32


def test_self_is_zero_and_q8_closer_than_q4(tiny):
    tokens = np.random.default_rng(2).integers(0, 49152, 2 * 64)
    res = compare.compare_files([tiny["f32"], tiny["q8"], tiny["q4"]], tiny["f32"], tokens, seq_len=64,
                                mc_items=2, progress=False)
    same, q8, q4 = res
    assert same.kl.kld_mean == 0.0 and same.kl.kld_max == 0.0
    assert same.kl.same_top_p == 1.0 and same.kl.ppl_ratio == 1.0 and same.kl.dp_rms == 0.0
    assert same.flips.n_flips == 0 and same.flips.acc_ref == same.flips.acc_cand
    assert 0 < q8.kl.kld_mean < q4.kl.kld_mean
    assert q4.flips.n_questions == 2
    d = q4.to_dict()
    assert json.loads(json.dumps(d))["kl"]["kld_mean"] == q4.kl.kld_mean and d["path"].endswith("tiny-q4_0.gguf")
    table = compare.side_by_side(res)
    assert "tiny-q8_0.gguf" in table and "Same top p %" in table and "MC flips" in table


def test_mismatched_models_are_refused(tiny, tmp_path, demo_model):
    other = _write_tiny(tmp_path / "wide.gguf", demo_model, d=2 * D)
    with pytest.raises(ModelError, match="not the same model: .*shape"):
        compare.compare_files([other], tiny["f32"], np.zeros(256, np.int32), seq_len=64, progress=False)
    swapped = _write_tiny(tmp_path / "swapped.gguf", demo_model, swap_tokens=True)
    with pytest.raises(ModelError, match="vocabularies differ"):
        compare.compare_files([swapped], tiny["f32"], np.zeros(256, np.int32), seq_len=64, progress=False)
    with pytest.raises(ModelError, match="no such file"):
        compare.compare_files([tmp_path / "nope.gguf"], tiny["f32"], np.zeros(256, np.int32), progress=False)
    with pytest.raises(CalibrationError, match="need at least 128 tokens"):
        compare.compare_files([tiny["q8"]], tiny["f32"], np.zeros(100, np.int32), seq_len=64, progress=False)


def test_padded_buckets_equal_one_sequence_at_a_time(tiny):
    fwd = BlockwiseForward(GGUFSource(tiny["q8"]))
    rng = np.random.default_rng(3)
    seqs = [rng.integers(0, 49152, n).tolist() for n in (5, 17, 9, 17, 1)]
    pos = [[4], [3, 10, 16], [0, 8], [16], [0]]
    ids = [[rng.integers(0, 49152, 3).tolist() for _ in p] for p in pos]
    got = gather_logprobs(fwd, seqs, pos, ids, max_tokens=40, head_rows=2)  # several buckets, padding
    for s, p, t, g in zip(seqs, pos, ids, got):
        (_, lp), = fwd.logits(np.asarray([s]), log_probs=True)
        want = lp[0, p].double().gather(-1, torch.as_tensor(t)).numpy()
        np.testing.assert_allclose(g, want, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="positions must lie"):
        gather_logprobs(fwd, [[1, 2]], [[2]], [[[0]]])


def test_cli_eval_and_compare(tiny, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 60)
    out = tmp_path / "r.json"
    assert main(["eval", str(tiny["q4"]), "--ref", str(tiny["f32"]), "--text", str(text), "--tokens", "256",
                 "--seq-len", "64", "--mc", "0", "--json", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "Mean    KLD:" in printed and "Same top p:" in printed and "bpw" in printed
    doc = json.loads(out.read_text())
    assert doc["candidates"][0]["kl"]["n_tokens"] == 4 * 31 and doc["candidates"][0]["flips"] is None
    assert main(["eval", "--ref", str(tiny["f32"]), "--compare", str(tiny["q8"]), str(tiny["q4"]),
                 "--text", str(text), "--tokens", "256", "--seq-len", "64", "--mc", "1", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "tiny-q8_0.gguf" in printed.splitlines()[2] and "File size MB" in printed and "Multiple choice" in printed
    assert main(["eval", "--ref", str(tiny["f32"]), "--tokens", "100", "--seq-len", "64", "--quiet"]) == 2
    assert "dynsearch: error:" in capsys.readouterr().err


# ------------------------------------------------------------------------------- the demo model


@pytest.fixture(scope="module")
def demo_pair(tmp_path_factory, demo_model):
    from dynsearch.bench.forward import f32_copy

    f32 = f32_copy(demo_model)
    q4 = apply_recipe(_all_type_recipe(f32, "Q4_0"), f32, tmp_path_factory.mktemp("demo") / "demo-q4_0.gguf",
                      progress=False)
    return f32, q4


@pytest.mark.slow
def test_demo_model_self_zero_q4_0_positive(demo_pair):
    f32, q4 = demo_pair
    same, q = compare.compare_files([f32, q4], f32, n_tokens=512, seq_len=128, mc_items=3, progress=False)
    assert same.kl.n_tokens == 4 * 63
    assert same.kl.kld_mean == 0.0 and same.kl.same_top_p == 1.0 and same.flips.n_flips == 0
    assert 0.01 < q.kl.kld_mean < 2.0 and q.kl.same_top_p < 1.0 and q.kl.ppl_ratio > 1.0
    assert q.bpw == pytest.approx(4.5, abs=0.01) and same.bpw == pytest.approx(32.0, abs=1e-9)
