"""Benchmarks and tools, one entry point: ``python -m dynsearch.bench NAME [options]``.

Each NAME is a module of this package with ``add_arguments(parser)`` and ``main(args) -> int``;
``python -m dynsearch.bench NAME --help`` shows its options and what it prints.
"""

from __future__ import annotations

import argparse
import logging
import sys
from types import ModuleType

from dynsearch.bench import (
    device,
    dither,
    forward,
    kernels,
    llamacpp,
    lossless,
    memory,
    quality,
    scale,
    synthetic,
    tied,
)
from dynsearch.errors import DynsearchError

# name: (module, one line for the list of subcommands)
COMMANDS: dict[str, tuple[ModuleType, str]] = {
    "quality": (quality, "llama.cpp's stock mixes, dynsearch and baselines: KL by llama.cpp and by us, JSON + PNG"),
    "kernels": (kernels, "quantize/dequantize throughput: ours vs ggml (C) vs gguf-py"),
    "forward": (forward, "our forward pass vs llama.cpp's: tokens/s and the KL between them"),
    "device": (device, "the steps of a search timed on CPU and CUDA, results compared"),
    "memory": (memory, "peak memory of a run, and a model 3x larger than a memory cap"),
    "scale": (scale, "a run on K layers of a Llama-3.1-8B or Llama-4-Scout shape: time, memory, full-depth estimate"),
    "lossless": (lossless, "which types re-quantize a model's weights exactly; shares of a type"),
    "synthetic": (synthetic, "write a random-weight GGUF of a given shape (llama, qwen3moe, llama4)"),
    "dither": (dither, "a fair reference model: a quantized GGUF's weights moved off their grid, as F32/BF16"),
    "tied": (tied, "a tied embedding's two roles (lookup, head): proxy terms against true KL"),
    "llamacpp": (llamacpp, "build or locate llama.cpp's tools (llama-quantize, -perplexity, -imatrix)"),
}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m dynsearch.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("-v", "--verbose", action="store_true", help="log each step (tool runs, builds)")
    sub = ap.add_subparsers(dest="name", metavar="NAME", required=True)
    for name, (module, summary) in COMMANDS.items():
        p = sub.add_parser(name, help=summary, description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(main=module.main)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(message)s" if args.verbose else "%(message)s")
    try:
        return args.main(args)
    except DynsearchError as e:
        print(f"{ap.prog}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
