"""Importance matrices in llama.cpp's formats: what ``llama-imatrix`` writes and ``llama-quantize`` reads.

An imatrix holds, per weight tensor (GGUF name, e.g. ``blk.3.ffn_down.weight``), the sum over the
calibration tokens of the squared inputs of every column, and how many tokens were summed::

    in_sum2[e, j] = sum_t x_t[j]**2      # float32 (n_mat, n_cols); n_mat = n_expert for MoE, else 1
    counts[e]     = number of tokens t   # per expert for MoE (the tokens routed to it)

``llama-quantize`` turns that into the per-column weights it hands to ``ggml_quantize_chunk``
(tools/quantize/quantize.cpp ``load_imatrix``): ``in_sum2 / counts`` per expert in float32, all ones
for an expert that saw no token; :meth:`ImatrixData.importance` is exactly that.

Two file formats (read both, write GGUF):

* GGUF (llama.cpp >= b5900, tools/imatrix/imatrix.cpp ``save_imatrix``): ``general.type = "imatrix"``,
  ``imatrix.datasets`` (array of str), ``imatrix.chunk_count`` (u32), ``imatrix.chunk_size`` (u32);
  per entry, names sorted, tensors ``<name>.in_sum2`` F32 ne=(n_cols, n_mat) and ``<name>.counts``
  F32 ne=(1, n_mat).
* legacy ``.dat`` (``save_imatrix_legacy``), little-endian: ``i32 n_entries``; per entry ``i32 len,
  name, i32 ncall, i32 nval, f32[nval]`` holding ``(in_sum2 / count) * ncall``; then optionally
  ``i32 chunk_count, i32 len, dataset``. Read as in_sum2 = the stored values, counts = ncall (so the
  importance is the same quotient llama-quantize takes), one matrix of nval columns, chunk_size 0.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

from dynsearch.atomic import atomic_path
from dynsearch.errors import ImatrixFormatError
from dynsearch.objectives.io.gguf_header import GGUFHeader

GGUF_MAGIC = b"GGUF"
KEY_TYPE = "general.type"
KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
SUFFIX_SUM2 = ".in_sum2"
SUFFIX_COUNTS = ".counts"


@dataclass
class ImatrixEntry:
    """Statistics of one weight tensor's inputs."""

    in_sum2: np.ndarray  # float32 (n_mat, n_cols): sum of squared inputs per column (per expert)
    counts: np.ndarray  # int64 (n_mat,): tokens summed into each row of in_sum2

    def __post_init__(self) -> None:
        self.in_sum2 = np.ascontiguousarray(self.in_sum2, dtype=np.float32)
        self.counts = np.ascontiguousarray(self.counts, dtype=np.int64).reshape(-1)
        if self.in_sum2.ndim == 1:
            self.in_sum2 = self.in_sum2.reshape(1, -1)
        if self.in_sum2.ndim != 2 or self.in_sum2.shape[0] != self.counts.size:
            raise ValueError(f"in_sum2 {self.in_sum2.shape} does not match counts {self.counts.shape}")

    @property
    def n_mat(self) -> int:
        return self.in_sum2.shape[0]

    @property
    def n_cols(self) -> int:
        return self.in_sum2.shape[1]


