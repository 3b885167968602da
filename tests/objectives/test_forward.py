"""The block-by-block forward pass against llama.cpp's logits on the same GGUF files.

The demo model (SmolLM2-135M, llama) is dequantized to an F32 GGUF; small random models of qwen2,
qwen3, gemma3 and llama (untied output, llama-3 RoPE factors) are written as F32 GGUF with the demo
model's tokenizer. Tokens come from llama.cpp's own tokenizer, so only the forward pass is under
test: mean KL(llama.cpp || ours) over >= 2048 tokens must stay below 1e-4, and a q/k layout mix-up
(the bug this test exists to catch) must push it far above.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from dynsearch.errors import ModelError
from dynsearch.objectives.forward import BlockwiseForward
from dynsearch.objectives.io.gguf_header import GGUFHeader
from dynsearch.objectives.io.gguf_source import GGUFSource
from dynsearch.objectives.io.gguf_write import write_dequantized_copy, write_model
from dynsearch.objectives.io.hf_source import permute_qk
from helpers import KL_MAX, english_chunks, llamacpp_logprobs

N_CTX = 512
N_CHUNKS = 4  # 2048 tokens
VT = gguf.GGUFValueType


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python (the llama.cpp reference) is not installed")


@pytest.fixture(scope="module")
def chunks(llama_cpp, demo_model) -> np.ndarray:
    return english_chunks(llama_cpp, demo_model, N_CTX, N_CHUNKS)


def _mean_kl(ref_logp: torch.Tensor, fwd: BlockwiseForward, chunks: np.ndarray, overrides=None) -> float:
    """Mean over tokens of KL(ref || ours), in float64."""
    total, n = 0.0, 0
    for s, logits in fwd.logits(chunks, overrides=overrides):
        ours = torch.log_softmax(logits.double(), dim=-1)
        ref = ref_logp[s : s + logits.shape[0]]
        total += float((ref.exp() * (ref - ours)).sum(-1).sum())
        n += ours.shape[0] * ours.shape[1]
    return total / n


def _q_layout_bug(fwd: BlockwiseForward) -> dict[str, np.ndarray]:
    """blk.0.attn_q rows in the other RoPE layout (HF vs GGUF): a plausible conversion bug."""
    name = "blk.0.attn_q.weight"
    return {name: permute_qk(fwd.source.load(name), fwd.cfg.n_head)}


# --------------------------------------------------------------------------- random models

def _rand(rng, *shape, scale=1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _tiny_model(arch: str, rng: np.random.Generator, n_vocab: int) -> tuple[dict, dict]:
    """Metadata (key -> (value, type)) and float32 tensors of a 2-layer random model."""
    d, n_ff, n_layer = 64, 128, 2
    n_head, n_kv, head_dim = {"llama": (4, 2, 16), "qwen2": (4, 2, 16),
                              "qwen3": (4, 2, 32), "gemma3": (4, 1, 32)}[arch]
    kv = {f"{arch}.context_length": (4096, VT.UINT32), f"{arch}.embedding_length": (d, VT.UINT32),
          f"{arch}.block_count": (n_layer, VT.UINT32), f"{arch}.feed_forward_length": (n_ff, VT.UINT32),
          f"{arch}.attention.head_count": (n_head, VT.UINT32),
          f"{arch}.attention.head_count_kv": (n_kv, VT.UINT32),
          f"{arch}.attention.layer_norm_rms_epsilon": (1e-6, VT.FLOAT32),
          f"{arch}.rope.freq_base": (10000.0, VT.FLOAT32),
          f"{arch}.attention.key_length": (head_dim, VT.UINT32),
          f"{arch}.attention.value_length": (head_dim, VT.UINT32)}
    t = {"token_embd.weight": _rand(rng, n_vocab, d, scale=0.4),
         "output_norm.weight": 1 + _rand(rng, d, scale=0.1)}
    if arch in ("llama", "gemma3"):  # untied output; tied for qwen2/qwen3
        t["output.weight"] = _rand(rng, n_vocab, d, scale=3 / np.sqrt(d))
    if arch == "llama":  # llama-3 style frequency factors, large enough to matter within 512 tokens
        kv[f"{arch}.rope.dimension_count"] = (head_dim, VT.UINT32)
        t["rope_freqs.weight"] = np.linspace(1.0, 8.0, head_dim // 2, dtype=np.float32)
    if arch == "gemma3":
        kv.update({f"{arch}.rope.freq_base": (1e6, VT.FLOAT32), f"{arch}.rope.freq_base_swa": (1e4, VT.FLOAT32),
                   f"{arch}.attention.sliding_window": (100, VT.UINT32),  # < N_CTX: the SWA mask bites
                   f"{arch}.attention.sliding_window_pattern": (2, VT.UINT32),  # layer 0 sliding, 1 full
                   f"{arch}.rope.scaling.type": ("linear", VT.STRING),
                   f"{arch}.rope.scaling.factor": (4.0, VT.FLOAT32),
                   f"{arch}.final_logit_softcapping": (10.0, VT.FLOAT32)})
    for il in range(n_layer):
        p = f"blk.{il}."
        t[p + "attn_norm.weight"] = 1 + _rand(rng, d, scale=0.1)
        t[p + "attn_q.weight"] = _rand(rng, n_head * head_dim, d, scale=1 / np.sqrt(d))
        t[p + "attn_k.weight"] = _rand(rng, n_kv * head_dim, d, scale=1 / np.sqrt(d))
        t[p + "attn_v.weight"] = _rand(rng, n_kv * head_dim, d, scale=1 / np.sqrt(d))
        t[p + "attn_output.weight"] = _rand(rng, d, n_head * head_dim, scale=1 / np.sqrt(n_head * head_dim))
        t[p + "ffn_norm.weight"] = 1 + _rand(rng, d, scale=0.1)
        t[p + "ffn_gate.weight"] = _rand(rng, n_ff, d, scale=1 / np.sqrt(d))
        t[p + "ffn_up.weight"] = _rand(rng, n_ff, d, scale=1 / np.sqrt(d))
        t[p + "ffn_down.weight"] = _rand(rng, d, n_ff, scale=1 / np.sqrt(n_ff))
        if arch == "qwen2":
            for x, n in (("q", n_head), ("k", n_kv), ("v", n_kv)):
                t[p + f"attn_{x}.bias"] = _rand(rng, n * head_dim, scale=0.5)
        if arch in ("qwen3", "gemma3"):
            t[p + "attn_q_norm.weight"] = 1 + _rand(rng, head_dim, scale=0.1)
            t[p + "attn_k_norm.weight"] = 1 + _rand(rng, head_dim, scale=0.1)
        if arch == "gemma3":
            t[p + "post_attention_norm.weight"] = 1 + _rand(rng, d, scale=0.1)
            t[p + "post_ffw_norm.weight"] = 1 + _rand(rng, d, scale=0.1)
    return kv, t


def write_tiny_model(arch: str, dst: Path, vocab_from: Path, seed: int = 0) -> Path:
    demo = GGUFHeader(vocab_from)
    n_vocab = len(demo.get("tokenizer.ggml.tokens"))
    kv, tensors = _tiny_model(arch, np.random.default_rng(seed), n_vocab)
    return write_model(dst, arch, demo, kv, tensors, keep=lambda k: k.startswith("tokenizer."))


# --------------------------------------------------------------------------- tests

@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3"])
def test_tiny_model_matches_llamacpp(arch, llama_cpp, chunks, tmp_path, demo_model):
    path = write_tiny_model(arch, tmp_path / f"{arch}.gguf", demo_model)
    ref = llamacpp_logprobs(llama_cpp, path, chunks)
    fwd = BlockwiseForward(GGUFSource(path), batch_size=2)
    kl = _mean_kl(ref, fwd, chunks)
    print(f"{arch}: mean KL(llama.cpp || ours) = {kl:.3e}")
    assert kl < KL_MAX
    assert _mean_kl(ref[:1], fwd, chunks[:1], overrides=_q_layout_bug(fwd)) > 100 * KL_MAX


@pytest.mark.slow
def test_demo_model_f32_matches_llamacpp(llama_cpp, chunks, tmp_path_factory, demo_model):
    path = write_dequantized_copy(demo_model, tmp_path_factory.mktemp("demo") / "smollm2-f32.gguf")
    ref = llamacpp_logprobs(llama_cpp, path, chunks)
    torch.set_num_threads(2)
    fwd = BlockwiseForward(GGUFSource(path), batch_size=2)
    kl = _mean_kl(ref, fwd, chunks)
    print(f"SmolLM2-135M F32: mean KL(llama.cpp || ours) = {kl:.3e}")
    assert kl < KL_MAX
    assert _mean_kl(ref[:1], fwd, chunks[:1], overrides=_q_layout_bug(fwd)) > 100 * KL_MAX


def test_overrides_and_capture(tmp_path, demo_model):
    """An override equal to the model's weight changes nothing; a changed one changes the logits;
    capture sees the input of every linear weight with the right width."""
    path = write_tiny_model("qwen2", tmp_path / "m.gguf", demo_model, seed=1)
    fwd = BlockwiseForward(GGUFSource(path), batch_size=1)
    toks = np.random.default_rng(0).integers(0, fwd.cfg.n_vocab, (3, 40))
    base = torch.cat([x for _, x in fwd.logits(toks)])

    seen: dict[str, tuple[int, int]] = {}
    name = "blk.1.ffn_down.weight"
    same = torch.cat([x for _, x in fwd.logits(toks, overrides={name: fwd.source.load(name)},
                                               capture=lambda n, x: seen.setdefault(n, tuple(x.shape)))])
    assert torch.equal(base, same)
    linear = [n for n in fwd.source.names() if n.endswith(".weight") and len(fwd.source.shape(n)) == 2
              and n.startswith("blk.")] + ["token_embd.weight"]  # tied output
    assert sorted(seen) == sorted(linear)
    for n, shp in seen.items():
        assert shp == (40, fwd.source.shape(n)[1]), n  # batch of one sequence, in_features wide

    changed = torch.cat([x for _, x in fwd.logits(toks, overrides={name: 1.5 * fwd.source.load(name)})])
    assert not torch.allclose(base, changed, atol=1e-3)
    with pytest.raises(ModelError, match="shape"):
        next(fwd.logits(toks, overrides={name: np.zeros((3, 3), np.float32)}))


def test_log_probs_batches(tmp_path, demo_model):
    path = write_tiny_model("gemma3", tmp_path / "m.gguf", demo_model, seed=2)
    fwd = BlockwiseForward(GGUFSource(path), batch_size=2)
    toks = np.random.default_rng(1).integers(0, fwd.cfg.n_vocab, (5, 16))
    starts, outs = zip(*fwd.logits(toks, log_probs=True))
    assert starts == (0, 2, 4) and [o.shape[0] for o in outs] == [2, 2, 1]
    logp = torch.cat(outs).double()
    assert torch.allclose(logp.exp().sum(-1), torch.ones(5, 16, dtype=torch.float64), atol=1e-4)
    # batching does not change the result
    one = BlockwiseForward(GGUFSource(path), batch_size=5)
    (_, all5), = one.logits(toks, log_probs=True)
    assert torch.allclose(torch.cat(outs), all5, atol=1e-5)


def test_errors_name_the_problem(tmp_path, demo_model):
    with pytest.raises(ModelError, match="no such file"):
        GGUFSource(tmp_path / "absent.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(ModelError, match="junk.gguf"):
        GGUFSource(tmp_path / "junk.gguf")
    w = gguf.GGUFWriter(tmp_path / "gpt2.gguf", "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(ModelError, match="unsupported architecture 'gpt2'"):
        GGUFSource(tmp_path / "gpt2.gguf")
    src = GGUFSource(write_tiny_model("llama", tmp_path / "m.gguf", demo_model))
    with pytest.raises(ModelError, match="blk.7.attn_q.weight"):
        src.load("blk.7.attn_q.weight")
