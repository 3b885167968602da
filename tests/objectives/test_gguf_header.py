"""The fast GGUF header reader against gguf-py's GGUFReader, and the F32/F16 copy writer."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from dynsearch.errors import ModelError
from dynsearch.kernels import QT
from dynsearch.objectives.io.gguf_header import GGUFHeader
from dynsearch.objectives.io.gguf_write import write_dequantized_copy


def _assert_same_as_gguf_py(path: Path) -> None:
    h, r = GGUFHeader(path), gguf.GGUFReader(path)
    fields = {k: f for k, f in r.fields.items() if not k.startswith("GGUF.")}
    assert set(h.fields) == set(fields)
    for k, f in fields.items():
        assert h.fields[k].value == f.contents(), k
        assert h.fields[k].vtype == f.types[0], k
        if len(f.types) > 1:
            assert h.fields[k].sub_type == f.types[-1], k
    assert list(h.tensors) == [t.name for t in r.tensors]
    for t in r.tensors:
        info = h.tensors[t.name]
        assert info.shape == tuple(int(x) for x in reversed(t.shape))
        assert info.qtype == t.tensor_type
        np.testing.assert_array_equal(h.data(t.name), np.asarray(t.data).reshape(-1).view(np.uint8))


def test_demo_header_matches_gguf_py(demo_model):
    _assert_same_as_gguf_py(demo_model)


def _tiny_gguf(path: Path) -> Path:
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(1)
    w.add_array("tokenizer.ggml.tokens", ["a", "b", "ü", ""])
    w.add_array("test.floats", [1.5, -2.0])
    w.add_array("test.bools", [True, False, True])
    w.add_int64("test.i64", -5)
    w.add_float64("test.f64", 0.125)
    w.add_bool("test.flag", True)
    w.add_uint32("general.alignment", 64)
    w.add_tensor("token_embd.weight", rng.standard_normal((8, 32)).astype(np.float32))
    w.add_tensor("blk.0.attn_norm.weight", rng.standard_normal(32).astype(np.float32))
    w.add_tensor("blk.0.ffn_up.weight", rng.standard_normal((3, 5, 32)).astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_tiny_header_matches_gguf_py(tmp_path):
    path = _tiny_gguf(tmp_path / "t.gguf")
    _assert_same_as_gguf_py(path)
    assert GGUFHeader(path).alignment == 64


def test_broken_files(tmp_path):
    with pytest.raises(ModelError, match="no such file"):
        GGUFHeader(tmp_path / "absent.gguf")
    (tmp_path / "x.gguf").write_bytes(b"GGML....")
    with pytest.raises(ModelError, match="bad magic"):
        GGUFHeader(tmp_path / "x.gguf")
    whole = _tiny_gguf(tmp_path / "t.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(whole[:200])
    with pytest.raises(ModelError, match="cut.gguf"):
        GGUFHeader(tmp_path / "cut.gguf")


@pytest.mark.parametrize("dtype", ["F32", "F16"])
def test_dequantized_copy(tmp_path, dtype):
    src = _tiny_gguf(tmp_path / "t.gguf")
    dst = write_dequantized_copy(src, tmp_path / f"copy-{dtype}.gguf", dtype=dtype)
    a, b = GGUFHeader(src), GGUFHeader(dst)
    for k, f in a.fields.items():
        if k != "general.file_type":
            assert b.fields[k] == f, k
    assert b.get("general.file_type") == (0 if dtype == "F32" else 1)
    originals = {t.name: t for t in gguf.GGUFReader(src).tensors}
    for t in gguf.GGUFReader(dst).tensors:  # gguf-py reads what we wrote
        want = gguf.quants.dequantize(np.asarray(originals[t.name].data), originals[t.name].tensor_type)
        got = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        if len(b.tensors[t.name].shape) == 1 or dtype == "F32":
            assert b.tensors[t.name].qtype == QT.F32
            np.testing.assert_array_equal(got.reshape(want.shape), want.astype(np.float32))
        else:
            assert b.tensors[t.name].qtype == QT.F16
            np.testing.assert_array_equal(got.reshape(want.shape), want.astype(np.float16).astype(np.float32))
