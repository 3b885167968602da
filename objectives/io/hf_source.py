"""A Hugging Face checkpoint folder (config.json + *.safetensors) under GGUF tensor names.

Names are mapped with gguf-py's ``TensorNameMap``, and each tensor gets the changes llama.cpp's
``convert_hf_to_gguf.py`` makes, so that the forward pass sees exactly what it would see in the
converted GGUF file: q/k rows permuted for llama (``LlamaModel.permute``), ``+1`` on Gemma 3 norms,
and llama-3 RoPE frequency factors as ``rope_freqs.weight``; MoE experts are stacked as GGUF's
``ffn_*_exps`` (see :mod:`.hf_moe`). Tensors are read one at a time through
``safetensors.safe_open`` (never ``torch.load``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from safetensors import SafetensorError, safe_open

from dynsearch.errors import DynsearchError, ModelError
from dynsearch.kernels import QT
from dynsearch.objectives.io.architectures import (
    ArchSpec,
    architecture_for_hf,
    swa_layers_from_pattern,
)
from dynsearch.objectives.io.hf_moe import ExpertIndex, ExpertStack, moe_fields, n_expert_of
from dynsearch.objectives.io.model import ModelConfig, missing_tensor
from dynsearch.objectives.io.model_check import block_indices, check_block_count, check_model

_DTYPES = {"F32": QT.F32, "F16": QT.F16, "BF16": QT.BF16}
# Prefixes of the text model inside multimodal checkpoints (Gemma3ForConditionalGeneration).
_PREFIXES = (("language_model.model.", "model."), ("model.language_model.", "model."),
             ("language_model.lm_head.", "lm_head."))
_SKIP = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.",
         "vision_model.", "model.vision_model.")  # Gemma 3's and llama4's vision towers
_HF_BLOCK = re.compile(r"(?:[\w.]*\.)?layers\.(\d+)\.")  # model.layers.3.self_attn.q_proj.weight
# The config.json key of each ModelConfig field that tensor shapes must agree with.
KEYS = {"n_layer": "num_hidden_layers", "n_embd": "hidden_size", "n_ff": "intermediate_size",
        "n_head": "num_attention_heads", "n_head_kv": "num_key_value_heads", "head_dim": "head_dim",
        "head_dim_v": "head_dim", "n_rot": "partial_rotary_factor", "n_expert": "num_experts",
        "n_expert_used": "num_experts_per_tok", "n_ff_exp": "moe_intermediate_size"}


@dataclass(frozen=True)
class _Entry:
    file: Path
    hf_name: str
    shape: tuple[int, ...]
    qtype: QT
    stack: ExpertStack | None = None  # an MoE expert stack, built from one or many HF tensors


class SafetensorsSource:
    """A checkpoint folder as a :class:`~dynsearch.objectives.io.model.WeightSource`."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder)
        cfg_file = self.path / "config.json"
        if not cfg_file.is_file():
            raise ModelError(f"{self.path}: no config.json")
        hparams = read_json(cfg_file)
        with _config_errors(cfg_file):
            if "text_config" in hparams:  # multimodal: the text model's parameters win, as in the converter
                hparams = {**hparams, **hparams["text_config"]}
            self.spec = architecture_for_hf(hparams.get("architectures") or [])
            n_layer = count(hparams, "num_hidden_layers")
            experts = ExpertIndex(self.path, n_expert_of(self.spec, hparams), self.spec.name == "llama4")
        self.hparams = hparams
        files = self._files()
        # before gguf-py's name map is built for n_layer blocks: a corrupt count must not hang
        check_block_count(str(cfg_file), "num_hidden_layers", n_layer,
                          block_indices((n for n in files if not n.startswith(_SKIP)), _HF_BLOCK))
        self._entries = self._index(files, gguf.get_tensor_name_map(_model_arch(self.spec.name), n_layer), experts)
        if "token_embd.weight" not in self._entries:
            raise missing_tensor(self.path.name, "token_embd.weight")
        with _config_errors(cfg_file):
            self._rope_freqs = _llama3_rope_factors(hparams)
            self.config = config_from_hf(self.spec, hparams, self._entries["token_embd.weight"].shape[0])
            vocab = hparams.get("vocab_size")
            n_tokens = count(hparams, "vocab_size") if vocab is not None else None
        names = self.names()
        check_model(str(cfg_file), KEYS.__getitem__, self.config, {n: self.shape(n) for n in names},
                    {n: self.qtype(n) for n in names}, n_tokens)

    def _files(self) -> dict[str, Path]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ModelError(f"{index}: no weight_map object")
            for name, f in weight_map.items():
                if not isinstance(f, str) or Path(f).name != f or f in ("", ".", ".."):
                    raise ModelError(f"{index}: weight_map entry {name!r} is {f!r}, not a file in the folder")
            return {name: self.path / f for name, f in weight_map.items()}
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise ModelError(f"{self.path}: no *.safetensors files")
        out = {}
        for f in files:
            with _open(f) as st:
                out.update({name: f for name in st.keys()})
        return out

    def _index(self, files: dict[str, Path], tmap: gguf.TensorNameMap, experts: ExpertIndex) -> dict[str, _Entry]:
        entries: dict[str, _Entry] = {}
        by_file: dict[Path, list[str]] = {}
        for name, f in files.items():
            by_file.setdefault(f, []).append(name)
        for f, names in by_file.items():
            if not f.is_file():
                raise ModelError(f"{f}: no such file (listed in model.safetensors.index.json)")
            with _open(f) as st:
                for hf_name in names:
                    if hf_name.startswith(_SKIP):
                        continue
                    mapped = _strip_prefix(hf_name)
                    sl = st.get_slice(hf_name)
                    dtype, shape = sl.get_dtype(), tuple(sl.get_shape())
                    if experts.offer(f, hf_name, mapped, shape, dtype):
                        _check_dtype(f, hf_name, dtype)
                        continue
                    gguf_name = tmap.get_name(mapped, try_suffixes=(".weight", ".bias"))
                    if gguf_name is None:
                        continue  # rotary inv_freq buffers and the like: not weights llama.cpp keeps
                    entries[gguf_name] = _Entry(f, hf_name, shape, _check_dtype(f, hf_name, dtype))
        for gguf_name, stack in experts.stacks(lambda n: tmap.get_name(f"{n}.weight", try_suffixes=(".weight",))).items():
            entries[gguf_name] = _Entry(stack.parts[0][0], stack.parts[0][1], stack.shape, _DTYPES[stack.dtype], stack)
        return entries

    def names(self) -> list[str]:
        return list(self._entries) + (["rope_freqs.weight"] if self._rope_freqs is not None else [])

    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise missing_tensor(self.path.name, name) from None

    def shape(self, name: str) -> tuple[int, ...]:
        if name == "rope_freqs.weight" and self._rope_freqs is not None:
            return self._rope_freqs.shape
        return self._entry(name).shape

    def qtype(self, name: str) -> QT:
        if name == "rope_freqs.weight" and self._rope_freqs is not None:
            return QT.F32
        return self._entry(name).qtype

    def load(self, name: str) -> np.ndarray:
        if name == "rope_freqs.weight" and self._rope_freqs is not None:
            return self._rope_freqs.copy()
        e = self._entry(name)
        if e.stack is not None:
            return e.stack.read(_open)
        with _open(e.file) as st:
            w = st.get_tensor(e.hf_name).float().numpy()
        return self._convert(name, np.ascontiguousarray(w, dtype=np.float32))

    def _convert(self, name: str, w: np.ndarray) -> np.ndarray:
        """The changes convert_hf_to_gguf.py makes to this tensor."""
        cfg = self.config
        if self.spec.hf_permute_qk:
            if name.endswith(("attn_q.weight", "attn_q.bias")):
                w = permute_qk(w, cfg.n_head)
            elif name.endswith(("attn_k.weight", "attn_k.bias")):
                w = permute_qk(w, cfg.n_head_kv)
        if self.spec.hf_norm_shift and name.endswith("norm.weight"):
            w = w + np.float32(self.spec.hf_norm_shift)
        return w


