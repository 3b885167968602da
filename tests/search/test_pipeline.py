"""`dynsearch run` end to end on the demo model, with small token counts."""

from __future__ import annotations

import numpy as np
import pytest

from dynsearch.cli import main
from dynsearch.recipes import schema
from dynsearch.search.run import config, pipeline, prepare

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("demo_model")]

ARGS = ["run", "smollm2-135m", "--budget", "100MB", "--calib-tokens", "2048", "--fisher-tokens",
        "1024", "--search-tokens", "512", "--eval-tokens", "1024", "--trials", "3", "--quiet"]


def _counted(monkeypatch, module, name: str) -> list:
    calls, real = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(a) or real(*a, **k))
    return calls


def test_run_writes_recipe_and_gguf_within_budget_and_resumes(tmp_path, capsys, demo_model, monkeypatch):
    out = tmp_path / "runs"
    counts = {name: _counted(monkeypatch, module, name) for module, name in (
        (config, "parse_budget"), (config, "parse_types"), (prepare, "resolve_model"),
        (prepare, "open_model"), (pipeline, "open_storage"))}
    assert main([*ARGS, "--out", str(out)]) == 0
    assert {k: len(v) for k, v in counts.items()} == dict.fromkeys(counts, 1)  # each input parsed, opened once
    printed = capsys.readouterr().out
    assert "Q4_1 is not a candidate" in printed
    (recipe_path,) = out.rglob("*.yaml")
    gguf_path = recipe_path.with_suffix(".gguf")  # beside it: imatrix.gguf
    assert f"recipe: {recipe_path}" in printed and f"gguf:   {gguf_path}" in printed
    recipe = schema.load(recipe_path)
    assert gguf_path.stat().st_size <= 100_000_000
    assert "Q4_1" not in recipe.types_histogram()
    assert recipe.kl["kld_mean"] > 0 and np.isfinite(recipe.kl["kld_p99"])

    import gguf  # gguf-py reads it back, with our types
    reader = gguf.GGUFReader(gguf_path)
    assert {t.name: t.tensor_type.name for t in reader.tensors} == recipe.tensors
    assert "dynsearch.recipe" in reader.fields

    # the phases' wall time, each beside the estimate printed before the run, and in the report
    import json
    import re
    assert re.search(r"^time: statistics \S+ s \(est\. [^)]+\), profiling .* GGUF .*; total \S+ \S+ \(est\.",
                     printed, re.M)
    (row,) = json.loads(next(out.rglob("report.json")).read_text())
    assert set(row["seconds"]) == {"search", "held-out", "GGUF"} and min(row["seconds"].values()) > 0

    # the run's imatrix reproduces its GGUF byte for byte through `dynsearch apply`
    (imatrix_path,) = out.rglob("imatrix.gguf")
    assert f"imatrix: {imatrix_path}" in printed
    again = tmp_path / "again.gguf"
    assert main(["apply", str(recipe_path), str(demo_model), "-o", str(again),
                 "--imatrix", str(imatrix_path), "--quiet"]) == 0
    assert again.read_bytes() == gguf_path.read_bytes()

    # the same command again resumes: no new trial, same recipe
    import optuna
    db = next(out.rglob("study.db"))
    n_before = len(optuna.load_study(study_name=None, storage=f"sqlite:///{db}").trials)
    assert main([*ARGS, "--out", str(out), "--no-gguf"]) == 0
    assert "GGUF 0.0 s (est. 0.0 s)" in capsys.readouterr().out  # statistics, profiles cached
    assert len(optuna.load_study(study_name=None, storage=f"sqlite:///{db}").trials) == n_before
    assert schema.load(recipe_path).tensors == recipe.tensors


def test_impossible_budget_is_one_line_error(tmp_path, capsys):
    rc = main(["run", "smollm2-135m", "--budget", "20MB", "--out", str(tmp_path), "--quiet",
               "--calib-tokens", "1024", "--fisher-tokens", "512", "--search-tokens", "512",
               "--eval-tokens", "512", "--no-gguf"])
    err = capsys.readouterr().err
    assert rc == 2 and "unreachable" in err and len(err.strip().splitlines()) == 1
