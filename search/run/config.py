"""The configuration of ``dynsearch run``: what the user typed, parsed and checked once.

:meth:`RunConfig.parse` turns the command line's strings into typed values (budgets, candidate
types, compiled ``--keep`` rules) and checks every input before any work, each failure one
clear line. A study stores the configuration as JSON (:meth:`RunConfig.to_json`) so that a
``dynsearch worker`` elsewhere rebuilds it (:meth:`RunConfig.from_json`, then checked the same way).
"""

from __future__ import annotations

import json
import re
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Iterable, NamedTuple

from dynsearch.atomic import check_output_folder
from dynsearch.errors import DynsearchError
from dynsearch.kernels import parse_qtype, quantizable_types
from dynsearch.objectives.forward import check_device
from dynsearch.objectives.io.resolve import DEMO_ALIAS, HUB_ALIASES
from dynsearch.search.budget import Budget, expand_budgets, parse_budget
from dynsearch.search.cluster import ProfileBackend, check_backend
from dynsearch.search.profile import cpu_count
from dynsearch.search.space import DEFAULT_EXPERT_GROUPING

STUDY_DB = "study.db"  # the run folder's default storage (SQLite), when no --storage is given
DEFAULT_TYPES = ("Q2_K", "Q3_K", "IQ4_XS", "Q4_K", "Q5_K", "Q6_K", "Q8_0",
                 "Q4_0", "IQ4_NL", "Q5_0", "Q5_1")


class KeepRule(NamedTuple):
    """``--keep PATTERN=TYPE``: tensors whose name matches ``pattern`` are held at ``qtype``."""

    pattern: re.Pattern
    qtype: str  # canonical type name

    def __str__(self) -> str:
        return f"{self.pattern.pattern}={self.qtype}"


@dataclass(frozen=True)
class RunConfig:
    model: str  # .gguf file, Hugging Face folder or alias
    budgets: tuple[Budget, ...]  # one, or several for a Pareto family
    types: tuple[str, ...] = DEFAULT_TYPES  # candidate types, canonical names
    keep: tuple[KeepRule, ...] = ()  # tensors held at a fixed type
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
    workers: int = field(default_factory=cpu_count)  # profiling threads: every core this process may use
    search_workers: int = 1  # processes searching each budget's study together (this one included)
    out: str = "runs"
    device: str = "cpu"
    write_gguf: bool = True
    cache: str | None = None  # profile cache folder; None: <out>/cache
    joblib_backend: str = "threading"  # where profiling runs: threading, loky (processes), dask
    dask_scheduler: str | None = None  # Dask scheduler address; None: $DYNSEARCH_DASK_SCHEDULER
    group_experts: str = DEFAULT_EXPERT_GROUPING  # MoE expert stacks' search variables: kind, layer, none

    @classmethod
    def parse(cls, model: str, budgets: Iterable[str], types: Iterable[str] = DEFAULT_TYPES,
              keep: Iterable[str] = (), **options) -> RunConfig:
        """The configuration of what a user typed (budget ranges expanded, repeats once), every
        input checked before any work (:func:`check`)."""
        specs = expand_budgets(budgets)
        if not specs:
            raise DynsearchError("no --budget given (e.g. --budget 100MB or --budget 4.5bpw)")
        parsed = tuple(dict.fromkeys(parse_budget(b) for b in specs))
        rules = parse_keep(keep)
        return check(cls(model=model, budgets=parsed, types=parse_types(types), keep=rules, **options))

    def to_json(self) -> str:
        """The configuration as a worker elsewhere needs it: paths absolute, the storage URL left
        out (a worker is given its own, and credentials never go into the study)."""
        model = self.model if self.model in (DEMO_ALIAS, *HUB_ALIASES) or not Path(self.model).exists() \
            else _absolute(self.model)
        d = asdict(replace(self, budgets=(), keep=()))
        d.update(budgets=[asdict(b) for b in self.budgets], keep=[str(k) for k in self.keep],
                 model=model, calib=_absolute(self.calib), out=_absolute(self.out),
                 cache=_absolute(self.cache or str(Path(self.out) / "cache")), storage=None,
                 search_workers=1, joblib_backend="threading", dask_scheduler=None)  # per process
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, **local) -> RunConfig:
        """The configuration a study stores, with this process's ``local`` options (storage,
        timeout, backend, ...); a process that runs it checks it first (:func:`check`: the
        calibration file, say, must be readable there), one that only reads it need not."""
        try:
            d = json.loads(text)
            d.update(budgets=tuple(Budget(**b) for b in d["budgets"]), types=parse_types(d["types"]),
                     keep=parse_keep(d["keep"]), **local)
            return cls(**d)
        except (TypeError, ValueError, KeyError) as e:
            raise DynsearchError(f"the study's stored run configuration is unreadable ({e}); "
                                 "was it made by another dynsearch version?") from None

    def profile_backend(self) -> ProfileBackend:
        return ProfileBackend(self.joblib_backend, self.workers, self.dask_scheduler, device=self.device)

    def run_dir(self, model_path: Path) -> Path:
        """The run's folder: recipes, GGUFs, report, imatrix, the default SQLite study."""
        return Path(self.out) / model_path.stem

    def cache_dir(self) -> Path:
        return Path(self.cache) if self.cache else Path(self.out) / "cache"

    def storage_url(self, model_path: Path) -> str:
        return self.storage or f"sqlite:///{(self.run_dir(model_path) / STUDY_DB).resolve()}"

    def study_of(self, model_path: Path, i: int) -> str:
        """The name of budget ``i``'s study."""
        name = self.study_name or f"{model_path.stem}-{self.budgets[i].spec}"
        return name if len(self.budgets) == 1 else f"{name}-{self.budgets[i].spec}"