def _check_dtype(f: Path, hf_name: str, dtype: str) -> QT:
    if dtype not in _DTYPES:
        raise ModelError(f"{f.name}: tensor {hf_name} has dtype {dtype}, expected F32/F16/BF16")
    return _DTYPES[dtype]


@contextlib.contextmanager
def _open(f: Path):
    """``safe_open`` (the safetensors library: a JSON header and raw bytes, nothing that can run
    code); a malformed or unreadable file is a one-line ModelError."""
    try:
        with safe_open(f, framework="pt") as st:
            yield st
    except SafetensorError as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelError(f"{f}: not a valid safetensors file ({why})") from None
    except OSError as e:
        raise ModelError(f"{f}: cannot read ({e.strerror or e})") from None


MAX_JSON_BYTES = 64 << 20  # config.json, an index of shards, tokenizer_config.json


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object of a checkpoint folder, read up to MAX_JSON_BYTES; anything else is one
    ModelError line naming the file."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_JSON_BYTES + 1)
        if len(raw) > MAX_JSON_BYTES:
            raise ModelError(f"{path}: larger than {MAX_JSON_BYTES >> 20} MiB, not a configuration file")
        data = json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise ModelError(f"{path}: not readable JSON (nested too deeply)") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ModelError(f"{path}: not readable JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


@contextlib.contextmanager
def _config_errors(cfg_file: Path):
    """A config.json that lacks a key or holds a value of the wrong type: one ModelError line."""
    try:
        yield
    except DynsearchError:
        raise
    except KeyError as e:
        raise ModelError(f"{cfg_file}: missing key {e.args[0]!r}") from None
    except (TypeError, ValueError, AttributeError, ZeroDivisionError, OverflowError) as e:
        raise ModelError(f"{cfg_file}: unusable value ({type(e).__name__}: {e})") from None


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute: HF's half-split RoPE rows to llama.cpp's pairs."""
    return np.ascontiguousarray(
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def _model_arch(name: str) -> gguf.MODEL_ARCH:
    for arch, arch_name in gguf.MODEL_ARCH_NAMES.items():
        if arch_name == name:
            return arch
    raise ModelError(f"gguf-py does not know architecture {name!r}")


def _strip_prefix(name: str) -> str:
    for old, new in _PREFIXES:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def _rope_parameters(hp: dict[str, Any]) -> dict[str, Any]:
    rp = dict(hp.get("rope_parameters") or hp.get("rope_scaling") or {})
    rp = dict(rp.get("full_attention", rp))
    if "rope_type" not in rp and "type" in rp:
        rp["rope_type"] = rp["type"]
    rp.setdefault("rope_theta", hp.get("rope_theta", 10000.0))
    return rp


def _llama3_rope_factors(hp: dict[str, Any]) -> np.ndarray | None:
    """convert_hf_to_gguf.py LlamaModel.generate_extra_tensors: llama-3 RoPE frequency factors."""
    rp = _rope_parameters(hp)
    if str(rp.get("rope_type", "")).lower() != "llama3":
        return None
    base = rp["rope_theta"]
    dim = hp.get("head_dim") or hp["hidden_size"] // hp["num_attention_heads"]
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor = rp.get("factor", 8.0)
    low, high = rp.get("low_freq_factor", 1.0), rp.get("high_freq_factor", 4.0)
    old_ctx = rp.get("original_max_position_embeddings", 8192)
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def count(hp: dict[str, Any], key: str, default: int | None = None) -> int:
    """A positive integer of config.json (``default`` when the key is absent or null); a KeyError
    or ValueError naming the key otherwise (the caller adds the file)."""
    if key not in hp and default is None:
        raise KeyError(key)
    v = hp.get(key)
    if v is None and default is not None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{key} = {str(v)[:40]!r} is not a positive integer")
    return v


def config_from_hf(spec: ArchSpec, hp: dict[str, Any], n_vocab: int) -> ModelConfig:
    """ModelConfig from config.json, as convert_hf_to_gguf.py would write it to GGUF metadata."""
    n_layer, n_embd = count(hp, "num_hidden_layers"), count(hp, "hidden_size")
    n_head = count(hp, "num_attention_heads")
    head_dim = count(hp, "head_dim", n_embd // n_head)
    rp = _rope_parameters(hp)
    rope_type = str(rp.get("rope_type", "default")).lower()
    if rope_type not in ("default", "linear", "llama3"):
        raise ModelError(f"rope scaling {rope_type!r} is not supported yet")
    factor = rp.get("factor") if rope_type == "linear" else None
    sliding_window, swa, attn_scale = 0, (), 0.0
    if spec.name == "gemma3":
        sliding_window = hp.get("sliding_window") or 0
        if "layer_types" in hp:
            swa = tuple(t == "sliding_attention" for t in hp["layer_types"])
        else:
            swa = swa_layers_from_pattern(n_layer, hp.get("sliding_window_pattern", spec.swa_pattern))
        attn_scale = hp.get("query_pre_attn_scalar", head_dim) ** -0.5
    local = (hp.get("rope_parameters") or {}).get("sliding_attention", {}).get("rope_theta")
    cfg = ModelConfig(
        arch=spec.name,
        n_layer=n_layer,
        n_embd=n_embd,
        n_ff=count(hp, "intermediate_size"),
        n_head=n_head,
        n_head_kv=count(hp, "num_key_value_heads", n_head),
        head_dim=head_dim,
        head_dim_v=head_dim,
        n_vocab=n_vocab,
        rms_eps=hp.get("rms_norm_eps", 1e-6),
        n_rot=int(head_dim * hp.get("partial_rotary_factor", 1.0)),
        rope_base=float(rp["rope_theta"]),
        rope_scale=1.0 / factor if factor else 1.0,
        rope_base_swa=float(local or hp.get("rope_local_base_freq", 10000.0)),
        sliding_window=sliding_window,
        swa_layers=swa,
        attn_scale=attn_scale,
        final_logit_softcap=hp.get("final_logit_softcapping") or 0.0,
    )
    if n_expert_of(spec, hp):
        cfg = dataclasses.replace(cfg, **moe_fields(spec, hp, n_layer, cfg.rope_base, cfg.rope_scale, "config.json"))
    return cfg
