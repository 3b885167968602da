"""``dynsearch run``: model -> statistics -> profile -> knapsack seed -> Optuna -> recipe -> GGUF.

Every phase is cached in the run folder (or the shared cache) so that re-running the same
command resumes: finished statistics, profiles and trials are reused, never recomputed.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from dynsearch import __version__
from dynsearch.atomic import atomic_write_text
from dynsearch.errors import DynsearchError
from dynsearch.kernels import effective_type, parse_qtype, tensor_nbytes
from dynsearch import system
from dynsearch.recipes import schema
from dynsearch.search.run import worker
from dynsearch.search.budget import Budget, check_reachable, parse_budget
from dynsearch.objectives.stats.moe import (
    expert_second_moment,
    is_expert_stack,
    is_router,
    routing_table,
)
from dynsearch.search.cluster import ProfileBackend, check_backend, probe
from dynsearch.search.profile import (
    GGUF_ALIGNMENT,
    ProfileCache,
    ProfileJob,
    TensorStats,
    padded,
    profile_tensor,
    profile_tensors,
)
from dynsearch.search.space import DEFAULT_EXPERT_GROUPING, SearchSpace, layer_groups
from dynsearch.search.run.storage import open_storage
from dynsearch.search.study import SearchSettings, best_result, open_study

log = logging.getLogger(__name__)

DEFAULT_TYPES = ("Q2_K", "Q3_K", "IQ4_XS", "Q4_K", "Q5_K", "Q6_K", "Q8_0",
                 "Q4_0", "IQ4_NL", "Q5_0", "Q5_1")


@dataclass(frozen=True)
class RunConfig:
    model: str  # .gguf file, Hugging Face folder or alias
    budgets: tuple[str, ...]  # e.g. ("100MB",) or several for a Pareto family
    types: tuple[str, ...] = DEFAULT_TYPES  # candidate types
    keep: tuple[str, ...] = ()  # "regex=TYPE": tensors held at a fixed type
    calib: str | None = None  # user calibration file; None: the shipped set
    calib_tokens: int = 16_384  # tokens for activation statistics (imatrix, X^T X)
    fisher_tokens: int = 4_096  # tokens for the output sensitivities
    search_tokens: int = 2_048  # tokens for true KL during the search
    eval_tokens: int = 8_192  # held-out tokens for the final measurement
    seq_len: int = 512
    trials: int = 24  # Optuna trials per budget (all workers together)
    timeout: float | None = None  # seconds per budget for this process
    seed: int = 0
    sampler: str = "tpe"
    storage: str | None = None  # Optuna storage URL; None: SQLite in the run folder
    study_name: str | None = None
    workers: int = 1  # threads for profiling
    search_workers: int = 1  # processes searching each budget's study together (this one included)
    out: str = "runs"
    device: str = "cpu"
    write_gguf: bool = True
    cache: str | None = None  # profile cache folder; None: <out>/cache
    joblib_backend: str = "threading"  # where profiling runs: threading, loky (processes), dask
    dask_scheduler: str | None = None  # Dask scheduler address; None: $DYNSEARCH_DASK_SCHEDULER
    group_experts: str = DEFAULT_EXPERT_GROUPING  # MoE expert stacks' search variables: kind, layer, none

    def profile_backend(self) -> ProfileBackend:
        return ProfileBackend(self.joblib_backend, self.workers, self.dask_scheduler)


@dataclass
class RunResult:
    recipe_paths: list[Path] = field(default_factory=list)
    gguf_paths: list[Path] = field(default_factory=list)
    report_path: Path | None = None
    imatrix_path: Path | None = None
    rows: list[dict] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per phase (PHASES)


PHASES = ("statistics", "profiling", "search", "held-out", "GGUF")  # RunResult.seconds' keys


def _sha256_file(path: Path, limit: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        done = 0
        while chunk := f.read(1 << 20):
            h.update(chunk)
            done += len(chunk)
            if limit is not None and done >= limit:
                break
    return h.hexdigest()


def model_fingerprint(path: Path) -> str:
    """Identity of the model's bytes (size + hash of the first 64 MB and the file names)."""
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(str(f.stat().st_size).encode())
        h.update(_sha256_file(f, 64 << 20).encode())
    return h.hexdigest()


