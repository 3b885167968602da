"""MoE Hugging Face checkpoints (Qwen3-MoE, Llama 4) through SafetensorsSource against transformers.

Tiny random models are built with transformers and saved as safetensors: Qwen3-MoE with one tensor
per expert (sharded, so that a layer's experts lie in several files), Llama 4 with its fused
``gate_up_proj`` and interleaved dense/routed layers, a shared expert and no RoPE on layer 3. Our
forward pass from the folder must give transformers' float32 logits; the stacks must be what
convert_hf_to_gguf.py builds, and a GGUF written from them with the converter's metadata must load
in llama.cpp and give transformers' logits there too; the multimodal Llama 4 layout (``language_model.`` prefix, vision
tensors) and transformers 5's fused Qwen layout must give the same model.
"""

from __future__ import annotations

import dataclasses
import json

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dynsearch.errors import ModelError
from dynsearch.objectives.forward import BlockwiseForward
from dynsearch.objectives.io.gguf_header import GGUFHeader
from dynsearch.objectives.io.gguf_source import GGUFSource
from dynsearch.objectives.io.gguf_write import write_model
from dynsearch.objectives.io.hf_source import SafetensorsSource
from helpers import llamacpp_logprobs

transformers = pytest.importorskip("transformers", reason="transformers (the HF reference) is not installed")

VOCAB, D, T = 49152, 64, 48  # the demo model's vocabulary: its tokenizer goes into the GGUF
COMMON = dict(vocab_size=VOCAB, hidden_size=D, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              max_position_embeddings=256, tie_word_embeddings=False)


def _config(arch: str):
    if arch == "qwen3moe":
        return transformers.Qwen3MoeConfig(**COMMON, num_hidden_layers=2, intermediate_size=128,
                                           moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                                           norm_topk_prob=True)
    return transformers.Llama4TextConfig(
        **COMMON, num_hidden_layers=4, intermediate_size=32, intermediate_size_mlp=128, num_local_experts=4,
        num_experts_per_tok=1, interleave_moe_layer_step=2,
        rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 16, "rope_theta": 10000.0})


def _model(arch: str):
    cfg = _config(arch)
    cls = transformers.Llama4ForCausalLM if arch == "llama4" else transformers.Qwen3MoeForCausalLM
    torch.manual_seed(0)
    model = cls._from_config(cfg, attn_implementation="eager")
    with torch.no_grad():  # weights with spread, so that logits and routing are far from uniform
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif "embed" in name:
                p.copy_(0.4 * torch.randn_like(p))
            elif "router" in name or name.endswith("mlp.gate.weight"):
                p.copy_(torch.randn_like(p))
            else:  # fused expert tensors are (n_expert, in, out) or (n_expert, out, in): fan-in either way
                p.copy_(torch.randn_like(p) / min(p.shape[-1], p.shape[-2]) ** 0.5)
    return model.float().eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict:
    """arch -> (folder, transformers' float64 logits of TOKENS)."""
    out = {}
    for arch in ("qwen3moe", "llama4"):
        d = tmp_path_factory.mktemp(arch)
        model = _model(arch)
        model.save_pretrained(d, safe_serialization=True)
        if arch == "qwen3moe":
            _reshard(d)
        with torch.no_grad():
            out[arch] = (d, model(TOKENS).logits.double(), model)
    return out


