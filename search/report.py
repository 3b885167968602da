"""The plain-text summary ``dynsearch run`` prints at the end."""

from __future__ import annotations

from .budget import format_bytes
from .models import DEMO_ALIAS


def print_summary(cfg, result) -> None:
    print()
    print(f"{'budget':>10} {'size':>11} {'bpw':>6} {'proxy':>9} {'search KL':>10} {'seed KL':>9} "
          f"{'held-out KL':>12}")
    for r in result.rows:
        size = r["file_bytes"] or r["tensor_bytes"]
        seed = "-" if r["seed_kl"] is None else f"{r['seed_kl']:.5f}"
        print(f"{r['budget']:>10} {format_bytes(size):>11} {r['bpw']:>6.3f} {r['proxy']:>9.4g} "
              f"{r['search_kl']:>10.5f} {seed:>9} {r['heldout_mean_kl']:>12.5f}")
        hist = ", ".join(f"{t} x{n}" for t, n in r["types"].items())
        print(f"{'':>10} types: {hist}")
    if cfg.model == DEMO_ALIAS and "Q4_1" not in [t.upper() for t in cfg.types]:
        print("note: Q4_1 is not a candidate type: the demo model's weights are dequantized Q4_1, so "
              "re-quantizing to it is lossless and would make comparisons meaningless")
    print()
    for p in result.recipe_paths:
        print(f"recipe: {p}")
    for p in result.gguf_paths:
        print(f"gguf:   {p}")
    if result.report_path:
        print(f"report: {result.report_path}")