def parse_keep(items: tuple[str, ...]) -> list[tuple[re.Pattern, str]]:
    out = []
    for item in items:
        if "=" not in item:
            raise DynsearchError(f"--keep {item!r}: expected PATTERN=TYPE, e.g. 'token_embd=Q8_0'")
        pat, t = item.rsplit("=", 1)
        try:
            out.append((re.compile(pat), parse_qtype(t).name))
        except re.error as e:
            raise DynsearchError(f"--keep {item!r}: bad pattern ({e})") from None
        except ValueError as e:
            raise DynsearchError(f"--keep {item!r}: {e}") from None
    return out


def parse_types(types: tuple[str, ...]) -> tuple[str, ...]:
    """Candidate types as canonical names: known, written by our kernels, each listed once."""
    from dynsearch.kernels import quantizable_types

    if not types:
        raise DynsearchError("--types: no candidate types given")
    writable, out = set(quantizable_types()), []
    for t in types:
        try:
            qt = parse_qtype(t)
        except ValueError:
            raise DynsearchError(f"--types: {t!r} is not a GGUF type (`dynsearch types` lists them)") from None
        if qt not in writable:
            raise DynsearchError(f"--types: dynsearch cannot write {qt.name} yet (`dynsearch types` lists them)")
        if qt.name in out:
            raise DynsearchError(f"--types: {qt.name} is listed twice")
        out.append(qt.name)
    return tuple(out)


_POSITIVE = ("calib_tokens", "fisher_tokens", "search_tokens", "eval_tokens", "seq_len", "trials",
             "workers", "search_workers")


def check_config(cfg: RunConfig) -> None:
    """Every user input of a run checked before any work, each failure one clear line: budgets,
    --keep, --types, counts, the calibration file, the output folder, and the storage (opened
    now, so that a bad or unreachable URL fails at once; its messages never show a password)."""
    if not cfg.budgets:
        raise DynsearchError("no --budget given (e.g. --budget 100MB or --budget 4.5bpw)")
    for b in cfg.budgets:
        parse_budget(b)
    parse_keep(cfg.keep)
    parse_types(cfg.types)
    for name in _POSITIVE:
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise DynsearchError(f"--{name.replace('_', '-')} must be a positive whole number, got {v!r}")
    if cfg.timeout is not None and not cfg.timeout > 0:
        raise DynsearchError(f"--timeout must be a positive number of seconds, got {cfg.timeout!r}")
    if cfg.calib is not None and not Path(cfg.calib).is_file():
        raise DynsearchError(f"--calib {cfg.calib}: no such file")
    if Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise DynsearchError(f"--out {cfg.out}: exists and is not a folder")
    check_backend(cfg.profile_backend())
    if cfg.storage is not None:
        open_storage(cfg.storage)


# ---------------------------------------------------------------------------------------------
# Phase 1: statistics (activations, imatrix, Fisher), cached as one .npz per run key


class _HeadGram:
    """Capture for the lm head: X^T X of the normed final hidden states."""

    def __init__(self, stats):
        self.stats = stats
        self.xtx: torch.Tensor | None = None
        self.n = 0

    def __call__(self, name, x):
        if name.startswith("blk."):
            self.stats(name, x)
            return
        xd = x.reshape(-1, x.shape[-1]).double()
        self.xtx = xd.T @ xd if self.xtx is None else self.xtx + xd.T @ xd
        self.n += xd.shape[0]

    def experts(self, name, x, expert_ids, n_expert):  # MoE expert stacks (blocks.moe_ffn)
        self.stats.experts(name, x, expert_ids, n_expert)


class _DictSink:
    """Statistics kept in memory (``collect_statistics`` without a path: tests, benchmarks)."""

    def __init__(self):
        self.stats: dict[str, TensorStats] = {}

    def add(self, name: str, field: str, value) -> None:
        setattr(self.stats.setdefault(name, TensorStats()), field, value)


