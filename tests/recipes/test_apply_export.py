"""`dynsearch apply` and `dynsearch export` on a tiny random llama model: llama-quantize's rules
(order, which tensors it converts, file type, pattern syntax), the errors, and -- where the tools
are built -- the same file as llama-quantize writes from the exported tensor-type file."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGUFValueType as VT

from dynsearch.cli import main
from dynsearch.errors import ModelError, OutputError, RecipeError
from dynsearch.kernels import effective_type, quantize
from dynsearch.objectives.io.gguf_write import write_model
from dynsearch.objectives.io.imatrix import ImatrixData, ImatrixEntry, write_imatrix
from dynsearch.recipes import llama_quant, schema
from dynsearch.recipes.apply import RECIPE_KEY, ImatrixFile, apply_recipe
from dynsearch.recipes.export import export_llama_quantize, tensor_pattern, tensor_type_file

D, FF, VOCAB, N_LAYER = 256, 320, 300, 2  # ffn_down rows of 320: only 32-wide types fit
ODD = ("blk.0.Odd Name=X.weight", "blk.0.odd name=x.weight")  # differ only in case


def _tiny_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    t = {"token_embd.weight": rng.standard_normal((VOCAB, D)).astype(np.float32),
         "output_norm.weight": np.ones(D, np.float32)}
    for il in range(N_LAYER):
        p = f"blk.{il}."
        t[p + "attn_norm.weight"] = 1 + 0.1 * rng.standard_normal(D).astype(np.float32)
        for n, shape in (("attn_q", (D, D)), ("attn_k", (128, D)), ("attn_v", (128, D)),
                         ("attn_output", (D, D)), ("ffn_gate", (FF, D)), ("ffn_up", (FF, D)),
                         ("ffn_down", (D, FF))):
            t[p + n + ".weight"] = (0.05 * rng.standard_normal(shape)).astype(np.float32)
        t[p + "ffn_norm.weight"] = np.ones(D, np.float32)
    for n in ODD:
        t[n] = rng.standard_normal((8, D)).astype(np.float32)
    for i in range(4):  # more rows of 320 for the fallback test
        t[f"blk.1.wide{i}.weight"] = rng.standard_normal((4, FF)).astype(np.float32)
    return t


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    kv = {"llama.context_length": (512, VT.UINT32), "llama.embedding_length": (D, VT.UINT32),
          "llama.block_count": (N_LAYER, VT.UINT32), "llama.feed_forward_length": (FF, VT.UINT32),
          "llama.attention.head_count": (4, VT.UINT32), "llama.attention.head_count_kv": (2, VT.UINT32),
          "llama.attention.layer_norm_rms_epsilon": (1e-5, VT.FLOAT32),
          "general.name": ("tiny", VT.STRING), "general.file_type": (0, VT.UINT32)}
    return write_model(tmp_path_factory.mktemp("tiny") / "tiny-f32.gguf", "llama", None, kv, _tiny_tensors())


def _recipe(**types: str) -> schema.Recipe:
    """All 2-D tensors Q8_0 and norms F32, then the overrides given (dots as '__')."""
    tensors = {n: ("F32" if a.ndim == 1 else "Q8_0") for n, a in _tiny_tensors().items()}
    for k, v in types.items():
        tensors[k.replace("__", ".")] = v
    return schema.Recipe(name="tiny-mix", model=schema.ModelInfo("tiny", "llama"), tensors=tensors)


MIX = dict(blk__0__attn_q__weight="Q4_K", blk__0__attn_k__weight="IQ4_XS", blk__0__attn_v__weight="Q6_K",
           blk__0__attn_output__weight="IQ2_XXS", blk__0__ffn_gate__weight="Q3_K",
           blk__0__ffn_up__weight="F16", blk__0__ffn_down__weight="Q5_1", blk__1__attn_q__weight="Q2_K",
           blk__1__attn_k__weight="IQ3_S", blk__1__attn_v__weight="Q5_K", blk__1__ffn_down__weight="IQ4_NL",
           blk__1__ffn_up__weight="BF16", blk__1__ffn_gate__weight="Q4_0", token_embd__weight="Q4_K")
MIX.update({ODD[0].replace(".", "__"): "Q5_0", ODD[1].replace(".", "__"): "Q6_K"})


@pytest.fixture(scope="module")
def imatrix(tmp_path_factory, tiny) -> Path:
    """A GGUF imatrix with an entry for every matmul weight of the tiny model (as llama-imatrix)."""
    rng = np.random.default_rng(7)
    entries = {n: ImatrixEntry(rng.lognormal(0, 1.5, (1, a.shape[1])).astype(np.float32) * 40, [40])
               for n, a in _tiny_tensors().items() if a.ndim == 2 and n != "token_embd.weight"}
    return write_imatrix(tmp_path_factory.mktemp("im") / "imatrix.gguf",
                         ImatrixData(entries, ["calib.txt"], chunk_count=2, chunk_size=20))


def _tensors(path: Path) -> dict[str, tuple[str, bytes]]:
    return {t.name: (t.tensor_type.name, t.data.tobytes()) for t in gguf.GGUFReader(path).tensors}


# ------------------------------------------------------------------------------ llama.cpp's rules


def test_tensor_order_is_llama_cpps():
    names = ["blk.10.attn_q.weight", "output.weight", "blk.2.ffn_up.weight", "blk.2.attn_q.weight",
             "token_embd.weight", "blk.0.Z.weight", "blk.0.a.weight", "output_norm.weight"]
    assert llama_quant.tensor_order(names) == [
        "output.weight", "output_norm.weight", "token_embd.weight", "blk.0.Z.weight", "blk.0.a.weight",
        "blk.2.attn_q.weight", "blk.2.ffn_up.weight", "blk.10.attn_q.weight"]


@pytest.mark.parametrize("name,shape,expected", [
    ("blk.0.attn_q.weight", (576, 576), True),
    ("token_embd.weight", (49152, 576), True),
    ("blk.0.ffn_down_exps.weight", (8, 576, 1536), True),
    ("blk.0.attn_norm.weight", (576,), False),
    ("blk.0.attn_q.weight", (1, 576), False),  # ggml_n_dims is 1
    ("blk.0.attn_q.bias", (576, 2), False),  # not a weight
    ("blk.0.attn_q_norm.weight", (64, 64), False),
    ("blk.0.ffn_gate_inp.weight", (8, 576), False),
    ("position_embd.weight", (512, 576), False),
])
def test_which_tensors_llama_quantize_converts(name, shape, expected):
    assert llama_quant.llama_quantizes(name, shape) is expected


def test_file_type_is_the_most_common_quantized_type():
    ft = llama_quant.file_type({"a": "F16", "b": "F16", "c": "F16", "d": "Q4_K", "e": "Q6_K", "f": "Q4_K"})
    assert (ft.ftype, ft.arg, ft.base.name) == (gguf.LlamaFileType.MOSTLY_Q4_K_M, "Q4_K_M", "Q4_K")
    assert llama_quant.file_type({"a": "Q6_K", "b": "Q5_0", "n": "F32"}).arg == "Q6_K"  # tie: first
    assert llama_quant.file_type({"a": "BF16", "b": "F32", "c": "BF16"}).arg == "BF16"
    assert llama_quant.file_type({"a": "IQ2_S"}).arg == "IQ2_M"  # the ftype whose default is IQ2_S


# ------------------------------------------------------------------------------ export


def test_patterns_survive_lower_casing_and_match_only_their_tensor():
    names = list(_tiny_tensors()) + ["output.weight", "blk.1.ATTN.weight", "a\tb.weight"]
    for name in names:
        pat = tensor_pattern(name)
        assert pat == pat.lower() and not re.search(r"\s|=", pat), pat
        hits = [n for n in names if re.search(pat.lower(), n)]
        assert hits == [name], (pat, hits)
    assert tensor_pattern("blk.0.attn_q.weight") == r"^blk\.0\.attn_q\.weight$"
    with pytest.raises(RecipeError, match="ASCII"):
        tensor_pattern("blk.0.größe.weight")


def test_tensor_type_file_has_one_line_per_tensor():
    r = _recipe(**MIX)
    lines = tensor_type_file(r).splitlines()
    assert len(lines) == len(r.tensors) and len(lines) == len(set(lines))
    assert r"^blk\.0\.attn_q\.weight$=q4_k" in lines and r"^output_norm\.weight$=f32" in lines
    assert all(len(ln.split()) == 1 and ln.count("=") == 1 for ln in lines)  # '=' inside names escaped


def test_command_line(tiny, imatrix, tmp_path):
    r = _recipe(**MIX)
    ex = export_llama_quantize(r, tmp_path / "t.txt", model=tiny, output=tmp_path / "o.gguf", imatrix=imatrix)
    assert ex.command == ["llama-quantize", "--imatrix", str(imatrix), "--tensor-type-file",
                          str(tmp_path / "t.txt"), str(tiny), str(tmp_path / "o.gguf"),
                          "Q8_0"]  # F32 source: no --allow-requantize
    quantized = apply_recipe(r, tiny, tmp_path / "q.gguf", importance=ImatrixFile.read(imatrix), progress=False)
    again = _recipe(**{**MIX, "blk__0__attn_q__weight": "Q5_K"})
    assert "--allow-requantize" in export_llama_quantize(again, "t.txt", model=quantized, imatrix=imatrix).command
    ex = export_llama_quantize(r, "t.txt", imatrix="im.gguf")  # no model: placeholders, flag kept
    assert ex.command_line() == ("llama-quantize --allow-requantize --imatrix im.gguf --tensor-type-file "
                                 "t.txt MODEL.gguf tiny-mix.gguf Q8_0")


def test_export_checks_the_model(tiny, tmp_path):
    with pytest.raises(RecipeError, match="needs an importance matrix"):  # IQ2_XXS without one
        export_llama_quantize(_recipe(**MIX), "t.txt", model=tiny)
    bad = _recipe(blk__0__attn_norm__weight="Q8_0")
    with pytest.raises(RecipeError, match="blk.0.attn_norm.weight: llama.cpp stores this tensor as it is"):
        export_llama_quantize(bad, "t.txt", model=tiny)
    floats = _recipe(**{n.replace(".", "__"): "F16" for n, a in _tiny_tensors().items() if a.ndim == 2})
    floats.tensors["blk.0.attn_q.weight"] = "BF16"
    with pytest.raises(RecipeError, match="ignores overrides for float base types"):
        export_llama_quantize(floats, "t.txt", model=tiny)


# ------------------------------------------------------------------------------ apply


def test_apply_writes_recipe_types_metadata_and_order(tiny, imatrix, tmp_path):
    r = _recipe(**MIX)
    out = apply_recipe(r, tiny, tmp_path / "q.gguf", importance=ImatrixFile.read(imatrix), progress=False)
    reader = gguf.GGUFReader(out)
    assert [t.name for t in reader.tensors] == llama_quant.tensor_order(r.tensors)
    assert {t.name: t.tensor_type.name for t in reader.tensors} == r.tensors
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    keys = list(fields)
    assert keys[:2] == ["general.architecture", "llama.context_length"]  # the source's order
    assert keys[-7:] == ["general.quantization_version", "general.file_type", "quantize.imatrix.file",
                         "quantize.imatrix.dataset", "quantize.imatrix.entries_count",
                         "quantize.imatrix.chunks_count", RECIPE_KEY]
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0  # 5 tensors, the most
    assert fields["quantize.imatrix.file"] == str(imatrix) and fields["quantize.imatrix.entries_count"] == 20
    assert schema.loads(fields[RECIPE_KEY]) == r
    assert all(t.data_offset % 32 == 0 for t in reader.tensors)
    assert not list(tmp_path.glob(".*.tmp"))


def test_apply_copies_unchanged_tensors_and_requantizes_the_rest(tiny, tmp_path):
    first = apply_recipe(_recipe(blk__0__attn_q__weight="Q4_K"), tiny, tmp_path / "a.gguf", progress=False)
    again = _recipe(blk__0__attn_q__weight="Q4_K", blk__0__attn_k__weight="Q4_0")
    second = apply_recipe(again, first, tmp_path / "b.gguf", progress=False)  # from a quantized source
    a, b = _tensors(first), _tensors(second)
    assert all(b[n] == a[n] for n in a if n != "blk.0.attn_k.weight")  # copied byte for byte
    # the Q8_0 tensor is dequantized (gguf-py as the reference decoder), then quantized to Q4_0
    k = next(t for t in gguf.GGUFReader(first).tensors if t.name == "blk.0.attn_k.weight")
    deq = gguf.quants.dequantize(k.data, k.tensor_type).reshape(128, D)
    assert b["blk.0.attn_k.weight"] == ("Q4_0", quantize(deq, "Q4_0").tobytes())


def test_apply_errors_name_the_problem(tiny, imatrix, tmp_path):
    out = tmp_path / "o.gguf"
    r = _recipe()
    with pytest.raises(ModelError, match="no such model file"):
        apply_recipe(r, tmp_path / "absent.gguf", out)
    with pytest.raises(ModelError, match="convert_hf_to_gguf"):
        apply_recipe(r, tmp_path, out)
    missing = schema.Recipe(r.name, r.model, {k: v for k, v in r.tensors.items() if k != "blk.1.ffn_up.weight"})
    with pytest.raises(RecipeError, match="does not fit tiny-f32.gguf: .*blk.1.ffn_up.weight"):
        apply_recipe(missing, tiny, out)
    with pytest.raises(RecipeError, match="architecture qwen2"):
        apply_recipe(schema.Recipe(r.name, schema.ModelInfo("x", "qwen2"), r.tensors), tiny, out)
    with pytest.raises(RecipeError, match="blk.1.ffn_down.weight: Q4_K does not fit rows of 320"):
        apply_recipe(_recipe(blk__1__ffn_down__weight="Q4_K"), tiny, out)
    with pytest.raises(RecipeError, match="blk.0.attn_output.weight: IQ2_XXS needs an importance matrix"):
        apply_recipe(_recipe(blk__0__attn_output__weight="IQ2_XXS"), tiny, out)
    with pytest.raises(RecipeError, match="cannot write IQ2_S"):
        apply_recipe(_recipe(blk__0__attn_q__weight="IQ2_S"), tiny, out, importance=ImatrixFile.read(imatrix))
    with pytest.raises(RecipeError, match="imatrix entry blk.0.attn_q.weight has 3 values, the tensor needs 256"):
        apply_recipe(_recipe(blk__0__attn_q__weight="Q4_K"), tiny, out,
                     importance={"blk.0.attn_q.weight": np.ones(3, np.float32)})
    with pytest.raises(RecipeError, match="imatrix file not found"):
        ImatrixFile.read(tmp_path / "nope.dat")
    (tmp_path / "junk.dat").write_bytes(b"\x00\x00\x00\x00")
    with pytest.raises(RecipeError, match="not a readable imatrix"):
        ImatrixFile.read(tmp_path / "junk.dat")
    with pytest.raises(OutputError, match="the output would overwrite the input"):
        apply_recipe(r, tiny, tiny)
    with pytest.raises(OutputError, match="the output would overwrite the input"):  # the imatrix
        apply_recipe(r, tiny, tmp_path / "junk.dat", importance=ImatrixFile(str(tmp_path / "junk.dat"), None))
    assert not out.exists() and not list(tmp_path.glob(".*.tmp"))


def test_interrupted_apply_leaves_no_file(tiny, tmp_path):
    t = _tiny_tensors()
    t["blk.1.ffn_up.weight"][3, 5] = np.nan  # fails late, after earlier tensors were written
    kv = {"llama.embedding_length": (D, VT.UINT32), "llama.block_count": (N_LAYER, VT.UINT32),
          "llama.attention.head_count": (4, VT.UINT32), "llama.attention.head_count_kv": (2, VT.UINT32),
          "llama.attention.layer_norm_rms_epsilon": (1e-5, VT.FLOAT32)}
    bad = write_model(tmp_path / "nan.gguf", "llama", None, kv, t)
    out = tmp_path / "o.gguf"
    out.write_bytes(b"previous")
    with pytest.raises(ModelError, match="cannot quantize blk.1.ffn_up.weight to Q8_0: .*NaN"):
        apply_recipe(_recipe(), bad, out, progress=False)
    assert out.read_bytes() == b"previous" and not list(tmp_path.glob(".*.tmp"))


def test_cli_apply_and_export(tiny, tmp_path, capsys):
    rpath = schema.save(_recipe(blk__0__attn_q__weight="Q4_K"), tmp_path / "r.yaml")
    assert main(["apply", str(rpath), str(tiny), "-o", str(tmp_path / "o.gguf"), "--quiet"]) == 0
    assert f"wrote {tmp_path / 'o.gguf'}" in capsys.readouterr().out
    assert main(["export", str(rpath), "--to", "llama-quantize", "-o", str(tmp_path / "t.txt"),
                 "--model", str(tiny)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[-1].startswith("llama-quantize --tensor-type-file") and printed[-1].endswith(" Q8_0")
    assert (tmp_path / "t.txt").read_text() == tensor_type_file(schema.load(rpath))
    assert main(["export", str(rpath), "--to", "llama-quantize"]) == 0
    cap = capsys.readouterr()
    assert cap.out == tensor_type_file(schema.load(rpath)) and "tiny-mix.tensor-types.txt" in cap.err
    rc = main(["apply", str(rpath), str(tmp_path / "absent.gguf"), "-o", str(tmp_path / "x.gguf")])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "absent.gguf" in err


# ------------------------------------------------------------------------------ against llama-quantize


@pytest.fixture(scope="module")
def llama_quantize(llama_tool) -> str:
    return str(llama_tool("llama-quantize"))


def test_same_file_as_llama_quantize(tiny, imatrix, llama_quantize, tmp_path):
    """Every type family, fallback-sized rows, names that need escaping, an imatrix: llama-quantize
    fed the exported file writes the same tensors and metadata as apply."""
    r = _recipe(**MIX)
    ours = apply_recipe(r, tiny, tmp_path / "ours.gguf", importance=ImatrixFile.read(imatrix), progress=False)
    ex = export_llama_quantize(r, tmp_path / "types.txt", model=tiny, output=tmp_path / "theirs.gguf",
                               imatrix=imatrix, exe=llama_quantize)
    (tmp_path / "types.txt").write_text(ex.tensor_types)
    p = subprocess.run(ex.command, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    a, b = gguf.GGUFReader(ours), gguf.GGUFReader(tmp_path / "theirs.gguf")
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    assert _tensors(ours) == _tensors(tmp_path / "theirs.gguf")
    ka = [k for k in a.fields if k != RECIPE_KEY and k != "GGUF.kv_count"]
    kb = [k for k in b.fields if k != "GGUF.kv_count"]
    assert ka == kb and all(a.fields[k].contents() == b.fields[k].contents() for k in ka)
    data_a, data_b = a.tensors[0].data_offset, b.tensors[0].data_offset
    assert Path(ours).read_bytes()[data_a:] == (tmp_path / "theirs.gguf").read_bytes()[data_b:]


def test_llama_quantize_fallback_is_effective_type(tiny, llama_quantize, tmp_path):
    """Asked for 256-wide types on rows of 320, llama-quantize writes what effective_type says (the
    types a recipe holds), byte for byte as apply writes them."""
    wish = {"blk.0.ffn_down.weight": "Q4_K", "blk.1.ffn_down.weight": "Q5_K", "blk.1.wide0.weight": "Q2_K",
            "blk.1.wide1.weight": "Q3_K", "blk.1.wide2.weight": "Q6_K", "blk.1.wide3.weight": "IQ4_XS"}
    r = _recipe(**{n.replace(".", "__"): effective_type(t, FF).name for n, t in wish.items()})
    assert {r.tensors[n] for n in wish} == {"Q5_0", "Q5_1", "Q4_0", "Q8_0", "IQ4_NL"}
    ours = apply_recipe(r, tiny, tmp_path / "ours.gguf", progress=False)
    asked = schema.Recipe(r.name, r.model, {**r.tensors, **wish})
    (tmp_path / "wish.txt").write_text(tensor_type_file(asked))
    cmd = [llama_quantize, "--tensor-type-file", str(tmp_path / "wish.txt"), str(tiny),
           str(tmp_path / "theirs.gguf"), llama_quant.file_type(r.tensors).arg]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    assert "6 of" in p.stdout + p.stderr  # "WARNING: 6 of N tensor(s) required fallback quantization"
    assert _tensors(ours) == _tensors(tmp_path / "theirs.gguf")


def test_plain_patterns_would_hit_the_wrong_tensor():
    """Why the escapes: lower-cased, a plainly escaped name matches its lower-case twin, not itself."""
    naive = f"^{re.escape(ODD[0])}$".lower()
    assert re.search(naive, ODD[1]) and not re.search(naive, ODD[0])
