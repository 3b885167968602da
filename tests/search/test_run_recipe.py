"""The recipe of a run's assignment: its name, and :func:`schema.from_assignment` against a recipe
assembled field by field."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

from dynsearch import __version__
from dynsearch.recipes import schema
from dynsearch.search.budget import parse_budget
from dynsearch.search.run.pipeline import recipe_name, slug

MODEL = schema.ModelInfo("Tiny", "llama", "ab" * 32, 3_000)
TENSORS = {"token_embd.weight": "Q8_0", "blk.0.attn_norm.weight": "F32", "output.weight": "Q6_K"}


def test_slug_and_recipe_name():
    assert slug("a b/c:d") == "a-b-c-d" and slug("  x  ") == "x" and slug("Q4_1-1.5.gguf") == "Q4_1-1.5.gguf"
    assert recipe_name(Path("/m/SmolLM2 135M.Q4_1.gguf"), parse_budget("100MB")) == "SmolLM2-135M.Q4_1-100MB"
    assert recipe_name(Path("m"), parse_budget("4.5bpw")) == "m-4.5bpw"


def test_from_assignment_is_the_recipe_field_by_field():
    budget = parse_budget("100MB")
    search = {"trials": 3, "sampler": "tpe"}
    got = schema.from_assignment("r", MODEL, TENSORS, 1_500, budget, {"sha256": "c"}, search,
                                 kl={"kld_mean": 0.01}, overhead_bytes=500)
    want = schema.Recipe(name="r", model=MODEL, tensors=TENSORS,
                         budget={"spec": "100MB", "bytes": 100_000_000, "bpw": None},
                         achieved={"tensor_bytes": 1_500, "bytes_estimate": 2_000, "bpw": 4.0},
                         calibration={"sha256": "c"}, kl={"kld_mean": 0.01}, search=search,
                         created=_dt.date.today().isoformat(), dynsearch_version=__version__)
    assert got == want and got.dumps() == want.dumps()
    assert list(got.achieved) == ["tensor_bytes", "bytes_estimate", "bpw"]  # the YAML's order


def test_from_assignment_without_overhead_or_kl():
    got = schema.from_assignment("b", MODEL, TENSORS, 1_000, parse_budget("2.5bpw"), {}, {"baseline": "k"})
    assert got.achieved == {"tensor_bytes": 1_000, "bpw": round(8_000 / 3_000, 4)}
    assert got.budget == {"spec": "2.5bpw", "bytes": None, "bpw": 2.5} and got.kl == {}
    assert schema.loads(got.dumps()) == got  # a valid recipe