def collect_statistics(forward, calib_tokens: np.ndarray, fisher_tokens: np.ndarray, seed: int,
                       progress: bool = True, path: Path | None = None) -> Mapping[str, TensorStats]:
    """Per searchable tensor, the :class:`TensorStats` profiling needs.

    Block by block over all calibration sequences at once (their hidden states are the resident
    calibration state), so that each layer's ``X^T X`` is final when its block is done: it is
    then written to ``path`` (a statistics ``.npz``, see :mod:`.stats_store`) and freed, and
    memory does not grow with the number of layers. Without ``path`` the result stays in memory.
    """
    from dynsearch.objectives.stats.capture import ActivationStats, CaptureConfig
    from dynsearch.objectives.stats.fisher import fisher_pass
    from dynsearch.objectives.stats.store import StatsFile, StatsWriter

    with contextlib.ExitStack() as stack:
        sink = _DictSink() if path is None else stack.enter_context(StatsWriter(path))
        stats = ActivationStats(CaptureConfig(second_moment=True))
        head = _HeadGram(stats)
        with torch.inference_mode():
            hidden = forward.embed(calib_tokens)
        for il in tqdm(range(forward.cfg.n_layer), desc="activations", disable=not progress, unit="block"):
            forward.run_block(il, hidden, capture=head)
            prefix = f"blk.{il}."
            for name in stats.names:
                if name.startswith(prefix) and stats.has_second_moment(name):
                    n = float(stats.count(name).sum())
                    sink.add(name, "xtx", (stats.second_moment(name) / n).float().cpu())
            stats.drop_second_moments(prefix)
        for _ in forward.head(hidden, capture=head):
            pass
        del hidden
        imat = stats.imatrix(["calibration"], calib_tokens.shape[1])
        log.info("fisher pass on %d tokens", fisher_tokens.size)
        sens = fisher_pass(forward, fisher_tokens, seed=seed)

        cfg, spec = forward.cfg, forward.spec
        for name in stats.names:
            if sens.fisher_out.get(name) is not None:
                sink.add(name, "fisher_out", sens.fisher_out[name])
            if imat.importance(name) is not None:
                sink.add(name, "importance", imat.importance(name))
            if is_expert_stack(name):  # per-expert input statistics and routing counts (search/moe.py)
                e = imat.entries[name]
                sink.add(name, "xdiag", expert_second_moment(e.in_sum2, e.counts,
                                                             float(e.counts.sum()) / cfg.n_expert_used))
                sink.add(name, "expert_counts", e.counts.astype(np.float64))
        head_name = "output.weight" if forward._has_output else "token_embd.weight"
        scale2 = float(cfg.n_embd) if spec.embed_scale else 1.0
        head_xtx = (head.xtx / head.n).float().cpu()
        sink.add(head_name, "xtx", head_xtx)
        sink.add(head_name, "fisher_out", sens.fisher_out[head_name])  # tied: one table, both uses
        sink.add("token_embd.weight", "row_weight", sens.token_counts / sens.token_counts.sum())
        sink.add("token_embd.weight", "fisher_col", sens.fisher_embed * scale2)
    return sink.stats if path is None else StatsFile(path)


def load_stats(path: Path) -> Mapping[str, TensorStats] | None:
    """The statistics file, opened lazily (each tensor's members read when asked for); its list
    of members and its small vectors are checked now, the X^T X matrices when read."""
    from dynsearch.objectives.stats.store import StatsFile

    if not path.exists():
        return None
    try:
        st = StatsFile(path)
        for name in st:
            for f in ("fisher_out", "importance", "row_weight", "fisher_col"):
                st.field(name, f)
        return st
    except Exception as e:  # noqa: BLE001 - a damaged cache is recomputed
        log.warning("statistics cache %s is corrupt (%s); recomputing", path, e)
        path.unlink(missing_ok=True)
        return None


def importance_of(stats: Mapping[str, TensorStats]) -> dict[str, np.ndarray | None]:
    """tensor -> imatrix vector, without reading the X^T X matrices of a :class:`StatsFile`."""
    field = getattr(stats, "field", None)
    if field is not None:
        return {n: field(n, "importance") for n in stats}
    return {n: st.importance for n, st in stats.items()}


# ---------------------------------------------------------------------------------------------
# Phase 2: the search space


