"""Everything before the search: tokens, statistics, the profiled search space.

Every costly part is cached in the run folder (or the shared cache), so a second process -- a
``dynsearch worker``, or the same command run again -- prepares quickly from cache hits.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from dynsearch import system
from dynsearch.kernels import effective_type, tensor_nbytes
from dynsearch.kernels.types import GGUF_ALIGNMENT, padded
from dynsearch.objectives import calibration as cal
from dynsearch.objectives.evaluate import KLEvaluator, QuantCache, QuantizedWeights
from dynsearch.objectives.forward import BlockwiseForward
from dynsearch.objectives.io.model import WeightSource
from dynsearch.objectives.io.resolve import open_model, resolve_model
from dynsearch.objectives.stats.collect import collect_statistics
from dynsearch.objectives.stats.moe import is_expert_stack, is_router, routing_table
from dynsearch.objectives.stats.store import TensorStats, importance_of, load_stats
from dynsearch.objectives.tokenizer import Tokenizer
from dynsearch.search.budget import check_reachable
from dynsearch.search.cluster import ProfileBackend
from dynsearch.search.profile import (
    ProfileCache,
    ProfileJob,
    model_fingerprint,
    profile_tensor,
    profile_tensors,
)
from dynsearch.search.run.config import RunConfig
from dynsearch.search.space import DEFAULT_EXPERT_GROUPING, SearchSpace, layer_groups
from dynsearch.search.study import SearchSettings


class RunModel(NamedTuple):
    """The run's model: what the user named, resolved once and opened once."""

    path: Path  # the .gguf file or Hugging Face folder
    source: WeightSource

    @classmethod
    def open(cls, spec: str) -> RunModel:
        path = resolve_model(spec)
        return cls(path, open_model(path))


class TokenSets(NamedTuple):
    """The run's token arrays, each (n_seq, seq_len), and the calibration's description."""

    calib: np.ndarray  # activation statistics
    fisher: np.ndarray  # the Fisher pass: the first calibration sequences
    search: np.ndarray  # true KL during the search: the last calibration sequences
    held_out: np.ndarray  # the final measurement: the disjoint evaluation set
    desc: dict  # description, sha256, n_tokens, seq_len (the recipe's calibration)


