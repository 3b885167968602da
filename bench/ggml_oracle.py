"""ctypes access to ggml's own quantizers (libggml-base from llama-cpp-python).

The reference for bit-exactness tests and the C baseline of the kernel benchmark. Nothing in
the product depends on it: :func:`load` returns ``None`` (see :func:`missing_reason`)
where llama-cpp-python is not installed.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
from functools import cache
from pathlib import Path

import numpy as np

from dynsearch.kernels.types import QT, parse_qtype, row_nbytes


class _TypeTraits(ctypes.Structure):
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


def library_path() -> Path | None:
    """Where llama-cpp-python's libggml-base lies, without importing llama_cpp."""
    override = os.environ.get("DYNSEARCH_GGML_BASE")
    if override:
        return Path(override)
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        for name in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll"):
            for cand in (Path(root) / "lib" / name, Path(root) / name):
                if cand.exists():
                    return cand
    return None


class GGML:
    """Thin wrapper over ``ggml_quantize_chunk`` and the types' ``to_float``."""

    def __init__(self, path: Path):
        self.path = path
        lib = ctypes.CDLL(str(path))
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                            ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                            ctypes.c_void_p]
        lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
        lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
        lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
        lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
        lib.ggml_quantize_init.argtypes = [ctypes.c_int]
        self.lib = lib

    def requires_imatrix(self, qtype: QT | str) -> bool:
        return bool(self.lib.ggml_quantize_requires_imatrix(parse_qtype(qtype).value))

    def quantize(self, rows: np.ndarray, qtype: QT | str, imatrix: np.ndarray | None = None) -> np.ndarray:
        qt = parse_qtype(qtype)
        x = np.ascontiguousarray(rows, dtype=np.float32)
        n_rows, n_per_row = x.shape
        out = np.zeros((n_rows, row_nbytes(qt, n_per_row)), dtype=np.uint8)
        qw = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
        written = self.lib.ggml_quantize_chunk(
            qt.value, x.ctypes.data, out.ctypes.data, 0, n_rows, n_per_row,
            None if qw is None else qw.ctypes.data)
        if written != out.size:
            raise RuntimeError(f"ggml wrote {written} bytes, expected {out.size}")
        return out

    def dequantize(self, data: np.ndarray, qtype: QT | str, n_per_row: int) -> np.ndarray:
        qt = parse_qtype(qtype)
        traits = self.lib.ggml_get_type_traits(qt.value).contents
        if not traits.to_float:
            raise NotImplementedError(f"ggml has no to_float for {qt.name}")
        raw = np.ascontiguousarray(data, dtype=np.uint8)
        n_rows = raw.size // row_nbytes(qt, n_per_row)
        out = np.empty((n_rows, n_per_row), dtype=np.float32)
        _TO_FLOAT(traits.to_float)(raw.ctypes.data, out.ctypes.data, out.size)
        return out


def missing_reason() -> str:
    return ("llama-cpp-python's libggml-base is not installed "
            "(pip install llama-cpp-python, or set DYNSEARCH_GGML_BASE)")


@cache
def load() -> GGML | None:
    """The oracle, or ``None`` where llama-cpp-python is absent (see :func:`missing_reason`)."""
    path = library_path()
    return None if path is None else GGML(path)
