"""Hostile GGUF files: the header reader either loads a file correctly or raises GGUFError.

A small GGUF builder writes files field by field and remembers where every length, count and id
went, so the corpus can aim at them: hand-crafted malformed files (one per rule), every truncation
of a small valid file, and seeded random header mutations. Each file must load *correctly*
(checked independently: sizes from the kernels' type table, data aligned, disjoint and inside
the file, llama.cpp's own ``gguf_init_from_buffer`` accepting it too) or raise GGUFError with one
line naming the file; never another exception, a crash, a hang or an allocation the file does not
pay for. A control runs the same corpus through gguf-py's GGUFReader (wrapped to raise GGUFError)
and shows that the property catches an unvalidated reader.
"""

from __future__ import annotations

import ctypes
import random
import signal
import struct
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT

from dynsearch.bench import ggml_oracle
from dynsearch.errors import GGUFError
from dynsearch.kernels import tensor_nbytes
from dynsearch.objectives.io.gguf_header import GGUFHeader

pytestmark = pytest.mark.timeout(300)

U32, I32, U64, I64 = "<I", "<i", "<Q", "<q"
_FMT = {VT.UINT8: "<B", VT.INT8: "<b", VT.UINT16: "<H", VT.INT16: "<h", VT.UINT32: "<I",
        VT.INT32: "<i", VT.FLOAT32: "<f", VT.BOOL: "<B", VT.UINT64: "<Q", VT.INT64: "<q",
        VT.FLOAT64: "<d"}


# ------------------------------------------------------------------------------------ the builder


@dataclass
class T:
    """A tensor to write: GGUF ``ne`` order (row length first), raw type id, data bytes."""

    name: str | bytes
    ne: tuple[int, ...]
    qtype: int
    data: bytes = b""


class Builder:
    """The bytes of a GGUF file, and ``slots``: (position, struct format) of every length, count,
    type id and offset written, for mutations to aim at."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.slots: list[tuple[int, str]] = []

    def put(self, fmt: str, v) -> None:
        self.slots.append((len(self.buf), fmt))
        self.buf += struct.pack(fmt, v)

    def string(self, s: str | bytes) -> None:
        b = s.encode() if isinstance(s, str) else s
        self.put(U64, len(b))
        self.buf += b

    def value(self, vtype: int, v) -> None:
        if vtype == VT.STRING:
            self.string(v)
        elif vtype == VT.ARRAY:
            sub, items = v
            self.put(U32, sub)
            self.put(U64, len(items))
            for item in items:
                self.value(sub, item)
        else:
            self.buf += struct.pack(_FMT[VT(vtype)], v)

    def pad(self, align: int) -> None:
        self.buf += b"\0" * (-len(self.buf) % align)


def build(kvs=(), tensors=(), *, version=3, magic=b"GGUF", n_kv=None, n_tensors=None, offsets=None,
          align=32) -> Builder:
    """A GGUF file: ``kvs`` are (key, value type id, value), array values are (element type,
    items); tensor offsets default to llama.cpp's layout (padded running sum)."""
    b = Builder()
    b.buf += magic
    b.put(U32, version)
    b.put(I64, len(tensors) if n_tensors is None else n_tensors)
    b.put(I64, len(kvs) if n_kv is None else n_kv)
    for key, vtype, v in kvs:
        b.string(key)
        b.put(U32, vtype)
        b.value(vtype, v)
    running = []
    pos = 0
    for t in tensors:
        running.append(pos)
        pos += len(t.data) + (-len(t.data) % align)
    for i, t in enumerate(tensors):
        b.string(t.name)
        b.put(U32, len(t.ne))
        for d in t.ne:
            b.put(I64, d)
        b.put(I32, t.qtype)
        b.put(U64, running[i] if offsets is None else offsets[i])
    if tensors:
        b.pad(align)
        for t in tensors:
            b.buf += t.data
            b.pad(align)
    return b


def _f32(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).standard_normal(n).astype(np.float32).tobytes()


