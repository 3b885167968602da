"""Which types re-quantize the demo model's weights (almost) exactly: for every 2-D weight matrix
of MODEL (the F32 copy of a quantized GGUF), the first ROWS rows quantized with the run's
imatrix to each TYPE and back; prints how many come back bit-exact and the worst relative error.

    python -m dynsearch.bench lossless MODEL.gguf IMATRIX.gguf [--types Q5_1,Q8_0] [--rows 64]
    python -m dynsearch.bench lossless --share Q5_1 FILE.gguf ...   # share of weights in a type

(docs/results.md: Q5_1 with the imatrix reproduces the demo's Q4_1 grid).
"""

from __future__ import annotations

import argparse

import numpy as np

from dynsearch.errors import BenchError
from dynsearch.kernels import dequantize, effective_type, quantize
from dynsearch.objectives.io.gguf_header import GGUFHeader
from dynsearch.objectives.io.gguf_source import GGUFSource
from dynsearch.recipes.apply import ImatrixFile


def share(qtype: str, paths: list[str]) -> None:
    for p in paths:
        tensors = GGUFHeader(p).tensors.values()
        total = sum(int(np.prod(t.shape)) for t in tensors)
        part = sum(int(np.prod(t.shape)) for t in tensors if t.qtype.name == qtype)
        print(f"{p}: {100 * part / total:.0f}% of the weights in {qtype}")


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("model", nargs="?")
    ap.add_argument("imatrix", nargs="?")
    ap.add_argument("--share", metavar="TYPE", help="print each file's share of weights in TYPE")
    ap.add_argument("files", nargs="*", help="GGUF files for --share")
    ap.add_argument("--types", default="Q5_1,Q8_0")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--no-imatrix", action="store_true")


def main(args: argparse.Namespace) -> int:
    if args.share:
        share(args.share, [f for f in (args.model, args.imatrix, *args.files) if f])
        return 0
    if not (args.model and args.imatrix):
        raise BenchError("give MODEL and IMATRIX (or --share TYPE FILE...)")
    src, imat = GGUFSource(args.model), ImatrixFile.read(args.imatrix)
    names = [n for n in src.names() if len(src.shape(n)) == 2 and n.endswith(".weight")
             and not n.startswith("token_embd")]
    for t in args.types.split(","):
        exact, worst = 0, (0.0, "")
        for n in names:
            w = np.ascontiguousarray(src.load(n)[: args.rows], dtype=np.float32)
            eff = effective_type(t, w.shape[1]).name
            imp = None if args.no_imatrix else imat.get(n)
            dq = dequantize(quantize(w, eff, imp), eff, w.shape[1])
            rel = float(np.linalg.norm(dq - w) / max(np.linalg.norm(w), 1e-30))
            exact += rel == 0.0
            worst = max(worst, (rel, n))
        print(f"{t}{'' if args.no_imatrix else ' with the imatrix'}: {exact} of {len(names)} matrices "
              f"exact on their first {args.rows} rows; worst relative error {worst[0]:.2e} ({worst[1]})")
    return 0
