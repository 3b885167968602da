"""Weights and hyper-parameters of a GGUF file, memory-mapped, dequantized one tensor at a time."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from dynsearch.errors import ModelError
from dynsearch.kernels import QT, row_nbytes
from dynsearch.kernels import dequantize as _kernels_dequantize
from dynsearch.objectives.io.architectures import architecture, swa_layers_from_pattern
from dynsearch.objectives.io.gguf_header import GGUFHeader
from dynsearch.objectives.io.model import ModelConfig, missing_tensor
from dynsearch.objectives.io.model_check import block_indices, check_block_count, check_model

Dequantize = Callable[[np.ndarray, QT, int], np.ndarray]

# The GGUF key (after "<arch>.") of each ModelConfig field that tensor shapes must agree with.
KEYS = {"n_layer": "block_count", "n_embd": "embedding_length", "n_ff": "feed_forward_length",
        "n_head": "attention.head_count", "n_head_kv": "attention.head_count_kv",
        "head_dim": "attention.key_length", "head_dim_v": "attention.value_length",
        "n_rot": "rope.dimension_count", "n_expert": "expert_count", "n_expert_used": "expert_used_count",
        "n_ff_exp": "expert_feed_forward_length"}


class GGUFSource:
    """A ``.gguf`` file as a :class:`~dynsearch.objectives.io.model.WeightSource`.

    ``dequantize`` decodes one tensor's blocks (default: :func:`dynsearch.kernels.dequantize`).
    The configuration is checked against the tensors when the file is opened
    (:func:`~dynsearch.objectives.io.model_check.check_model`).
    """

    def __init__(self, path: str | Path, dequantize: Dequantize | None = None):
        self.path = Path(path)
        self.header = GGUFHeader(self.path)
        self._dequantize = dequantize or _kernels_dequantize
        self.config = config_from_gguf(self.header, self.shape("token_embd.weight")[0])
        tokens = self.header.get("tokenizer.ggml.tokens")
        tensors = self.header.tensors
        check_model(self.path.name, lambda f: f"GGUF metadata {self.config.arch}.{KEYS[f]}", self.config,
                    {n: t.shape for n, t in tensors.items()}, {n: t.qtype for n, t in tensors.items()},
                    len(tokens) if isinstance(tokens, list) else None)

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
        """The tensor's stored bytes (uint8), read from the file into a new array.

        Read, not a view of the header's mapping: pages of a mapping stay resident (and count
        in RSS) until memory runs short, so a model read tensor by tensor through it would
        grow to the whole file; read pages live in the page cache, which the kernel drops first.
        """
        self._check(name)
        t = self.header.tensors[name]
        out = np.empty(t.nbytes, dtype=np.uint8)
        try:
            with open(self.path, "rb", buffering=0) as f:
                f.seek(t.offset)
                got = f.readinto(memoryview(out))
                while got is not None and 0 < got < t.nbytes:  # short reads: keep going
                    more = f.readinto(memoryview(out)[got:])
                    got = got + more if more else None
        except OSError as e:
            raise ModelError(f"{self.path}: cannot read tensor {name!r} ({e.strerror or e})") from None
        if got != t.nbytes:
            raise ModelError(f"{self.path}: tensor {name!r} is cut short (file changed or truncated?)")
        return out

    def load(self, name: str) -> np.ndarray:
        shape = self.shape(name)
        raw = self.raw(name)
        if self.qtype(name) == QT.F32 and self._dequantize is _kernels_dequantize:
            return raw.view(np.float32).reshape(shape)  # the read array itself: no second copy
        return self._dequantize(raw, self.qtype(name), shape[-1]).reshape(shape)

    def load_rows(self, name: str, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (int, any order) of 2-D tensor ``name``, float32 (len(rows), n_per_row):
        only their bytes are read (a token embedding's lookup without the vocabulary-wide table)."""
        self._check(name)
        shape, qt = self.shape(name), self.qtype(name)
        n_per_row = shape[-1]
        rb = row_nbytes(qt, n_per_row)
        t = self.header.tensors[name]
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= int(np.prod(shape[:-1]))):
            raise ModelError(f"{self.path}: row index out of range for tensor {name!r}")
        out = np.empty((rows.size, rb), dtype=np.uint8)
        try:
            with open(self.path, "rb", buffering=0) as f:
                for i, r in enumerate(rows):
                    got = os.preadv(f.fileno(), [memoryview(out[i])], t.offset + int(r) * rb)
                    if got != rb:
                        raise ModelError(f"{self.path}: tensor {name!r} is cut short (file changed or truncated?)")
        except OSError as e:
            raise ModelError(f"{self.path}: cannot read tensor {name!r} ({e.strerror or e})") from None
        return self._dequantize(out.reshape(-1), qt, n_per_row).reshape(rows.size, n_per_row)


