"""MoE architectures (qwen3moe, llama4) against llama.cpp's logits on small random-weight models.

The models come from :mod:`dynsearch.bench.synthetic` with the demo model's tokenizer: a
2-layer qwen3moe (8 experts, 2 per token, softmax routing renormalised over the selection) and a
4-layer llama4 (dense and routed layers interleaved, 1 of 4 experts by sigmoid with the weight on
the expert's input, a shared expert, no RoPE and no q/k norm on layer 3). Each has an expert whose
router row is pushed far negative, so it never fires. llama.cpp runs with an F32 KV cache: with the
default F16 cache, its rounding flips the selection of a token whose top experts nearly tie, once
in a few hundred tokens, which says nothing about the forward pass under test.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from dynsearch.bench.synthetic import Shape, write_synthetic_model
from dynsearch.errors import ModelError
from dynsearch.objectives.forward import BlockwiseForward
from dynsearch.objectives.io.gguf_header import GGUFHeader
from dynsearch.objectives.io.gguf_source import GGUFSource
from dynsearch.objectives.io.gguf_write import write_model
from helpers import KL_MAX, english_chunks, llamacpp_logprobs

N_CTX = 256
N_CHUNKS = 2  # 512 tokens
VT = gguf.GGUFValueType

QWEN3MOE = Shape(n_layer=2, n_embd=64, n_ff=128, n_head=4, n_head_kv=2, n_vocab=49152, tied=False,
                 logit_scale=4.0, arch="qwen3moe", n_expert=8, n_expert_used=2, n_ff_exp=32,
                 dead_experts=(5,))
LLAMA4 = Shape(n_layer=4, n_embd=64, n_ff=128, n_head=4, n_head_kv=2, n_vocab=49152, tied=False,
               logit_scale=4.0, arch="llama4", n_expert=4, n_expert_used=1, n_ff_exp=32, moe_step=2,
               dead_experts=(2,))
SHAPES = {"qwen3moe": QWEN3MOE, "llama4": LLAMA4}


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python (the llama.cpp reference) is not installed")


@pytest.fixture(scope="module")
def chunks(llama_cpp, demo_model) -> np.ndarray:
    return english_chunks(llama_cpp, demo_model, N_CTX, N_CHUNKS)


@pytest.fixture(scope="module")
def models(tmp_path_factory, demo_model) -> dict:
    d = tmp_path_factory.mktemp("moe")
    return {a: write_synthetic_model(d / f"{a}.gguf", s, seed=0, tokenizer_from=demo_model)
            for a, s in SHAPES.items()}


def _llamacpp_logprobs(llama_cpp, path, chunks: np.ndarray) -> torch.Tensor:
    return llamacpp_logprobs(llama_cpp, path, chunks, type_k=0, type_v=0)  # GGML_TYPE_F32 KV cache


def _mean_kl(ref: torch.Tensor, fwd: BlockwiseForward, chunks, overrides=None, capture=None) -> float:
    total, n = 0.0, 0
    for s, logits in fwd.logits(chunks, overrides=overrides, capture=capture):
        ours = torch.log_softmax(logits.double(), dim=-1)
        r = ref[s:s + logits.shape[0]]
        total += float((r.exp() * (r - ours)).sum())
        n += ours.shape[0] * ours.shape[1]
    return total / n


class _Routing:
    """Capture: tokens routed to each expert, per expert stack."""

    def __init__(self):
        self.counts: dict[str, torch.Tensor] = {}

    def __call__(self, name, x):
        pass

    def experts(self, name, x, ids, n_expert):
        c = torch.bincount(ids.reshape(-1), minlength=n_expert)
        self.counts[name] = self.counts.get(name, 0) + c


@pytest.mark.parametrize("arch", ["qwen3moe", "llama4"])
def test_moe_model_matches_llamacpp(arch, llama_cpp, chunks, models):
    path, shape = models[arch], SHAPES[arch]
    ref = _llamacpp_logprobs(llama_cpp, path, chunks)
    fwd = BlockwiseForward(GGUFSource(path), batch_size=2)
    routing = _Routing()
    kl = _mean_kl(ref, fwd, chunks, capture=routing)
    print(f"{arch}: mean KL(llama.cpp || ours) over {chunks.size} tokens = {kl:.3e}")
    assert kl < KL_MAX
    # every routed layer, and only those, routed each token to n_expert_used experts
    routed = [il for il in range(shape.n_layer) if shape.is_moe_layer(il)]
    assert sorted(routing.counts) == sorted(f"blk.{il}.ffn_{k}_exps.weight" for il in routed
                                            for k in ("gate", "up", "down"))
    for name, c in routing.counts.items():
        assert int(c.sum()) == chunks.size * shape.n_expert_used, name
        assert all(int(c[e]) == 0 for e in shape.dead_experts), (name, c.tolist())
        assert int((c > 0).sum()) >= 2, (name, c.tolist())  # not a degenerate router
    # the test can fail: two live experts swapped in one layer's down stack
    name = f"blk.{routed[-1]}.ffn_down_exps.weight"
    c = routing.counts[name]
    a, b = (int(i) for i in torch.argsort(c, descending=True)[:2])
    w = fwd.source.load(name).copy()
    w[[a, b]] = w[[b, a]]
    assert _mean_kl(ref[:1], fwd, chunks[:1], overrides={name: w}) > 100 * KL_MAX


def test_llama4_config(models):
    cfg = GGUFSource(models["llama4"]).config
    assert cfg.nope_layers == (False, False, False, True)  # every 4th layer: no RoPE
    assert cfg.swa_chunked and cfg.sliding_window == 8192 and cfg.swa_layers == (True, True, True, False)
    assert cfg.kq_l2_norm and cfg.n_ff_exp == 32 and (cfg.n_expert, cfg.n_expert_used) == (4, 1)
    assert cfg.rope_base_swa == cfg.rope_base
    fwd = BlockwiseForward(GGUFSource(models["llama4"]))
    mask = fwd._mask(0, 8192 + 4)  # chunked: a token attends within its own 8192-token chunk
    assert mask[8193, 8191].item() is False and mask[8193, 8192].item() and mask[8191, 0].item()
    assert fwd._mask(3, 8192 + 4) is None  # the full-attention layer


def test_moe_metadata_errors(tmp_path, models, demo_model):
    demo = GGUFHeader(demo_model)
    src = GGUFSource(models["qwen3moe"])
    tensors = {n: src.load(n) for n in src.names()}
    h = src.header
    kv = {k: (f.value, f.vtype) for k, f in h.fields.items()
          if k.startswith("qwen3moe.") and not k.endswith("expert_used_count")}
    kv["qwen3moe.expert_used_count"] = (9, VT.UINT32)
    bad = write_model(tmp_path / "bad.gguf", "qwen3moe", demo, kv, tensors, keep=lambda k: k.startswith("tokenizer."))
    with pytest.raises(ModelError, match="expert_used_count"):
        GGUFSource(bad)


def test_synthetic_shape_checks():
    with pytest.raises(ValueError, match="n_expert_used"):
        Shape(arch="qwen3moe", n_expert=4, n_expert_used=0, n_ff_exp=8)
    with pytest.raises(ValueError, match="dead_experts"):
        Shape(arch="qwen3moe", n_expert=4, n_expert_used=2, n_ff_exp=8, dead_experts=(0, 1, 2))
    with pytest.raises(ValueError, match="not 'gpt2'"):
        Shape(arch="gpt2")