@dataclass
class ImatrixData:
    """A whole imatrix: entries by tensor name plus llama-imatrix's metadata."""

    entries: dict[str, ImatrixEntry] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)  # calibration files it was computed on
    chunk_count: int = 0  # chunks evaluated (llama-imatrix: max count // chunk_size)
    chunk_size: int = 0  # tokens per chunk (llama-imatrix: n_ctx); 0 when read from a legacy file

    def importance(self, name: str) -> np.ndarray:
        """The float32 weights llama-quantize passes to ggml_quantize_chunk for tensor ``name``.

        ``in_sum2 / count`` per expert (float32 division, as in quantize.cpp), ones where the count
        is zero; flat (n_mat * n_cols,), the layout llama-quantize indexes per expert. Raises
        ImatrixFormatError (a ValueError) on non-finite values, which llama-quantize refuses as well.
        """
        e = self.entries[name]
        count = e.counts.astype(np.float32)[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            w = np.where(count > 0, e.in_sum2 / np.where(count > 0, count, np.float32(1)), np.float32(1))
        w = w.astype(np.float32).reshape(-1)
        if not np.all(np.isfinite(w)):
            raise ImatrixFormatError(f"imatrix entry {name} has non-finite values")
        return w

    def merge(self, other: ImatrixData) -> ImatrixData:
        """Sums of both (what ``llama-imatrix --in-file a --in-file b`` combines); a new object."""
        out = {n: ImatrixEntry(e.in_sum2.copy(), e.counts.copy()) for n, e in self.entries.items()}
        for n, e in other.entries.items():
            if n not in out:
                out[n] = ImatrixEntry(e.in_sum2.copy(), e.counts.copy())
                continue
            a = out[n]
            if a.in_sum2.size != e.in_sum2.size:
                raise ValueError(f"{n}: sizes differ ({a.in_sum2.size} vs {e.in_sum2.size})")
            shape = max(a.in_sum2.shape, e.in_sum2.shape)  # one count broadcast to every expert
            counts = np.broadcast_to(a.counts, shape[:1]) + np.broadcast_to(e.counts, shape[:1])
            out[n] = ImatrixEntry(a.in_sum2.reshape(shape) + e.in_sum2.reshape(shape), counts)
        size = self.chunk_size or other.chunk_size
        max_count = max((int(e.counts.max()) for e in out.values() if e.counts.size), default=0)
        return ImatrixData(out, self.datasets + other.datasets,
                           max_count // size if size else self.chunk_count + other.chunk_count, size)


# ------------------------------------------------------------------------------------------- reading


def read_imatrix(path: str | os.PathLike[str]) -> ImatrixData:
    """Read an imatrix file, GGUF or legacy ``.dat`` (told apart by the GGUF magic)."""
    path = Path(path)
    with open(path, "rb") as fh:
        magic = fh.read(4)
    return _read_gguf(path) if magic == GGUF_MAGIC else _read_legacy(path)


def _read_gguf(path: Path) -> ImatrixData:
    header = GGUFHeader(path)  # validated as llama.cpp does; a malformed file is a GGUFError
    kind = header.get(KEY_TYPE)
    if kind is not None and kind != "imatrix":
        raise ImatrixFormatError(f"{path}: general.type is {kind!r}, not 'imatrix'")
    parts: dict[str, dict[str, np.ndarray]] = {}
    for t in header.tensors.values():
        for suffix in (SUFFIX_SUM2, SUFFIX_COUNTS):
            if t.name.endswith(suffix):
                if t.qtype != GGMLQuantizationType.F32:
                    raise ImatrixFormatError(f"{path}: {t.name} is {t.qtype.name}, must be F32")
                n_mat = t.shape[-2] if len(t.shape) > 1 else 1  # ne[1]
                data = np.frombuffer(header.data(t.name), np.float32).copy()
                parts.setdefault(t.name[: -len(suffix)], {})[suffix] = data.reshape(n_mat, -1)
    if not parts:
        raise ImatrixFormatError(f"{path}: no imatrix entries")
    entries = {}
    for name in sorted(parts):
        p = parts[name]
        if len(p) != 2:
            raise ImatrixFormatError(f"{path}: mismatched sums and counts for {name}")
        counts = _token_counts(path, name, p[SUFFIX_COUNTS].reshape(-1))
        if p[SUFFIX_SUM2].size % counts.size:
            raise ImatrixFormatError(f"{path}: {name} has {p[SUFFIX_SUM2].size} sums for {counts.size} counts")
        entries[name] = ImatrixEntry(p[SUFFIX_SUM2].reshape(counts.size, -1), counts)

    def integer(key: str) -> int:
        v = header.get(key, 0)
        if isinstance(v, bool) or not isinstance(v, int):
            raise ImatrixFormatError(f"{path}: {key} is {v!r}, not an integer")
        return v

    datasets = header.get(KEY_DATASETS, [])
    return ImatrixData(entries, [str(d) for d in (datasets if isinstance(datasets, list) else [datasets])],
                       integer(KEY_CHUNK_COUNT), integer(KEY_CHUNK_SIZE))


MAX_COUNT = 2**53  # tokens summed into one entry; above it a float count is no whole number


def _token_counts(path: Path, name: str, counts: np.ndarray) -> np.ndarray:
    """The counts of an entry as whole numbers (``std::lround`` in llama.cpp's loader); a count
    that is not a number of tokens (NaN, infinite, negative, above MAX_COUNT) is refused, where
    llama-quantize would silently take all-ones importance or divide by it."""
    bad = ~((counts >= 0) & (counts <= MAX_COUNT))  # NaN compares False
    if bad.any():
        raise ImatrixFormatError(f"{path}: entry {name} has a token count of {float(counts[bad][0]):g}, "
                                 f"not a whole number from 0 to 2**53")
    return np.round(counts).astype(np.int64)


def _read_legacy(path: Path) -> ImatrixData:
    """Read entry by entry; every declared size is checked against the bytes the file has left
    before it is read, so a file declaring more than it holds costs nothing."""
    with open(path, "rb") as fh:
        left = os.fstat(fh.fileno()).st_size

        def take(n: int, what: str) -> bytes:
            nonlocal left
            if n > left:
                raise ImatrixFormatError(f"{path}: truncated legacy imatrix: {what} needs {n} bytes, "
                                         f"{left} left")
            left -= n
            return fh.read(n)

        def int32(what: str) -> int:
            return struct.unpack("<i", take(4, what))[0]

        n_entries = int32("the entry count")
        if n_entries < 1:
            raise ImatrixFormatError(f"{path}: not an imatrix (neither GGUF nor a legacy file with entries)")
        if n_entries > left // 16:  # an entry takes at least 16 bytes: length, ncall, nval, 1 value
            raise ImatrixFormatError(f"{path}: declares {n_entries} entries, the file holds at most "
                                     f"{left // 16}")
        entries = {}
        for i in range(n_entries):
            length = int32(f"entry {i}'s name length")
            if length < 0:
                raise ImatrixFormatError(f"{path}: entry {i} has a name of length {length}")
            name = take(length, f"entry {i}'s name").decode("utf-8", "replace")
            ncall, nval = int32(f"entry {name!r}"), int32(f"entry {name!r}")
            if nval < 1:
                raise ImatrixFormatError(f"{path}: entry {name!r} has {nval} values")
            sums = np.frombuffer(take(4 * nval, f"entry {name!r}'s {nval} values"), "<f4").astype(np.float32)
            # quantize.cpp divides by ncall, or takes the values as they are when ncall <= 0
            entries[name] = ImatrixEntry(sums, [ncall if ncall > 0 else 1])
        chunk_count, datasets = 0, []
        if left >= 4:  # optional trailer: chunk count and dataset name
            chunk_count = int32("the chunk count")
            if left >= 4:
                length = int32("the dataset name length")
                if 0 < length <= left:
                    datasets.append(take(length, "the dataset name").decode("utf-8", "replace"))
    return ImatrixData(dict(sorted(entries.items())), datasets, chunk_count, 0)


# ------------------------------------------------------------------------------------------- writing


def write_imatrix(path: str | os.PathLike[str], data: ImatrixData) -> Path:
    """Write ``data`` as a GGUF imatrix, atomically (temp file in the same folder, fsync, rename)."""
    from gguf import GGUFValueType, GGUFWriter

    path = Path(path)
    if not data.entries:
        raise ValueError("refusing to write an imatrix without entries (llama.cpp cannot load it)")
    if not data.datasets:  # llama-quantize refuses a GGUF imatrix without the datasets key
        raise ValueError("an imatrix needs at least one dataset name (ImatrixData.datasets)")
    with atomic_path(path) as tmp:
        writer = GGUFWriter(tmp, arch="imatrix")
        writer.kv_data[0].pop("general.architecture", None)  # llama-imatrix writes no architecture
        writer.add_type("imatrix")
        writer.add_key_value(KEY_DATASETS, [str(d) for d in data.datasets], GGUFValueType.ARRAY,
                             sub_type=GGUFValueType.STRING)
        writer.add_key_value(KEY_CHUNK_COUNT, int(data.chunk_count), GGUFValueType.UINT32)
        writer.add_key_value(KEY_CHUNK_SIZE, int(data.chunk_size), GGUFValueType.UINT32)
        for name in sorted(data.entries):  # llama-imatrix's deterministic order
            e = data.entries[name]
            writer.add_tensor(name + SUFFIX_SUM2, e.in_sum2)  # numpy (n_mat, n_cols) -> ne (n_cols, n_mat)
            writer.add_tensor(name + SUFFIX_COUNTS, e.counts.astype(np.float32).reshape(-1, 1))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path
