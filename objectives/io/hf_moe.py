"""Mixture-of-experts checkpoints (qwen3moe, llama4) under GGUF's stacked expert tensors.

GGUF keeps one tensor per layer and projection for all experts: ``ffn_{gate,up}_exps`` of shape
``(n_expert, n_ff_exp, n_embd)`` and ``ffn_down_exps`` of ``(n_expert, n_embd, n_ff_exp)`` (numpy
order). Hugging Face checkpoints store them two other ways, both turned into those stacks as
llama.cpp's ``convert_hf_to_gguf.py`` does:

* one 2-D tensor per expert, ``mlp.experts.{e}.{gate,up,down}_proj.weight`` (Qwen3-MoE;
  ``Qwen2MoeModel.modify_tensors``: ``torch.stack`` over the experts in id order);
* one fused 3-D tensor per layer: llama4's ``feed_forward.experts.gate_up_proj`` of
  ``(n_expert, n_embd, 2 * n_ff_exp)`` and ``down_proj`` of ``(n_expert, n_ff_exp, n_embd)``, split
  and transposed (``Llama4Model.modify_tensors``), or transformers 5's in-memory layout
  ``(n_expert, 2 * n_ff_exp, n_embd)`` / ``(n_expert, n_embd, n_ff_exp)``, split only
  (``Qwen2MoeModel``).

A stack is read when asked for, one expert (or one half of a fused tensor, through a
``safe_open`` slice) at a time. :func:`moe_fields` maps config.json's MoE keys to the
:class:`ModelConfig` fields the GGUF path reads (``expert_count``, ...), with llama.cpp's fixed
llama4 values (8192-token chunks, attention temperature, NoPE every 4th layer); a config that
asks for something else is refused, since the GGUF written from it would compute differently.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from dynsearch.errors import ModelError
from dynsearch.objectives.io.architectures import ArchSpec, swa_layers_from_pattern

_PER_EXPERT = re.compile(r"^(?P<base>.+\.experts)\.(?P<x>\d+)\.(?P<w>gate_proj|up_proj|down_proj)\.weight$")
_FUSED = re.compile(r"^(?P<base>.+\.experts)\.(?P<w>gate_up_proj|down_proj)(?:\.weight)?$")
_PROJ = ("gate_proj", "up_proj", "down_proj")

# llama.cpp's llama_model_llama4::load_arch_hparams ignores these config.json values and uses its own
LLAMA4_CHUNK = 8192  # n_swa of the chunked-attention layers
LLAMA4_TEMP = dict(attn_temp_floor=8192, attn_temp_scale=0.1, attn_temp_offset=1.0)
LLAMA4_SWA_PATTERN = 4  # 3 chunked layers, then 1 full


@dataclass(frozen=True)
class ExpertStack:
    """How to read one GGUF ``ffn_*_exps`` tensor from the checkpoint."""

    parts: tuple[tuple[Path, str], ...]  # (file, HF name): one per expert, or the one fused tensor
    shape: tuple[int, ...]  # (n_expert, rows, cols) as the forward pass sees it
    dtype: str  # safetensors dtype of the parts
    fused: bool = False  # parts[0] holds all experts in one 3-D tensor
    half: int = -1  # fused gate_up_proj: 0 the gate half, 1 the up half; -1 the whole tensor
    transposed: bool = False  # the fused tensor is (n_expert, in, out): llama4's layout

    def read(self, open_file: Callable) -> np.ndarray:
        """float32 ``(n_expert, rows, cols)``; ``open_file(path)``: a context manager giving ``safe_open``."""
        with contextlib.ExitStack() as stack:
            handles: dict[Path, Any] = {}

            def st(f: Path):
                if f not in handles:
                    handles[f] = stack.enter_context(open_file(f))
                return handles[f]

            if self.fused:
                f, name = self.parts[0]
                sl = st(f).get_slice(name)
                if self.half >= 0:  # only the rows (or columns) of one half are read
                    n = self.shape[1]  # n_ff_exp
                    part = slice(self.half * n, (self.half + 1) * n)
                    w = sl[:, :, part] if self.transposed else sl[:, part, :]
                else:
                    w = sl[:]
                w = w.float().numpy()
                return np.ascontiguousarray(w.swapaxes(1, 2) if self.transposed else w, dtype=np.float32)
            out = np.empty(self.shape, dtype=np.float32)
            for x, (f, name) in enumerate(self.parts):  # one expert at a time
                out[x] = st(f).get_tensor(name).float().numpy()
            return out


class ExpertIndex:
    """Collects a checkpoint's expert tensors while it is indexed, then checks and stacks them.

    ``offer`` takes a tensor (its name with the multimodal prefix already stripped) and returns
    True when it is an expert tensor, which the caller then leaves out of its plain index.
    """

    def __init__(self, folder: Path, n_expert: int, transposed: bool):
        self.folder = folder
        self.n_expert = n_expert
        self.transposed = transposed  # fused tensors in llama4's (n_expert, in, out) layout
        self._per_expert: dict[tuple[str, str], dict[int, tuple[Path, str, tuple[int, ...], str]]] = {}
        self._fused: dict[tuple[str, str], tuple[Path, str, tuple[int, ...], str]] = {}

    def offer(self, f: Path, hf_name: str, mapped: str, shape: tuple[int, ...], dtype: str) -> bool:
        if self.n_expert <= 0:
            return False
        m = _PER_EXPERT.match(mapped)
        if m:
            key = (m["base"], m["w"])
            self._per_expert.setdefault(key, {})[int(m["x"])] = (f, hf_name, shape, dtype)
            return True
        m = _FUSED.match(mapped)
        if m:
            self._fused[(m["base"], m["w"])] = (f, hf_name, shape, dtype)
            return True
        return False

    def stacks(self, gguf_name: Callable[[str], str | None]) -> dict[str, ExpertStack]:
        """GGUF name -> stack; ``gguf_name`` maps ``model.layers.3.mlp.experts.gate_proj`` to
        ``blk.3.ffn_gate_exps`` (None: not a tensor llama.cpp keeps)."""
        out: dict[str, ExpertStack] = {}
        for (base, w), experts in self._per_expert.items():
            name = gguf_name(f"{base}.{w}")
            if name is not None:
                out[name] = self._stack(base, w, experts)
        for (base, w), (f, hf_name, shape, dtype) in self._fused.items():
            if any((base, p) in self._per_expert for p in _PROJ):
                raise ModelError(f"{self.folder.name}: {hf_name} and per-expert tensors of the same layer")
            for proj, stack in self._split(f, hf_name, shape, dtype, w):
                name = gguf_name(f"{base}.{proj}")
                if name is not None:
                    out[name] = stack
        return out

    def _stack(self, base: str, w: str, experts: dict) -> ExpertStack:
        ids = set(experts)
        missing = sorted(set(range(self.n_expert)) - ids)
        extra = sorted(ids - set(range(self.n_expert)))
        where = f"{self.folder.name}: {base}.*.{w}.weight"
        if missing or extra:
            what = f"experts {missing[:8]} missing" if missing else f"experts {extra[:8]} beyond the last"
            raise ModelError(f"{where}: {what} (config.json has {self.n_expert} experts)")
        parts = [experts[x] for x in range(self.n_expert)]
        shapes = {p[2] for p in parts}
        dtypes = {p[3] for p in parts}
        if len(shapes) != 1 or len(dtypes) != 1 or len(parts[0][2]) != 2:
            raise ModelError(f"{where}: the experts' tensors differ in shape or dtype, or are not 2-D "
                             f"(shapes {sorted(shapes)[:3]}, dtypes {sorted(dtypes)})")
        return ExpertStack(tuple((p[0], p[1]) for p in parts), (self.n_expert, *parts[0][2]), parts[0][3])

    def _split(self, f: Path, hf_name: str, shape: tuple[int, ...], dtype: str, w: str):
        if len(shape) != 3 or shape[0] != self.n_expert:
            raise ModelError(f"{f.name}: {hf_name} has shape {list(shape)}, expected "
                             f"[{self.n_expert} experts, rows, cols]")
        _, a, b = shape
        t = self.transposed
        if w == "down_proj":
            yield "down_proj", ExpertStack(((f, hf_name),), (self.n_expert, b, a) if t else shape, dtype,
                                           fused=True, transposed=t)
            return
        two_ff = b if t else a
        if two_ff % 2:
            raise ModelError(f"{f.name}: {hf_name} has shape {list(shape)}: an odd gate+up width {two_ff}")
        n_in = a if t else b
        for half, proj in enumerate(("gate_proj", "up_proj")):
            yield proj, ExpertStack(((f, hf_name),), (self.n_expert, two_ff // 2, n_in), dtype,
                                    fused=True, half=half, transposed=t)


def n_expert_of(spec: ArchSpec, hp: dict[str, Any]) -> int:
    """Experts per routed layer, from config.json (0 for a dense architecture)."""
    if spec.name not in ("qwen3moe", "llama4"):
        return 0
    for key in ("num_local_experts", "num_experts"):  # as the converter's find_hparam
        if key in hp:
            return int(hp[key])
    raise KeyError("num_local_experts")


def _refuse(cfg_name: str, key: str, got: Any, llama_cpp: str) -> ModelError:
    return ModelError(f"{cfg_name}: {key} = {got!r}, but llama.cpp's {llama_cpp}; "
                      "a GGUF of this model would compute something else, so it is not supported")


def moe_fields(spec: ArchSpec, hp: dict[str, Any], n_layer: int, rope_base: float, rope_scale: float,
               cfg_name: str) -> dict[str, Any]:
    """The :class:`ModelConfig` fields of an MoE architecture, as the converted GGUF would give them
    (``n_ff``: the dense FFN width; llama4: its chunked attention, NoPE layers and temperature)."""
    n_expert, n_used = n_expert_of(spec, hp), int(hp["num_experts_per_tok"])
    if not 0 < n_used <= n_expert:
        raise ModelError(f"{cfg_name}: num_experts_per_tok = {n_used} with {n_expert} experts: "
                         "needs 0 < num_experts_per_tok <= experts")
    out: dict[str, Any] = dict(n_expert=n_expert, n_expert_used=n_used)
    if spec.name == "qwen3moe":
        if hp.get("mlp_only_layers") or hp.get("decoder_sparse_step", 1) != 1:
            raise _refuse(cfg_name, "mlp_only_layers / decoder_sparse_step",
                          (hp.get("mlp_only_layers"), hp.get("decoder_sparse_step")),
                          "qwen3moe routes every layer")
        if not hp.get("norm_topk_prob", False):  # transformers' default is False
            raise _refuse(cfg_name, "norm_topk_prob", hp.get("norm_topk_prob", False),
                          "qwen3moe always renormalises the top-k weights")
        out.update(n_ff=int(hp["intermediate_size"]), n_ff_exp=int(hp["moe_intermediate_size"]))
        return out
    # llama4 (Llama4Model in the converter: intermediate_size is the experts', _mlp the dense layers')
    out.update(n_ff=int(hp["intermediate_size_mlp"]), n_ff_exp=int(hp["intermediate_size"]))
    types = hp.get("layer_types")
    if types and all(t == "full_attention" for t in types):
        raise ModelError(f"{cfg_name}: llama4 without chunked attention (all layer_types are "
                         "full_attention) is not supported")
    swa = swa_layers_from_pattern(n_layer, LLAMA4_SWA_PATTERN)
    if types and tuple(t == "chunked_attention" for t in types) != swa:
        raise _refuse(cfg_name, "layer_types", types, "llama4 has chunked attention on 3 of 4 layers")
    chunk = hp.get("attention_chunk_size", LLAMA4_CHUNK)
    if chunk != LLAMA4_CHUNK:
        raise _refuse(cfg_name, "attention_chunk_size", chunk, f"llama4 uses chunks of {LLAMA4_CHUNK}")
    nope = tuple((il + 1) % spec.nope_layer_step == 0 for il in range(n_layer))
    # Llama4TextConfig: an empty or missing no_rope_layers means every no_rope_layer_interval-th layer
    interval = hp.get("no_rope_layer_interval", 4)
    uses_rope = hp.get("no_rope_layers") or [int((il + 1) % interval != 0) for il in range(n_layer)]
    if tuple(not x for x in uses_rope[:n_layer]) != nope:
        raise _refuse(cfg_name, "no_rope_layers", uses_rope, "llama4 skips RoPE on every 4th layer")
    kq_norm = n_expert != 128  # use_kq_norm: off for the 17B-128E model only
    if bool(hp.get("use_qk_norm", True)) != kq_norm:  # transformers' default is True
        raise _refuse(cfg_name, "use_qk_norm", hp.get("use_qk_norm", True),
                      f"llama4 {'uses' if kq_norm else 'skips'} it with {n_expert} experts")
    temp = (bool(hp.get("attn_temperature_tuning", True)), hp.get("floor_scale", 8192), hp.get("attn_scale", 0.1))
    if temp != (True, LLAMA4_TEMP["attn_temp_floor"], LLAMA4_TEMP["attn_temp_scale"]):
        raise _refuse(cfg_name, "attn_temperature_tuning, floor_scale, attn_scale", temp,
                      "llama4 always applies (True, 8192, 0.1)")
    out.update(sliding_window=LLAMA4_CHUNK, swa_layers=swa, swa_chunked=True, nope_layers=nope,
               kq_l2_norm=kq_norm, rope_base_swa=rope_base, rope_scale_swa=rope_scale, **LLAMA4_TEMP)
    return out
