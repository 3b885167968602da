"""Writing GGUF files of float tensors: a dequantized copy of a model, or a model from arrays.

Tensors are streamed to disk one at a time (gguf-py's ``GGUFWriter`` in its explicit
header -> kv -> tensor-info -> data order), so a copy never holds the whole model in memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Mapping

import gguf
import numpy as np

from dynsearch.kernels import QT, parse_qtype, quantize, tensor_nbytes
from dynsearch.kernels import dequantize as _kernels_dequantize

from .errors import ModelError
from .gguf_header import GGUFHeader
from .gguf_source import Dequantize

# Keys the writer sets itself, or that describe the source's own layout.
_OWN_KEYS = ("GGUF.", "general.architecture", "general.alignment")
# llama_ftype of a file whose weights are all of one float type.
_FILE_TYPE = {QT.F32: gguf.LlamaFileType.ALL_F32, QT.F16: gguf.LlamaFileType.MOSTLY_F16,
              QT.BF16: gguf.LlamaFileType.MOSTLY_BF16}


def copy_metadata(header: GGUFHeader, writer: gguf.GGUFWriter,
                  keep: Callable[[str], bool] = lambda key: True) -> None:
    """Copy every metadata field of ``header`` that ``keep`` accepts, with its GGUF value type."""
    for key, f in header.fields.items():
        if not key.startswith(_OWN_KEYS) and keep(key):
            writer.add_key_value(key, f.value, f.vtype, sub_type=f.sub_type)


def _encode(rows: np.ndarray, qtype: QT) -> np.ndarray:
    """float32 (..., n) -> the bytes GGUF stores for ``qtype`` (F32 as float32, others as blocks)."""
    if qtype == QT.F32:
        return np.ascontiguousarray(rows, dtype=np.float32)
    return quantize(rows.reshape(-1, rows.shape[-1]), qtype)


def write_tensors(writer: gguf.GGUFWriter, tensors: Iterable[tuple[str, tuple[int, ...], Callable[[], np.ndarray]]],
                  qtype_of: Callable[[str, tuple[int, ...]], QT]) -> None:
    """Write tensor infos and then the data, loading each tensor (via its thunk) only when written.

    ``tensors`` yields (name, numpy shape, load) and is iterated twice; ``qtype_of`` picks the type.
    """
    items = list(tensors)
    for name, shape, _ in items:
        qt = qtype_of(name, shape)
        writer.add_tensor_info(name, shape, np.dtype(np.float32), tensor_nbytes(shape, qt), raw_dtype=qt)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for name, shape, load in items:
        writer.write_tensor_data(_encode(load(), qtype_of(name, shape)))
    writer.close()


def _float_type(dtype: QT | str, shape: tuple[int, ...]) -> QT:
    qt = parse_qtype(dtype)
    return QT.F32 if len(shape) == 1 else qt  # norms and biases stay F32, as llama.cpp keeps them


def write_dequantized_copy(src: str | Path, dst: str | Path, dtype: QT | str = QT.F32,
                           dequantize: Dequantize | None = None) -> Path:
    """Copy the GGUF ``src`` to ``dst`` with every tensor dequantized to F32 (or F16/BF16).

    All metadata is copied; ``general.file_type`` is set to match. ``dequantize`` decodes the
    source blocks (default: :func:`dynsearch.kernels.dequantize`).
    """
    qt = parse_qtype(dtype)
    if qt not in _FILE_TYPE:
        raise ValueError(f"dtype must be F32, F16 or BF16, got {qt.name}")
    header = GGUFHeader(src)
    arch = header.get("general.architecture")
    if arch is None:
        raise ModelError(f"{header.path.name}: no general.architecture in the metadata")
    decode = dequantize or _kernels_dequantize

    def load(name: str) -> np.ndarray:
        info = header.tensors[name]
        return decode(header.data(name), info.qtype, info.shape[-1]).reshape(info.shape)

    dst = Path(dst)
    writer = gguf.GGUFWriter(dst, arch)
    if "general.alignment" in header.fields:
        writer.data_alignment = header.alignment
        writer.add_uint32("general.alignment", header.alignment)
    copy_metadata(header, writer, keep=lambda k: k != "general.file_type")
    writer.add_file_type(int(_FILE_TYPE[qt]))
    write_tensors(writer, ((n, t.shape, lambda n=n: load(n)) for n, t in header.tensors.items()),
                  lambda name, shape: _float_type(qt, shape))
    return dst


def write_model(dst: str | Path, arch: str, metadata: GGUFHeader | None,
                kv: Mapping[str, tuple[object, gguf.GGUFValueType]],
                tensors: Mapping[str, np.ndarray], keep: Callable[[str], bool] = lambda k: True) -> Path:
    """Write a float32 GGUF model from arrays: metadata copied from ``metadata`` (filtered by
    ``keep``, e.g. a tokenizer), then ``kv`` (key -> (value, value type)), then ``tensors``."""
    dst = Path(dst)
    writer = gguf.GGUFWriter(dst, arch)
    if metadata is not None:
        copy_metadata(metadata, writer, keep)
    for key, (value, vtype) in kv.items():
        sub = None
        if vtype == gguf.GGUFValueType.ARRAY:
            value, sub = value  # (values, element type)
        writer.add_key_value(key, value, vtype, sub_type=sub)
    write_tensors(writer, ((n, tuple(a.shape), lambda a=a: a) for n, a in tensors.items()),
                  lambda name, shape: QT.F32)
    return dst
