"""What sets the supported architectures apart, one frozen spec each.

A block is always ``h += post(attention(norm(h))); h += post(ffn(norm(h)))``; a spec only switches
the parts on and off. The FFN of a block is dense or MoE depending on which tensors the block has
(``ffn_gate_inp`` marks a routed layer), so MoE architectures (qwen3moe, llama4) are added as specs
plus an MoE FFN in :mod:`blocks`, without touching the driver.
"""

from __future__ import annotations

from dataclasses import dataclass

from dynsearch.errors import ModelError


@dataclass(frozen=True)
class ArchSpec:
    """How one GGUF architecture computes a block, and how its HF checkpoints map to GGUF."""

    name: str  # GGUF general.architecture
    rope_neox: bool  # True: rotate the two halves of a head (NEOX); False: consecutive pairs (llama)
    activation: str = "silu"  # gated FFN activation: "silu" or "gelu_tanh"
    embed_scale: bool = False  # token embeddings times sqrt(n_embd) (Gemma)
    sandwich_norm: bool = False  # RMSNorm attention and FFN outputs before the residual add (Gemma 3)
    qk_norm: bool = False  # RMSNorm every query and key head before RoPE (Qwen3, Gemma 3)
    swa_pattern: int = 0  # default when GGUF has none: every n-th layer full, the others sliding
    hf_architectures: tuple[str, ...] = ()  # config.json "architectures" entries that map here
    hf_permute_qk: bool = False  # convert_hf_to_gguf permutes q/k rows (LlamaModel.permute)
    hf_norm_shift: float = 0.0  # added to HF "*norm.weight" on conversion (Gemma3RMSNorm uses 1 + w)
    # MoE routing (llm_graph_context::build_moe_ffn): "softmax" or "sigmoid" over the router logits
    moe_gating: str = "softmax"
    moe_norm_w: bool = False  # renormalise the selected experts' weights to sum to 1
    moe_select_by_logits: bool = False  # top-k on the raw logits, not the gated probabilities (llama4)
    moe_weight_before_ffn: bool = False  # scale the expert's input, not its output, by the weight (llama4)
    moe_shared_expert: bool = False  # an always-on ffn_{gate,up,down}_shexp added to the routed sum
    nope_layer_step: int = 0  # every n-th layer has no RoPE (llama4: 4); 0: RoPE everywhere
    kq_l2_norm: bool = False  # weightless RMSNorm of q and k after RoPE, on RoPE layers (llama4)


ARCHITECTURES: dict[str, ArchSpec] = {
    s.name: s
    for s in (
        ArchSpec("llama", rope_neox=False, hf_permute_qk=True,
                 hf_architectures=("LlamaForCausalLM", "MistralForCausalLM")),
        ArchSpec("qwen2", rope_neox=True, hf_architectures=("Qwen2ForCausalLM",)),
        ArchSpec("qwen3", rope_neox=True, qk_norm=True, hf_architectures=("Qwen3ForCausalLM",)),
        ArchSpec("gemma3", rope_neox=True, activation="gelu_tanh", embed_scale=True,
                 sandwich_norm=True, qk_norm=True, swa_pattern=6, hf_norm_shift=1.0,
                 hf_architectures=("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration")),
        # MoE: HF's per-expert (qwen3moe) or fused gate_up (llama4) tensors are stacked as GGUF's
        # ffn_*_exps by hf_source, as convert_hf_to_gguf.py does
        ArchSpec("qwen3moe", rope_neox=True, qk_norm=True, moe_gating="softmax", moe_norm_w=True,
                 hf_architectures=("Qwen3MoeForCausalLM",)),
        # llama4: HF's RoPE already rotates consecutive pairs, so no q/k permutation (undo_permute = False)
        ArchSpec("llama4", rope_neox=False, moe_gating="sigmoid",
                 hf_architectures=("Llama4ForConditionalGeneration", "Llama4ForCausalLM"),
                 moe_select_by_logits=True, moe_weight_before_ffn=True, moe_shared_expert=True,
                 nope_layer_step=4, kq_l2_norm=True),  # chunked attention: see gguf_source
    )
}


def architecture(name: str) -> ArchSpec:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        known = ", ".join(ARCHITECTURES)
        raise ModelError(f"unsupported architecture {name!r} (supported: {known})") from None


def architecture_for_hf(hf_architectures: list[str]) -> ArchSpec:
    """The spec whose HF class names include one of config.json's ``architectures``."""
    for spec in ARCHITECTURES.values():
        if any(a in spec.hf_architectures for a in hf_architectures):
            return spec
    known = ", ".join(a for s in ARCHITECTURES.values() for a in s.hf_architectures)
    raise ModelError(f"unsupported Hugging Face architecture {hf_architectures} (supported: {known})")


def swa_layers_from_pattern(n_layer: int, pattern: int) -> tuple[bool, ...]:
    """llama_hparams::set_swa_pattern: layer il is sliding unless il % pattern == pattern - 1."""
    if pattern <= 0:
        return (True,) * n_layer
    return tuple(il % pattern < pattern - 1 for il in range(n_layer))
