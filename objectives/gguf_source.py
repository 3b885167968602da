"""Weights and hyper-parameters of a GGUF file, memory-mapped, dequantized one tensor at a time."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from dynsearch.kernels import QT
from dynsearch.kernels import dequantize as _kernels_dequantize

from .architectures import architecture, swa_layers_from_pattern
from .errors import ModelError
from .gguf_header import GGUFHeader
from .model import ModelConfig, missing_tensor

Dequantize = Callable[[np.ndarray, QT, int], np.ndarray]


class GGUFSource:
    """A ``.gguf`` file as a :class:`~dynsearch.objectives.model.WeightSource`.

    ``dequantize`` decodes one tensor's blocks (default: :func:`dynsearch.kernels.dequantize`).
    """

    def __init__(self, path: str | Path, dequantize: Dequantize | None = None):
        self.path = Path(path)
        self.header = GGUFHeader(self.path)
        self._dequantize = dequantize or _kernels_dequantize
        self.config = config_from_gguf(self.header, self.shape("token_embd.weight")[0])

    def metadata(self, key: str, default: Any = None) -> Any:
        """One metadata value (``general.name``, ``llama.block_count``, ...), or ``default``."""
        return self.header.get(key, default)

    def names(self) -> list[str]:
        return list(self.header.tensors)

    def _check(self, name: str) -> None:
        if name not in self.header.tensors:
            raise missing_tensor(self.path.name, name)

    def shape(self, name: str) -> tuple[int, ...]:
        self._check(name)
        return self.header.tensors[name].shape

    def qtype(self, name: str) -> QT:
        self._check(name)
        return self.header.tensors[name].qtype

    def raw(self, name: str) -> np.ndarray:
        """The tensor's stored bytes (uint8, read-only view of the mapped file)."""
        self._check(name)
        return self.header.data(name)

    def load(self, name: str) -> np.ndarray:
        shape = self.shape(name)
        return self._dequantize(self.raw(name), self.qtype(name), shape[-1]).reshape(shape)


def _per_layer(value: Any, n_layer: int, key: str) -> int:
    """A hyper-parameter llama.cpp accepts as one number or one per layer (get_key_or_arr)."""
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise ModelError(f"per-layer {key} {value} is not supported yet")
        return int(value[0])
    return int(value)


def config_from_gguf(header: GGUFHeader, n_vocab: int) -> ModelConfig:
    """ModelConfig from GGUF metadata, with llama.cpp's defaults (llama_model::load_hparams)."""
    arch = header.get("general.architecture")
    if arch is None:
        raise ModelError(f"{header.path.name}: no general.architecture in the metadata")
    spec = architecture(arch)

    def key(k: str, default: Any = None, required: bool = False) -> Any:
        v = header.get(f"{arch}.{k}", default)
        if v is None and required:
            raise ModelError(f"{header.path.name}: missing GGUF metadata key '{arch}.{k}'")
        return v

    n_layer = int(key("block_count", required=True))
    n_embd = int(key("embedding_length", required=True))
    n_head = _per_layer(key("attention.head_count", required=True), n_layer, "head_count")
    n_head_kv = _per_layer(key("attention.head_count_kv", n_head), n_layer, "head_count_kv")
    head_dim = int(key("attention.key_length", n_embd // n_head))
    scaling = key("rope.scaling.type", "linear")
    if scaling not in ("linear", "none"):
        raise ModelError(f"{header.path.name}: rope scaling {scaling!r} is not supported yet")
    factor = float(key("rope.scaling.factor", 0.0) or key("rope.scale_linear", 0.0))

    sliding_window = int(key("attention.sliding_window", 0))
    swa_layers: tuple[bool, ...] = ()
    if sliding_window > 0:
        pattern = key("attention.sliding_window_pattern", spec.swa_pattern)
        swa_layers = (tuple(bool(x) for x in pattern) if isinstance(pattern, list)
                      else swa_layers_from_pattern(n_layer, int(pattern)))

    attn_scale = float(key("attention.scale", 0.0))
    if arch == "gemma3":  # llama_model_gemma3::load_arch_hparams: only the 27B scales by d / n_head
        attn_scale = 1.0 / np.sqrt(n_embd / n_head if n_layer == 62 else head_dim)

    return ModelConfig(
        arch=arch,
        n_layer=n_layer,
        n_embd=n_embd,
        n_ff=_per_layer(key("feed_forward_length", 0), n_layer, "feed_forward_length"),
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim=head_dim,
        head_dim_v=int(key("attention.value_length", n_embd // n_head)),
        n_vocab=n_vocab,
        rms_eps=float(key("attention.layer_norm_rms_epsilon", required=True)),
        n_rot=int(key("rope.dimension_count", head_dim)),
        rope_base=float(key("rope.freq_base", 10000.0)),
        rope_scale=1.0 / factor if factor else 1.0,
        rope_base_swa=float(key("rope.freq_base_swa", 10000.0)),
        sliding_window=sliding_window,
        swa_layers=swa_layers,
        attn_scale=float(attn_scale),
        final_logit_softcap=float(key("final_logit_softcapping", 0.0)),
        n_expert=int(key("expert_count", 0)),
        n_expert_used=int(key("expert_used_count", 0)),
    )
