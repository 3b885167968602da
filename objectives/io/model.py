"""What the forward pass needs to know about a model: its hyper-parameters and a source of weights.

Weights are always named as in GGUF (``blk.3.attn_q.weight``) and shaped as numpy/torch see them:
``(rows, n_per_row)``, i.e. GGUF's ``ne`` reversed, so a linear weight is ``(out_features,
in_features)``. A source hands out one tensor at a time as float32, so a model larger than RAM can
be processed block by block.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from dynsearch.errors import ModelError
from dynsearch.kernels import QT


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a decoder-only transformer, in llama.cpp's terms (GGUF metadata)."""

    arch: str  # GGUF architecture: "llama", "qwen2", "qwen3", "gemma3", "qwen3moe", "llama4"
    n_layer: int  # transformer blocks
    n_embd: int  # hidden size d
    n_ff: int  # width of the dense feed-forward layer
    n_head: int  # query heads
    n_head_kv: int  # key/value heads (GQA when < n_head)
    head_dim: int  # width of one query/key head (GGUF attention.key_length)
    head_dim_v: int  # width of one value head (GGUF attention.value_length)
    n_vocab: int  # rows of token_embd
    rms_eps: float  # epsilon of every RMSNorm
    n_rot: int  # leading dims of each head that RoPE rotates (GGUF rope.dimension_count)
    rope_base: float = 10000.0  # RoPE theta of full-attention layers
    rope_scale: float = 1.0  # linear position scale of full-attention layers (1 / rope.scaling.factor)
    rope_base_swa: float = 10000.0  # RoPE theta of sliding-window layers (scale 1)
    sliding_window: int = 0  # window of the sliding-window layers; 0: none
    swa_layers: tuple[bool, ...] = ()  # per layer, True where it attends within sliding_window
    attn_scale: float = 0.0  # scale of q.k; 0 means 1/sqrt(head_dim)
    final_logit_softcap: float = 0.0  # logits = c * tanh(logits / c) where > 0
    n_expert: int = 0  # experts per MoE layer; 0: dense model
    n_expert_used: int = 0  # experts routed to per token
    n_ff_exp: int = 0  # width of one expert's feed-forward layer (expert_feed_forward_length)
    swa_chunked: bool = False  # the sliding_window layers attend within chunks of that size (llama4)
    rope_scale_swa: float = 1.0  # linear position scale of sliding-window layers
    nope_layers: tuple[bool, ...] = ()  # per layer, True where RoPE is skipped (llama4's every 4th)
    kq_l2_norm: bool = False  # weightless RMSNorm of q and k on RoPE layers (llama4's use_kq_norm)
    # attention temperature of no-RoPE layers (llama4): q *= 1 + scale * log(floor((pos + offset) / floor) + 1)
    attn_temp_floor: int = 0  # 0: off
    attn_temp_scale: float = 0.0
    attn_temp_offset: float = 0.0
    extra: dict = field(default_factory=dict, compare=False)  # arch-specific leftovers, read-only

    @property
    def kq_scale(self) -> float:
        return self.attn_scale if self.attn_scale > 0 else 1.0 / float(np.sqrt(self.head_dim))

    def is_swa(self, il: int) -> bool:
        return self.sliding_window > 0 and bool(self.swa_layers) and self.swa_layers[il]

    def uses_rope(self, il: int) -> bool:
        return not (self.nope_layers and self.nope_layers[il])


@runtime_checkable
class WeightSource(Protocol):
    """A model's weights under GGUF names, read one tensor at a time."""

    config: ModelConfig

    def names(self) -> list[str]:
        """All tensor names, in file order."""
        ...

    def shape(self, name: str) -> tuple[int, ...]:
        """Numpy shape (GGUF ``ne`` reversed): ``(out_features, in_features)`` for a linear weight."""
        ...

    def qtype(self, name: str) -> QT:
        """The GGUF type the tensor is stored in."""
        ...

    def load(self, name: str) -> np.ndarray:
        """The tensor dequantized to float32, shaped as :meth:`shape`."""
        ...


def missing_tensor(source_name: str, name: str) -> ModelError:
    return ModelError(f"{source_name}: tensor {name!r} not found")
