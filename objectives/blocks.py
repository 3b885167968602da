"""The torch math of one transformer block, float32, mirroring llama.cpp's graphs (src/models/*.cpp).

Shapes: B sequences, T tokens, d = n_embd, H / Hkv query / key-value heads, hd = head width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from dynsearch.errors import ModelError
from dynsearch.objectives.io.architectures import ArchSpec
from dynsearch.objectives.io.model import ModelConfig

# capture(tensor_name, x): x is the (n_tokens, in_features) float32 input of that linear weight.
Capture = Callable[[str, torch.Tensor], None]


@dataclass
class LayerWeights:
    """The float32 weights of block ``il``, by the name after ``blk.{il}.`` (``attn_q.weight``)."""

    il: int
    tensors: dict[str, torch.Tensor]

    def full_name(self, short: str) -> str:
        return f"blk.{self.il}.{short}"

    def __getitem__(self, short: str) -> torch.Tensor:
        try:
            return self.tensors[short]
        except KeyError:
            raise ModelError(f"tensor {self.full_name(short)!r} not found") from None

    def get(self, short: str) -> torch.Tensor | None:
        return self.tensors.get(short)

    def __contains__(self, short: str) -> bool:
        return short in self.tensors


@dataclass(frozen=True)
class Rope:
    """Precomputed RoPE tables for positions 0..T-1: cos, sin (T, n_rot/2)."""

    cos: torch.Tensor
    sin: torch.Tensor
    neox: bool  # rotate halves (NEOX) or consecutive pairs (llama.cpp's LLAMA_ROPE_TYPE_NORM)

    @staticmethod
    def build(n_ctx: int, n_rot: int, base: float, scale: float, factors: torch.Tensor | None,
              neox: bool, device: torch.device | str) -> "Rope":
        """ggml_rope_ext without YaRN: theta_i = pos * scale * base^(-2i/n_rot) / factors[i]."""
        inv = base ** (-torch.arange(0, n_rot, 2, dtype=torch.float64) / n_rot)
        if factors is not None:
            inv = inv / factors.to(torch.float64).cpu()
        theta = torch.arange(n_ctx, dtype=torch.float64)[:, None] * (scale * inv)[None, :]
        return Rope(theta.cos().float().to(device), theta.sin().float().to(device), neox)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate x (B, T, heads, hd) by position; dims past n_rot pass unchanged."""
        T, half = x.shape[1], self.cos.shape[1]
        cos, sin = self.cos[:T, None, :], self.sin[:T, None, :]  # (T, 1, n_rot/2)
        rot, rest = x[..., : 2 * half], x[..., 2 * half:]
        if self.neox:
            x0, x1 = rot[..., :half], rot[..., half:]
            out = torch.cat((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1)
        else:
            pairs = rot.unflatten(-1, (half, 2))
            x0, x1 = pairs[..., 0], pairs[..., 1]
            out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)
        return out if rest.shape[-1] == 0 else torch.cat((out, rest), dim=-1)


def attn_temperature(cfg: ModelConfig, n_ctx: int, device) -> torch.Tensor:
    """llm_graph_input_attn_temp: per position, 1 + scale * log(floor((pos + offset) / floor) + 1)."""
    pos = torch.arange(n_ctx, dtype=torch.float32)
    t = torch.log(torch.floor((pos + cfg.attn_temp_offset) / cfg.attn_temp_floor) + 1.0) * cfg.attn_temp_scale + 1.0
    return t.to(device)


