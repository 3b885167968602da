"""A model's configuration checked against its own tensors when it is opened (issue 14 item 3):
each repro of the issue is one ModelError line naming the key, fast; and a fuzz test of the whole
open path (header + configuration + tokenizer) on mutated small models."""

from __future__ import annotations

import json
import random
import re
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFValueType as VT
from safetensors.numpy import save_file

from dynsearch.errors import DynsearchError, ModelError
from dynsearch.kernels import QT
from dynsearch.objectives.io.gguf_write import write_model
from dynsearch.objectives.io.resolve import open_model
from dynsearch.objectives.tokenizer import Tokenizer

D, FF, N_LAYER, N_HEAD, N_KV, N_VOCAB = 32, 64, 2, 4, 2, 8
HD = D // N_HEAD
TOKENS = ["<s>", "a", "b", "c", " ", "ab", "ba", "</s>"]
KV = {"llama.block_count": (N_LAYER, VT.UINT32), "llama.embedding_length": (D, VT.UINT32),
      "llama.feed_forward_length": (FF, VT.UINT32), "llama.attention.head_count": (N_HEAD, VT.UINT32),
      "llama.attention.head_count_kv": (N_KV, VT.UINT32), "llama.rope.dimension_count": (HD, VT.UINT32),
      "llama.attention.layer_norm_rms_epsilon": (1e-5, VT.FLOAT32),
      "tokenizer.ggml.model": ("gpt2", VT.STRING), "tokenizer.ggml.pre": ("default", VT.STRING),
      "tokenizer.ggml.tokens": ((TOKENS, VT.STRING), VT.ARRAY),
      "tokenizer.ggml.token_type": (([3, 1, 1, 1, 1, 1, 1, 3], VT.INT32), VT.ARRAY),
      "tokenizer.ggml.merges": ((["a b", "b a"], VT.STRING), VT.ARRAY),
      "tokenizer.ggml.bos_token_id": (0, VT.UINT32), "tokenizer.ggml.eos_token_id": (7, VT.UINT32),
      "tokenizer.chat_template": ("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}", VT.STRING)}


def tensors(d: int = D) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    t = {"token_embd.weight": rng.standard_normal((N_VOCAB, d)).astype(np.float32),
         "output_norm.weight": np.ones(d, np.float32)}
    for il in range(N_LAYER):
        for name, shape in (("attn_norm", (d,)), ("attn_q", (N_HEAD * HD, d)), ("attn_k", (N_KV * HD, d)),
                            ("attn_v", (N_KV * HD, d)), ("attn_output", (d, N_HEAD * HD)), ("ffn_norm", (d,)),
                            ("ffn_gate", (FF, d)), ("ffn_up", (FF, d)), ("ffn_down", (d, FF))):
            t[f"blk.{il}.{name}.weight"] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
    return t


def model(path: Path, kv=None, t=None) -> Path:
    return write_model(path, "llama", None, {**KV, **(kv or {})}, tensors() if t is None else t)


def test_consistent_model_opens(tmp_path):
    src = open_model(model(tmp_path / "m.gguf"))
    assert (src.config.n_layer, src.config.n_embd, src.config.head_dim, src.config.n_vocab) == (N_LAYER, D, HD, N_VOCAB)
    assert Tokenizer.from_gguf(tmp_path / "m.gguf").encode("ab") == [5]


