"""Benchmarks: ``python -m dynsearch.bench quality [MODEL]`` (llama.cpp's stock mixes vs the
full-precision model, measured by llama-perplexity and by our forward side by side; with
``--with-dynsearch`` dynsearch at each mix's size, ``--sweep N`` sizes between them, and
``--baselines uniform,knapsack,random``; see :mod:`dynsearch.bench.quality`)."""

from __future__ import annotations

import argparse
import logging
import sys

from dynsearch.errors import DynsearchError


def main(argv: list[str] | None = None) -> int:
    from dynsearch.bench import quality as bench_quality

    ap = argparse.ArgumentParser(prog="python -m dynsearch.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("-v", "--verbose", action="store_true", help="log each tool run")
    sub = ap.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("quality", help="stock mixes: llama.cpp's KL and ours side by side, JSON + Pareto PNG")
    bench_quality.add_arguments(q)
    q.set_defaults(func=bench_quality.main)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return args.func(args)
    except DynsearchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
