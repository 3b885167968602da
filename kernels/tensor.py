"""Quantizing a whole tensor: the data a GGUF file stores for it, as llama-quantize writes it.

A tensor is quantized row by row (``numpy`` order: the last axis is the row). Its importance
matrix entry holds one vector per matrix: a 3-D MoE expert stack (n_expert, rows, n_per_row) has
one per expert, and each expert is quantized with its own.
"""

from __future__ import annotations

import numpy as np

from dynsearch.kernels.registry import quantize
from dynsearch.kernels.types import QT, parse_qtype


def quantize_tensor(w: np.ndarray, qtype: QT | str, importance: np.ndarray | None = None) -> np.ndarray:
    """float32 ``w`` (..., n_per_row) -> what GGUF stores for ``qtype``: for F32 the float32 values
    themselves (in ``w``'s shape), else the blocks, uint8 (n_rows, row_bytes).

    ``importance``: None, or n_mat * n_per_row values (any shape), the vector of each of the n_mat
    matrices the rows split into evenly (n_mat is the expert count of a 3-D stack, or 1).
    """
    n_per_row = w.shape[-1]
    if importance is not None:
        n_mat = np.size(importance) // n_per_row
        n_rows = int(np.prod(w.shape[:-1]))
        if n_mat == 0 or n_mat * n_per_row != np.size(importance) or n_rows % n_mat:
            raise ValueError(f"importance of {np.size(importance)} values does not fit a tensor of shape {w.shape}")
        importance = np.asarray(importance, dtype=np.float32).reshape(n_mat, n_per_row)
    if parse_qtype(qtype) == QT.F32:
        return np.ascontiguousarray(w, dtype=np.float32)
    rows = w.reshape(-1, n_per_row)
    if importance is None:
        return quantize(rows, qtype)
    mats = rows.reshape(importance.shape[0], -1, n_per_row)
    return np.concatenate([quantize(m, qtype, imp) for m, imp in zip(mats, importance)])