# each repro of the issue, and what it now prints
REPROS = [
    ("block-count-bit-flip", {"llama.block_count": (268435458, VT.UINT32)}, None,
     "GGUF metadata llama.block_count = 268435458, but the file has tensors for blocks 0 to 1"),
    ("block-count-short", {"llama.block_count": (1, VT.UINT32)}, None,
     "GGUF metadata llama.block_count = 1, but the file has tensors for blocks 0 to 1"),
    ("embedding-65", {"llama.embedding_length": (65, VT.UINT32)}, None,
     "GGUF metadata llama.embedding_length = 65, but token_embd.weight is 32 wide"),
    ("embedding-2^31", {"llama.embedding_length": (2**31, VT.UINT32)}, None,
     "GGUF metadata llama.embedding_length = 2147483648, but token_embd.weight is 32 wide"),
    ("head-count-3", {"llama.attention.head_count": (3, VT.UINT32)}, None,
     "GGUF metadata llama.attention.head_count = 3, which does not divide the 32 rows of blk.0.attn_q.weight"),
    ("head-count-kv-3", {"llama.attention.head_count_kv": (3, VT.UINT32)}, None,
     "GGUF metadata llama.attention.head_count_kv = 3, which does not divide the 4 query heads"),
    ("head-count-kv-8", {"llama.attention.head_count_kv": (8, VT.UINT32)}, None,
     "GGUF metadata llama.attention.head_count_kv = 8, which does not divide the 4 query heads"),
    ("head-count-kv-4", {"llama.attention.head_count_kv": (4, VT.UINT32)}, None,
     "GGUF metadata llama.attention.head_count_kv = 4, but blk.0.attn_k.weight has 16 rows for heads of 8"),
    ("rope-dims-1000", {"llama.rope.dimension_count": (1000, VT.UINT32)}, None,
     "GGUF metadata llama.rope.dimension_count = 1000, not an even count of at most the head width 8"),
    ("key-length-2^31", {"llama.attention.key_length": (2**31, VT.UINT32)}, None,
     "GGUF metadata llama.attention.key_length = 2147483648, but blk.0.attn_q.weight has 32 rows for 4 heads"),
    ("value-length-16", {"llama.attention.value_length": (16, VT.UINT32)}, None,
     "GGUF metadata llama.attention.value_length = 16, but blk.0.attn_v.weight has 16 rows for 2 heads"),
    ("ff-100", {"llama.feed_forward_length": (100, VT.UINT32)}, None,
     "tensor blk.0.ffn_gate.weight has shape (64, 32), the configuration gives (100, 32) "
     "(GGUF metadata llama.embedding_length, GGUF metadata llama.feed_forward_length)"),
    ("swapped-dims", {"llama.embedding_length": (FF, VT.UINT32), "llama.feed_forward_length": (D, VT.UINT32)}, None,
     "GGUF metadata llama.embedding_length = 64, but token_embd.weight is 32 wide"),
    ("expert-count", {"llama.expert_count": (2, VT.UINT32), "llama.expert_used_count": (4, VT.UINT32)}, None,
     "GGUF metadata llama.expert_used_count = 4, more than GGUF metadata llama.expert_count = 2"),
    ("vocabulary", {"tokenizer.ggml.tokens": ((TOKENS[:7], VT.STRING), VT.ARRAY)}, None,
     "the vocabulary has 7 tokens, but token_embd.weight has 8 rows"),
    ("layer-5-differs", {}, {"blk.1.attn_k.weight": np.zeros((8, D), np.float32)},
     "tensor blk.1.attn_k.weight has shape (8, 32), the configuration gives (16, 32) "
     "(GGUF metadata llama.embedding_length, GGUF metadata llama.attention.head_count_kv, "
     "GGUF metadata llama.attention.key_length)"),
    ("a-block-missing", {"llama.block_count": (3, VT.UINT32)},
     {f"blk.2.{n}": a for n, a in (("attn_norm.weight", np.ones(D, np.float32)),)}, None),
]


@pytest.mark.parametrize("kv,replace,message", [r[1:] for r in REPROS], ids=[r[0] for r in REPROS])
def test_configuration_repros_are_one_line(tmp_path, kv, replace, message):
    t = tensors()
    if replace:
        t.update(replace)
        if "blk.2.attn_norm.weight" in replace:  # block 2 present, block 1 gone
            t = {n: a for n, a in t.items() if not n.startswith("blk.1.")}
            message = "GGUF metadata llama.block_count = 3, but block 1 has no tensors"
    path = model(tmp_path / "m.gguf", kv, t)
    t0 = time.process_time()
    with pytest.raises(ModelError) as e:
        open_model(path)
    assert time.process_time() - t0 < 2.0  # fast: the bit-flipped block count hung before
    assert str(e.value) == f"m.gguf: {message}"


@pytest.mark.parametrize("qtype", [QT.I32, QT.NVFP4, QT.F64])
def test_tensor_types_without_kernels(tmp_path, qtype):
    """An I32 or NVFP4 tensor was a NotImplementedError in run; now the open refuses it."""
    path = model(tmp_path / "m.gguf")
    data = bytearray(path.read_bytes())
    name = b"blk.1.ffn_norm.weight"
    at = data.index(name) + len(name) + 4 + 8  # n_dims, ne[0]
    assert struct.unpack_from("<i", data, at)[0] == QT.F32
    if qtype == QT.NVFP4:  # 64-element blocks of 36 bytes: 3 of them pad to the 128 bytes of 32 floats
        struct.pack_into("<q", data, at - 8, 192)
    elif qtype == QT.F64:
        struct.pack_into("<q", data, at - 8, 16)
    struct.pack_into("<i", data, at, qtype)
    path.write_bytes(bytes(data))
    with pytest.raises(ModelError, match=f"^m.gguf: tensor blk.1.ffn_norm.weight is {qtype.name}, "
                                         "which dynsearch cannot read$"):
        open_model(path)