def default(name: str):
    """A :class:`RunConfig` field's default (the command line's defaults come from here)."""
    f = next(f for f in fields(RunConfig) if f.name == name)
    return f.default_factory() if f.default is MISSING else f.default


def _absolute(p: str | None) -> str | None:
    return None if p is None else str(Path(p).expanduser().resolve())


def parse_keep(items: Iterable[str]) -> tuple[KeepRule, ...]:
    out = []
    for item in items:
        if "=" not in item:
            raise DynsearchError(f"--keep {item!r}: expected PATTERN=TYPE, e.g. 'token_embd=Q8_0'")
        pat, t = item.rsplit("=", 1)
        try:
            out.append(KeepRule(re.compile(pat), parse_qtype(t).name))
        except re.error as e:
            raise DynsearchError(f"--keep {item!r}: bad pattern ({e})") from None
        except ValueError as e:
            raise DynsearchError(f"--keep {item!r}: {e}") from None
    return tuple(out)


def parse_types(types: Iterable[str]) -> tuple[str, ...]:
    """Candidate types as canonical names: known, written by our kernels, each listed once."""
    types = tuple(types)
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


def check(cfg: RunConfig) -> RunConfig:
    """The options besides budgets, types and --keep (which parsing checked): counts, timeout, the
    calibration file, the output folder, the profiling backend; each failure one line."""
    for name in _POSITIVE:
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise DynsearchError(f"--{name.replace('_', '-')} must be a positive whole number, got {v!r}")
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or not 0 <= cfg.seed < 2**32:
        raise DynsearchError(f"--seed must be a whole number from 0 to {2**32 - 1}, got {cfg.seed!r}")
    check_device(cfg.device)
    if cfg.timeout is not None and not cfg.timeout > 0:
        raise DynsearchError(f"--timeout must be a positive number of seconds, got {cfg.timeout!r}")
    if cfg.calib is not None and not Path(cfg.calib).is_file():
        raise DynsearchError(f"--calib {cfg.calib}: no such file")
    check_output_folder(cfg.out, "--out")
    if cfg.cache is not None:
        check_output_folder(cfg.cache, "--cache")
    check_backend(cfg.profile_backend())
    return cfg
