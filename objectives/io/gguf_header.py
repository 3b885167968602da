"""A fast, validating reader of a GGUF file's header: metadata key/values and tensor infos, with
tensor data memory-mapped.

Every GGUF dynsearch reads (models, imatrix files, tokenizer metadata) goes through this reader,
and GGUF files come from strangers. It validates as llama.cpp's own parser does
(ggml/src/gguf.cpp ``gguf_init_from_reader``, plus llama_model_loader's "within the file" check),
so a file either loads with sane values or raises :class:`~dynsearch.errors.GGUFError` whose one
line names the file and the problem; never a crash, a hang, or an allocation the file's size does
not pay for:

* magic ``GGUF``, version 2 or 3 (version 1 and byte-swapped files are refused);
* key/value and tensor counts no larger than the remaining bytes can hold;
* strings at most 1 GiB and inside the file; arrays at most 2**30 elements whose smallest encoding
  fits in the remaining bytes; no arrays of arrays (nesting depth 1, as llama.cpp);
* keys non-empty and unique, value types known, ``general.alignment`` a u32 power of two;
* tensor names under 64 bytes and unique; 1 to 4 dimensions, each positive (llama.cpp also takes
  0: an empty tensor is of no use here); element counts within int64; a known GGML type whose
  block size divides the row;
* tensor data at llama.cpp's offsets (contiguous in header order, each padded to the alignment:
  aligned and non-overlapping) and inside the file.

gguf-py's ``GGUFReader`` accepts many of these corruptions, and builds numpy views for every part
of every field (seconds for a 150k-token vocabulary); this reader reads the header once with
``struct`` and numpy. Layout: ggml/include/gguf.h (little-endian).
"""

from __future__ import annotations

import contextlib
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from dynsearch.errors import GGUFError
from dynsearch.kernels.types import GGUF_ALIGNMENT, padded

GGUF_MAGIC = b"GGUF"
MAX_STRING_BYTES = 1 << 30  # GGUF_MAX_STRING_LENGTH
MAX_ARRAY_ELEMENTS = 1 << 30  # GGUF_MAX_ARRAY_ELEMENTS
MAX_NAME_BYTES = 63  # GGML_MAX_NAME - 1: a tensor name is a C string of 64 bytes with its NUL
MAX_DIMS = 4  # GGML_MAX_DIMS
INT64_MAX = (1 << 63) - 1
_MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, a one-byte value
_MIN_TENSOR_BYTES = 8 + 4 + 4 + 8  # name length, n_dims, type, offset