def build_space(source, names: list[str], types: tuple[str, ...], stats: dict[str, TensorStats],
                cache: ProfileCache, backend: ProfileBackend | int = 1, progress: bool = True,
                job: ProfileJob | None = None, group_experts: str = DEFAULT_EXPERT_GROUPING) -> SearchSpace:
    """Profile every tensor (cache hits read, misses computed on ``backend``: threads here, or
    ``job`` in loky processes or on a Dask cluster) into the search space; ``group_experts``:
    how MoE expert stacks share search variables (see :data:`.space.EXPERT_GROUPINGS`)."""
    types_l = [parse_qtype(t).name for t in types]
    if isinstance(backend, int):
        backend = ProfileBackend(n_jobs=backend)

    def one(name: str):
        res = profile_tensor(source.load(name), types_l, stats.get(name, TensorStats()))
        cache.put(name, types_l, *res)
        system.trim()
        return res

    rows = profile_tensors(names, types_l, cache, one, job, backend, lambda it, n: tqdm(
        it, total=n, desc=f"profile ({backend.name})", disable=not progress, unit="tensor"))
    written = tuple(tuple(r[0]) for r in rows)
    sizes = np.stack([r[1] for r in rows])
    errors = np.stack([r[2] for r in rows])
    groups, gnames = layer_groups(names, source.config.n_layer, n_bands=3, experts=group_experts)
    n_weights = int(sum(int(np.prod(source.shape(n))) for n in names))
    return SearchSpace(tuple(names), tuple(types_l), written, sizes, errors, groups, tuple(gnames), n_weights)


def header_overhead(source) -> int:
    """Bytes of a GGUF file besides the searched tensors' data: the source's header (metadata,
    tensor infos, padding) plus room for the recipe embedded as metadata."""
    hdr = getattr(source, "header", None)
    header = min((t.offset for t in hdr.tensors.values()), default=0) if hdr is not None else 4 << 20
    return padded(header + 256 * 1024, GGUF_ALIGNMENT)


# ---------------------------------------------------------------------------------------------
# The run


def study_name_of(cfg: RunConfig, model_path: Path, budgets: list[Budget], i: int) -> str:
    name = cfg.study_name or f"{model_path.stem}-{budgets[i].spec}"
    return name if len(budgets) == 1 else f"{name}-{budgets[i].spec}"


def storage_url_of(cfg: RunConfig, run_dir: Path) -> str:
    return cfg.storage or f"sqlite:///{(run_dir / 'study.db').resolve()}"


HELPER_WAIT_S = 7 * 24 * 3600.0  # helpers started with the run wait this long for its first study


def spawn_early_helpers(cfg: RunConfig, run_id: str) -> list:
    """``--search-workers N``: the N-1 helpers of the first budget start now and wait for its
    study (``--wait-for-study``), so that they import and load while this process prepares and
    are ready when the first trial starts."""
    from dynsearch.objectives.io.resolve import resolve_model

    if cfg.search_workers < 2:
        return []
    check_config(cfg)
    model_path = resolve_model(cfg.model)
    run_dir = Path(cfg.out) / model_path.stem
    run_dir.mkdir(parents=True, exist_ok=True)
    budgets = [parse_budget(b) for b in cfg.budgets]
    return worker.spawn(storage_url_of(cfg, run_dir), study_name_of(cfg, model_path, budgets, 0),
                        cfg.search_workers - 1, run_dir, cfg.timeout, cfg.profile_backend(),
                        HELPER_WAIT_S, run_id)


def run(cfg: RunConfig, progress: bool = True) -> RunResult:
    """Prepare, then for every budget: search (resuming its study) and write recipe + GGUF."""
    if cfg.storage:
        open_storage(cfg.storage)  # a bad URL or an unreachable server: an error before any work
    probe(cfg.profile_backend())  # and so is an unreachable Dask scheduler
    run_id = uuid.uuid4().hex
    helpers = spawn_early_helpers(cfg, run_id)
    try:
        prep = prepare(cfg, progress)
        result = RunResult(imatrix_path=write_run_imatrix(prep),
                           seconds={**dict.fromkeys(PHASES, 0.0), **prep.seconds})
    except BaseException:
        worker.stop_all(helpers)  # they would wait for a study that never comes
        raise
    for i in range(len(prep.budgets)):
        try:
            study = open_budget_study(prep, i)
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


