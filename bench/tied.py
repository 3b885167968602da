"""``python -m dynsearch.bench tied MODEL``: does the proxy weigh a tied embedding's two roles as
true KL does?

A tied ``token_embd`` is both the input lookup and the output head. The proxy prices its
quantization error as the sum of two terms (:mod:`dynsearch.search.profile`): the head's
second-order term (output Fisher x the final hidden states' second moment) and the lookup's
(token frequency x the Fisher of the residual stream a looked-up row feeds). For each type this
measures, on the run's search tokens:

- the true KL with the quantized table as head only (the lookup keeps the reference rows), as
  lookup only (the head keeps the reference), and in both roles, as the written file has it;
- each against its proxy term: the ratio true KL / proxy;
- the same ratio for the rest of the model at that type (every other searched tensor quantized,
  the embedding kept): the scale the knapsack trades the embedding's bytes against.

Equal ratios mean the proxy prices the two roles and the rest alike when each is quantized
alone at one type; the budget's mixed assignments can still differ (on the dithered demo the
rest's ratio is 0.44-0.84 and the embedding's about 1, yet the search's embedding moves at the
stock sizes confirmed the proxy's split: docs/results.md).
Statistics and profiles are ``dynsearch run``'s, cached in ``--out`` (the same folder as a run
on the same model and calibration reuses them).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from dynsearch.atomic import atomic_write_text
from dynsearch.errors import BenchError
from dynsearch.objectives.evaluate import KLEvaluator, QuantCache, QuantizedWeights
from dynsearch.objectives.stats.store import load_stats
from dynsearch.search.profile import quant_error
from dynsearch.search.run.config import RunConfig, default, parse_types
from dynsearch.search.run.prepare import Prepared, RunModel, fixed_types, prepare

EMBD = "token_embd.weight"
TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")


@dataclass(frozen=True)
class RoleRow:
    qtype: str
    written: str  # the type written (llama.cpp's fallback where the rows do not fit qtype's blocks)
    nbytes: int  # the embedding's bytes at this type
    proxy_head: float  # the proxy's head term
    proxy_lookup: float  # the proxy's lookup term
    kl_head: float  # true KL, the table quantized as head only
    kl_lookup: float  # ... as lookup only
    kl_both: float  # ... in both roles (the written file)
    proxy_rest: float  # the proxy of every other searched tensor at this type
    kl_rest: float  # true KL of those, the embedding kept

    @property
    def ratio_head(self) -> float:
        return self.kl_head / self.proxy_head

    @property
    def ratio_lookup(self) -> float:
        return self.kl_lookup / self.proxy_lookup

    @property
    def ratio_both(self) -> float:
        return self.kl_both / (self.proxy_head + self.proxy_lookup)

    @property
    def ratio_rest(self) -> float:
        return self.kl_rest / self.proxy_rest


def check_inputs(model_name: str, names, searched, types: tuple[str, ...], candidates: tuple[str, ...]) -> None:
    """One :class:`BenchError` line unless the model's embedding is tied and searched (``names``:
    every tensor; ``searched``: those the run searches) and every type is a candidate."""
    if EMBD not in searched:
        raise BenchError(f"{model_name}: {EMBD} is not searched (kept by --keep?)")
    if "output.weight" in names:
        raise BenchError(f"{model_name} has its own output.weight: its embedding is not tied")
    missing = [t for t in types if t not in candidates]
    if missing:
        raise BenchError(f"type(s) {', '.join(missing)} are not among the run's candidates {', '.join(candidates)}")


def role_rows(prep: Prepared, types: tuple[str, ...], progress: bool = True) -> list[RoleRow]:
    """One :class:`RoleRow` per type of ``types`` (each a candidate of the run)."""
    space, source = prep.space, prep.source
    check_inputs(prep.model_path.name, prep.names, space.names, types, space.types)
    e = space.names.index(EMBD)
    st = load_stats(prep.stats_path)[EMBD]
    head_stats = replace(st, row_weight=None, fisher_col=None)
    lookup_stats = replace(st, xtx=None, fisher_out=None)
    w = source.load(EMBD)
    ev = KLEvaluator(prep.forward, prep.search_tokens)
    cache = QuantCache()
    rows = []
    for qtype in types:
        t0 = time.perf_counter()
        j = space.types.index(qtype)
        written = space.written[e][j]
        dq = QuantizedWeights(source, {EMBD: written}, prep.importance.get, cache)[EMBD]
        ph, pl = quant_error(w, dq, head_stats), quant_error(w, dq, lookup_stats)
        if not np.isclose(ph + pl, space.errors[e, j], rtol=1e-6, atol=0.0):
            raise BenchError(f"{EMBD} at {qtype}: the proxy's two terms {ph:.6g} + {pl:.6g} do not add up to "
                             f"the profiled error {space.errors[e, j]:.6g} (stale profile cache?)")
        ours = {EMBD: dq}
        kl_head = ev.mean_kl({}, head_overrides=ours)
        kl_lookup = ev.mean_kl(ours, head_overrides={})
        kl_both = ev.mean_kl(ours)
        others = [i for i in range(len(space.names)) if i != e and np.isfinite(space.errors[i, j])]
        rest = {space.names[i]: space.written[i][j] for i in others}
        proxy_rest = float(space.errors[others, j].sum())
        kl_rest = ev.mean_kl(QuantizedWeights(source, rest, prep.importance.get, cache))
        rows.append(RoleRow(qtype, written, int(space.sizes[e, j]), ph, pl, kl_head, kl_lookup, kl_both, proxy_rest, kl_rest))
        if progress:
            print(f"  {qtype}: {time.perf_counter() - t0:.1f} s", flush=True)
    return rows


def format_rows(rows: list[RoleRow]) -> str:
    head = (f"{'type':<12} {'MB':>6} {'proxy head':>11} {'proxy lookup':>12} {'KL head':>9} {'KL lookup':>10} "
            f"{'KL both':>9} {'KL/proxy: head':>15} {'lookup':>8} {'both':>8} {'rest':>8}")
    lines = [head]
    for r in rows:
        qtype = r.qtype if r.written == r.qtype else f"{r.qtype}->{r.written}"
        lines.append(f"{qtype:<12} {r.nbytes / 1e6:>6.2f} {r.proxy_head:>11.4g} {r.proxy_lookup:>12.4g} "
                     f"{r.kl_head:>9.4g} {r.kl_lookup:>10.4g} {r.kl_both:>9.4g} {r.ratio_head:>15.3f} "
                     f"{r.ratio_lookup:>8.3f} {r.ratio_both:>8.3f} {r.ratio_rest:>8.3f}")
    rel = np.array([[r.ratio_head / r.ratio_rest, r.ratio_lookup / r.ratio_rest, r.ratio_both / r.ratio_rest]
                    for r in rows])
    lines.append("relative to the rest of the model's KL/proxy (1 = priced as the rest is): "
                 f"head {np.exp(np.log(rel[:, 0]).mean()):.2f}x, lookup {np.exp(np.log(rel[:, 1]).mean()):.2f}x, "
                 f"both {np.exp(np.log(rel[:, 2]).mean()):.2f}x (geometric means over the types)")
    return "\n".join(lines)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("model", help="GGUF file or alias with a tied embedding (e.g. a dithered demo)")
    ap.add_argument("--types", default=",".join(TYPES), help="comma-separated types (default: %(default)s)")
    ap.add_argument("--out", default="runs/tied", help="the run folder: statistics and profiles cached there")
    ap.add_argument("--search-tokens", type=int, default=default("search_tokens"),
                    help="tokens the KL is measured on (default: %(default)s, as dynsearch run)")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")


def main(args: argparse.Namespace) -> int:
    types = parse_types(t.strip() for t in args.types.split(",") if t.strip())
    rc = RunConfig.parse(args.model, ["8bpw"], search_tokens=args.search_tokens, out=args.out)
    model = RunModel.open(rc.model)
    names = model.source.names()
    fixed = fixed_types(model.source, rc)
    check_inputs(model.path.name, names, [n for n in names if n not in fixed], types, rc.types)  # before any costly work
    prep = prepare(rc, model)
    rows = role_rows(prep, types)
    print(f"{prep.model_path.name}: {EMBD}'s two roles, true KL on {prep.search_tokens.size} search tokens")
    print(format_rows(rows))
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(
            [{**asdict(r), "ratio_head": r.ratio_head, "ratio_lookup": r.ratio_lookup,
              "ratio_both": r.ratio_both, "ratio_rest": r.ratio_rest} for r in rows], indent=1))
    return 0
