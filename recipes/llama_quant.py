"""What ``llama-quantize`` does with a file, in Python: the rules a recipe's GGUF must follow to be
the file llama.cpp writes for the same types.

Each function mirrors one piece of vendor llama.cpp (the version llama-cpp-python ships), named
where it is defined:

* :func:`tensor_order` -- the order tensors are written in (``weight_name_comparer``,
  src/llama-model-loader.h): tensors outside blocks first, then by block number, then by name.
* :func:`llama_quantizes` -- which tensors llama-quantize converts at all
  (``tensor_allows_quantization``, src/llama-quant.cpp); every other tensor is copied as stored.
* :func:`requires_imatrix` -- where it refuses to quantize without an importance matrix
  (``tensor_requires_imatrix``).
* :func:`file_type` -- the ``general.file_type`` recorded, which for a recipe is also the base type
  passed on llama-quantize's command line (overrides only apply when it is a quantized type).
* :func:`imatrix_metadata` -- the ``quantize.imatrix.*`` keys it records (tools/quantize/quantize.cpp).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping

from gguf import GGUFValueType, LlamaFileType

from dynsearch.kernels import QT, parse_qtype
from dynsearch.objectives.io.imatrix import ImatrixData

_BLOCK_RE = re.compile(r"^blk\.\s*([+-]?\d+)")  # sscanf(name, "blk.%d.", &layer)


def _layer(name: str) -> int:
    m = _BLOCK_RE.match(name)
    return int(m.group(1)) if m else -1


def tensor_order(names: Iterable[str]) -> list[str]:
    """``names`` in llama-quantize's write order: by block number (-1 outside blocks), then by name
    (byte order, as std::string compares)."""
    return sorted(names, key=lambda n: (_layer(n), n.encode("utf-8")))


# Substrings of tensor names llama-quantize never converts (tensor_allows_quantization), in order.
_NEVER = ("_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel",
          "per_layer_model_proj", "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight",
          "indexer.q_proj.weight", "time_mix_first.weight", "time_mix_w0.weight",
          "time_mix_w1.weight", "time_mix_w2.weight", "time_mix_v0.weight", "time_mix_v1.weight",
          "time_mix_v2.weight", "time_mix_a0.weight", "time_mix_a1.weight", "time_mix_a2.weight",
          "time_mix_g1.weight", "time_mix_g2.weight", "time_mix_decay_w1.weight",
          "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight", "attn_rel_b.weight",
          ".position_embd", "sam.pos_embd", "sam.neck.", "sam.net_", ".rel_pos", ".patch_embd",
          ".patch_merger", "a.rvq.codebook", "mm.a.code_embd")
_NEVER_GLM5_NEXT = ("hc_", "indexer.attn_q_b", "indexer.attn_k", "indexer.proj",
                    "indexer_compressor_gate", "indexer_compressor_ape", "ssm_f_a.weight",
                    "ssm_f_b.weight", "ssm_g_a.weight", "ssm_g_b.weight", "ssm_beta.weight",
                    "attn_kv_a_mqa.weight", "attn_k_b.weight", "attn_v_b.weight")
_NEVER_EXACT = ("position_embd.weight", "token_types.weight")


def _n_dims(shape: tuple[int, ...]) -> int:
    """ggml_n_dims: dimensions up to the last one larger than 1 (ne is numpy's shape reversed)."""
    ne = list(reversed(shape))
    return max((i + 1 for i, d in enumerate(ne) if d > 1), default=1)


def llama_quantizes(name: str, shape: tuple[int, ...], arch: str = "") -> bool:
    """Whether llama-quantize converts this tensor (else it copies the stored bytes unchanged).

    ``shape`` is numpy order; only tensors of 2 or more dimensions whose name ends in ``weight``
    qualify, minus norms, MoE routers and a list of small or special tensors.
    """
    if _n_dims(shape) < 2:
        return False
    if not name.endswith("weight") or name in _NEVER_EXACT:
        return False
    never = _NEVER + (_NEVER_GLM5_NEXT if arch == "glm5-next" else ())
    return not any(s in name for s in never)


def is_embedding_or_output(name: str) -> bool:
    return name in ("token_embd.weight", "per_layer_token_embd.weight", "output.weight")


# ggml types llama-quantize will not write without importance weights (token embeddings and the
# output tensor excepted); Q2_K only in a Q2_K_S file, which a recipe's file never is.
_NEEDS_IMATRIX = frozenset({QT.IQ3_XXS, QT.IQ2_XXS, QT.IQ2_XS, QT.IQ2_S, QT.IQ1_M, QT.IQ1_S})


def requires_imatrix(name: str, qtype: QT | str) -> bool:
    return not is_embedding_or_output(name) and parse_qtype(qtype) in _NEEDS_IMATRIX


@dataclass(frozen=True)
class FileType:
    """A llama_ftype: what ``general.file_type`` records and llama-quantize's name for it."""

    ftype: LlamaFileType
    arg: str  # llama-quantize's type argument, e.g. "Q4_K_M"
    base: QT  # llama_ftype_get_default_type(ftype)


# For each tensor type, the llama_ftype whose default type it is (the _M mix for K-quants, as
# llama-quantize's "Q4_K" alias; IQ2_M is the ftype defaulting to IQ2_S).
_FILE_TYPES: dict[QT, FileType] = {ft.base: ft for ft in (
    FileType(LlamaFileType.ALL_F32, "F32", QT.F32),
    FileType(LlamaFileType.MOSTLY_F16, "F16", QT.F16),
    FileType(LlamaFileType.MOSTLY_BF16, "BF16", QT.BF16),
    FileType(LlamaFileType.MOSTLY_Q4_0, "Q4_0", QT.Q4_0),
    FileType(LlamaFileType.MOSTLY_Q4_1, "Q4_1", QT.Q4_1),
    FileType(LlamaFileType.MOSTLY_Q5_0, "Q5_0", QT.Q5_0),
    FileType(LlamaFileType.MOSTLY_Q5_1, "Q5_1", QT.Q5_1),
    FileType(LlamaFileType.MOSTLY_Q8_0, "Q8_0", QT.Q8_0),
    FileType(LlamaFileType.MOSTLY_MXFP4_MOE, "MXFP4_MOE", QT.MXFP4),
    FileType(LlamaFileType.MOSTLY_Q2_K, "Q2_K", QT.Q2_K),
    FileType(LlamaFileType.MOSTLY_Q3_K_M, "Q3_K_M", QT.Q3_K),
    FileType(LlamaFileType.MOSTLY_Q4_K_M, "Q4_K_M", QT.Q4_K),
    FileType(LlamaFileType.MOSTLY_Q5_K_M, "Q5_K_M", QT.Q5_K),
    FileType(LlamaFileType.MOSTLY_Q6_K, "Q6_K", QT.Q6_K),
    FileType(LlamaFileType.MOSTLY_IQ2_XXS, "IQ2_XXS", QT.IQ2_XXS),
    FileType(LlamaFileType.MOSTLY_IQ2_XS, "IQ2_XS", QT.IQ2_XS),
    FileType(LlamaFileType.MOSTLY_IQ2_M, "IQ2_M", QT.IQ2_S),
    FileType(LlamaFileType.MOSTLY_IQ3_XXS, "IQ3_XXS", QT.IQ3_XXS),
    FileType(LlamaFileType.MOSTLY_IQ3_S, "IQ3_S", QT.IQ3_S),
    FileType(LlamaFileType.MOSTLY_IQ1_S, "IQ1_S", QT.IQ1_S),
    FileType(LlamaFileType.MOSTLY_IQ1_M, "IQ1_M", QT.IQ1_M),
    FileType(LlamaFileType.MOSTLY_IQ4_NL, "IQ4_NL", QT.IQ4_NL),
    FileType(LlamaFileType.MOSTLY_IQ4_XS, "IQ4_XS", QT.IQ4_XS),
)}
FLOAT_TYPES = (QT.F32, QT.F16, QT.BF16)


def file_type(tensor_types: Mapping[str, str]) -> FileType:
    """The file type of a recipe's GGUF: its most common quantized type, counted in tensors (ties:
    the first in recipe order); the most common float type where nothing is quantized.

    llama-quantize applies ``--tensor-type`` overrides only when its base type is quantized, so
    this is also the base type of the command that reproduces the file. Counted in tensors rather
    than weights so that it depends on the recipe alone.
    """
    counts: dict[QT, int] = {}
    for t in tensor_types.values():
        qt = parse_qtype(t)
        counts[qt] = counts.get(qt, 0) + 1
    quantized = {qt: n for qt, n in counts.items() if qt not in FLOAT_TYPES and qt in _FILE_TYPES}
    pool = quantized or {qt: n for qt, n in counts.items() if qt in _FILE_TYPES}
    if not pool:
        raise ValueError(f"no llama.cpp file type for types {', '.join(t.name for t in counts)}")
    return _FILE_TYPES[max(pool, key=pool.get)]  # max keeps the first of equal counts


# tools/quantize/quantize.cpp: LLM_KV_QUANTIZE_IMATRIX_*
KEY_IMATRIX_FILE = "quantize.imatrix.file"
KEY_IMATRIX_DATASET = "quantize.imatrix.dataset"
KEY_IMATRIX_N_ENTRIES = "quantize.imatrix.entries_count"
KEY_IMATRIX_N_CHUNKS = "quantize.imatrix.chunks_count"
_KV_STR_MAX = 127  # llama_model_kv_override.val_str is char[128]


def _kv_str(s: str) -> str:
    return s.encode("utf-8")[:_KV_STR_MAX].decode("utf-8", "ignore")


def imatrix_metadata(file_arg: str, data: ImatrixData) -> list[tuple[str, object, GGUFValueType]]:
    """The keys llama-quantize adds for ``--imatrix file_arg`` (the path as given), in its order."""
    kv: list[tuple[str, object, GGUFValueType]] = [(KEY_IMATRIX_FILE, _kv_str(file_arg), GGUFValueType.STRING)]
    if data.datasets:  # only the first dataset is recorded
        kv.append((KEY_IMATRIX_DATASET, _kv_str(data.datasets[0]), GGUFValueType.STRING))
    kv.append((KEY_IMATRIX_N_ENTRIES, len(data.entries), GGUFValueType.UINT32))
    if data.chunk_count > 0:
        kv.append((KEY_IMATRIX_N_CHUNKS, int(data.chunk_count), GGUFValueType.UINT32))
    return kv