BASE_KVS = [("general.architecture", VT.STRING, "llama"),
            ("general.alignment", VT.UINT32, 32),
            ("llama.block_count", VT.UINT32, 1),
            ("tokenizer.ggml.tokens", VT.ARRAY, (VT.STRING, ["<s>", "a", "ü", ""])),
            ("tokenizer.ggml.scores", VT.ARRAY, (VT.FLOAT32, [0.0, -1.5, -2.0, 0.25])),
            ("test.flags", VT.ARRAY, (VT.BOOL, [1, 0, 1])),
            ("test.i64", VT.INT64, -5),
            ("test.f64", VT.FLOAT64, 0.125)]
BASE_TENSORS = [T("token_embd.weight", (8, 4), QT.F32, _f32(32)),
                T("blk.0.attn_q.weight", (32, 2), QT.Q8_0, bytes(range(68))),
                T("output_norm.weight", (8,), QT.F16, np.ones(8, np.float16).tobytes())]


def base() -> Builder:
    return build(BASE_KVS, BASE_TENSORS)


# ------------------------------------------------------------------------------ llama.cpp's parser


class _LlamaCppGGUF:
    """``gguf_init_from_buffer`` of llama-cpp-python's libggml-base: llama.cpp's own verdict."""

    class _Params(ctypes.Structure):
        _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]

    _LOG = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)

    def __init__(self, path: Path):
        lib = ctypes.CDLL(str(path))
        lib.gguf_init_from_buffer.restype = ctypes.c_void_p
        lib.gguf_init_from_buffer.argtypes = [ctypes.c_char_p, ctypes.c_size_t, self._Params]
        lib.gguf_free.argtypes = [ctypes.c_void_p]
        self.lib = lib
        self._quiet = self._LOG(lambda level, text, user: None)

    def accepts(self, data: bytes) -> bool:
        if not data:
            return False
        get, setter = self.lib.ggml_log_get, self.lib.ggml_log_set
        old_cb, old_ud = ctypes.c_void_p(), ctypes.c_void_p()
        get.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_void_p)]
        setter.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        get(ctypes.byref(old_cb), ctypes.byref(old_ud))
        setter(ctypes.cast(self._quiet, ctypes.c_void_p), None)
        try:
            ctx = self.lib.gguf_init_from_buffer(data, len(data), self._Params(True, None))
        finally:
            setter(old_cb, old_ud)
        self.lib.gguf_free(ctx)
        return bool(ctx)


@pytest.fixture(scope="module")
def llama_cpp() -> _LlamaCppGGUF:
    path = ggml_oracle.library_path()
    if path is None:
        pytest.skip(ggml_oracle.missing_reason())
    try:
        return _LlamaCppGGUF(path)
    except AttributeError:
        pytest.skip(f"{path} has no gguf_init_from_buffer (llama-cpp-python too old)")


# Rules on which we are stricter than gguf_init_from_reader (every other verdict must be equal):
# empty tensors (llama.cpp takes a dimension of 0, or no dimension at all), data beyond the end of
# the file (llama_model_loader refuses it later, gguf.cpp does not look), and GGML type ids that
# gguf-py's table does not know (we could not size or decode them).
STRICTER = ("dimension of 0", "has 0 dimensions", "extends past the end of the file",
            "unknown GGML type")


# -------------------------------------------------------------------------------- the property


def _sound(h: GGUFHeader, data: bytes) -> None:
    """Independent checks of a loaded header against the file's bytes."""
    align = h.alignment
    assert align > 0 and align & (align - 1) == 0
    spans = []
    for t in h.tensors.values():
        assert 1 <= len(t.shape) <= 4 and all(d > 0 for d in t.shape), t
        assert t.nbytes == tensor_nbytes(t.shape, t.qtype), t  # the kernels' size table
        assert t.offset % align == 0 and t.offset + t.nbytes <= len(data), t
        assert h.data(t.name).tobytes() == data[t.offset:t.offset + t.nbytes]
        spans.append((t.offset, t.offset + t.nbytes))
    spans.sort()
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:])), "overlap"
    for f in h.fields.values():
        if f.vtype == VT.ARRAY:
            assert f.sub_type != VT.ARRAY and isinstance(f.value, list)


@dataclass
class Outcome:
    loaded: int = 0
    rejected: int = 0
    stricter: int = 0  # rejected by a STRICTER rule where llama.cpp accepts
    violations: list = None  # (file, problem)
    slowest: float = 0.0

    def __post_init__(self):
        self.violations = []