def _reshard(folder) -> None:
    """Odd and even experts in two shard files, the rest in a third, with an index (as a large
    checkpoint spreads a layer's experts over shards)."""
    with safe_open(folder / "model.safetensors", "pt") as st:
        tensors = {k: st.get_tensor(k) for k in st.keys()}
    (folder / "model.safetensors").unlink()
    shards: dict[str, dict] = {}
    for k, v in tensors.items():
        x = k.split(".experts.")[1].split(".")[0] if ".experts." in k else None
        f = "rest.safetensors" if x is None else f"experts-{int(x) % 2}.safetensors"
        shards.setdefault(f, {})[k] = v
    for f, part in shards.items():
        save_file(part, folder / f)
    index = {"metadata": {}, "weight_map": {k: f for f, part in shards.items() for k in part}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


TOKENS = torch.randint(0, VOCAB, (3, T), generator=torch.Generator().manual_seed(1))


def _ours(folder) -> torch.Tensor:
    src = SafetensorsSource(folder)
    return torch.cat([x for _, x in BlockwiseForward(src, batch_size=2).logits(TOKENS.numpy())]).double()


def _kl(want: torch.Tensor, got: torch.Tensor) -> float:
    p, q = torch.log_softmax(want, -1), torch.log_softmax(got, -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


@pytest.mark.parametrize("arch", ["qwen3moe", "llama4"])
def test_moe_forward_matches_transformers(arch, saved):
    folder, want, _ = saved[arch]
    if arch == "qwen3moe":
        assert (folder / "model.safetensors.index.json").is_file()
        files = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
        assert len({files[f"model.layers.0.mlp.experts.{x}.gate_proj.weight"] for x in range(8)}) > 1
    src = SafetensorsSource(folder)
    cfg = src.config
    assert cfg.arch == arch and cfg.n_expert == (8 if arch == "qwen3moe" else 4)
    got = _ours(folder)
    print(f"{arch}: mean KL(transformers || ours from the HF folder) = {_kl(want, got):.3e}, "
          f"max |logit diff| = {float((got - want).abs().max()):.2e}, logit std = {float(want.std()):.2f}")
    assert _kl(want, got) < 1e-8, _kl(want, got)
    assert torch.allclose(got, want, atol=1e-3, rtol=1e-4)
    assert float(want.std()) > 0.5  # the comparison is not between two near-uniform outputs


def _converter_metadata(src: SafetensorsSource) -> dict:
    """The hyper-parameters convert_hf_to_gguf.py writes for this model (llama.cpp reads the rest
    from its own fixed llama4 values)."""
    c, a, u32, f32 = src.config, src.config.arch, gguf.GGUFValueType.UINT32, gguf.GGUFValueType.FLOAT32
    kv = {"context_length": (256, u32), "embedding_length": (c.n_embd, u32), "block_count": (c.n_layer, u32),
          "feed_forward_length": (c.n_ff, u32), "attention.head_count": (c.n_head, u32),
          "attention.head_count_kv": (c.n_head_kv, u32), "rope.dimension_count": (c.n_rot, u32),
          "attention.key_length": (c.head_dim, u32), "attention.value_length": (c.head_dim_v, u32),
          "attention.layer_norm_rms_epsilon": (c.rms_eps, f32), "rope.freq_base": (c.rope_base, f32),
          "vocab_size": (c.n_vocab, u32), "expert_count": (c.n_expert, u32),
          "expert_used_count": (c.n_expert_used, u32), "expert_feed_forward_length": (c.n_ff_exp, u32)}
    if a == "llama4":
        kv["interleave_moe_layer_step"] = (src.hparams["interleave_moe_layer_step"], u32)
    return {f"{a}.{k}": v for k, v in kv.items()}


@pytest.mark.parametrize("arch", ["qwen3moe", "llama4"])
def test_llamacpp_runs_the_mapped_checkpoint(arch, saved, tmp_path, demo_model):
    """The mapped tensors written as a GGUF: llama.cpp loads it (shapes and names as it expects)
    and its logits are transformers'; our GGUF reader gives the same ModelConfig as config.json."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (the llama.cpp reference) is not installed")
    folder, want, _ = saved[arch]
    src = SafetensorsSource(folder)
    path = write_model(tmp_path / f"{arch}.gguf", arch, GGUFHeader(demo_model), _converter_metadata(src),
                       {n: src.load(n) for n in src.names()}, keep=lambda k: k.startswith("tokenizer."))
    assert GGUFSource(path).config == dataclasses.replace(src.config, rms_eps=float(np.float32(src.config.rms_eps)))
    got = llamacpp_logprobs(llama_cpp, path, TOKENS, type_k=0, type_v=0)  # F32 KV cache, as in test_moe
    kl = _kl(want, got)
    print(f"{arch}: mean KL(transformers || llama.cpp on the mapped GGUF) = {kl:.3e}")
    assert kl < 1e-6, kl


def test_qwen3moe_stacks_as_the_converter(saved):
    folder, _, _ = saved["qwen3moe"]
    src = SafetensorsSource(folder)
    cfg = src.config
    assert (cfg.n_expert, cfg.n_expert_used, cfg.n_ff_exp, cfg.n_ff) == (8, 2, 32, 128)
    files = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    for il in range(2):
        assert src.shape(f"blk.{il}.ffn_gate_inp.weight") == (8, D)
        for w, gname in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
            datas = []
            for x in range(8):  # Qwen2MoeModel.modify_tensors: torch.stack over the experts, in id order
                hf = f"model.layers.{il}.mlp.experts.{x}.{w}.weight"
                with safe_open(folder / files[hf], "pt") as st:
                    datas.append(st.get_tensor(hf))
            want = torch.stack(datas, dim=0).numpy()
            name = f"blk.{il}.ffn_{gname}_exps.weight"
            assert src.shape(name) == want.shape
            np.testing.assert_array_equal(src.load(name), want)
    assert not any("experts." in n for n in src.names())


def test_llama4_splits_gate_up_as_the_converter(saved):
    folder, _, _ = saved["llama4"]
    src = SafetensorsSource(folder)
    cfg = src.config
    assert (cfg.n_ff, cfg.n_ff_exp, cfg.n_expert_used) == (128, 32, 1)
    assert cfg.nope_layers == (False, False, False, True) and cfg.swa_layers == (True, True, True, False)
    assert cfg.swa_chunked and cfg.sliding_window == 8192 and cfg.kq_l2_norm
    assert "rope_freqs.weight" in src.names()
    with safe_open(folder / "model.safetensors", "pt") as st:
        gate_up = st.get_tensor("model.layers.1.feed_forward.experts.gate_up_proj")
        down = st.get_tensor("model.layers.1.feed_forward.experts.down_proj")
    # Llama4Model.modify_tensors
    gate, up = gate_up.transpose(-1, -2).split(gate_up.shape[-1] // 2, dim=-2)
    np.testing.assert_array_equal(src.load("blk.1.ffn_gate_exps.weight"), gate.numpy())
    np.testing.assert_array_equal(src.load("blk.1.ffn_up_exps.weight"), up.numpy())
    np.testing.assert_array_equal(src.load("blk.1.ffn_down_exps.weight"), down.transpose(-1, -2).numpy())
    assert src.shape("blk.1.ffn_gate_exps.weight") == (4, 32, D)
    assert src.shape("blk.1.ffn_down_exps.weight") == (4, D, 32)
    assert src.shape("blk.0.ffn_gate.weight") == (128, D)  # a dense layer
    assert src.shape("blk.1.ffn_gate_shexp.weight") == (32, D)
    assert "blk.0.ffn_gate_exps.weight" not in src.names()


def _rewrite(src_folder, dst, rename, config_edit, extra=None):
    """A copy of a checkpoint with renamed/changed tensors and an edited config.json."""
    dst.mkdir()
    tensors = {}
    for f in sorted(src_folder.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            for k in st.keys():
                for nk, v in rename(k, st.get_tensor(k)):
                    tensors[nk] = v.contiguous()
    tensors.update(extra or {})
    save_file(tensors, dst / "model.safetensors")
    cfg = json.loads((src_folder / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(config_edit(cfg)))
    return dst


def test_llama4_multimodal_layout(saved, tmp_path):
    """Llama4ForConditionalGeneration: text model under ``language_model.``, parameters under
    ``text_config``, vision tensors skipped."""
    folder, want, _ = saved["llama4"]

    def rename(k, v):
        yield "language_model." + k, v

    def config(cfg):
        return {"architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4",
                "text_config": {k: v for k, v in cfg.items() if k != "architectures"},
                "vision_config": {"hidden_size": 8}}

    mm = _rewrite(folder, tmp_path / "mm", rename, config,
                  extra={"vision_model.patch_embedding.linear.weight": torch.ones(8, 12),
                         "multi_modal_projector.linear_1.weight": torch.ones(D, 8)})
    src = SafetensorsSource(mm)
    assert src.config == SafetensorsSource(folder).config
    assert not any("vision" in n or "mm" in n for n in src.names())
    assert torch.equal(_ours(mm), _ours(folder))
    assert _kl(want, _ours(mm)) < 1e-8


def test_qwen3moe_fused_layout(saved, tmp_path):
    """transformers 5's layout (``experts.gate_up_proj`` (E, 2 ff, d), ``experts.down_proj`` (E, d, ff)),
    which the converter's Qwen2MoeModel splits without a transpose: the same model."""
    folder, want, model = saved["qwen3moe"]
    state = model.state_dict()
    assert state["model.layers.0.mlp.experts.gate_up_proj"].shape == (8, 64, D)

    def rename(k, v):
        if ".experts." not in k:
            yield k, v
        elif k.endswith(".0.gate_proj.weight"):
            base = k.removesuffix(".0.gate_proj.weight")
            yield base + ".gate_up_proj", state[base + ".gate_up_proj"]
            yield base + ".down_proj", state[base + ".down_proj"]

    fused = _rewrite(folder, tmp_path / "fused", rename, lambda c: c)
    src = SafetensorsSource(fused)
    ref = SafetensorsSource(folder)
    for name in ("blk.1.ffn_gate_exps.weight", "blk.1.ffn_up_exps.weight", "blk.1.ffn_down_exps.weight"):
        np.testing.assert_array_equal(src.load(name), ref.load(name))
    assert _kl(want, _ours(fused)) < 1e-8


def _edited(folder, tmp_path, name, edit=lambda c: c, drop=()):
    def rename(k, v):
        if not any(d in k for d in drop):
            yield k, v
    return _rewrite(folder, tmp_path / name, rename, edit)


def test_moe_checkpoint_errors(saved, tmp_path):
    q, _, _ = saved["qwen3moe"]
    l4, _, _ = saved["llama4"]
    bad = _edited(q, tmp_path, "missing", drop=("layers.1.mlp.experts.3.",))
    with pytest.raises(ModelError, match=r"experts \[3\] missing \(config.json has 8 experts\)"):
        SafetensorsSource(bad)
    bad = _edited(q, tmp_path, "extra", lambda c: {**c, "num_experts": 6, "num_local_experts": 6})
    with pytest.raises(ModelError, match=r"experts \[6, 7\] beyond the last"):
        SafetensorsSource(bad)
    cases = [
        (q, {"num_experts_per_tok": 9}, "num_experts_per_tok = 9 with 8 experts"),
        (q, {"norm_topk_prob": False}, "norm_topk_prob = False.*renormalises"),
        (q, {"mlp_only_layers": [1]}, "mlp_only_layers.*routes every layer"),
        (q, {"norm_topk_prob": None}, "norm_topk_prob = None.*renormalises"),
        (l4, {"no_rope_layers": [1, 0, 1, 1]}, "no_rope_layers.*every 4th layer"),
        (l4, {"no_rope_layers": [], "no_rope_layer_interval": 2}, r"no_rope_layers = \[1, 0, 1, 0\]"),
        (l4, {"attention_chunk_size": 16}, "attention_chunk_size = 16"),
        (l4, {"use_qk_norm": False}, "use_qk_norm = False"),
        (l4, {"layer_types": ["full_attention"] * 4}, "without chunked attention"),
    ]
    for i, (folder, change, msg) in enumerate(cases):
        bad = _edited(folder, tmp_path, f"c{i}", lambda c, change=change: {**c, **change})
        with pytest.raises(ModelError, match=msg):
            SafetensorsSource(bad)
    # Llama4TextConfig's defaults for what a config.json may leave out or empty: the same model
    ok = _edited(l4, tmp_path, "defaults", lambda c: {**{k: v for k, v in c.items() if k not in (
        "use_qk_norm", "layer_types", "attention_chunk_size", "no_rope_layer_interval")}, "no_rope_layers": []})
    assert SafetensorsSource(ok).config == SafetensorsSource(l4).config
    bad = _edited(l4, tmp_path, "nokey", lambda c: {k: v for k, v in c.items() if k != "num_local_experts"})
    with pytest.raises(ModelError, match="missing key 'num_local_experts'"):
        SafetensorsSource(bad)

    def odd(k, v):
        yield k, (v[..., :-1] if k.endswith("gate_up_proj") else v)
    bad = _rewrite(l4, tmp_path / "odd", odd, lambda c: c)
    with pytest.raises(ModelError, match="odd gate\\+up width 63"):
        SafetensorsSource(bad)
