"""``dynsearch run``: model -> statistics -> profile -> knapsack seed -> Optuna -> recipe -> GGUF.

Every phase is cached in the run folder (or the shared cache) so that re-running the same
command resumes: finished statistics, profiles and trials are reused, never recomputed.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dynsearch.atomic import atomic_write_text
from dynsearch.kernels import tensor_nbytes
from dynsearch.kernels.types import padded
from dynsearch.objectives.evaluate import KLEvaluator, QuantizedWeights
from dynsearch.objectives.io.imatrix import ImatrixData, ImatrixEntry, write_imatrix
from dynsearch.recipes import schema
from dynsearch.recipes.apply import ImatrixFile, apply_recipe
from dynsearch.search.budget import Budget
from dynsearch.search.cluster import probe
from dynsearch.search.run import worker
from dynsearch.search.run.config import RunConfig
from dynsearch.search.run.prepare import Prepared, RunModel, header_overhead, prepare
from dynsearch.search.run.storage import open_storage
from dynsearch.search.space import headroom
from dynsearch.search.study import best_result


@dataclass
class RunResult:
    recipe_paths: list[Path] = field(default_factory=list)
    gguf_paths: list[Path] = field(default_factory=list)
    report_path: Path | None = None
    imatrix_path: Path | None = None
    rows: list[dict] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per phase (PHASES)


PHASES = ("statistics", "profiling", "search", "held-out", "GGUF")  # RunResult.seconds' keys
HELPER_WAIT_S = 7 * 24 * 3600.0  # helpers started with the run wait this long for its first study


def slug(s: str) -> str:
    """``s`` as a file name part: runs of other characters than letters, digits, ``_.-`` become ``-``."""
    return re.sub(r"[^A-Za-z0-9_.\-]+", "-", s).strip("-")


def recipe_name(model_path: Path, budget: Budget) -> str:
    """The name of a run's recipe (its YAML and GGUF files are named after it)."""
    return f"{slug(model_path.stem)}-{slug(budget.spec)}"


def open_run_storage(cfg: RunConfig, model_path: Path):
    """The run's Optuna storage: ``--storage``, or SQLite in the run folder (created)."""
    if cfg.storage is None:
        cfg.run_dir(model_path).mkdir(parents=True, exist_ok=True)
    return open_storage(cfg.storage_url(model_path))


def spawn_early_helpers(cfg: RunConfig, model_path: Path, run_id: str) -> list:
    """``--search-workers N``: the N-1 helpers of the first budget start now and wait for its
    study (``--wait-for-study``), so that they import and load while this process prepares and
    are ready when the first trial starts."""
    if cfg.search_workers < 2:
        return []
    run_dir = cfg.run_dir(model_path)
    run_dir.mkdir(parents=True, exist_ok=True)
    return worker.spawn(cfg.storage_url(model_path), cfg.study_of(model_path, 0), cfg.search_workers - 1,
                        run_dir, cfg.timeout, cfg.profile_backend(), HELPER_WAIT_S, run_id)


def run(cfg: RunConfig, model: RunModel, storage=None, progress: bool = True) -> RunResult:
    """Prepare, then for every budget: search (resuming its study) and write recipe + GGUF.
    ``storage``: the opened ``--storage`` (None: :func:`open_run_storage` opens the run's)."""
    probe(cfg.profile_backend())  # an unreachable Dask scheduler: an error before any work
    if storage is None:
        storage = open_run_storage(cfg, model.path)
    run_id = uuid.uuid4().hex
    helpers = spawn_early_helpers(cfg, model.path, run_id)
    try:
        prep = prepare(cfg, model, progress)
        result = RunResult(imatrix_path=write_run_imatrix(prep),
                           seconds={**dict.fromkeys(PHASES, 0.0), **prep.seconds})
    except BaseException:
        worker.stop_all(helpers)  # they would wait for a study that never comes
        raise
    for i in range(len(cfg.budgets)):
        try:
            study = worker.open_budget_study(prep, storage, i)
            study.set_user_attr(worker.RUN_ID_ATTR, run_id)  # last: the helpers waiting for it go
        except BaseException:
            worker.stop_all(helpers)
            raise
        if i > 0:
            helpers = worker.spawn(prep.storage_url(), study.study_name, cfg.search_workers - 1,
                                   prep.run_dir, cfg.timeout, cfg.profile_backend())
        t0 = time.perf_counter()
        try:
            worker.work(study, prep.space, prep.settings(i), prep.kl_of, progress=progress)
        finally:
            worker.wait_all(helpers, prep.run_dir)
        searched = time.perf_counter() - t0
        result.seconds["search"] += searched
        finish_budget(prep, i, study, result, progress)
        result.rows[-1]["seconds"]["search"] = round(searched, 3)
    result.report_path = atomic_write_text(prep.run_dir / "report.json",
                                           json.dumps(result.rows, indent=2, default=str))
    return result


