"""imatrix files: GGUF and legacy round trips, llama-quantize's importance, and llama.cpp's own tools.

The fast tests check our reader against files laid out byte by byte after imatrix.cpp's writers;
the slow ones hand our GGUF to ``llama-imatrix --in-file`` (its loader and both its writers) and to
``llama-quantize --imatrix``, whose output must equal ggml quantizing with :meth:`importance`.
"""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

from dynsearch.objectives.io.imatrix import ImatrixData, ImatrixEntry, ImatrixFormatError, read_imatrix, write_imatrix


def _sample(seed: int = 0) -> ImatrixData:
    rng = np.random.default_rng(seed)
    entries = {
        "blk.0.attn_q.weight": ImatrixEntry(rng.lognormal(0, 2, (1, 64)) * 300, [512 * 3]),
        "blk.0.ffn_down.weight": ImatrixEntry(rng.lognormal(0, 2, (1, 96)) * 300, [512 * 3]),
        # MoE: 4 experts, the third never routed to
        "blk.1.ffn_up_exps.weight": ImatrixEntry(rng.lognormal(0, 1, (4, 64)) * np.array([[7], [1], [0], [3]]),
                                                 [7, 1, 0, 3]),
        "output.weight": ImatrixEntry(rng.lognormal(0, 1, (1, 64)), [1536]),
    }
    return ImatrixData(entries, ["calib/wiki.txt", "more.txt"], 3, 512)


def _assert_same(a: ImatrixData, b: ImatrixData) -> None:
    assert sorted(a.entries) == sorted(b.entries)
    for name, e in a.entries.items():
        np.testing.assert_array_equal(e.in_sum2, b.entries[name].in_sum2, err_msg=name)
        np.testing.assert_array_equal(e.counts, b.entries[name].counts, err_msg=name)
    assert (a.datasets, a.chunk_count, a.chunk_size) == (b.datasets, b.chunk_count, b.chunk_size)


def test_gguf_round_trip(tmp_path):
    data = _sample()
    path = write_imatrix(tmp_path / "im.gguf", data)
    _assert_same(data, read_imatrix(path))
    assert [p.name for p in tmp_path.iterdir()] == ["im.gguf"]  # no temp file left behind


def test_gguf_layout_is_llama_imatrix_layout(tmp_path):
    """Keys, tensor names/order/shapes/types as imatrix.cpp's save_imatrix writes them."""
    from gguf import GGMLQuantizationType, GGUFReader

    data = _sample()
    reader = GGUFReader(write_imatrix(tmp_path / "im.gguf", data))
    keys = [k for k in reader.fields if not k.startswith("GGUF.")]
    assert keys == ["general.type", "imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"]
    assert reader.fields["general.type"].contents() == "imatrix"
    expected = []
    for name in sorted(data.entries):
        n_mat, n_cols = data.entries[name].in_sum2.shape
        expected += [(name + ".in_sum2", [n_cols, n_mat]), (name + ".counts", [1, n_mat])]
    got = [(t.name, [int(s) for s in t.shape] + [1] * (2 - len(t.shape))) for t in reader.tensors]
    assert got == expected
    assert all(t.tensor_type == GGMLQuantizationType.F32 for t in reader.tensors)


def test_write_is_atomic(tmp_path, monkeypatch):
    from gguf import GGUFWriter

    path = write_imatrix(tmp_path / "im.gguf", _sample(0))
    before = path.read_bytes()

    def boom(self, **kw):
        raise RuntimeError("disk full")

    monkeypatch.setattr(GGUFWriter, "write_tensors_to_file", boom)
    with pytest.raises(RuntimeError):
        write_imatrix(path, _sample(1))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["im.gguf"]


def test_write_refuses_what_llama_quantize_refuses(tmp_path):
    with pytest.raises(ValueError):
        write_imatrix(tmp_path / "a.gguf", ImatrixData({}, ["x"], 0, 512))
    with pytest.raises(ValueError):
        write_imatrix(tmp_path / "b.gguf", ImatrixData(_sample().entries, [], 0, 512))


