"""The torch math of one transformer block, float32, mirroring llama.cpp's graphs (src/models/*.cpp).

Shapes: B sequences, T tokens, d = n_embd, H / Hkv query / key-value heads, hd = head width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .architectures import ArchSpec
from .errors import ModelError
from .model import ModelConfig

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


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
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
    q, k, v = rope.apply(q).transpose(1, 2), rope.apply(k).transpose(1, 2), v.transpose(1, 2)
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


def dense_ffn(spec: ArchSpec, lw: LayerWeights, x: torch.Tensor, capture: Capture | None) -> torch.Tensor:
    """Gated FFN (LLM_FFN_PAR): down(act(gate(x)) * up(x))."""
    act = _ACTIVATIONS[spec.activation]
    h = act(linear(lw, "ffn_gate", x, capture)) * linear(lw, "ffn_up", x, capture)
    return linear(lw, "ffn_down", h, capture)


def moe_ffn(spec: ArchSpec, cfg: ModelConfig, lw: LayerWeights, x: torch.Tensor,
            capture: Capture | None) -> torch.Tensor:
    """Routed experts (ffn_gate_inp, ffn_{gate,up,down}_exps): not implemented yet."""
    raise ModelError(f"{spec.name}: MoE blocks ({lw.full_name('ffn_gate_inp.weight')}) are not supported yet")


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