@dataclass
class Prepared:
    """Everything a trial needs, rebuilt from a :class:`RunConfig` (and the shared cache) alone,
    so that any process -- ``dynsearch run`` or a ``dynsearch worker`` -- can score trials."""

    cfg: RunConfig
    model_path: Path
    source: object  # objectives.model source (GGUF or Hugging Face folder)
    model_key: str
    run_dir: Path
    names: list[str]  # every tensor, model order
    fixed: dict[str, str]  # tensor -> type for the tensors not searched (1-D, --keep)
    budgets: list[Budget]
    tensor_budgets: list[int]  # bytes of searched tensor data per budget
    calib_desc: dict
    search_tokens: np.ndarray  # (n_seq, seq_len) true KL during the search
    eval_tokens: np.ndarray  # (n_seq, seq_len) held-out tokens for the final measurement
    importance: dict  # tensor -> imatrix importance vector (or None)
    space: SearchSpace
    forward: object  # BlockwiseForward
    routing: dict = field(default_factory=dict)  # MoE: tokens routed per expert per layer (report)
    seconds: dict = field(default_factory=dict)  # statistics and profiling wall time (small: read from the cache)
    _evaluator: object = None  # KLEvaluator on the search tokens, built on first use
    _quant_cache: object = None  # QuantCache shared by the trials of this process

    def settings(self, i: int) -> SearchSettings:
        c = self.cfg
        return SearchSettings(budget=self.tensor_budgets[i], n_trials=c.trials, timeout=c.timeout,
                              seed=c.seed, sampler=c.sampler)

    def study_name(self, i: int) -> str:
        return study_name_of(self.cfg, self.model_path, self.budgets, i)

    def storage_url(self) -> str:
        return storage_url_of(self.cfg, self.run_dir)

    def kl_of(self, choice: np.ndarray) -> float:
        """True KL of a candidate on the search tokens."""
        from dynsearch.objectives.evaluate import KLEvaluator, QuantCache, QuantizedWeights

        if self._evaluator is None:
            self._evaluator = KLEvaluator(self.forward, self.search_tokens)
            self._quant_cache = QuantCache()
        return self._evaluator.mean_kl(QuantizedWeights(self.source, self.space.assignment(choice),
                                                        self.importance.get, self._quant_cache))


def prepare(cfg: RunConfig, progress: bool = True) -> Prepared:
    """Model, tokens, statistics, profiled search space: everything before the search. Every
    costly part is read from the cache when present, so a second process prepares quickly."""
    from dynsearch.objectives.forward import BlockwiseForward
    from dynsearch.objectives.io.resolve import open_model
    from dynsearch.objectives.io.resolve import resolve_model

    check_config(cfg)  # errors before any work
    budgets = [parse_budget(b) for b in cfg.budgets]
    keep = parse_keep(cfg.keep)
    model_path = resolve_model(cfg.model)
    source = open_model(model_path)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    run_dir = out / model_path.stem
    run_dir.mkdir(parents=True, exist_ok=True)
    model_key = model_fingerprint(model_path)

    # tensors: 1-D ones stay F32; --keep ones are fixed; the rest are searched
    names_all = source.names()
    fixed: dict[str, str] = {}
    for n in names_all:
        if len(source.shape(n)) < 2:
            fixed[n] = "F32"
        elif is_router(n):  # MoE routers: kept as stored, as llama-quantize keeps them
            fixed[n] = source.qtype(n).name
        else:
            for pat, t in keep:
                if pat.search(n):
                    fixed[n] = t
                    break
    searched = [n for n in names_all if n not in fixed]
    fixed_bytes = sum(padded(tensor_nbytes(source.shape(n), t)) for n, t in fixed.items())
    overhead = header_overhead(source) + fixed_bytes

    # every budget is checked against the reachable sizes before any costly work
    n_searched = int(sum(int(np.prod(source.shape(n))) for n in searched))
    tensor_budgets = []
    for budget in budgets:
        tb = (budget.tensor_bytes(n_searched, 0) if budget.bpw is not None
              else budget.tensor_bytes(0, overhead))
        sizes = np.array([[padded(tensor_nbytes(source.shape(n), effective_type(t, source.shape(n)[-1]).name))
                           for t in cfg.types] for n in searched], dtype=np.int64)
        check_reachable(budget, tb, int(sizes.min(axis=1).sum()), int(sizes.max(axis=1).sum()))
        tensor_budgets.append(tb)

    # tokens
    tok_sets = _token_sets(model_path, source, cfg)
    calib, fisher_t, search_t, eval_t, calib_desc = tok_sets
    stats_key = hashlib.sha256(f"{model_key}|{calib_desc['sha256']}|{calib.shape}|{fisher_t.shape}|{cfg.seed}"
                               .encode()).hexdigest()[:16]

    forward = BlockwiseForward(source, device=cfg.device, batch_size=4)
    stats_path = (Path(cfg.cache) if cfg.cache else out / "cache") / f"stats-{stats_key}.npz"
    t0 = time.perf_counter()
    stats = load_stats(stats_path)
    if stats is None:
        stats = collect_statistics(forward, calib, fisher_t, cfg.seed, progress, path=stats_path)
    t1 = time.perf_counter()
    cache = ProfileCache((Path(cfg.cache) if cfg.cache else out / "cache") / "profile", model_key, stats_key)
    job = ProfileJob(str(model_path.resolve()), model_key, str(stats_path.resolve()),
                     str(cache.folder.resolve()), stats_key, tuple(parse_qtype(t).name for t in cfg.types))
    space = build_space(source, searched, tuple(cfg.types), stats, cache, cfg.profile_backend(),
                        progress, job, cfg.group_experts)
    seconds = {"statistics": t1 - t0, "profiling": time.perf_counter() - t1}

    importance = importance_of(stats)
    routing = routing_table({n: stats[n].expert_counts for n in searched if is_expert_stack(n) and n in stats})
    return Prepared(cfg=cfg, model_path=model_path, source=source, model_key=model_key,
                    run_dir=run_dir, names=names_all, fixed=fixed, budgets=budgets,
                    tensor_budgets=tensor_budgets, calib_desc=calib_desc, search_tokens=search_t,
                    eval_tokens=eval_t, importance=importance, space=space, forward=forward,
                    routing=routing, seconds=seconds)


