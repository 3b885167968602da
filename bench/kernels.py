"""Kernel throughput benchmark: ours (1 thread, all cores) vs ggml C (1 thread) vs gguf-py numpy.

    python -m dynsearch.bench kernels [--rows 256] [--cols 4096] [--types Q4_K,Q6_K] [--markdown]

Prints MB of float32 per second per type and the ratios ours(1 thread)/ggml and
ours(1 thread)/gguf-py, all measured in the same run on the same rows. Not a test: machines are
shared and noisy, so each figure is the best of several repetitions.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import gguf
import numba
import numpy as np

from dynsearch.bench import ggml_oracle
from dynsearch.kernels import dequantize, quantizable_types, quantize, type_info
from dynsearch.kernels.types import QT, parse_qtype


def _best_time(fn, repeat: int, min_time: float = 0.2) -> float:
    fn()  # warm-up (compiles numba on first use)
    best = float("inf")
    spent = 0.0
    for i in range(100):
        t = time.perf_counter()
        fn()
        dt = time.perf_counter() - t
        best = min(best, dt)
        spent += dt
        if i + 1 >= repeat and spent >= min_time:
            break
    return best


@dataclass
class Row:
    qtype: str
    q_ours1: float = float("nan")
    q_oursN: float = float("nan")
    q_ggml: float = float("nan")
    q_gguf: float = float("nan")
    qi_ours1: float = float("nan")
    qi_ggml: float = float("nan")
    dq_ours1: float = float("nan")
    dq_oursN: float = float("nan")
    dq_gguf: float = float("nan")

    def ratios(self) -> tuple[float, float, float]:
        return (self.q_ours1 / self.q_ggml, self.qi_ours1 / self.qi_ggml, self.dq_ours1 / self.dq_gguf)


def _with_threads(n: int, fn):
    old = numba.get_num_threads()
    numba.set_num_threads(n)
    try:
        return fn()
    finally:
        numba.set_num_threads(old)


def bench_type(qt: QT, x: np.ndarray, qw: np.ndarray, oracle, repeat: int) -> Row:
    mb = x.nbytes / 1e6
    n = x.shape[1]
    row = Row(qt.name)
    needs_qw = type_info(qt).requires_imatrix
    plain_qw = qw if needs_qw else None
    row.q_ours1 = mb / _with_threads(1, lambda: _best_time(lambda: quantize(x, qt, plain_qw), repeat))
    row.q_oursN = mb / _best_time(lambda: quantize(x, qt, plain_qw), repeat)
    row.qi_ours1 = mb / _with_threads(1, lambda: _best_time(lambda: quantize(x, qt, qw), repeat))
    data = quantize(x, qt, qw)
    row.dq_ours1 = mb / _with_threads(1, lambda: _best_time(lambda: dequantize(data, qt, n), repeat))
    row.dq_oursN = mb / _best_time(lambda: dequantize(data, qt, n), repeat)
    row.dq_gguf = mb / _best_time(lambda: gguf.quants.dequantize(data, qt), repeat)
    try:
        row.q_gguf = mb / _best_time(lambda: gguf.quants.quantize(x, qt), repeat)
    except NotImplementedError:
        pass
    if oracle is not None:
        row.q_ggml = mb / _best_time(lambda: oracle.quantize(x, qt, plain_qw), repeat)
        row.qi_ggml = mb / _best_time(lambda: oracle.quantize(x, qt, qw), repeat)
    return row


def _fmt(v: float, ratio: bool = False) -> str:
    if v != v:  # NaN: not available
        return "-"
    return f"{v:.2f}x" if ratio else (f"{v:.0f}" if v >= 100 else f"{v:.1f}")


HEADER = ("type", "q 1t", f"q {numba.config.NUMBA_NUM_THREADS}t", "q ggml", "q gguf-py", "q/ggml",
          "qi 1t", "qi ggml", "qi/ggml", "dq 1t", f"dq {numba.config.NUMBA_NUM_THREADS}t",
          "dq gguf-py", "dq/gguf-py")


def format_table(rows: list[Row], markdown: bool) -> str:
    body = []
    for r in rows:
        q, qi, dq = r.ratios()
        body.append((r.qtype, _fmt(r.q_ours1), _fmt(r.q_oursN), _fmt(r.q_ggml), _fmt(r.q_gguf),
                     _fmt(q, True), _fmt(r.qi_ours1), _fmt(r.qi_ggml), _fmt(qi, True),
                     _fmt(r.dq_ours1), _fmt(r.dq_oursN), _fmt(r.dq_gguf), _fmt(dq, True)))
    if markdown:
        lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
        lines += ["| " + " | ".join(b) + " |" for b in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(HEADER)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join([fmt.format(*HEADER)] + [fmt.format(*b) for b in body])


def _type_list(text: str) -> list[QT]:
    try:
        return [parse_qtype(t) for t in text.split(",") if t.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rows", type=int, default=256, help="rows per measurement (default 256)")
    p.add_argument("--cols", type=int, default=4096, help="row width (default 4096)")
    p.add_argument("--types", type=_type_list, default=[], help="comma-separated types (default: all quantizable)")
    p.add_argument("--repeat", type=int, default=3, help="repetitions; the best is kept")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")


def main(args: argparse.Namespace) -> int:
    types = args.types or [t for t in quantizable_types() if t != QT.F32]
    rng = np.random.default_rng(0)
    x = (rng.standard_t(4.0, (args.rows, args.cols)) * 0.02).astype(np.float32)
    qw = rng.lognormal(0.0, 1.5, args.cols).astype(np.float32)
    oracle = ggml_oracle.load()
    print(f"MB/s of float32 input, {args.rows} x {args.cols} rows; 1t = one thread, "
          f"{numba.config.NUMBA_NUM_THREADS}t = all cores; q = quantize without imatrix, "
          "qi = with imatrix, dq = dequantize; ratios use our 1-thread figure.")
    if oracle is None:
        print(f"(ggml columns empty: {ggml_oracle.missing_reason()})")
    rows = []
    for qt in types:
        rows.append(bench_type(qt, x, qw, oracle, args.repeat))
        print(f"  measured {qt.name}", flush=True)
    print(format_table(rows, args.markdown))
    return 0