class Hang(Exception):
    """A read ran past its CPU-time deadline."""


def _raise_hang(signum, frame):
    raise Hang("no result after the deadline")


def with_deadline(read, path: Path, seconds: float):
    """``read(path)``, interrupted with Hang after ``seconds`` of CPU time (SIGPROF: leaves
    pytest-timeout's SIGALRM alone)."""
    old = signal.signal(signal.SIGPROF, _raise_hang)
    signal.setitimer(signal.ITIMER_PROF, seconds)
    try:
        return read(path)
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, old)


def check(read, path: Path, data: bytes, llama_cpp: _LlamaCppGGUF | None, out: Outcome,
          deadline: float = 5.0) -> None:
    """Read ``path`` (holding ``data``) with ``read``; record whether the property held."""
    path.write_bytes(data)
    t0 = time.perf_counter()
    try:
        h = with_deadline(read, path, deadline)
    except GGUFError as e:
        msg = str(e)
        out.rejected += 1
        if "\n" in msg or not msg.startswith(str(path)):
            out.violations.append((path.name, f"message is not one line naming the file: {msg!r}"))
        if llama_cpp is not None and llama_cpp.accepts(data):
            if any(s in msg for s in STRICTER):
                out.stricter += 1
            else:
                out.violations.append((path.name, f"rejected a file llama.cpp accepts: {msg}"))
    except Exception as e:  # noqa: BLE001 - the point: any other exception is a failure
        out.violations.append((path.name, f"{type(e).__name__}: {e}"[:200]))
    else:
        out.loaded += 1
        if llama_cpp is not None and not llama_cpp.accepts(data):
            out.violations.append((path.name, "loaded a file llama.cpp rejects"))
        elif isinstance(h, GGUFHeader):
            try:
                _sound(h, data)
            except AssertionError as e:
                out.violations.append((path.name, f"unsound load: {e}"))
        del h
    out.slowest = max(out.slowest, time.perf_counter() - t0)
    path.unlink()


# --------------------------------------------------------------------------- the valid baseline


