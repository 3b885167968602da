"""A fast reader of a GGUF file's header: metadata key/values and tensor infos, data memory-mapped.

gguf-py's ``GGUFReader`` builds numpy views for every part of every field, which takes seconds
for a 50k-150k token vocabulary; opening a model here reads the header once with ``struct`` and
numpy, and leaves tensor data on disk until asked for. Layout: ggml/include/gguf.h (version 2/3,
little-endian).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from .errors import ModelError

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

_SCALARS: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}


@dataclass(frozen=True)
class Field:
    """One metadata value with its GGUF type (``sub_type``: element type of an array)."""

    value: Any  # int/float/bool/str, or a list of them
    vtype: GGUFValueType
    sub_type: GGUFValueType | None = None


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order: GGUF ne reversed
    qtype: GGMLQuantizationType
    offset: int  # absolute byte offset of the data in the file
    nbytes: int


class _Cursor:
    def __init__(self, buf: memoryview, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def unpack(self, fmt: str) -> Any:
        try:
            (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        except struct.error:
            raise ModelError(f"{self.path}: truncated GGUF header") from None
        self.pos += struct.calcsize(fmt)
        return v

    def string(self) -> str:
        n = self.unpack("<Q")
        if self.pos + n > len(self.buf):
            raise ModelError(f"{self.path}: truncated GGUF header")
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: GGUFValueType) -> Any:
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype == GGUFValueType.ARRAY:
            raise ModelError(f"{self.path}: nested GGUF arrays are not supported")
        return self.unpack(_SCALARS[vtype])

    def array(self, sub: GGUFValueType, n: int) -> list:
        if sub in _SCALARS and sub != GGUFValueType.BOOL:  # numbers: one numpy read
            dt = np.dtype(_SCALARS[sub])
            a = np.frombuffer(self.buf, dtype=dt, count=n, offset=self.pos)
            self.pos += n * dt.itemsize
            return a.tolist()
        return [self.value(sub) for _ in range(n)]


def _vtype(cur: _Cursor, key: str) -> GGUFValueType:
    raw = cur.unpack("<I")
    try:
        return GGUFValueType(raw)
    except ValueError:
        raise ModelError(f"{cur.path}: metadata {key!r} has unknown value type {raw}") from None


class GGUFHeader:
    """Metadata and tensor infos of a GGUF file; tensor data is memory-mapped on demand."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelError(f"{self.path}: no such file")
        with open(self.path, "rb") as f:
            if f.read(4) != GGUF_MAGIC:
                raise ModelError(f"{self.path}: not a GGUF file (bad magic)")
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        cur = _Cursor(memoryview(self._mm), self.path)
        cur.pos = 4
        self.version = cur.unpack("<I")
        if self.version not in (2, 3):
            raise ModelError(f"{self.path}: GGUF version {self.version} is not supported (2 or 3)")
        n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
        self.fields: dict[str, Field] = {}
        for _ in range(n_kv):
            key = cur.string()
            vtype = _vtype(cur, key)
            if vtype == GGUFValueType.ARRAY:
                sub = _vtype(cur, key)
                self.fields[key] = Field(cur.array(sub, cur.unpack("<Q")), vtype, sub)
            else:
                self.fields[key] = Field(cur.value(vtype), vtype)
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            ne = [cur.unpack("<Q") for _ in range(cur.unpack("<I"))]
            raw_type, offset = cur.unpack("<I"), cur.unpack("<Q")
            infos.append((name, ne, raw_type, offset))
        self.alignment = int(self.get("general.alignment", DEFAULT_ALIGNMENT))
        data_start = -(-cur.pos // self.alignment) * self.alignment
        self.tensors: dict[str, TensorInfo] = {}
        for name, ne, raw_type, offset in infos:
            self.tensors[name] = self._info(name, ne, raw_type, data_start + offset)

    def _info(self, name: str, ne: list[int], raw_type: int, offset: int) -> TensorInfo:
        try:
            qt = GGMLQuantizationType(raw_type)
            block, size = GGML_QUANT_SIZES[qt]
        except (ValueError, KeyError):
            raise ModelError(f"{self.path}: tensor {name!r} has unknown GGML type {raw_type}") from None
        n = int(np.prod(ne)) if ne else 1
        nbytes = n // block * size
        if offset + nbytes > len(self._mm):
            raise ModelError(f"{self.path}: tensor {name!r} extends past the end of the file")
        return TensorInfo(name, tuple(int(x) for x in reversed(ne)), qt, offset, nbytes)

    def get(self, key: str, default: Any = None) -> Any:
        f = self.fields.get(key)
        return default if f is None else f.value

    def data(self, name: str) -> np.ndarray:
        """The raw bytes of one tensor, uint8, a read-only view of the mapped file."""
        t = self.tensors[name]
        return np.frombuffer(self._mm, dtype=np.uint8, count=t.nbytes, offset=t.offset)