# ------------------------------------------------------------------------- Hugging Face folders

HF = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": N_LAYER, "hidden_size": D,
      "intermediate_size": FF, "num_attention_heads": N_HEAD, "num_key_value_heads": N_KV,
      "vocab_size": N_VOCAB, "rms_norm_eps": 1e-5, "rope_theta": 10000.0}
HF_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "attn_norm": "input_layernorm",
            "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
            "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
            "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def hf_folder(folder: Path, config: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, a in tensors().items():
        parts = name.split(".")
        out[(HF_NAMES[parts[0]] if parts[0] != "blk" else f"model.layers.{parts[1]}.{HF_NAMES[parts[2]]}") + ".weight"] = a
    save_file(out, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


HF_REPROS = [
    ({"num_hidden_layers": 268435458}, "num_hidden_layers = 268435458, but the file has tensors for blocks 0 to 1"),
    ({"hidden_size": 65}, "hidden_size = 65, but token_embd.weight is 32 wide"),
    ({"num_attention_heads": 3}, "num_attention_heads = 3, which does not divide the 32 rows of blk.0.attn_q.weight"),
    ({"num_key_value_heads": 3}, "num_key_value_heads = 3, which does not divide the 4 query heads"),
    ({"head_dim": 2**31}, "head_dim = 2147483648, but blk.0.attn_q.weight has 32 rows for 4 heads"),
    ({"vocab_size": 9}, "the vocabulary has 9 tokens, but token_embd.weight has 8 rows"),
    ({"hidden_size": 32.5}, "unusable value (ValueError: hidden_size = '32.5' is not a positive integer)"),
    ({"num_hidden_layers": True}, "unusable value (ValueError: num_hidden_layers = 'True' is not a positive integer)"),
]


@pytest.mark.parametrize("change,message", HF_REPROS, ids=[next(iter(c)) + "=" + str(v)[:12] for c, _ in HF_REPROS
                                                            for v in c.values()])
def test_hf_configuration_repros_are_one_line(tmp_path, change, message):
    folder = hf_folder(tmp_path / "m", {**HF, **change})
    assert open_model(hf_folder(tmp_path / "ok", HF)).config.n_embd == D
    with pytest.raises(ModelError) as e:
        open_model(folder)
    assert str(e.value) == f"{folder / 'config.json'}: {message}"


# ------------------------------------------------------------------------------------ fuzzing


def _open_everything(path: Path) -> None:
    """The whole open path a run takes: header, configuration, tokenizer, a chat rendered."""
    open_model(path)
    tok = Tokenizer.from_gguf(path)
    tok.encode(tok.apply_chat_template([{"role": "user", "content": "ab ba"}]))


@pytest.mark.timeout(120)
def test_fuzz_open_path(tmp_path):
    """400 seeded mutations of a small model (bytes of the header flipped, set to edge values,
    cut): each opens, or raises one DynsearchError line; never another exception, within 60 s."""
    whole = model(tmp_path / "m.gguf").read_bytes()
    n_header = whole.index(b"blk.1.ffn_down.weight") + 64  # through the last tensor info
    numbers = [m.start() for m in re.finditer(rb"[\x01-\xff]\x00\x00\x00", whole[:n_header])]
    rng = random.Random(14)
    path = tmp_path / "f.gguf"
    opened = refused = 0
    t0 = time.perf_counter()
    for i in range(400):
        data = bytearray(whole)
        for _ in range(rng.randint(1, 3)):
            kind = rng.random()
            if kind < 0.4:  # a bit flipped anywhere in the header
                at = rng.randrange(n_header)
                data[at] ^= 1 << rng.randrange(8)
            elif kind < 0.8:  # a little-endian count or id set to an edge value
                at = rng.choice(numbers)
                data[at:at + 4] = struct.pack("<I", rng.choice([0, 1, 2, 3, 7, 63, 65, 1000, 2**31, 2**32 - 1]))
            else:  # cut
                del data[rng.randrange(len(data)):]
        path.write_bytes(bytes(data))
        try:
            _open_everything(path)
            opened += 1
        except DynsearchError as e:
            assert "\n" not in str(e) and str(e), (i, str(e))
            refused += 1
    wall = time.perf_counter() - t0
    print(f"fuzzed open path: 400 mutations, {opened} opened, {refused} refused, {wall:.1f} s")
    assert opened + refused == 400 and refused > 100 and opened > 10
    assert wall < 60