# ---------------------------------------------------------------------------------------------
# The study of one budget, and what a worker process needs to join it

RUN_CONFIG_ATTR = "run_config"  # study user attr: the RunConfig (JSON) a worker rebuilds from
BUDGET_INDEX_ATTR = "budget_index"  # study user attr: which of the config's budgets it searches
N_TRIALS_ATTR = "n_trials"  # study user attr: the trial count last requested (all workers)


def config_to_json(cfg: RunConfig) -> str:
    """The RunConfig as a worker elsewhere needs it: paths absolute, the storage URL left out (a
    worker is given its own, and credentials never go into the study)."""
    from dynsearch.objectives.io.resolve import DEMO_ALIAS, HUB_ALIASES

    def absolute(p: str | None) -> str | None:
        return None if p is None else str(Path(p).expanduser().resolve())

    model = cfg.model if cfg.model in (DEMO_ALIAS, *HUB_ALIASES) or not Path(cfg.model).exists() \
        else absolute(cfg.model)
    d = asdict(cfg)
    d.update(model=model, calib=absolute(cfg.calib), out=absolute(cfg.out),
             cache=absolute(cfg.cache or str(Path(cfg.out) / "cache")), storage=None,
             search_workers=1, joblib_backend="threading", dask_scheduler=None)  # per process
    return json.dumps(d, sort_keys=True)


def config_from_json(text: str) -> RunConfig:
    try:
        d = json.loads(text)
        tuples = {f for f in ("budgets", "types", "keep")}
        return RunConfig(**{k: tuple(v) if k in tuples else v for k, v in d.items()})
    except (TypeError, ValueError) as e:
        raise DynsearchError(f"the study's stored run configuration is unreadable ({e}); "
                             "was it made by another dynsearch version?") from None


def open_budget_study(prep: Prepared, i: int):
    """Create or resume the study of budget ``i`` and store what a worker needs to join it (the
    run configuration, which budget, the trial count requested)."""
    study = open_study(open_storage(prep.storage_url()), prep.study_name(i), prep.space, prep.settings(i))
    study.set_user_attr(RUN_CONFIG_ATTR, config_to_json(prep.cfg))
    study.set_user_attr(BUDGET_INDEX_ATTR, i)
    study.set_user_attr(N_TRIALS_ATTR, int(prep.cfg.trials))
    return study


