"""The plain-text summary ``dynsearch run`` prints at the end."""

from __future__ import annotations

from dynsearch.objectives.io.resolve import DEMO_ALIAS
from dynsearch.search.budget import format_bytes
from dynsearch.search.run.config import RunConfig
from dynsearch.search.run.pipeline import RunResult


def print_summary(cfg: RunConfig, result: RunResult) -> None:
    print()
    print(f"{'budget':>10} {'size':>11} {'bpw':>6} {'proxy':>9} {'seed KL':>9} {'search KL':>10} "
          f"{'Optuna':>7} {'held-out KL':>12} {'99% KLD':>8}")
    for r in result.rows:
        size = r["file_bytes"] or r["tensor_bytes"]
        seed = "-" if r["seed_kl"] is None else f"{r['seed_kl']:.5f}"
        gain = "-" if not r["seed_kl"] else f"{100 * (r['search_kl'] / r['seed_kl'] - 1):+.1f}%"
        print(f"{r['budget']:>10} {format_bytes(size):>11} {r['bpw']:>6.3f} {r['proxy']:>9.4g} "
              f"{seed:>9} {r['search_kl']:>10.5f} {gain:>7} {r['heldout_mean_kl']:>12.5f} "
              f"{r['heldout'].get('kld_p99', float('nan')):>8.4f}")
        hist = ", ".join(f"{t} x{n}" for t, n in r["types"].items())
        print(f"{'':>10} types: {hist}")
        if r.get("unused_bytes"):
            print(f"{'':>10} unused: {format_bytes(r['unused_bytes'])} of the budget; {r['unused_reason']}")
    if cfg.model == DEMO_ALIAS and "Q4_1" not in cfg.types:
        print("note: Q4_1 is not a candidate type: the demo model's weights are dequantized Q4_1, so "
              "re-quantizing to it is lossless and would make comparisons meaningless")
    print("seed KL: true KL of the proxy's knapsack optimum; search KL: the best trial's (Optuna "
          "column: its change); both on calibration tokens. held-out: the disjoint evaluation set.")
    print()
    for p in result.recipe_paths:
        print(f"recipe: {p}")
    for p in result.gguf_paths:
        print(f"gguf:   {p}")
    if result.imatrix_path:
        print(f"imatrix: {result.imatrix_path}")
    if result.report_path:
        print(f"report: {result.report_path}")