def test_builder_matches_gguf_py_and_llama_cpp(tmp_path, llama_cpp):
    """The builder's valid file reads the same through gguf-py, llama.cpp and our reader."""
    data = bytes(base().buf)
    path = tmp_path / "base.gguf"
    path.write_bytes(data)
    assert llama_cpp.accepts(data)
    h, r = GGUFHeader(path), gguf.GGUFReader(path)
    assert {k: f.value for k, f in h.fields.items()} == \
        {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    for t in r.tensors:
        info = h.tensors[t.name]
        assert info.shape == tuple(int(x) for x in reversed(t.shape)) and info.qtype == t.tensor_type
        assert h.data(t.name).tobytes() == np.asarray(t.data).tobytes()
    _sound(h, data)


# --------------------------------------------------------------------------------- hand-crafted

_KEY = [("general.architecture", VT.STRING, "llama")]
_F32 = [T("a", (8,), QT.F32, _f32(8))]
_2T = [T("a", (8,), QT.F32, _f32(8)), T("b", (8,), QT.F32, _f32(8, 1))]


def _raw(*parts) -> bytes:
    return b"".join(struct.pack(f, v) if isinstance(f, str) else f for f, v in parts)


def _cut(b: Builder, n: int) -> bytes:
    return bytes(b.buf[:n])


def _hdr(version=3, n_tensors=0, n_kv=0) -> bytes:
    return b"GGUF" + struct.pack("<Iqq", version, n_tensors, n_kv)


# (id, file bytes, expected message, does llama.cpp's gguf parser reject it too)
MALFORMED = [
    ("empty", b"", "bad magic b''", True),
    ("short", b"GGU", "bad magic", True),
    ("magic", b"GGML" + bytes(20), "bad magic b'GGML'", True),
    ("version-0", _hdr(0), "version 0 is not supported", True),
    ("version-1", _hdr(1), "version 1 is not supported", True),
    ("version-4", _hdr(4), "version 4 is not supported", True),
    ("big-endian", b"GGUF" + struct.pack(">Iqq", 3, 0, 0), "byte-swapped", True),
    ("no-counts", b"GGUF" + struct.pack("<I", 3), "ends in the tensor count", True),
    ("negative-tensors", _hdr(n_tensors=-1), "negative count", True),
    ("kv-count-2^40", _hdr(n_kv=1 << 40) + bytes(64), "cannot fit", True),
    ("tensor-count-2^62", _hdr(n_tensors=1 << 62) + bytes(64), "cannot fit", True),
    ("key-past-end", _hdr(n_kv=1) + struct.pack("<Q", 1000) + b"k" * 20, "key #0: string length 1000 runs past", True),
    ("key-2^62", _hdr(n_kv=1) + struct.pack("<Q", 1 << 62) + b"k" * 20, "exceeds the limit", True),
    ("empty-key", bytes(build([("", VT.UINT8, 1), ("k", VT.UINT8, 1)]).buf), "key #0 is empty", True),
    ("duplicate-key", bytes(build([("a.b", VT.UINT8, 1), ("a.b", VT.UINT8, 2)]).buf), "duplicate key 'a.b'", True),
    ("value-type-13", _hdr(n_kv=1) + struct.pack("<Q", 3) + b"a.b" + struct.pack("<IB", 13, 0),
     "unknown value type 13", True),
    ("value-type-2^31", _hdr(n_kv=1) + struct.pack("<Q", 1) + b"k" + struct.pack("<IB", 1 << 31, 0) + bytes(8),
     "unknown value type 2147483648", True),
    ("nested-array", bytes(build([("a.b", VT.ARRAY, (VT.ARRAY, []))]).buf), "arrays of arrays", True),
    ("array-2^31", _hdr(n_kv=1) + struct.pack("<Q", 1) + b"k" + struct.pack("<IIQ", VT.ARRAY, VT.UINT8, 1 << 31) + bytes(32),
     "exceeds the limit of 1073741824", True),
    ("array-past-end", _hdr(n_kv=1) + struct.pack("<Q", 1) + b"k" + struct.pack("<IIQ", VT.ARRAY, VT.UINT32, 100) + bytes(32),
     "array of 100 UINT32 elements runs past", True),
    ("string-array-past-end", _hdr(n_kv=1) + struct.pack("<Q", 1) + b"k" + struct.pack("<IIQ", VT.ARRAY, VT.STRING, 2)
     + struct.pack("<Q", 2) + b"ab" + struct.pack("<Q", 50) + b"x", "string length 50 runs past", True),
    ("string-value-past-end", _cut(build([("k", VT.STRING, "x" * 40)]), 60), "string length 40 runs past", True),
    ("scalar-cut", _cut(build([("k", VT.UINT64, 7)]), 4 + 4 + 16 + 9 + 4 + 3), "truncated: the file ends in metadata 'k'", True),
    ("alignment-u64", bytes(build([("general.alignment", VT.UINT64, 32)]).buf), "general.alignment must be a UINT32, not UINT64", True),
    ("alignment-48", bytes(build([("general.alignment", VT.UINT32, 48)]).buf), "general.alignment 48 is not a power of two", True),
    ("alignment-0", bytes(build([("general.alignment", VT.UINT32, 0)]).buf), "general.alignment 0 is not a power of two", True),
    ("alignment-2^31", bytes(build([("general.alignment", VT.UINT32, 1 << 31)], _F32, align=1).buf),
     "tensor data would start at byte 2147483648", True),
    ("name-64-bytes", bytes(build(_KEY, [T("n" * 64, (8,), QT.F32, _f32(8))]).buf), "is 64 bytes \\(at most 63\\)", True),
    ("duplicate-tensor", bytes(build(_KEY, [T("a", (8,), QT.F32, _f32(8)), T("a", (8,), QT.F32, _f32(8))]).buf),
     "duplicate tensor name 'a'", True),
    ("5-dims", bytes(build(_KEY, [T("a", (1, 1, 1, 1, 8), QT.F32, _f32(8))]).buf), "has 5 dimensions", True),
    ("dims-2^32", _hdr(n_tensors=1) + struct.pack("<Q", 1) + b"a" + struct.pack("<I", 1 << 31) + bytes(64),
     "has 2147483648 dimensions", True),
    ("negative-dim", bytes(build(_KEY, [T("a", (8, -1), QT.F32, _f32(8))]).buf), "dimension of -1", True),
    ("zero-dim", bytes(build(_KEY, [T("a", (8, 0), QT.F32, b"")]).buf), "dimension of 0", False),
    ("no-dims", bytes(build(_KEY, [T("a", (), QT.F32, _f32(1))]).buf), "has 0 dimensions", False),
    ("elements-overflow", bytes(build(_KEY, [T("a", (1 << 32, 1 << 32), QT.F32, _f32(8))]).buf),
     "more than 2\\*\\*63-1 elements", True),
    ("type-99", bytes(build(_KEY, [T("a", (8,), 99, _f32(8))]).buf), "unknown GGML type 99", True),
    ("type-negative", bytes(build(_KEY, [T("a", (8,), -1, _f32(8))]).buf), "unknown GGML type -1", True),
    ("type-removed-Q4_2", bytes(build(_KEY, [T("a", (32,), 4, bytes(18))]).buf), "unknown GGML type 4", True),
    ("row-not-block", bytes(build(_KEY, [T("a", (33,), QT.Q8_0, bytes(34))]).buf),
     "rows of 33 are not a multiple of Q8_0's block size 32", True),
    ("misaligned", bytes(build(_KEY, _2T, offsets=[0, 4]).buf), "has data offset 4, expected 32", True),
    ("overlap", bytes(build(_KEY, _2T, offsets=[0, 0]).buf), "has data offset 0, expected 32", True),
    ("out-of-order", bytes(build(_KEY, _2T, offsets=[32, 0]).buf), "'a' has data offset 32, expected 0", True),
    ("data-past-end", _cut(build(_KEY, _F32), len(build(_KEY, _F32).buf) - 32 + 16), "extends past the end of the file", False),
    ("tensor-info-cut", _cut(build(_KEY, _F32), len(build(_KEY, []).buf) + 8 + 1 + 4 + 3),
     "ends in tensor 'a' \\(dimensions\\)", True),
]


def test_enough_hand_crafted_files():
    assert len(MALFORMED) >= 20 and len({m[0] for m in MALFORMED}) == len(MALFORMED)


@pytest.mark.parametrize("name,data,message,llama_rejects", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed(tmp_path, llama_cpp, name, data, message, llama_rejects):
    path = tmp_path / f"{name}.gguf"
    path.write_bytes(data)
    with pytest.raises(GGUFError, match=message) as e:
        GGUFHeader(path)
    assert str(e.value).startswith(f"{path}: ") and "\n" not in str(e.value)
    assert llama_cpp.accepts(data) is not llama_rejects  # llama.cpp agrees, or STRICTER applies
    if not llama_rejects:
        assert any(s in str(e.value) for s in STRICTER)


def test_unreadable_paths(tmp_path):
    with pytest.raises(GGUFError, match="no such file"):
        GGUFHeader(tmp_path / "absent.gguf")
    with pytest.raises(GGUFError, match="no such file"):
        GGUFHeader(tmp_path)  # a folder
    p = tmp_path / "locked.gguf"
    p.write_bytes(bytes(base().buf))
    p.chmod(0)
    try:
        with open(p, "rb"):
            pytest.skip("running as root: permissions are not enforced")
    except PermissionError:
        with pytest.raises(GGUFError, match="cannot read"):
            GGUFHeader(p)
    finally:
        p.chmod(0o644)


# -------------------------------------------------------------------------------- truncations


def test_every_truncation(tmp_path, llama_cpp):
    whole = bytes(base().buf)
    data_end = len(whole) - (-len(BASE_TENSORS[-1].data) % 32)  # the last tensor's padding
    out = Outcome()
    for n in range(len(whole) + 1):
        check(GGUFHeader, tmp_path / f"cut{n}.gguf", whole[:n], llama_cpp, out)
    assert out.violations == []
    assert out.loaded == len(whole) - data_end + 1  # only cuts in the last padding load
    assert out.rejected == data_end
    print(f"truncations: {len(whole) + 1} files, {out.loaded} loaded, {out.rejected} rejected "
          f"({out.stricter} where only the data was cut), slowest {out.slowest * 1e3:.1f} ms")


# ---------------------------------------------------------------------------------- mutations

_INTERESTING = [0, 1, 2, 3, 4, 5, 7, 8, 13, 31, 32, 33, 63, 64, 255, 256, 1 << 15, 1 << 16, (1 << 31) - 1,
                1 << 31, (1 << 32) - 1, 1 << 32, 1 << 40, (1 << 63) - 1, 1 << 63, (1 << 64) - 1]


def mutate(b: Builder, rng: random.Random) -> bytes:
    """One random corruption of ``b``'s header (its tensor data is left alone)."""
    data = bytearray(b.buf)
    header_end = max(pos + struct.calcsize(fmt) for pos, fmt in b.slots)
    kind = rng.randrange(6)
    if kind == 0:  # flip bits
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(header_end)] ^= 1 << rng.randrange(8)
    elif kind == 1:  # a length, count, type id or offset set to an interesting value
        pos, fmt = rng.choice(b.slots)
        size = struct.calcsize(fmt)
        v = rng.choice(_INTERESTING) % (1 << (8 * size))
        data[pos:pos + size] = v.to_bytes(size, "little")
    elif kind == 2:  # a length or count inflated or shrunk by a little
        pos, fmt = rng.choice(b.slots)
        size = struct.calcsize(fmt)
        v = (int.from_bytes(data[pos:pos + size], "little") + rng.choice([-2, -1, 1, 2, 8, 1000])) % (1 << (8 * size))
        data[pos:pos + size] = v.to_bytes(size, "little")
    elif kind == 3:  # random bytes overwrite a run
        at = rng.randrange(header_end)
        n = rng.randint(1, 16)
        data[at:at + n] = rng.randbytes(n)
    elif kind == 4:  # bytes cut out of the header or inserted into it
        at = rng.randrange(header_end)
        if rng.random() < 0.5:
            del data[at:at + rng.randint(1, 24)]
        else:
            data[at:at] = rng.randbytes(rng.randint(1, 24))
    else:  # a run of the header repeated (duplicate keys, infos)
        at = rng.randrange(header_end)
        n = rng.randint(4, 64)
        data[at:at] = data[at:at + n]
    return bytes(data)


def corpus(n: int, seed: int = 1234) -> list[bytes]:
    """``n`` distinct mutated files, alternately of the base file and of a smaller one."""
    rng = random.Random(seed)
    sources = [build(BASE_KVS[:3], BASE_TENSORS[:2]), base()]
    originals = {bytes(b.buf) for b in sources}
    files: dict[bytes, None] = {}
    while len(files) < n:
        data = mutate(sources[len(files) % 2], rng)
        if data not in originals:
            files[data] = None
    return list(files)


N_MUTATIONS = 3000
CONTROL_FILES = 600  # gguf-py is slower, and some files make it loop until the deadline


def test_random_mutations(tmp_path, llama_cpp):
    out = Outcome()
    files = corpus(N_MUTATIONS)
    for i, data in enumerate(files):
        check(GGUFHeader, tmp_path / f"m{i}.gguf", data, llama_cpp, out)
    assert out.violations == [], out.violations[:5]
    assert out.loaded + out.rejected == N_MUTATIONS
    assert out.loaded > 50 and out.rejected > 1000  # the corpus reaches both outcomes
    assert out.slowest < 1.0
    print(f"mutations: {N_MUTATIONS} files, {out.loaded} loaded, {out.rejected} rejected "
          f"({out.stricter} by a stricter rule), slowest {out.slowest * 1e3:.1f} ms")


def _gguf_py_wrapped(path: Path):
    """The 'just wrap gguf-py' reader: every exception of GGUFReader becomes a GGUFError."""
    try:
        return gguf.GGUFReader(path)
    except Hang:
        raise
    except Exception as e:  # noqa: BLE001
        raise GGUFError(f"{path}: {type(e).__name__}") from None


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # gguf-py's own offset overflows
def test_control_gguf_py_fails_the_property(tmp_path, llama_cpp):
    """The same check flags an unvalidated reader: gguf-py (even with its exceptions wrapped)
    loads files llama.cpp rejects, and raw gguf-py raises unrelated exceptions."""
    files = corpus(CONTROL_FILES)
    wrapped = Outcome()
    for i, data in enumerate(files):
        check(_gguf_py_wrapped, tmp_path / f"w{i}.gguf", data, llama_cpp, wrapped, deadline=0.5)
    raw = Outcome()
    for i, data in enumerate(files):
        check(gguf.GGUFReader, tmp_path / f"r{i}.gguf", data, None, raw, deadline=0.5)
    bad_loads = sum("llama.cpp rejects" in v[1] for v in wrapped.violations)
    hangs = sum(v[1].startswith("Hang") for v in wrapped.violations)
    kinds = sorted({v[1].split(":")[0] for v in raw.violations})
    print(f"control on {len(files)} mutations: wrapped gguf-py broke the property on "
          f"{len(wrapped.violations)} ({bad_loads} loads of files llama.cpp rejects, {hangs} hangs); "
          f"raw gguf-py: {len(raw.violations)} unrelated exceptions or hangs ({', '.join(kinds)})")
    assert bad_loads > 0 and len(raw.violations) > 0


# ------------------------------------------------------------------------ 2 MB crafted headers

_2MB = 2 << 20


def _many_strings() -> bytes:  # a 2 MB vocabulary, then a duplicate key
    n = _2MB // 9
    return bytes(build([("tokenizer.ggml.tokens", VT.ARRAY, (VT.STRING, ["x"] * n)),
                        ("tokenizer.ggml.tokens", VT.UINT8, 1)]).buf)


def _many_keys() -> bytes:  # 2 MB of one-byte keys, then an unknown value type
    n = _2MB // 19 + 1  # 8 + 6 + 4 + 1 bytes each
    kvs = [(f"{i:06x}", VT.UINT8, 1) for i in range(n)]
    return bytes(build(kvs, n_kv=n + 1).buf) + struct.pack("<Q", 2) + b"zz" + struct.pack("<I", 13) + bytes(8)


def _many_tensors() -> bytes:  # 2 MB of tensor infos, the last one misplaced
    n = _2MB // 40
    tensors = [T(f"t{i}", (8,), QT.F32, _f32(8)) for i in range(n)]
    offsets = [32 * i for i in range(n)]
    offsets[-1] += 4
    return bytes(build(_KEY, tensors, offsets=offsets).buf)


def _big_numbers() -> bytes:  # 2 MB of int16s and int64s, then the file ends
    return bytes(build([("a", VT.ARRAY, (VT.INT16, [-1] * (_2MB // 4))),
                        ("b", VT.ARRAY, (VT.INT64, [1 << 40] * (_2MB // 16)))], n_kv=3).buf)


def _huge_claims() -> bytes:  # lengths that ask for terabytes, in 2 MB of zeros
    return _hdr(n_kv=1) + struct.pack("<Q", 1) + b"k" + struct.pack("<IIQ", VT.ARRAY, VT.UINT64, 1 << 29) + bytes(_2MB)


@pytest.mark.parametrize("make", [_many_strings, _many_keys, _many_tensors, _big_numbers, _huge_claims],
                         ids=lambda f: f.__name__.strip("_"))
def test_2mb_header_fails_fast_and_small(tmp_path, make):
    path = tmp_path / "big.gguf"
    path.write_bytes(make())
    assert path.stat().st_size >= _2MB
    wall, cpu = [], []
    for _ in range(3):  # best of three, and CPU time: the shared machine's load is not our cost
        w0, c0 = time.perf_counter(), time.process_time()
        with pytest.raises(GGUFError):
            GGUFHeader(path)
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    tracemalloc.start()
    try:
        with pytest.raises(GGUFError):
            GGUFHeader(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    print(f"{make.__name__}: {path.stat().st_size / 2**20:.1f} MiB, best {min(wall) * 1e3:.0f} ms wall, "
          f"{min(cpu) * 1e3:.0f} ms CPU, peak {peak / 2**20:.1f} MiB")
    assert min(cpu) < 1.0 and min(wall) < 2.0
    assert peak < 100 * 2**20


# ------------------------------------------------------------------- model metadata of any type

_MODEL_KEYS = ["block_count", "embedding_length", "attention.head_count", "attention.head_count_kv",
               "feed_forward_length", "attention.layer_norm_rms_epsilon", "attention.key_length",
               "rope.dimension_count", "rope.freq_base", "rope.scaling.factor", "attention.sliding_window",
               "attention.sliding_window_pattern", "expert_count"]
_ODD_VALUES = [("x", VT.STRING), (0, VT.UINT32), (-1, VT.INT32), (2**40, VT.UINT64), (float("nan"), VT.FLOAT32),
               (float("inf"), VT.FLOAT64), (2.5, VT.FLOAT32), (([4, 4], VT.UINT32), VT.ARRAY),
               ((["a"], VT.STRING), VT.ARRAY), (True, VT.BOOL)]


def test_model_metadata_of_any_type(tmp_path):
    """A well-formed GGUF whose model keys hold odd values or types: the model opens, or a
    ModelError names the file and the key (no int('x') or division by zero tracebacks)."""
    from dynsearch.errors import ModelError
    from dynsearch.objectives.io.gguf_source import GGUFSource
    from dynsearch.objectives.io.gguf_write import write_model

    rng = np.random.default_rng(0)
    tensors = {"token_embd.weight": rng.standard_normal((8, 32)).astype(np.float32),
               "blk.0.attn_norm.weight": np.ones(32, np.float32),
               "blk.0.attn_q.weight": rng.standard_normal((32, 32)).astype(np.float32)}
    base = {"llama.block_count": (1, VT.UINT32), "llama.embedding_length": (32, VT.UINT32),
            "llama.attention.head_count": (4, VT.UINT32), "llama.attention.layer_norm_rms_epsilon": (1e-5, VT.FLOAT32)}
    GGUFSource(write_model(tmp_path / "ok.gguf", "llama", None, base, tensors))
    opened = refused = 0
    for k in _MODEL_KEYS:
        for value in _ODD_VALUES:
            path = write_model(tmp_path / "m.gguf", "llama", None, {**base, f"llama.{k}": value}, tensors)
            try:
                GGUFSource(path)
                opened += 1
            except ModelError as e:
                assert str(e).startswith("m.gguf: ") and "\n" not in str(e), str(e)
                refused += 1
    assert refused > 50 and opened + refused == len(_MODEL_KEYS) * len(_ODD_VALUES)


_TOKENIZER_KEYS = ["tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                   "tokenizer.ggml.merges", "tokenizer.ggml.scores", "tokenizer.ggml.pre",
                   "tokenizer.ggml.bos_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.chat_template"]


def test_tokenizer_metadata_of_any_type(tmp_path):
    """Odd values under the tokenizer keys: a working tokenizer, or a ModelError naming the file."""
    from dynsearch.errors import ModelError
    from dynsearch.objectives.io.gguf_write import write_model
    from dynsearch.objectives.tokenizer import Tokenizer

    tokens = ["<s>", "a", "b", "c", " ", "ab"]
    base = {"tokenizer.ggml.model": ("gpt2", VT.STRING), "tokenizer.ggml.pre": ("default", VT.STRING),
            "tokenizer.ggml.tokens": ((tokens, VT.STRING), VT.ARRAY),
            "tokenizer.ggml.token_type": (([3, 1, 1, 1, 1, 1], VT.INT32), VT.ARRAY),
            "tokenizer.ggml.merges": ((["a b"], VT.STRING), VT.ARRAY),
            "tokenizer.ggml.bos_token_id": (0, VT.UINT32)}
    tensors = {"token_embd.weight": np.zeros((6, 32), np.float32)}
    assert Tokenizer.from_gguf(write_model(tmp_path / "ok.gguf", "llama", None, base, tensors)).encode("ab")
    ok = refused = 0
    for k in _TOKENIZER_KEYS:
        for value in _ODD_VALUES:
            path = write_model(tmp_path / "t.gguf", "llama", None, {**base, k: value}, tensors)
            try:
                Tokenizer.from_gguf(path).encode("abc ab")
                ok += 1
            except ModelError as e:
                assert str(path) in str(e) and "\n" not in str(e), str(e)
                refused += 1
    assert refused > 10 and ok + refused == len(_TOKENIZER_KEYS) * len(_ODD_VALUES)