def finish_budget(prep: Prepared, i: int, study, result: RunResult, progress: bool = True) -> None:
    """Measure the study's best on held-out tokens; write its recipe (and GGUF); add a report row."""
    from dynsearch.objectives.evaluate import KLEvaluator, QuantizedWeights

    cfg, source, space, budget = prep.cfg, prep.source, prep.space, prep.budgets[i]
    model_path, run_dir, names_all = prep.model_path, prep.run_dir, prep.names
    importance = prep.importance
    search_t = prep.search_tokens
    t0 = time.perf_counter()
    held_out = KLEvaluator(prep.forward, prep.eval_tokens)
    best = best_result(study)
    assignment = {**prep.fixed, **space.assignment(best.choice)}
    assignment = {n: assignment[n] for n in names_all}  # model order
    ho = held_out.stats(QuantizedWeights(source, assignment, importance.get))
    t1 = time.perf_counter()
    tensor_bytes = sum(padded(tensor_nbytes(source.shape(n), t)) for n, t in assignment.items())
    n_params = int(sum(int(np.prod(source.shape(n))) for n in names_all))
    recipe = schema.Recipe(
        name=f"{_slug(model_path.stem)}-{_slug(budget.spec)}",
        model=schema.ModelInfo(str(source.metadata("general.name", model_path.stem) if hasattr(source, "metadata") else model_path.stem),
                               source.config.arch, prep.model_key, n_params),
        tensors=assignment,
        budget={"spec": budget.spec, "bytes": budget.file_bytes, "bpw": budget.bpw},
        achieved={"tensor_bytes": tensor_bytes, "bytes_estimate": tensor_bytes + header_overhead(source),
                  "bpw": round(8.0 * tensor_bytes / n_params, 4)},
        calibration=prep.calib_desc,
        kl={k: float(v) for k, v in ho.to_dict().items() if isinstance(v, (int, float))},
        search={"trials": best.n_complete + best.n_pruned + best.n_failed, "complete": best.n_complete,
                "pruned": best.n_pruned, "failed": best.n_failed, "sampler": cfg.sampler,
                "seed": cfg.seed, "types": list(space.types), "search_tokens": int(search_t.size),
                "proxy": space.proxy_of(best.choice), "search_kl": best.value,
                "knapsack_seed_kl": best.seed_value, "study": study.study_name},
        created=_dt.date.today().isoformat(), dynsearch_version=__version__)
    rpath = schema.save(recipe, run_dir / f"{recipe.name}.yaml")
    result.recipe_paths.append(rpath)
    gpath = None
    if cfg.write_gguf:
        from dynsearch.recipes.apply import ImatrixFile, apply_recipe

        # through the written imatrix file (same vectors), so that the GGUF records it as
        # llama-quantize --imatrix would and `dynsearch apply --imatrix` reproduces it exactly
        imatrix = ImatrixFile.read(result.imatrix_path) if result.imatrix_path else importance
        gpath = apply_recipe(recipe, model_path, run_dir / f"{recipe.name}.gguf",
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
                        "recipe": str(rpath), "gguf": str(gpath) if gpath else None,
                        "seconds": {k: round(v, 3) for k, v in seconds.items()},
                        **({"moe_routing": prep.routing} if prep.routing else {})})


def write_run_imatrix(prep: Prepared) -> Path:
    """The importance vectors the run quantized with, as a GGUF imatrix beside the recipes, so
    that ``dynsearch apply --imatrix`` and ``llama-quantize --imatrix`` (``dynsearch export``)
    reproduce the run's GGUF byte for byte (each entry is the mean, with a count of 1)."""
    from dynsearch.objectives.io.imatrix import ImatrixData, ImatrixEntry, write_imatrix

    entries = {n: ImatrixEntry(np.asarray(v, dtype=np.float32).reshape(1, -1), np.ones(1, dtype=np.int64))
               for n, v in prep.importance.items() if v is not None}
    seq = int(prep.calib_desc["seq_len"])
    return write_imatrix(prep.run_dir / "imatrix.gguf",
                         ImatrixData(entries, [str(prep.calib_desc["description"])],
                                     int(prep.calib_desc["n_tokens"]) // seq, seq))


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]+", "-", s).strip("-")


def _token_sets(model_path: Path, source, cfg: RunConfig):
    """(calibration, fisher, search, held-out) token arrays (n_seq, seq_len) and the calibration's
    description; search tokens are the first calibration sequences, held-out tokens come from the
    disjoint evaluation set."""
    from dynsearch.objectives import calibration as cal
    from dynsearch.objectives.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(model_path) if model_path.is_file() else Tokenizer.from_tokenizer_json(model_path / "tokenizer.json")
    c = cal.load_calibration(tok, source=cfg.calib, n_tokens=cfg.calib_tokens, seq_len=cfg.seq_len, seed=cfg.seed)
    e = cal.load_evaluation(tok, n_tokens=cfg.eval_tokens, seq_len=cfg.seq_len)
    calib = np.asarray(c.tokens)
    n_f = max(1, cfg.fisher_tokens // cfg.seq_len)
    n_s = max(1, cfg.search_tokens // cfg.seq_len)
    desc = {"description": c.description, "sha256": c.content_hash, "n_tokens": int(calib.size),
            "seq_len": cfg.seq_len}
    return calib, calib[:n_f], calib[-n_s:], np.asarray(e.tokens), desc
