"""The ``dynsearch`` command line. Each subcommand lives in the module that implements it;
this file only maps arguments to those entry points."""

from __future__ import annotations

import argparse
import sys

from . import __version__


def _cmd_types(args: argparse.Namespace) -> int:
    from .kernels import dequantizable_types, quantizable_types, type_info

    writable = set(quantizable_types())
    print(f"{'type':8} {'block':>5} {'bytes':>5} {'bpw':>6}  {'fallback':8} {'quantize':8}")
    for qt in dequantizable_types():
        info = type_info(qt)
        fb = info.fallback.name if info.fallback else "-"
        print(f"{info.name:8} {info.block_size:>5} {info.type_size:>5} {info.bits_per_weight:>6.3f}  "
              f"{fb:8} {'yes' if qt in writable else 'read-only':8}")
    return 0


def _cmd_bench_kernels(args: argparse.Namespace) -> int:
    from .kernels import bench

    return bench.main(args.bench_args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dynsearch", description="Search-based dynamic GGUF quantization.")
    p.add_argument("--version", action="version", version=f"dynsearch {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("types", help="list the GGUF types dynsearch reads and writes")
    s.set_defaults(func=_cmd_types)
    s = sub.add_parser("bench-kernels", help="kernel throughput vs ggml and gguf-py",
                       add_help=False)
    s.add_argument("bench_args", nargs=argparse.REMAINDER)
    s.set_defaults(func=_cmd_bench_kernels)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
