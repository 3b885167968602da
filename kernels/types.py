"""The one table of GGUF tensor types the project uses, and the sizes derived from it.

Block layouts (elements per block, bytes per block) come from gguf-py's ``GGML_QUANT_SIZES``; this
module adds what the search needs on top: llama.cpp's fallback when a tensor's rows do not fit the
block (``tensor_type_fallback`` in ``src/llama-quant.cpp``), whether ggml insists on an importance
matrix, and the alignment every tensor's data is padded to in a GGUF file. Every byte size in the
project comes from :func:`row_nbytes` / :func:`tensor_nbytes` / :func:`padded`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Iterable

from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType

QT = GGMLQuantizationType
GGUF_ALIGNMENT = GGUF_DEFAULT_ALIGNMENT  # bytes; llama.cpp pads every tensor's data to this (general.alignment)

# llama.cpp's fallback for tensors whose row length is not a multiple of the block size
# (src/llama-quant.cpp: tensor_type_fallback). When the fallback does not fit either, F16 is used.
_FALLBACK: dict[QT, QT] = {
    QT.IQ1_S: QT.IQ4_NL, QT.IQ1_M: QT.IQ4_NL, QT.IQ2_XXS: QT.IQ4_NL, QT.IQ2_XS: QT.IQ4_NL,
    QT.IQ2_S: QT.IQ4_NL, QT.IQ3_XXS: QT.IQ4_NL, QT.IQ3_S: QT.IQ4_NL, QT.IQ4_XS: QT.IQ4_NL,
    QT.Q2_K: QT.Q4_0, QT.Q3_K: QT.Q4_0, QT.TQ1_0: QT.Q4_0, QT.TQ2_0: QT.Q4_0,
    QT.Q4_K: QT.Q5_0, QT.Q5_K: QT.Q5_1, QT.Q6_K: QT.Q8_0,
}

# ggml_quantize_requires_imatrix(): these types refuse to quantize without importance weights.
_REQUIRES_IMATRIX = frozenset({QT.IQ2_XXS, QT.IQ2_XS, QT.IQ1_S})


@dataclass(frozen=True)
class TypeInfo:
    """Layout facts of one GGUF tensor type."""

    qtype: QT
    block_size: int  # elements per block
    type_size: int  # bytes per block
    fallback: QT | None  # llama.cpp's replacement when a row does not fit the block
    requires_imatrix: bool  # ggml refuses to quantize without importance weights

    @property
    def name(self) -> str:
        return self.qtype.name

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block_size

    def fits(self, n_per_row: int) -> bool:
        return n_per_row % self.block_size == 0


def parse_qtype(qtype: QT | str | int) -> QT:
    """Accept a ``GGMLQuantizationType``, its name (``"Q4_K"``, case-insensitive) or its id."""
    if isinstance(qtype, QT):
        return qtype
    if isinstance(qtype, str):
        try:
            return QT[qtype.strip().upper()]
        except KeyError:
            known = ", ".join(t.name for t in QT)
            raise ValueError(f"unknown GGUF type {qtype!r} (known: {known})") from None
    if isinstance(qtype, int) and not isinstance(qtype, bool):
        try:
            return QT(qtype)
        except ValueError:
            raise ValueError(f"unknown GGUF type id {qtype}") from None
    raise TypeError(f"expected a GGUF type name or GGMLQuantizationType, got {type(qtype).__name__}")


def type_info(qtype: QT | str | int) -> TypeInfo:
    return _type_info(parse_qtype(qtype))


@cache
def _type_info(qt: QT) -> TypeInfo:
    if qt not in GGML_QUANT_SIZES:
        raise ValueError(f"GGUF type {qt.name} has no known block layout")
    block_size, type_size = GGML_QUANT_SIZES[qt]
    return TypeInfo(qt, block_size, type_size, _FALLBACK.get(qt), qt in _REQUIRES_IMATRIX)


def effective_type(qtype: QT | str, n_per_row: int) -> QT:
    """The type llama.cpp actually writes for rows of ``n_per_row`` elements (its fallback rule)."""
    info = type_info(qtype)
    if info.fits(n_per_row):
        return info.qtype
    target = info.fallback if info.fallback is not None else info.qtype
    if info.fallback is None and info.block_size > 32:
        raise ValueError(f"no fallback is defined for {info.name} with rows of {n_per_row}")
    if not type_info(target).fits(n_per_row):
        return QT.F16
    return target


def row_nbytes(qtype: QT | str, n_per_row: int) -> int:
    """Bytes of one row of ``n_per_row`` elements stored as ``qtype`` (no fallback applied)."""
    info = type_info(qtype)
    if n_per_row <= 0 or not info.fits(n_per_row):
        raise ValueError(f"row of {n_per_row} elements is not a positive multiple of "
                         f"{info.name}'s block size {info.block_size}")
    return n_per_row // info.block_size * info.type_size


def tensor_nbytes(shape: Iterable[int], qtype: QT | str, *, fallback: bool = False) -> int:
    """Exact bytes of a tensor's data. ``shape`` is numpy order: the last axis is the row.

    With ``fallback=True`` the type is first replaced as llama.cpp does when the rows do not fit.
    """
    dims = [int(d) for d in shape]
    if not dims or any(d <= 0 for d in dims):
        raise ValueError(f"invalid tensor shape {tuple(dims)}")
    n_per_row = dims[-1]
    n_rows = 1
    for d in dims[:-1]:
        n_rows *= d
    qt = effective_type(qtype, n_per_row) if fallback else parse_qtype(qtype)
    return n_rows * row_nbytes(qt, n_per_row)


def padded(nbytes: int, alignment: int = GGUF_ALIGNMENT) -> int:
    """``nbytes`` rounded up to a multiple of ``alignment``: the room a tensor's data takes in a GGUF file."""
    return -(-nbytes // alignment) * alignment
