"""GGUF quantize/dequantize kernels (numba), byte-identical with ggml.

Public API::

    quantize(rows, qtype, imatrix=None) -> uint8 (n_rows, row_bytes)
    dequantize(data, qtype, n_per_row)  -> float32 (n_rows, n_per_row)

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
from dynsearch.kernels.types import (
    QT,
    TypeInfo,
    effective_type,
    parse_qtype,
    row_nbytes,
    tensor_nbytes,
    type_info,
)

__all__ = [
    "QT", "TypeInfo", "dequantizable_types", "dequantize", "effective_type", "kernel",
    "parse_qtype", "quantizable_types", "quantize", "row_nbytes", "tensor_nbytes", "type_info",
]