def token_sets(model_path: Path, cfg: RunConfig) -> TokenSets:
    tok = (Tokenizer.from_gguf(model_path) if model_path.is_file()
           else Tokenizer.from_tokenizer_json(model_path / "tokenizer.json"))
    c = cal.load_calibration(tok, source=cfg.calib, n_tokens=cfg.calib_tokens, seq_len=cfg.seq_len, seed=cfg.seed)
    e = cal.load_evaluation(tok, n_tokens=cfg.eval_tokens, seq_len=cfg.seq_len)
    calib = np.asarray(c.tokens)
    n_f = max(1, cfg.fisher_tokens // cfg.seq_len)
    n_s = max(1, cfg.search_tokens // cfg.seq_len)
    desc = {"description": c.description, "sha256": c.content_hash, "n_tokens": int(calib.size),
            "seq_len": cfg.seq_len}
    return TokenSets(calib, calib[:n_f], calib[-n_s:], np.asarray(e.tokens), desc)


def header_overhead(source) -> int:
    """Bytes of a GGUF file besides the searched tensors' data: the source's header (metadata,
    tensor infos, padding) plus room for the recipe embedded as metadata."""
    hdr = getattr(source, "header", None)
    header = min((t.offset for t in hdr.tensors.values()), default=0) if hdr is not None else 4 << 20
    return padded(header + 256 * 1024, GGUF_ALIGNMENT)


def fixed_types(source, cfg: RunConfig) -> dict[str, str]:
    """tensor -> type for the tensors not searched: 1-D ones stay F32, MoE routers as stored (as
    llama-quantize keeps them), --keep ones at their type."""
    fixed: dict[str, str] = {}
    for n in source.names():
        if len(source.shape(n)) < 2:
            fixed[n] = "F32"
        elif is_router(n):
            fixed[n] = source.qtype(n).name
        else:
            for rule in cfg.keep:
                if rule.pattern.search(n):
                    fixed[n] = rule.qtype
                    break
    return fixed


def tensor_budgets(source, cfg: RunConfig, searched: list[str], overhead: int) -> list[int]:
    """Bytes of searched tensor data per budget, each checked against the reachable sizes."""
    n_searched = int(sum(int(np.prod(source.shape(n))) for n in searched))
    out = []
    for budget in cfg.budgets:
        tb = (budget.tensor_bytes(n_searched, 0) if budget.bpw is not None
              else budget.tensor_bytes(0, overhead))
        sizes = np.array([[padded(tensor_nbytes(source.shape(n), effective_type(t, source.shape(n)[-1]).name))
                           for t in cfg.types] for n in searched], dtype=np.int64)
        check_reachable(budget, tb, int(sizes.min(axis=1).sum()), int(sizes.max(axis=1).sum()))
        out.append(tb)
    return out


def build_space(source, names: list[str], types: tuple[str, ...], stats: dict[str, TensorStats],
                cache: ProfileCache, backend: ProfileBackend = ProfileBackend(), progress: bool = True,
                job: ProfileJob | None = None, group_experts: str = DEFAULT_EXPERT_GROUPING) -> SearchSpace:
    """Profile every tensor (cache hits read, misses computed on ``backend``: threads here, or
    ``job`` in loky processes or on a Dask cluster) into the search space; ``types``: canonical
    names; ``group_experts``: how MoE expert stacks share search variables (see
    :data:`.space.EXPERT_GROUPINGS`)."""
    types_l = list(types)

    def one(name: str):
        res = profile_tensor(source.load(name), types_l, stats.get(name, TensorStats()), backend.device)
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


@dataclass
class Prepared:
    """Everything a trial needs, rebuilt from a :class:`RunConfig` and its model (and the shared
    cache) alone, so that any process -- ``dynsearch run`` or a ``dynsearch worker`` -- can
    score trials."""

    cfg: RunConfig
    model_path: Path  # the resolved model (.gguf file or Hugging Face folder)
    source: WeightSource  # ... opened
    model_key: str
    run_dir: Path
    names: list[str]  # every tensor, model order
    fixed: dict[str, str]  # tensor -> type for the tensors not searched (1-D, routers, --keep)
    tensor_budgets: list[int]  # bytes of searched tensor data per budget
    calib_desc: dict  # the calibration's description, sha256, n_tokens, seq_len
    stats_path: Path  # the statistics file (activation second moments, Fisher, imatrix)
    search_tokens: np.ndarray  # (n_seq, seq_len) true KL during the search
    eval_tokens: np.ndarray  # (n_seq, seq_len) held-out tokens for the final measurement
    importance: dict  # tensor -> imatrix importance vector (or None)
    space: SearchSpace
    forward: BlockwiseForward
    routing: dict = field(default_factory=dict)  # MoE: tokens routed per expert per layer (report)
    seconds: dict = field(default_factory=dict)  # statistics and profiling wall time (small: read from the cache)
    _evaluator: KLEvaluator | None = None  # on the search tokens, built on first use
    _quant_cache: QuantCache | None = None  # shared by the trials of this process

    def settings(self, i: int) -> SearchSettings:
        c = self.cfg
        return SearchSettings(budget=self.tensor_budgets[i], n_trials=c.trials, timeout=c.timeout,
                              seed=c.seed, sampler=c.sampler)

    def study_name(self, i: int) -> str:
        return self.cfg.study_of(self.model_path, i)

    def storage_url(self) -> str:
        return self.cfg.storage_url(self.model_path)

    def kl_of(self, choice: np.ndarray) -> float:
        """True KL of a candidate on the search tokens."""
        if self._evaluator is None:
            self._evaluator = KLEvaluator(self.forward, self.search_tokens)
            self._quant_cache = QuantCache()
        return self._evaluator.mean_kl(QuantizedWeights(self.source, self.space.assignment(choice),
                                                        self.importance.get, self._quant_cache))


def prepare(cfg: RunConfig, model: RunModel, progress: bool = True) -> Prepared:
    """Tokens, statistics, profiled search space of ``model``: everything before the search.
    Every costly part is read from the cache when present."""
    source = model.source
    torch.manual_seed(cfg.seed)
    run_dir = cfg.run_dir(model.path)
    run_dir.mkdir(parents=True, exist_ok=True)
    model_key = model_fingerprint(model.path)

    fixed = fixed_types(source, cfg)
    names = source.names()
    searched = [n for n in names if n not in fixed]
    fixed_bytes = sum(padded(tensor_nbytes(source.shape(n), t)) for n, t in fixed.items())
    budgets = tensor_budgets(source, cfg, searched, header_overhead(source) + fixed_bytes)  # before any costly work

    tokens = token_sets(model.path, cfg)
    stats_key = hashlib.sha256(f"{model_key}|{tokens.desc['sha256']}|{tokens.calib.shape}|"
                               f"{tokens.fisher.shape}|{cfg.seed}".encode()).hexdigest()[:16]
    forward = BlockwiseForward(source, device=cfg.device, batch_size=4)
    stats_path = cfg.cache_dir() / f"stats-{stats_key}.npz"
    t0 = time.perf_counter()
    stats = load_stats(stats_path)
    if stats is None:
        stats = collect_statistics(forward, tokens.calib, tokens.fisher, cfg.seed, progress, path=stats_path)
    t1 = time.perf_counter()
    cache = ProfileCache(cfg.cache_dir() / "profile", model_key, stats_key)
    job = ProfileJob(str(model.path.resolve()), model_key, str(stats_path.resolve()),
                     str(cache.folder.resolve()), stats_key, cfg.types)
    space = build_space(source, searched, cfg.types, stats, cache, cfg.profile_backend(),
                        progress, job, cfg.group_experts)
    seconds = {"statistics": t1 - t0, "profiling": time.perf_counter() - t1}

    routing = routing_table({n: stats[n].expert_counts for n in searched if is_expert_stack(n) and n in stats})
    return Prepared(cfg=cfg, model_path=model.path, source=source, model_key=model_key, run_dir=run_dir,
                    names=names, fixed=fixed, tensor_budgets=budgets, calib_desc=tokens.desc,
                    stats_path=stats_path,
                    search_tokens=tokens.search, eval_tokens=tokens.held_out, importance=importance_of(stats),
                    space=space, forward=forward, routing=routing, seconds=seconds)