def _number(value: Any, what: str, kind: type, minimum: float | None = None) -> Any:
    """A metadata value as ``kind`` (int or float), or a ModelError naming the file and key
    (``what``): a file may hold any type under any key."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        x = kind(value)
        if x == value and (minimum is None or x >= minimum):
            return x
    shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    raise ModelError(f"{what} = {shown} is not a valid "
                     f"{'count' if kind is int else 'number'}"
                     f"{f' (at least {minimum})' if minimum is not None else ''}")


def _per_layer(value: Any, n_layer: int, what: str, minimum: int = 0) -> int:
    """A hyper-parameter llama.cpp accepts as one number or one per layer (get_key_or_arr)."""
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise ModelError(f"{what} = {value[:8]}: per-layer values are not supported yet")
        value = value[0]
    return _number(value, what, int, minimum)


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

    def what(k: str) -> str:
        return f"{header.path.name}: GGUF metadata {arch}.{k}"

    def count(k: str, default: Any = None, required: bool = False, minimum: int = 0) -> int:
        return _number(key(k, default, required), what(k), int, minimum)

    def real(k: str, default: Any = None, required: bool = False) -> float:
        return _number(key(k, default, required), what(k), float)

    n_layer = count("block_count", required=True, minimum=1)
    # before anything is built per layer: a corrupt count must not allocate or loop for hours
    check_block_count(header.path.name, f"GGUF metadata {arch}.block_count", n_layer, block_indices(header.tensors))
    n_embd = count("embedding_length", required=True, minimum=1)
    n_head = _per_layer(key("attention.head_count", required=True), n_layer, what("attention.head_count"), 1)
    n_head_kv = _per_layer(key("attention.head_count_kv", n_head), n_layer, what("attention.head_count_kv"), 1)
    head_dim = count("attention.key_length", n_embd // n_head, minimum=1)
    scaling = key("rope.scaling.type", "linear")
    if scaling not in ("linear", "none"):
        raise ModelError(f"{header.path.name}: rope scaling {scaling!r} is not supported yet")
    factor = real("rope.scaling.factor", 0.0) or real("rope.scale_linear", 0.0)

    sliding_window = count("attention.sliding_window", 0)
    swa_layers: tuple[bool, ...] = ()
    if sliding_window > 0:
        pattern = key("attention.sliding_window_pattern", spec.swa_pattern)
        swa_layers = (tuple(bool(x) for x in pattern) if isinstance(pattern, list)
                      else swa_layers_from_pattern(n_layer, _number(pattern, what("attention.sliding_window_pattern"), int, 0)))

    moe = _moe_config(arch, n_layer, count, key, lambda k: what(k))
    if arch == "llama4":  # llama_model_llama4::load_arch_hparams: chunked attention, 3 of 4 layers
        if key("attention.sliding_window") is not None and sliding_window == 0:
            raise ModelError(f"{header.path.name}: llama4 without chunked attention "
                             "(attention.sliding_window = 0) is not supported")
        sliding_window = 8192  # llama.cpp ignores the stored value: chunks of 8192 tokens
        pattern = key("attention.sliding_window_pattern", 4)
        swa_layers = (tuple(bool(x) for x in pattern) if isinstance(pattern, list)
                      else swa_layers_from_pattern(n_layer, _number(pattern, what("attention.sliding_window_pattern"), int, 0)))

    attn_scale = real("attention.scale", 0.0)
    if arch == "gemma3":  # llama_model_gemma3::load_arch_hparams: only the 27B scales by d / n_head
        attn_scale = 1.0 / np.sqrt(n_embd / n_head if n_layer == 62 else head_dim)

    cfg = ModelConfig(
        arch=arch,
        n_layer=n_layer,
        n_embd=n_embd,
        n_ff=_per_layer(key("feed_forward_length", 0), n_layer, what("feed_forward_length")),
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim=head_dim,
        head_dim_v=count("attention.value_length", n_embd // n_head, minimum=1),
        n_vocab=n_vocab,
        rms_eps=real("attention.layer_norm_rms_epsilon", required=True),
        n_rot=count("rope.dimension_count", head_dim),
        rope_base=real("rope.freq_base", 10000.0),
        rope_scale=1.0 / factor if factor else 1.0,
        rope_base_swa=real("rope.freq_base_swa", 10000.0),
        sliding_window=sliding_window,
        swa_layers=swa_layers,
        attn_scale=float(attn_scale),
        final_logit_softcap=real("final_logit_softcapping", 0.0),
        rope_scale_swa=(1.0 / factor if factor else 1.0) if arch == "llama4" else 1.0,
        **moe,
    )
    if arch == "llama4":
        cfg = dataclasses.replace(cfg, rope_base_swa=real("rope.freq_base_swa", cfg.rope_base))
    return cfg


def _moe_config(arch: str, n_layer: int, count, key, what) -> dict[str, Any]:
    """The MoE and llama4 fields of ModelConfig (load_arch_hparams of qwen3moe / llama4)."""
    spec = architecture(arch)
    n_expert, n_expert_used = count("expert_count", 0), count("expert_used_count", 0)
    out: dict[str, Any] = dict(n_expert=n_expert, n_expert_used=n_expert_used)
    if arch in ("qwen3moe", "llama4"):
        if n_expert == 0 or n_expert_used == 0 or n_expert_used > n_expert:
            raise ModelError(f"{what('expert_count')} = {n_expert}, expert_used_count = {n_expert_used}: "
                             f"{arch} needs 0 < expert_used_count <= expert_count")
        out["n_ff_exp"] = _per_layer(key("expert_feed_forward_length", 0), n_layer,
                                     what("expert_feed_forward_length"))
    if spec.nope_layer_step:
        out["nope_layers"] = tuple((il + 1) % spec.nope_layer_step == 0 for il in range(n_layer))
    if arch == "llama4":
        out.update(kq_l2_norm=n_expert != 128,  # use_kq_norm: off for the 17B-128E model only
                   swa_chunked=True, attn_temp_floor=8192, attn_temp_scale=0.1, attn_temp_offset=1.0)
    return out
