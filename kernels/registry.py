"""Registry of the numba kernels, one entry per GGUF type, and the public quantize/dequantize.

Kernel calling convention (every family module follows it):

* ``quantize(x, qw, out)``: ``x`` float32 (n_rows, n_per_row) C-contiguous and finite; ``qw``
  float32 (n_per_row,) importance weights, or an empty array for ggml's path without imatrix;
  ``out`` uint8 (n_rows, row_bytes) preallocated. Returns nothing.
* ``dequantize(data, out)``: ``data`` uint8 (n_rows, row_bytes); ``out`` float32 (n_rows, n_per_row).

Kernels are pure, ``@njit(cache=True, nogil=True)``, parallel over rows; all checks, allocation
and type dispatch happen here, outside them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from dynsearch.kernels.types import QT, parse_qtype, row_nbytes, type_info


@dataclass(frozen=True)
class Kernel:
    """The numba kernels registered for one GGUF type."""

    qtype: QT
    dequantize: Callable[[np.ndarray, np.ndarray], None]
    quantize: Callable[[np.ndarray, np.ndarray, np.ndarray], None] | None = None
    uses_imatrix: bool = True  # False where ggml ignores importance weights (F16, BF16, Q8_0)


_KERNELS: dict[QT, Kernel] = {}


def register(qtype: QT, *, dequantize, quantize=None, uses_imatrix: bool = True) -> None:
    """Register the kernels of ``qtype``; called once by each family module at import."""
    if qtype in _KERNELS:
        raise RuntimeError(f"kernels for {qtype.name} registered twice")
    _KERNELS[qtype] = Kernel(qtype, dequantize, quantize, uses_imatrix)


def kernel(qtype: QT | str) -> Kernel:
    qt = parse_qtype(qtype)
    try:
        return _KERNELS[qt]
    except KeyError:
        raise NotImplementedError(f"no kernels for GGUF type {qt.name}") from None


def quantizable_types() -> list[QT]:
    """Types with a quantize kernel, in GGML id order."""
    return sorted((t for t, k in _KERNELS.items() if k.quantize is not None), key=lambda t: t.value)


def dequantizable_types() -> list[QT]:
    return sorted(_KERNELS, key=lambda t: t.value)


def _check_finite(a: np.ndarray, what: str) -> None:
    if not np.isfinite(a).all():
        bad = np.argwhere(~np.isfinite(a))[0]
        raise ValueError(f"{what} contains NaN or inf (first at index {tuple(int(i) for i in bad)})")


def quantize(rows: np.ndarray, qtype: QT | str, imatrix: np.ndarray | None = None) -> np.ndarray:
    """Quantize float32 ``rows`` (n_rows, n_per_row) to GGUF blocks: uint8 (n_rows, row_bytes).

    ``imatrix`` is an optional importance vector of length n_per_row (llama-quantize --imatrix);
    output is byte-identical to ggml's ``ggml_quantize_chunk`` for the same input and weights.
    """
    k = kernel(qtype)
    info = type_info(k.qtype)
    if k.quantize is None:
        raise NotImplementedError(f"{info.name} can be read (dequantized) but not written")
    x = np.asarray(rows)
    if x.ndim != 2:
        raise ValueError(f"rows must be 2-D (n_rows, n_per_row), got shape {x.shape}")
    n_rows, n_per_row = x.shape
    if n_per_row == 0 or n_per_row % info.block_size:
        raise ValueError(f"{info.name} needs rows that are a positive multiple of {info.block_size} "
                         f"elements, got {n_per_row}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    _check_finite(x, "input rows")
    if imatrix is None:
        if info.requires_imatrix:
            raise ValueError(f"{info.name} requires an importance matrix (imatrix)")
        qw = np.empty(0, dtype=np.float32)
    else:
        qw = np.ascontiguousarray(imatrix, dtype=np.float32).reshape(-1)
        if qw.shape != (n_per_row,):
            raise ValueError(f"imatrix must have {n_per_row} entries (one per column), got {qw.size}")
        _check_finite(qw, "imatrix")
        if (qw < 0).any():
            raise ValueError("imatrix has negative entries")
        if not k.uses_imatrix:
            qw = np.empty(0, dtype=np.float32)
    out = np.empty((n_rows, row_nbytes(info.qtype, n_per_row)), dtype=np.uint8)
    if n_rows:
        k.quantize(x, qw, out)
    return out


def dequantize(data: np.ndarray, qtype: QT | str, n_per_row: int) -> np.ndarray:
    """Decode GGUF blocks ``data`` (uint8, n_rows x row_bytes or flat) to float32 (n_rows, n_per_row)."""
    k = kernel(qtype)
    nbytes = row_nbytes(k.qtype, int(n_per_row))
    raw = np.ascontiguousarray(np.asarray(data).view(np.uint8) if np.asarray(data).dtype != np.uint8
                               else np.asarray(data))
    if raw.size % nbytes:
        raise ValueError(f"{raw.size} bytes is not a whole number of {k.qtype.name} rows of "
                         f"{n_per_row} elements ({nbytes} bytes each)")
    raw = raw.reshape(-1, nbytes)
    out = np.empty((raw.shape[0], int(n_per_row)), dtype=np.float32)
    if raw.shape[0]:
        k.dequantize(raw, out)
    return out
