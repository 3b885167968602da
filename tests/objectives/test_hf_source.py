"""Hugging Face checkpoint folders through SafetensorsSource against transformers' own forward pass.

Tiny random models are built with transformers, saved as safetensors (one of them sharded with an
index), read back under GGUF names (q/k permutation, Gemma's 1 + w norms, llama-3 RoPE factors)
and run through our forward pass; the logits must match transformers' float32 logits.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dynsearch.errors import ModelError
from dynsearch.objectives.forward import BlockwiseForward
from dynsearch.objectives.io.hf_source import SafetensorsSource
from dynsearch.objectives.io.resolve import open_model

transformers = pytest.importorskip("transformers", reason="transformers (the HF reference) is not installed")

VOCAB, D, FF, T = 300, 64, 128, 48
COMMON = dict(vocab_size=VOCAB, hidden_size=D, intermediate_size=FF, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def _configs() -> dict:
    return {
        "llama": transformers.LlamaConfig(**COMMON, tie_word_embeddings=False, rope_parameters={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16, "rope_theta": 10000.0}),
        "qwen2": transformers.Qwen2Config(**COMMON, tie_word_embeddings=True),
        "qwen3": transformers.Qwen3Config(**COMMON, head_dim=32, tie_word_embeddings=True),
        "gemma3": transformers.Gemma3TextConfig(
            **{**COMMON, "num_key_value_heads": 1}, head_dim=32, query_pre_attn_scalar=32,
            sliding_window=16, layer_types=["sliding_attention", "full_attention"],
            rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                             "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6}}),
    }


def _model(arch: str):
    cfg = _configs()[arch]
    cls = transformers.Gemma3ForCausalLM if arch == "gemma3" else transformers.AutoModelForCausalLM
    torch.manual_seed(0)
    model = cls.from_config(cfg, attn_implementation="eager") if cls is transformers.AutoModelForCausalLM \
        else cls._from_config(cfg, attn_implementation="eager")
    with torch.no_grad():  # weights with spread, so that logits are far from uniform
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name:
                p.copy_((0.0 if arch == "gemma3" else 1.0) + 0.1 * torch.randn_like(p))
            elif p.ndim == 1:
                p.copy_(0.5 * torch.randn_like(p))
            elif "embed" in name:
                p.copy_(0.4 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
    return model.float().eval()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3"])
def test_safetensors_forward_matches_transformers(arch, tmp_path):
    model = _model(arch)
    shard = "60KB" if arch == "qwen2" else "1GB"
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size=shard)
    if arch == "qwen2":
        assert (tmp_path / "model.safetensors.index.json").is_file()
    toks = torch.randint(0, VOCAB, (3, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(toks).logits.double()

    src = open_model(tmp_path)
    assert isinstance(src, SafetensorsSource) and src.config.arch == arch
    got = torch.cat([x for _, x in BlockwiseForward(src, batch_size=2).logits(toks.numpy())]).double()
    p, q = torch.log_softmax(want, -1), torch.log_softmax(got, -1)
    kl = float((p.exp() * (p - q)).sum(-1).mean())
    assert kl < 1e-8, kl
    assert torch.allclose(got, want, atol=1e-3, rtol=1e-4)
    assert float(want.std()) > 0.5  # the comparison is not between two near-uniform outputs


def test_hf_errors(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        SafetensorsSource(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ModelError, match="GPT2LMHeadModel"):
        SafetensorsSource(tmp_path)
    _model("qwen2").save_pretrained(tmp_path / "m", safe_serialization=True)
    src = SafetensorsSource(tmp_path / "m")
    with pytest.raises(ModelError, match="output.weight"):
        src.load("output.weight")  # tied: only token_embd exists
    assert src.shape("blk.0.attn_q.weight") == (D, D)
    assert src.load("blk.1.attn_k.bias").dtype == np.float32
    with pytest.raises(ModelError, match="no such file"):
        open_model(tmp_path / "absent")