def finish_budget(prep: Prepared, i: int, study, result: RunResult, progress: bool = True) -> None:
    """Measure the study's best on held-out tokens; write its recipe (and GGUF); add a report row."""
    cfg, source, space, budget = prep.cfg, prep.source, prep.space, prep.cfg.budgets[i]
    model_path, names_all = prep.model_path, prep.names
    t0 = time.perf_counter()
    held_out = KLEvaluator(prep.forward, prep.eval_tokens)
    best = best_result(study)
    assignment = {**prep.fixed, **space.assignment(best.choice)}
    assignment = {n: assignment[n] for n in names_all}  # model order
    ho = held_out.stats(QuantizedWeights(source, assignment, prep.importance.get))
    t1 = time.perf_counter()
    tensor_bytes = sum(padded(tensor_nbytes(source.shape(n), t)) for n, t in assignment.items())
    room = headroom(space, best.choice, prep.tensor_budgets[i])
    n_params = int(sum(int(np.prod(source.shape(n))) for n in names_all))
    name = str(source.metadata("general.name", model_path.stem) if hasattr(source, "metadata") else model_path.stem)
    recipe = schema.from_assignment(
        recipe_name(model_path, budget), schema.ModelInfo(name, source.config.arch, prep.model_key, n_params),
        assignment, tensor_bytes, budget, prep.calib_desc,
        search={"trials": best.n_complete + best.n_pruned + best.n_failed, "complete": best.n_complete,
                "pruned": best.n_pruned, "failed": best.n_failed, "sampler": cfg.sampler,
                "seed": cfg.seed, "types": list(space.types), "search_tokens": int(prep.search_tokens.size),
                "proxy": space.proxy_of(best.choice), "search_kl": best.value,
                "knapsack_seed_kl": best.seed_value, "study": study.study_name},
        kl={k: float(v) for k, v in ho.to_dict().items() if isinstance(v, (int, float))},
        overhead_bytes=header_overhead(source))
    rpath = schema.save(recipe, prep.run_dir / f"{recipe.name}.yaml")
    result.recipe_paths.append(rpath)
    gpath = None
    if cfg.write_gguf:
        # through the written imatrix file (same vectors), so that the GGUF records it as
        # llama-quantize --imatrix would and `dynsearch apply --imatrix` reproduces it exactly
        imatrix = ImatrixFile.read(result.imatrix_path) if result.imatrix_path else prep.importance
        gpath = apply_recipe(recipe, model_path, prep.run_dir / f"{recipe.name}.gguf",
                             importance=imatrix, progress=progress)
        result.gguf_paths.append(gpath)
    seconds = {"held-out": t1 - t0, "GGUF": time.perf_counter() - t1}
    for k, v in seconds.items():
        result.seconds[k] = result.seconds.get(k, 0.0) + v
    result.rows.append({"budget": budget.spec, "tensor_bytes": tensor_bytes,
                        "file_bytes": gpath.stat().st_size if gpath else None,
                        "bpw": recipe.achieved["bpw"], "proxy": space.proxy_of(best.choice),
                        "search_kl": best.value, "seed_kl": best.seed_value,
                        "heldout_mean_kl": ho.to_dict()["kld_mean"],
                        "heldout": ho.to_dict(), "types": recipe.types_histogram(),
                        "unused_bytes": room.unused, "unused_reason": room.reason() if room.unused else None,
                        "recipe": str(rpath), "gguf": str(gpath) if gpath else None,
                        "seconds": {k: round(v, 3) for k, v in seconds.items()},
                        **({"moe_routing": prep.routing} if prep.routing else {})})


def write_run_imatrix(prep: Prepared) -> Path:
    """The importance vectors the run quantized with, as a GGUF imatrix beside the recipes, so
    that ``dynsearch apply --imatrix`` and ``llama-quantize --imatrix`` (``dynsearch export``)
    reproduce the run's GGUF byte for byte (each entry is the mean, with a count of 1)."""
    entries = {n: ImatrixEntry(np.asarray(v, dtype=np.float32).reshape(1, -1), np.ones(1, dtype=np.int64))
               for n, v in prep.importance.items() if v is not None}
    seq = int(prep.calib_desc["seq_len"])
    return write_imatrix(prep.run_dir / "imatrix.gguf",
                         ImatrixData(entries, [str(prep.calib_desc["description"])],
                                     int(prep.calib_desc["n_tokens"]) // seq, seq))
