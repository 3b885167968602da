"""Hostile Hugging Face folders: safetensors files are read only through the safetensors library,
and a malformed file, index or config.json is a one-line ModelError, never another exception."""

from __future__ import annotations

import json
import random
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from dynsearch.errors import ModelError
from dynsearch.objectives.io.hf_source import SafetensorsSource
from dynsearch.objectives.io.resolve import open_model

pytestmark = pytest.mark.timeout(120)

D, FF, VOCAB = 16, 32, 32
CONFIG = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 1, "hidden_size": D,
          "intermediate_size": FF, "num_attention_heads": 2, "num_key_value_heads": 1,
          "vocab_size": VOCAB, "rms_norm_eps": 1e-5, "rope_theta": 10000.0}
SHAPES = {"model.embed_tokens.weight": (VOCAB, D), "model.norm.weight": (D,), "lm_head.weight": (VOCAB, D),
          "model.layers.0.input_layernorm.weight": (D,), "model.layers.0.post_attention_layernorm.weight": (D,),
          "model.layers.0.self_attn.q_proj.weight": (D, D), "model.layers.0.self_attn.k_proj.weight": (D // 2, D),
          "model.layers.0.self_attn.v_proj.weight": (D // 2, D), "model.layers.0.self_attn.o_proj.weight": (D, D),
          "model.layers.0.mlp.gate_proj.weight": (FF, D), "model.layers.0.mlp.up_proj.weight": (FF, D),
          "model.layers.0.mlp.down_proj.weight": (D, FF)}


def make_folder(folder: Path, dtype=np.float32) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    save_file({n: rng.standard_normal(s).astype(dtype) for n, s in SHAPES.items()},
              str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(CONFIG))
    return folder


def _split(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join(header: dict, body: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + body


def _edit(key: str, **changes):
    def f(data: bytes) -> bytes:
        header, body = _split(data)
        header[key] = {**header[key], **changes}
        return _join(header, body)
    return f


def _int_dtype(data: bytes) -> bytes:  # a valid safetensors file whose weights are integers
    header, body = _split(data)
    header["model.norm.weight"]["dtype"] = "I32"
    return _join(header, body)


FILE_CASES = [
    ("empty", lambda d: b"", "not a valid safetensors file"),
    ("header-cut", lambda d: d[:20], "not a valid safetensors file"),
    ("body-cut", lambda d: d[:-100], "not a valid safetensors file"),
    ("header-length-2^60", lambda d: struct.pack("<Q", 1 << 60) + d[8:], "not a valid safetensors file"),
    ("header-not-json", lambda d: struct.pack("<Q", 12) + b"{'a': pickle" + d[20:], "not a valid safetensors file"),
    ("offsets-out-of-range", _edit("lm_head.weight", data_offsets=[0, 1 << 40]), "not a valid safetensors file"),
    ("offsets-overlap", _edit("model.norm.weight", data_offsets=[0, D * 4]), "not a valid safetensors file"),
    ("shape-mismatch", _edit("lm_head.weight", shape=[VOCAB, D + 1]), "not a valid safetensors file"),
    ("unknown-dtype", _edit("lm_head.weight", dtype="Q4_K"), "not a valid safetensors file"),
    ("integer-dtype", _int_dtype, "has dtype I32, expected F32/F16/BF16"),
]


@pytest.mark.parametrize("name,corrupt,message", FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_malformed_safetensors(tmp_path, name, corrupt, message):
    folder = make_folder(tmp_path / "m")
    f = folder / "model.safetensors"
    f.write_bytes(corrupt(f.read_bytes()))
    with pytest.raises(ModelError, match=message) as e:
        open_model(folder)
    assert "\n" not in str(e.value) and "model.safetensors" in str(e.value)


CONFIG_CASES = [
    ("not-json", lambda c: "{'num_hidden_layers': 1", "config.json: not readable JSON"),
    ("not-utf8", lambda c: b"\xff\xfe{}", "config.json: not readable JSON"),
    ("a-list", lambda c: "[1, 2]", "config.json: expected a JSON object, got list"),
    ("no-layers", lambda c: json.dumps({k: v for k, v in c.items() if k != "num_hidden_layers"}),
     "config.json: missing key 'num_hidden_layers'"),
    ("layers-a-word", lambda c: json.dumps({**c, "num_hidden_layers": "one"}), "config.json: unusable value"),
    ("heads-null", lambda c: json.dumps({**c, "num_attention_heads": None}), "config.json: unusable value"),
    ("text-config-a-list", lambda c: json.dumps({**c, "text_config": [1]}), "config.json: unusable value"),
]


@pytest.mark.parametrize("name,edit,message", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_malformed_config(tmp_path, name, edit, message):
    folder = make_folder(tmp_path / "m")
    text = edit(dict(CONFIG))
    (folder / "config.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ModelError, match=message) as e:
        SafetensorsSource(folder)
    assert "\n" not in str(e.value)


INDEX_CASES = [
    ("traversal", {"weight_map": {n: "../outside.safetensors" for n in SHAPES}}, "not a file in the folder"),
    ("absolute", {"weight_map": {n: "/etc/passwd" for n in SHAPES}}, "not a file in the folder"),
    ("subfolder", {"weight_map": {n: "a/model.safetensors" for n in SHAPES}}, "not a file in the folder"),
    ("missing-file", {"weight_map": {n: "model-00002.safetensors" for n in SHAPES}}, "no such file"),
    ("no-weight-map", {"metadata": {}}, "no weight_map object"),
    ("not-a-string", {"weight_map": {n: 3 for n in SHAPES}}, "not a file in the folder"),
]


@pytest.mark.parametrize("name,index,message", INDEX_CASES, ids=[c[0] for c in INDEX_CASES])
def test_malformed_index(tmp_path, name, index, message):
    folder = make_folder(tmp_path / "m")
    (tmp_path / "outside.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError, match=message):
        SafetensorsSource(folder)


def test_valid_folder_loads(tmp_path):
    src = SafetensorsSource(make_folder(tmp_path / "m", np.float16))
    assert src.config.n_layer == 1 and src.config.n_embd == D
    for n in src.names():
        assert src.load(n).shape == src.shape(n)


def test_random_header_corruptions(tmp_path):
    """300 seeded corruptions of the safetensors header: a clean load or a ModelError."""
    folder = make_folder(tmp_path / "m")
    f = folder / "model.safetensors"
    whole = f.read_bytes()
    n_header = 8 + struct.unpack("<Q", whole[:8])[0]
    rng = random.Random(7)
    loaded = rejected = 0
    for _ in range(300):
        data = bytearray(whole)
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(n_header)
            if rng.random() < 0.7:
                data[at] = rng.choice(b'0123456789[]{}",:-eE .' + bytes([rng.randrange(256)]))
            else:
                del data[at:at + rng.randint(1, 8)]
        f.write_bytes(bytes(data))
        try:
            src = SafetensorsSource(folder)
            for n in src.names():
                assert src.load(n).shape == src.shape(n)
            loaded += 1
        except ModelError as e:
            assert "\n" not in str(e)
            rejected += 1
    print(f"safetensors header corruptions: 300 files, {loaded} loaded, {rejected} rejected")
    assert loaded + rejected == 300 and rejected > 100


PACKAGE = Path(__file__).resolve().parents[2]  # the repository root
_UNSAFE = re.compile(r"torch\.load\(|pickle\.loads?\(|joblib\.load\(|dill\.|cloudpickle|"
                     r"allow_pickle\s*=\s*True|np\.load\((?![^)]*allow_pickle=False)")


def test_no_pickle_loaders_in_the_package():
    """Nothing in dynsearch deserializes with pickle (torch.load, np.load without
    allow_pickle=False, joblib.load): model files and caches are data, never code."""
    hits = []
    for folder in ("dynsearch", "kernels", "objectives", "search", "recipes"):
        for py in (PACKAGE / folder).rglob("*.py"):
            for i, line in enumerate(py.read_text().splitlines(), 1):
                code = line.split("#")[0]
                if _UNSAFE.search(code):
                    hits.append(f"{py.relative_to(PACKAGE)}:{i}: {line.strip()}")
    assert hits == []
