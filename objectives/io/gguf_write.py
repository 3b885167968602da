"""Writing GGUF files: a dequantized copy of a model, a model from arrays, and the one tensor loop
every writer uses (``recipes.apply`` included).

Tensors are streamed to disk one at a time (gguf-py's ``GGUFWriter`` in its explicit
header -> kv -> tensor-info -> data order), so a copy never holds the whole model in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import gguf
import numpy as np
from tqdm.auto import tqdm

from dynsearch.errors import ModelError
from dynsearch.kernels import QT, parse_qtype, quantize_tensor, tensor_nbytes
from dynsearch.kernels import dequantize as _kernels_dequantize
from dynsearch.objectives.io.gguf_header import GGUFHeader
from dynsearch.objectives.io.gguf_source import Dequantize

# Keys the writer sets itself, or that describe the source's own layout.
_OWN_KEYS = ("GGUF.", "general.architecture", "general.alignment")
# llama_ftype of a file whose weights are all of one float type.
_FILE_TYPE = {QT.F32: gguf.LlamaFileType.ALL_F32, QT.F16: gguf.LlamaFileType.MOSTLY_F16,
              QT.BF16: gguf.LlamaFileType.MOSTLY_BF16}


@dataclass(frozen=True)
class TensorOut:
    """One tensor to write: its stored type and a thunk that produces its stored data when written."""

    name: str
    shape: tuple[int, ...]  # numpy order: the last axis is the row
    qtype: QT
    data: Callable[[], np.ndarray]  # float32 for F32, else the GGUF blocks (uint8)


def copy_metadata(header: GGUFHeader, writer: gguf.GGUFWriter,
                  keep: Callable[[str], bool] = lambda key: True) -> None:
    """Copy every metadata field of ``header`` that ``keep`` accepts, with its GGUF value type."""
    for key, f in header.fields.items():
        if not key.startswith(_OWN_KEYS) and keep(key):
            writer.add_key_value(key, f.value, f.vtype, sub_type=f.sub_type)


def metadata_writer(path: str | Path, header: GGUFHeader,
                    keep: Callable[[str], bool] = lambda key: True) -> gguf.GGUFWriter:
    """A GGUFWriter starting with ``header``'s metadata (the fields ``keep`` accepts) in the source's
    order, the architecture and alignment where they stand, as llama.cpp's ``gguf_set_kv`` copies a
    source's metadata into the file it quantizes; the data alignment follows the source's."""
    arch = header.get("general.architecture")
    if arch is None:
        raise ModelError(f"{header.path.name}: no general.architecture in the metadata")
    writer = gguf.GGUFWriter(path, arch)
    writer.kv_data[0].clear()  # the architecture comes from the source, in its place
    writer.data_alignment = header.alignment
    for key, f in header.fields.items():
        if keep(key):
            writer.add_key_value(key, f.value, f.vtype, sub_type=f.sub_type)
    return writer


def write_tensors(writer: gguf.GGUFWriter, tensors: Sequence[TensorOut], desc: str = "",
                  progress: bool = False) -> None:
    """Write the tensor infos and then the data, one tensor at a time in the order given (each
    produced by its thunk only when written), then close the writer."""
    for t in tensors:
        writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), tensor_nbytes(t.shape, t.qtype),
                               raw_dtype=t.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in tqdm(tensors, desc=desc, disable=not progress, unit="tensor"):
        writer.write_tensor_data(t.data())
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
    decode = dequantize or _kernels_dequantize

    def load(name: str) -> np.ndarray:
        info = header.tensors[name]
        return decode(header.data(name), info.qtype, info.shape[-1]).reshape(info.shape)

    dst = Path(dst)
    writer = metadata_writer(dst, header, keep=lambda k: k != "general.file_type")
    writer.add_file_type(int(_FILE_TYPE[qt]))
    out = []
    for n, t in header.tensors.items():
        tq = _float_type(qt, t.shape)
        out.append(TensorOut(n, t.shape, tq, lambda n=n, tq=tq: quantize_tensor(load(n), tq)))
    write_tensors(writer, out)
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
    write_tensors(writer, [TensorOut(n, tuple(a.shape), QT.F32, lambda a=a: quantize_tensor(a, QT.F32))
                           for n, a in tensors.items()])
    return dst
