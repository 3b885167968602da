"""The recipe schema: round trip, strict validation with the offending path, hostile YAML."""

from __future__ import annotations

import pytest

from dynsearch import atomic
from dynsearch.errors import OutputError, RecipeError
from dynsearch.recipes import schema
from dynsearch.recipes.schema import ModelInfo, Recipe

SHAPES = {"token_embd.weight": (49152, 576), "blk.0.attn_q.weight": (576, 576),
          "blk.0.ffn_down.weight": (576, 1536), "blk.0.attn_norm.weight": (576,)}


def make_recipe(**over) -> Recipe:
    base = dict(
        name="smollm2-135m-100MB",
        model=ModelInfo("SmolLM2-135M-Instruct", "llama", "ab" * 32, 134_515_008),
        tensors={"token_embd.weight": "Q8_0", "blk.0.attn_q.weight": "Q5_0",
                 "blk.0.ffn_down.weight": "Q4_K", "blk.0.attn_norm.weight": "F32"},
        budget={"spec": "100MB", "bytes": 100_000_000},
        achieved={"bytes": 99_812_345, "bpw": 5.12},
        calibration={"description": "default chat mix", "sha256": "cd" * 32, "n_tokens": 65536},
        kl={"mean": 0.0123, "p99": 0.18},
        search={"trials": 200, "seed": 0, "types": ["Q4_0", "Q4_K", "Q8_0"]},
        created="2026-11-23", dynsearch_version="0.1.0")
    base.update(over)
    return Recipe(**base)


def test_round_trip(tmp_path):
    r = make_recipe()
    path = schema.save(r, tmp_path / "r.yaml")
    back = schema.load(path)
    assert back == r
    assert list(back.tensors) == list(r.tensors)  # model order kept
    back.check_model(SHAPES)
    assert back.types_histogram() == {"Q8_0": 1, "Q5_0": 1, "Q4_K": 1, "F32": 1}


def _text(**over) -> str:
    d = make_recipe().to_dict()
    d.update(over)
    return schema.yaml.safe_dump(d, sort_keys=False)


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d.update(extra=1), r"^extra: unknown key"),
    (lambda d: d.pop("tensors"), r"^tensors: required key is missing"),
    (lambda d: d.update(format=2), r"^format: version 2 is not supported"),
    (lambda d: d.update(format="1"), r"^format: expected int, got str"),
    (lambda d: d["tensors"].update({"blk.0.attn_q.weight": "Q4_Z"}), r"^tensors\.blk\.0\.attn_q\.weight: unknown quant type 'Q4_Z'"),
    (lambda d: d["tensors"].update({"blk.0.attn_q.weight": 4}), r"^tensors\.blk\.0\.attn_q\.weight: expected str, got int"),
    (lambda d: d["model"].update(layers=3), r"^model\.layers: unknown key"),
    (lambda d: d["model"].update(n_params="many"), r"^model\.n_params: expected int, got str"),
    (lambda d: d["model"].pop("architecture"), r"^model\.architecture: required key is missing"),
    (lambda d: d["kl"].update(mean="low"), r"^kl\.mean: expected a number"),
    (lambda d: d.update(name="../../etc/passwd"), r"^name: '\.\./\.\./etc/passwd' may hold only"),
    (lambda d: d.update(tensors={}), r"^tensors: empty"),
    (lambda d: d.update(search={"x": [{"a": 1}]}), r"^search\.x: lists may hold only scalars"),
])
def test_schema_errors_name_the_path(mutate, message):
    d = make_recipe().to_dict()
    mutate(d)
    with pytest.raises(RecipeError, match=message):
        schema.loads(schema.yaml.safe_dump(d, sort_keys=False))


def test_model_mismatch_errors():
    r = make_recipe()
    with pytest.raises(RecipeError, match=r"tensors\.token_embd\.weight: not a tensor of the model"):
        r.check_model({k: v for k, v in SHAPES.items() if k != "token_embd.weight"})
    with pytest.raises(RecipeError, match=r"no type for model tensor output\.weight"):
        r.check_model({**SHAPES, "output.weight": (49152, 576)})
    bad = make_recipe(tensors={**r.tensors, "blk.0.attn_q.weight": "Q4_K"})
    with pytest.raises(RecipeError, match=r"tensors\.blk\.0\.attn_q\.weight: Q4_K does not fit rows of 576"):
        bad.check_model(SHAPES)


def test_hostile_yaml():
    with pytest.raises(RecipeError, match="duplicate key 'name'"):
        schema.loads(_text() + "name: again\n")
    bomb = "a: &a [x, x]\nb: &b [*a, *a]\nc: [*b, *b]\n"
    with pytest.raises(RecipeError, match="aliases are not allowed"):
        schema.loads(bomb)
    with pytest.raises(RecipeError, match="nesting deeper than"):
        schema.loads("a: " + "[" * 50 + "]" * 50)
    with pytest.raises(RecipeError, match="not valid YAML"):
        schema.loads("a: [1, 2\n")
    with pytest.raises(RecipeError, match="expected dict, got list"):
        schema.loads("- 1\n- 2\n")
    with pytest.raises(RecipeError, match="expected str, got date"):
        schema.loads(_text().replace("created: '2026-11-23'", "created: 2026-11-23"))
    with pytest.raises(RecipeError, match="python/object"):
        schema.loads("!!python/object/apply:os.system ['echo hi']")


def test_file_errors(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        schema.load(tmp_path / "missing.yaml")
    big = tmp_path / "big.yaml"
    big.write_bytes(b"#" * (schema.MAX_BYTES + 1))
    with pytest.raises(RecipeError, match="larger than"):
        schema.load(big)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(RecipeError, match="not UTF-8"):
        schema.load(binary)


def test_save_is_atomic_and_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "r.yaml"
    schema.save(make_recipe(), path)
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "replace", boom)
    with pytest.raises(OutputError, match="r.yaml: cannot write: disk full"):
        schema.save(make_recipe(name="other"), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]  # no temp file left