def rms_norm(x: torch.Tensor, w: torch.Tensor | float, eps: float) -> torch.Tensor:
    """ggml_rms_norm then multiply by the weight (GGUF norms already hold Gemma's 1 + w)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def linear(lw: LayerWeights, stem: str, x: torch.Tensor, capture: Capture | None) -> torch.Tensor:
    """x @ W.T (+ b) for the weight ``blk.{il}.{stem}.weight``; reports x to ``capture`` first."""
    if capture is not None:
        capture(lw.full_name(stem + ".weight"), x.reshape(-1, x.shape[-1]))
    y = F.linear(x, lw[stem + ".weight"], lw.get(stem + ".bias"))
    on_output = getattr(capture, "on_output", None)  # output hooks (the Fisher pass)
    if on_output is not None:
        on_output(lw.full_name(stem + ".weight"), y)
    return y


def attention(spec: ArchSpec, cfg: ModelConfig, lw: LayerWeights, x: torch.Tensor, rope: Rope,
              mask: torch.Tensor | None, capture: Capture | None) -> torch.Tensor:
    """Causal self-attention of x (B, T, d); ``mask`` (T, T) bool replaces the causal mask (SWA)."""
    B, T, _ = x.shape
    q = linear(lw, "attn_q", x, capture).view(B, T, cfg.n_head, cfg.head_dim)
    k = linear(lw, "attn_k", x, capture).view(B, T, cfg.n_head_kv, cfg.head_dim)
    v = linear(lw, "attn_v", x, capture).view(B, T, cfg.n_head_kv, cfg.head_dim_v)
    if spec.qk_norm:
        q = rms_norm(q, lw["attn_q_norm.weight"], cfg.rms_eps)
        k = rms_norm(k, lw["attn_k_norm.weight"], cfg.rms_eps)
    if cfg.uses_rope(lw.il):
        q, k = rope.apply(q), rope.apply(k)
        if cfg.kq_l2_norm:  # llama4's Llama4TextL2Norm: RMSNorm without a weight, after RoPE
            q, k = rms_norm(q, 1.0, cfg.rms_eps), rms_norm(k, 1.0, cfg.rms_eps)
    elif cfg.attn_temp_floor > 0:  # llama4's temperature tuning on no-RoPE layers
        q = q * attn_temperature(cfg, T, q.device)[None, :, None, None]
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if cfg.n_head != cfg.n_head_kv:  # GQA: each kv head serves n_head / n_head_kv query heads
        rep = cfg.n_head // cfg.n_head_kv
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                       scale=cfg.kq_scale)  # (B, H, T, hd_v)
    return linear(lw, "attn_output", o.transpose(1, 2).reshape(B, T, cfg.n_head * cfg.head_dim_v), capture)


_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
}


def dense_ffn(spec: ArchSpec, lw: LayerWeights, x: torch.Tensor, capture: Capture | None,
              suffix: str = "") -> torch.Tensor:
    """Gated FFN (LLM_FFN_PAR): down(act(gate(x)) * up(x)); ``suffix="_shexp"``: the shared expert."""
    act = _ACTIVATIONS[spec.activation]
    h = act(linear(lw, "ffn_gate" + suffix, x, capture)) * linear(lw, "ffn_up" + suffix, x, capture)
    return linear(lw, "ffn_down" + suffix, h, capture)


def moe_ffn(spec: ArchSpec, cfg: ModelConfig, lw: LayerWeights, x: torch.Tensor,
            capture: Capture | None) -> torch.Tensor:
    """Routed experts, as llm_graph_context::build_moe_ffn computes them, plus llama4's shared expert.

    The router ``ffn_gate_inp`` (n_expert, d) scores every token; the top ``n_expert_used`` experts
    (by the gated probability, or by the raw logit for llama4) each run a gated FFN from the stacks
    ``ffn_{gate,up}_exps`` (n_expert, n_ff_exp, d) and ``ffn_down_exps`` (n_expert, d, n_ff_exp), and
    their outputs are summed, weighted by the gate (softmax or sigmoid of the logits, renormalised
    over the selection with ``moe_norm_w``); llama4 scales each expert's input instead of its output.
    ``capture`` sees the router's and shared expert's inputs as plain linear inputs and, through its
    optional ``experts(name, x, expert_ids, n_expert)`` method, each stack's inputs with the experts
    every token was routed to (x: (N, d) one input for all selected experts, or (N, k, n_in)).
    """
    B, T, d = x.shape
    xf = x.reshape(B * T, d)  # (N, d)
    n_expert, k = cfg.n_expert, cfg.n_expert_used
    logits = linear(lw, "ffn_gate_inp", xf, capture)  # (N, n_expert)
    if logits.shape[-1] != n_expert:
        raise ModelError(f"{lw.full_name('ffn_gate_inp.weight')} has {logits.shape[-1]} rows, "
                         f"expected expert_count = {n_expert}")
    probs = torch.softmax(logits, -1) if spec.moe_gating == "softmax" else torch.sigmoid(logits)
    ids = torch.topk(logits if spec.moe_select_by_logits else probs, k, dim=-1).indices  # (N, k)
    weights = probs.gather(1, ids)  # (N, k)
    if spec.moe_norm_w:
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(6.103515625e-5)
    if spec.moe_weight_before_ffn:
        xin = xf[:, None, :] * weights[..., None]  # (N, k, d): each slot's own input
        x_exp = xin
    else:
        xin = xf[:, None, :].expand(-1, k, -1)
        x_exp = xf
    experts = getattr(capture, "experts", None)
    if experts is not None:
        experts(lw.full_name("ffn_gate_exps.weight"), x_exp, ids, n_expert)
        experts(lw.full_name("ffn_up_exps.weight"), x_exp, ids, n_expert)
    gate, up, down = lw["ffn_gate_exps.weight"], lw["ffn_up_exps.weight"], lw["ffn_down_exps.weight"]
    act = _ACTIVATIONS[spec.activation]
    h = xin.new_zeros((xf.shape[0], k, gate.shape[1]))  # (N, k, n_ff_exp)
    flat_ids = ids.reshape(-1)
    rows = [(e, (flat_ids == e).nonzero()[:, 0]) for e in torch.unique(flat_ids).tolist()]
    xin_flat = xin.reshape(-1, d)
    h_flat = h.reshape(-1, h.shape[-1])
    on_expert = getattr(capture, "on_expert_output", None)  # output hooks (the Fisher pass)
    parts = []
    for e, r in rows:
        xe = xin_flat[r]
        g, u = F.linear(xe, gate[e]), F.linear(xe, up[e])
        if on_expert is not None:
            on_expert(lw.full_name("ffn_gate_exps.weight"), e, n_expert, g)
            on_expert(lw.full_name("ffn_up_exps.weight"), e, n_expert, u)
        parts.append(act(g) * u)
    if parts:
        h_flat = h_flat.index_put((torch.cat([r for _, r in rows]),), torch.cat(parts))
    h = h_flat.view(xf.shape[0], k, -1)
    if experts is not None:
        experts(lw.full_name("ffn_down_exps.weight"), h, ids, n_expert)
    out_flat = xf.new_zeros((xf.shape[0] * k, d))
    outs = []
    for e, r in rows:
        y = F.linear(h_flat[r], down[e])
        if on_expert is not None:
            on_expert(lw.full_name("ffn_down_exps.weight"), e, n_expert, y)
        outs.append(y)
    if outs:
        out_flat = out_flat.index_put((torch.cat([r for _, r in rows]),), torch.cat(outs))
    y = out_flat.view(-1, k, d)
    if not spec.moe_weight_before_ffn:
        y = y * weights[..., None]
    out = y.sum(1)
    if spec.moe_shared_expert:
        out = out + dense_ffn(spec, lw, xf, capture, suffix="_shexp")
    return out.view(B, T, d)


def block(spec: ArchSpec, cfg: ModelConfig, lw: LayerWeights, h: torch.Tensor, rope: Rope,
          mask: torch.Tensor | None, capture: Capture | None) -> torch.Tensor:
    """One transformer block on h (B, T, d); returns the new residual stream."""
    a = attention(spec, cfg, lw, rms_norm(h, lw["attn_norm.weight"], cfg.rms_eps), rope, mask, capture)
    if spec.sandwich_norm:
        a = rms_norm(a, lw["post_attention_norm.weight"], cfg.rms_eps)
    h = h + a
    x = rms_norm(h, lw["ffn_norm.weight"], cfg.rms_eps)
    f = moe_ffn(spec, cfg, lw, x, capture) if "ffn_gate_inp.weight" in lw else dense_ffn(spec, lw, x, capture)
    if spec.sandwich_norm:
        f = rms_norm(f, lw["post_ffw_norm.weight"], cfg.rms_eps)
    return h + f
