"""GGUF quantize/dequantize kernels (numba), byte-identical with ggml.

Public API::

    quantize(rows, qtype, imatrix=None) -> uint8 (n_rows, row_bytes)
    dequantize(data, qtype, n_per_row)  -> float32 (n_rows, n_per_row)
    quantize_tensor(w, qtype, importance=None) -> what GGUF stores for a whole tensor

``qtype`` is a ``gguf.GGMLQuantizationType``, its name (``"Q4_K"``) or id.
"""

from __future__ import annotations

# Family modules register their kernels on import.
from dynsearch.kernels import floats, iquants, kquants, legacy  # noqa: F401  (registered on import)
from dynsearch.kernels.registry import (
    dequantizable_types,
    dequantize,
    kernel,
    quantizable_types,
    quantize,
)
from dynsearch.kernels.tensor import quantize_tensor
from dynsearch.kernels.types import (
    GGUF_ALIGNMENT,
    QT,
    TypeInfo,
    effective_type,
    padded,
    parse_qtype,
    row_nbytes,
    tensor_nbytes,
    type_info,
)

__all__ = [
    "GGUF_ALIGNMENT", "QT", "TypeInfo", "dequantizable_types", "dequantize", "effective_type", "kernel",
    "padded", "parse_qtype", "quantizable_types", "quantize", "quantize_tensor", "row_nbytes",
    "tensor_nbytes", "type_info",
]