def test_importance_is_llama_quantize_division():
    data = _sample()
    for name, e in data.entries.items():
        w = data.importance(name)
        assert w.dtype == np.float32 and w.shape == (e.in_sum2.size,)
        for j in range(e.n_mat):  # quantize.cpp: sums / (float) count, all ones for a zero count
            row = w[j * e.n_cols:(j + 1) * e.n_cols]
            if e.counts[j] == 0:
                np.testing.assert_array_equal(row, 1.0)
            else:
                np.testing.assert_array_equal(row, e.in_sum2[j] / np.float32(e.counts[j]))
    bad = ImatrixData({"blk.0.x.weight": ImatrixEntry(np.array([[1.0, np.inf]]), [2])}, ["x"], 0, 512)
    with pytest.raises(ValueError):
        bad.importance("blk.0.x.weight")


def _legacy_bytes(stats: dict[str, tuple[np.ndarray, list[int]]], chunk_size: int, last_chunk: int,
                  dataset: str | None) -> bytes:
    """A legacy .dat laid out as imatrix.cpp's save_imatrix_legacy writes it (raw sums and counts in)."""
    out = [struct.pack("<i", len(stats))]
    for name in sorted(stats):
        values, counts = stats[name]
        values = values.astype(np.float32).reshape(-1)
        nmat = len(counts)
        ncall = (max(counts) + chunk_size - 1) // chunk_size
        tmp = np.empty(values.size, np.float32)
        for i in range(values.size):
            count, value = np.float32(counts[i // (values.size // nmat)]), values[i]
            if count == 0:
                value, count = np.float32(1), np.float32(1)
            tmp[i] = (value / count) * np.float32(ncall)
        out += [struct.pack("<i", len(name)), name.encode(), struct.pack("<ii", ncall, values.size), tmp.tobytes()]
    if dataset is not None:
        out += [struct.pack("<ii", last_chunk, len(dataset)), dataset.encode()]
    return b"".join(out)


@pytest.mark.parametrize("trailer", [True, False])
def test_read_legacy(tmp_path, trailer):
    rng = np.random.default_rng(3)
    stats = {"blk.0.attn_k.weight": (rng.lognormal(0, 2, 32) * 1000, [1000]),
             "blk.2.ffn_down_exps.weight": (rng.lognormal(0, 2, 3 * 16) * 50, [100, 0, 40])}
    path = tmp_path / "im.dat"
    path.write_bytes(_legacy_bytes(stats, 512, 2, "wiki.train.raw" if trailer else None))
    data = read_imatrix(path)
    assert sorted(data.entries) == sorted(stats)
    assert (data.datasets, data.chunk_count, data.chunk_size) == ((["wiki.train.raw"], 2, 0) if trailer else ([], 0, 0))
    for name, (values, counts) in stats.items():
        w = data.importance(name)
        n_cols = values.size // len(counts)
        for j, c in enumerate(counts):  # sums / count, or 1 for a zero count, up to float rounding
            want = values[j * n_cols:(j + 1) * n_cols] / c if c else np.ones(n_cols)
            np.testing.assert_allclose(w[j * n_cols:(j + 1) * n_cols], want, rtol=1e-6)


def test_read_rejects_garbage(tmp_path):
    p = tmp_path / "x.dat"
    p.write_bytes(struct.pack("<i", 0))
    with pytest.raises(ImatrixFormatError):
        read_imatrix(p)
    p.write_bytes(struct.pack("<ii", 1, 50) + b"abc")
    with pytest.raises(ImatrixFormatError):
        read_imatrix(p)


def test_merge_sums_like_in_file():
    a, b = _sample(0), _sample(1)
    m = a.merge(b)
    for name in a.entries:
        np.testing.assert_allclose(m.entries[name].in_sum2, a.entries[name].in_sum2 + b.entries[name].in_sum2)
        np.testing.assert_array_equal(m.entries[name].counts, a.entries[name].counts + b.entries[name].counts)
    assert m.datasets == a.datasets + b.datasets and m.chunk_count == 6
    # an old file with one count for a whole expert stack: the count is broadcast (imatrix.cpp)
    old = ImatrixData({"blk.1.ffn_up_exps.weight": ImatrixEntry(np.ones((1, 4 * 64)), [10])}, ["o"], 0, 512)
    for merged in (old.merge(a), a.merge(old)):
        e = merged.entries["blk.1.ffn_up_exps.weight"]
        assert e.in_sum2.shape == (4, 64) and e.counts.tolist() == [17, 11, 10, 13]


# --------------------------------------------------------------------------------- llama.cpp tools


def _run(cmd: list) -> str:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"{cmd[0]} failed ({r.returncode}):\n{(r.stdout + r.stderr)[-3000:]}"
    return r.stdout + r.stderr


def _model_imatrix(model: Path, seed: int) -> ImatrixData:
    """Plausible statistics for every matrix of the demo model that llama-imatrix would collect."""
    from gguf import GGUFReader

    rng = np.random.default_rng(seed)
    entries = {}
    for t in GGUFReader(model).tensors:
        if t.name.startswith("blk.") and len(t.shape) == 2:
            entries[t.name] = ImatrixEntry(rng.lognormal(0, 2, (1, int(t.shape[0]))) * 2048, [2048])
    return ImatrixData(entries, ["synthetic.txt"], 4, 512)


@pytest.mark.slow
def test_llama_imatrix_reads_and_rewrites_ours(tmp_path, llama_tool, demo_model):
    """llama-imatrix loads our GGUF and writes it back (GGUF: same numbers; legacy: same importance)."""
    exe = llama_tool("llama-imatrix")
    data = _sample()
    ours = write_imatrix(tmp_path / "ours.gguf", data)
    model = demo_model  # required by the argument parser, not loaded when only combining files
    _run([exe, "-m", model, "--in-file", ours, "-o", tmp_path / "back.gguf"])
    _assert_same(data, read_imatrix(tmp_path / "back.gguf"))
    _run([exe, "-m", model, "--in-file", ours, "-o", tmp_path / "back.dat", "--output-format", "dat"])
    legacy = read_imatrix(tmp_path / "back.dat")
    assert legacy.datasets == data.datasets[-1:]
    for name in data.entries:
        np.testing.assert_allclose(legacy.importance(name), data.importance(name), rtol=1e-6, err_msg=name)


@pytest.mark.slow
def test_llama_quantize_uses_our_importance(tmp_path, ggml, llama_tool, demo_model):
    """llama-quantize --imatrix ours.gguf gives, per tensor, ggml's quantization under importance()."""
    from gguf import GGUFReader

    exe, model = llama_tool("llama-quantize"), demo_model
    data = _model_imatrix(model, 7)
    ours = write_imatrix(tmp_path / "ours.gguf", data)
    out = tmp_path / "q.gguf"
    log = _run([exe, "--allow-requantize", "--pure", "--imatrix", ours, model, out, "Q4_K_S", "2"])
    assert f"loaded {len(data.entries)} importance matrix entries" in log
    src = {t.name: t for t in GGUFReader(model).tensors}
    checked = 0
    for t in GGUFReader(out).tensors:
        if t.name not in ("blk.0.ffn_down.weight", "blk.5.attn_q.weight", "blk.29.ffn_up.weight"):
            continue
        n_per_row = int(t.shape[0])
        s = src[t.name]
        rows = ggml.dequantize(np.array(s.data).reshape(int(s.shape[1]), -1), s.tensor_type.name, n_per_row)
        want = ggml.quantize(rows, t.tensor_type.name, data.importance(t.name))
        np.testing.assert_array_equal(np.array(t.data).reshape(want.shape), want, err_msg=t.name)
        assert not np.array_equal(want, ggml.quantize(rows, t.tensor_type.name, None))  # importance mattered
        checked += 1
    assert checked == 3