_U32, _I32, _U64, _I64 = (struct.Struct(f) for f in ("<I", "<i", "<Q", "<q"))
_VTYPES = {int(t): t for t in GGUFValueType}
_FORMATS = {  # struct format of each scalar value type (BOOL: one byte, nonzero is true)
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<B", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
_SCALARS = {t: struct.Struct(f) for t, f in _FORMATS.items()}
_GGML_TYPES = {int(qt): (qt, *GGML_QUANT_SIZES[qt]) for qt in GGMLQuantizationType if qt in GGML_QUANT_SIZES}
_DTYPES = {t: np.dtype(f) for t, f in _FORMATS.items()}


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


def _show(s: str) -> str:
    """A name from the file, quoted on one line and cut to a readable length."""
    return repr(s if len(s) <= 60 else s[:57] + "...")


def _describe(what: str | tuple) -> str:
    """Where in the file a read failed: a label, or (label, key or index[, detail]) formatted
    only when an error needs it (the happy path reads 10**5 keys and must not pay for it)."""
    if isinstance(what, str):
        return what
    label, name, *detail = what
    return f"{label} {f'#{name}' if isinstance(name, int) else _show(name)}{''.join(detail)}"


_NESTED = "arrays of arrays are not supported (nesting depth is capped at 1)"


class _Cursor:
    """Bounds-checked reads from the mapped file; every failure is a GGUFError naming the file
    and what was being read (``what``: see :func:`_describe`)."""

    def __init__(self, buf: mmap.mmap, path: Path):
        self.buf, self.pos, self.end, self.path = buf, 0, len(buf), path

    def error(self, problem: str) -> GGUFError:
        return GGUFError(f"{self.path}: {problem}")

    def truncated(self, what: str | tuple) -> GGUFError:
        return self.error(f"truncated: the file ends in {_describe(what)} (byte {self.pos} of {self.end})")

    # The reads below are called 10**5-10**6 times for a large vocabulary: unpack_from does the
    # bounds check (struct.error when the file ends), messages are built only on failure.

    def take(self, st: struct.Struct, what: str | tuple) -> Any:
        try:
            (v,) = st.unpack_from(self.buf, self.pos)
        except struct.error:
            raise self.truncated(what) from None
        self.pos += st.size
        return v

    def raw_string(self, what: str | tuple) -> bytes:
        try:
            (n,) = _U64.unpack_from(self.buf, self.pos)
        except struct.error:
            raise self.truncated(what) from None
        start = self.pos + 8
        if n > MAX_STRING_BYTES or n > self.end - start:
            limit = (f"exceeds the limit of {MAX_STRING_BYTES} bytes" if n > MAX_STRING_BYTES else
                     f"runs past the end of the file ({self.end - start} bytes left)")
            raise self.error(f"{_describe(what)}: string length {n} {limit}")
        self.pos = start + n
        return self.buf[start:start + n]

    def string(self, what: str | tuple) -> str:
        return self.raw_string(what).decode("utf-8", "replace")

    def strings(self, n: int, what: str | tuple) -> list[str]:
        """``n`` strings in a row: :meth:`string` inlined (a vocabulary holds 10**5 of them)."""
        buf, pos, end, unpack, cap = self.buf, self.pos, self.end, _U64.unpack_from, MAX_STRING_BYTES
        out = [""] * n
        for i in range(n):
            if pos + 8 > end or (k := unpack(buf, pos)[0]) > cap or pos + 8 + k > end:
                self.pos = pos
                self.raw_string(what)  # raises the precise error
            pos += 8
            out[i] = buf[pos:pos + k].decode("utf-8", "replace")
            pos += k
        self.pos = pos
        return out

    def vtype(self, what: str | tuple) -> GGUFValueType:
        raw = self.take(_U32, what)
        try:
            return _VTYPES[raw]
        except KeyError:
            raise self.error(f"{_describe(what)} has unknown value type {raw}") from None

    def value(self, vtype: GGUFValueType, what: str | tuple) -> Any:
        if vtype == GGUFValueType.STRING:
            return self.raw_string(what).decode("utf-8", "replace")
        st = _SCALARS[vtype]
        try:
            (v,) = st.unpack_from(self.buf, self.pos)
        except struct.error:
            raise self.truncated(what) from None
        self.pos += st.size
        return v != 0 if vtype == GGUFValueType.BOOL else v

    def array(self, sub: GGUFValueType, n: int, what: str | tuple) -> list:
        if sub == GGUFValueType.ARRAY:
            raise self.error(f"{_describe(what)}: {_NESTED}")
        if n > MAX_ARRAY_ELEMENTS:
            raise self.error(f"{_describe(what)}: array of {n} elements exceeds the limit of {MAX_ARRAY_ELEMENTS}")
        itemsize = 8 if sub == GGUFValueType.STRING else _DTYPES[sub].itemsize  # strings: the length
        if n * itemsize > self.end - self.pos:
            raise self.error(f"{_describe(what)}: array of {n} {sub.name} elements runs past the end "
                             f"of the file ({self.end - self.pos} bytes left)")
        if sub == GGUFValueType.STRING:
            return self.strings(n, what)
        a = np.frombuffer(self.buf, dtype=_DTYPES[sub], count=n, offset=self.pos)
        self.pos += n * itemsize
        return (a != 0).tolist() if sub == GGUFValueType.BOOL else a.tolist()


class GGUFHeader:
    """Metadata and tensor infos of a GGUF file; tensor data is memory-mapped on demand."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            if not self.path.is_file():
                raise GGUFError(f"{self.path}: no such file")
            with open(self.path, "rb") as f:
                magic = f.read(4)
                if magic != GGUF_MAGIC:
                    raise GGUFError(f"{self.path}: not a GGUF file (bad magic {magic[:4]!r})")
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise GGUFError(f"{self.path}: cannot read ({e.strerror or e})") from None
        try:
            self._parse(_Cursor(self._mm, self.path))
        except BaseException:
            with contextlib.suppress(BufferError):
                self._mm.close()
            raise

    def _parse(self, cur: _Cursor) -> None:
        cur.pos = 4
        self.version = cur.take(_U32, "the version")
        if self.version and self.version & 0xFFFF == 0:
            raise cur.error(f"GGUF version {self.version:#x} looks byte-swapped (big-endian files are not supported)")
        if self.version not in (2, 3):
            raise cur.error(f"GGUF version {self.version} is not supported (2 or 3)")
        n_tensors, n_kv = cur.take(_I64, "the tensor count"), cur.take(_I64, "the key/value count")
        if n_tensors < 0 or n_kv < 0:
            raise cur.error(f"negative count: {n_tensors} tensors, {n_kv} key/values")
        if n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_BYTES > cur.end - cur.pos:
            raise cur.error(f"{n_kv} key/values and {n_tensors} tensors cannot fit in the "
                            f"{cur.end - cur.pos} bytes left")
        self.fields = self._read_fields(cur, n_kv)
        self.alignment = self._alignment(cur)
        infos = self._read_tensor_infos(cur, n_tensors)
        data_start = padded(cur.pos, self.alignment) if n_tensors else cur.pos
        if data_start > cur.end:
            raise cur.error(f"truncated: the tensor data would start at byte {data_start} of {cur.end}")
        self.data_start = data_start
        self.tensors = self._place(cur, infos, data_start)

    def _read_fields(self, cur: _Cursor, n_kv: int) -> dict[str, Field]:
        fields: dict[str, Field] = {}
        for i in range(n_kv):
            key = cur.raw_string(("key", i)).decode("utf-8", "replace")
            if not key:
                raise cur.error(f"key #{i} is empty")
            if key in fields:
                raise cur.error(f"duplicate key {_show(key)}")
            what = ("metadata", key)
            vtype = cur.vtype(what)
            if vtype == GGUFValueType.ARRAY:
                sub = cur.vtype(("metadata", key, " (array element)"))
                n = cur.take(_U64, ("metadata", key, " (array length)"))
                fields[key] = Field(cur.array(sub, n, what), vtype, sub)
            else:
                fields[key] = Field(cur.value(vtype, what), vtype)
        return fields

    def _alignment(self, cur: _Cursor) -> int:
        f = self.fields.get("general.alignment")
        if f is None:
            return GGUF_ALIGNMENT
        if f.vtype != GGUFValueType.UINT32:
            raise cur.error(f"general.alignment must be a UINT32, not {f.vtype.name}")
        if f.value == 0 or f.value & (f.value - 1):
            raise cur.error(f"general.alignment {f.value} is not a power of two")
        return int(f.value)

    def _read_tensor_infos(self, cur: _Cursor, n_tensors: int) -> list[tuple]:
        infos: list[tuple] = []
        seen: set[str] = set()
        for i in range(n_tensors):
            raw = cur.raw_string(("tensor", i, " name"))
            name = raw.decode("utf-8", "replace")
            if len(raw) > MAX_NAME_BYTES:
                raise cur.error(f"tensor #{i} name {_show(name)} is {len(raw)} bytes (at most {MAX_NAME_BYTES})")
            if name in seen:
                raise cur.error(f"duplicate tensor name {_show(name)}")
            seen.add(name)
            n_dims = cur.take(_U32, ("tensor", name, " (dimension count)"))
            if not 1 <= n_dims <= MAX_DIMS:
                raise cur.error(f"tensor {_show(name)} has {n_dims} dimensions (1 to {MAX_DIMS} supported)")
            ne = [cur.take(_I64, ("tensor", name, " (dimensions)")) for _ in range(n_dims)]
            n = 1
            for d in ne:
                if d <= 0:
                    raise cur.error(f"tensor {_show(name)} has a dimension of {d} (must be positive)")
                n *= d
            if n > INT64_MAX:
                raise cur.error(f"tensor {_show(name)} shape {tuple(ne)} has more than 2**63-1 elements")
            raw_type = cur.take(_I32, ("tensor", name, " (type)"))
            try:
                qt, block, size = _GGML_TYPES[raw_type]
            except KeyError:
                raise cur.error(f"tensor {_show(name)} has unknown GGML type {raw_type}") from None
            if ne[0] % block:
                raise cur.error(f"tensor {_show(name)} rows of {ne[0]} are not a multiple of "
                                f"{qt.name}'s block size {block}")
            offset = cur.take(_U64, ("tensor", name, " (data offset)"))
            infos.append((name, tuple(reversed(ne)), qt, offset, n // block * size))
        return infos

    def _place(self, cur: _Cursor, infos: list[tuple], data_start: int) -> dict[str, TensorInfo]:
        """llama.cpp's layout rule: each tensor starts where the previous one's padded data ends."""
        tensors: dict[str, TensorInfo] = {}
        expected = 0
        for name, shape, qt, offset, nbytes in infos:
            if offset != expected:
                raise cur.error(f"tensor {_show(name)} has data offset {offset}, expected {expected} "
                                f"(tensor data must follow header order, each aligned to {self.alignment})")
            if data_start + offset + nbytes > cur.end:
                raise cur.error(f"tensor {_show(name)} data ({nbytes} bytes at byte {data_start + offset}) "
                                f"extends past the end of the file ({cur.end} bytes)")
            tensors[name] = TensorInfo(name, shape, qt, data_start + offset, nbytes)
            expected += padded(nbytes, self.alignment)
        return tensors

    def get(self, key: str, default: Any = None) -> Any:
        f = self.fields.get(key)
        return default if f is None else f.value

    def data(self, name: str) -> np.ndarray:
        """The raw bytes of one tensor, uint8, a read-only view of the mapped file."""
        t = self.tensors[name]
        return np.frombuffer(self._mm, dtype=np.uint8, count=t.nbytes, offset=t.offset)
