"""Rehearsal at real scale: a random-weight model with a real model's shape, ``dynsearch run`` on
K of its layers, measured against the cost estimate, and the estimate for the full depth::

    python -m dynsearch.bench scale --shape llama3-8b --layers 4 --device cuda
    python -m dynsearch.bench scale --shape llama4-scout --layers 2 --device cuda --budget 16GB
    python -m dynsearch.bench scale --shape llama3-8b --layers 1 --shrink 16 --vocab 2048 \\
        --tokens 512 --trials 2                  # a tiny CPU rehearsal (CI)

The model (BF16, the demo model's tokenizer, :mod:`dynsearch.bench.synthetic`) is written in one
child process and run in another, so that the peak RSS is the run's alone. The run is
``dynsearch run``'s own path (configuration, estimate, run), with the
default settings unless ``--tokens`` / ``--trials`` / ``--types`` say otherwise. Printed: per
phase the measured time beside the estimate (and their ratio), the peak RSS beside the
estimate's peak, the peak GPU memory (CUDA), and the estimate for the full depth (the shapes of
the K layers repeated; the block pace and throughput measured on this run).
"""

from __future__ import annotations

import argparse
import multiprocessing
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import gguf
import torch

from dynsearch.bench.memory import PeakRSS
from dynsearch.bench.synthetic import Shape, write_synthetic_model
from dynsearch.errors import DynsearchError
from dynsearch.kernels import QT, effective_type
from dynsearch.objectives.io.gguf_header import GGUFHeader
from dynsearch.objectives.io.model import ModelConfig
from dynsearch.objectives.io.resolve import resolve_model
from dynsearch.search.run.config import RunConfig, default
from dynsearch.search.run.cost import (
    CostEstimate,
    estimate,
    format_seconds,
    measure_block_pace,
    phase_seconds,
    throughput,
)
from dynsearch.search.run.pipeline import run
from dynsearch.search.run.prepare import RunModel

# The real shapes, as llama.cpp's converter writes them (tensor names, stacked experts)
SHAPES = {
    # Llama-3.1-8B: 32 x 4096, ff 14336, 32 query / 8 key-value heads, vocab 128256, untied
    "llama3-8b": Shape(n_layer=32, n_embd=4096, n_ff=14336, n_head=32, n_head_kv=8, n_vocab=128256, tied=False),
    # Llama-4-Scout-17B-16E: 48 x 5120, 40 / 8 heads, every layer routed (interleave step 1) to 1 of
    # 16 experts of width 8192 plus a shared expert, vocab 202048, untied
    "llama4-scout": Shape(n_layer=48, n_embd=5120, n_ff=16384, n_head=40, n_head_kv=8, n_vocab=202048,
                          tied=False, arch="llama4", n_expert=16, n_expert_used=1, n_ff_exp=8192, moe_step=1),
}


def bench_shape(name: str, layers: int | None = None, shrink: int = 1, vocab: int | None = None) -> Shape:
    """The shape ``name`` with ``layers`` of its blocks, widths and head counts divided by
    ``shrink`` (head width kept), and ``vocab`` tokens: a smaller rehearsal of the same layout."""
    full = SHAPES[name]
    if shrink < 1 or full.n_head % shrink or full.n_head_kv % shrink:
        raise DynsearchError(f"--shrink {shrink}: must divide the {full.n_head} query and "
                             f"{full.n_head_kv} key-value heads of {name}")
    if layers is not None and not 1 <= layers <= full.n_layer:
        raise DynsearchError(f"--layers {layers}: {name} has 1 to {full.n_layer} layers")
    return replace(full, n_layer=layers or full.n_layer, n_embd=full.n_embd // shrink,
                   n_ff=full.n_ff // shrink, n_head=full.n_head // shrink, n_head_kv=full.n_head_kv // shrink,
                   n_ff_exp=full.n_ff_exp // shrink, n_vocab=vocab or full.n_vocab)


class Deeper:
    """``source``'s config, names and shapes with its blocks repeated to ``n_layer`` (block ``il``
    shaped as block ``il % K``): what the estimate reads of a model, never its weights."""

    def __init__(self, source, n_layer: int):
        k = source.config.n_layer

        def cycle(t: tuple) -> tuple:
            return tuple(t[il % k] for il in range(n_layer)) if t else ()

        c: ModelConfig = source.config
        self.config = replace(c, n_layer=n_layer, swa_layers=cycle(c.swa_layers), nope_layers=cycle(c.nope_layers))
        self._shapes = {}
        for name in source.names():
            if not name.startswith("blk."):
                self._shapes[name] = source.shape(name)
        for il in range(n_layer):
            prefix = f"blk.{il % k}."
            for name in source.names():
                if name.startswith(prefix):
                    self._shapes[f"blk.{il}.{name[len(prefix):]}"] = source.shape(name)

    def names(self) -> list[str]:
        return list(self._shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]


def full_depth_estimate(source, cfg: RunConfig, n_layer: int) -> CostEstimate:
    """The estimate of the run at ``n_layer`` blocks, from this machine's throughput and the pace
    of the heaviest block of ``source`` (its blocks are the full model's)."""
    deep = Deeper(source, n_layer)
    names = [n for n in deep.names() if len(deep.shape(n)) >= 2]
    tp = throughput({(effective_type(t, deep.shape(n)[-1]).name, deep.shape(n)[-1]) for n in names
                     for t in cfg.types}, device=cfg.device)
    pace = measure_block_pace(source, cfg.seq_len, tp.flops, cfg.device)
    return estimate(deep, cfg, tp, pace)


def padded_tokenizer(dst: Path, src: Path, n_vocab: int) -> Path:
    """A GGUF without tensors holding ``src``'s tokenizer, its vocabulary padded to ``n_vocab``
    with unused tokens (as Llama 3's 256 reserved ones): the demo's tokenizer for a model of a
    larger vocabulary (a model's vocabulary must match its embedding's rows)."""
    header = GGUFHeader(src)
    n_tokens = len(header.get("tokenizer.ggml.tokens"))
    if n_vocab < n_tokens:
        raise DynsearchError(f"--vocab {n_vocab}: at least the demo tokenizer's {n_tokens} tokens")
    pad = n_vocab - n_tokens
    extra = {"tokenizer.ggml.tokens": [f"<|reserved_{i}|>" for i in range(pad)],
             "tokenizer.ggml.token_type": [int(gguf.TokenType.UNUSED)] * pad, "tokenizer.ggml.scores": [0.0] * pad}
    writer = gguf.GGUFWriter(dst, "llama")
    for key, f in header.fields.items():
        if key.startswith("tokenizer."):
            value = list(f.value) + extra[key] if key in extra else f.value
            writer.add_key_value(key, value, f.vtype, sub_type=f.sub_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return dst


def _gb(x: float | None) -> str:
    return "-" if x is None else f"{x / 1e9:.2f} GB"


def report(seconds: dict[str, float], est: CostEstimate, full: CostEstimate, n_layer: int, k: int,
           peak_rss: int, peak_gpu: int | None) -> str:
    """Per phase: measured, estimate, ratio, and the full depth's estimate; then memory."""
    taken, guess, deep = phase_seconds(seconds), est.phases(), full.phases()
    rows = [f"{'phase':12}{'measured':>12}{'estimate':>12}{'ratio':>8}   full depth ({n_layer} layers)"]
    for k_, v in [*taken.items(), ("total", sum(taken.values()))]:
        g = est.total_s if k_ == "total" else guess[k_]
        d = full.total_s if k_ == "total" else deep[k_]
        ratio = f"{v / g:.2f}" if g > 0 else "-"
        rows.append(f"{k_:12}{format_seconds(v):>12}{format_seconds(g):>12}{ratio:>8}   {format_seconds(d)}")
    rows.append(f"peak RSS {_gb(peak_rss)} (estimate {_gb(est.peak_bytes)}, full depth {_gb(full.peak_bytes)}); "
                f"peak GPU memory {_gb(peak_gpu)}; {k} of {n_layer} layers measured")
    return "\n".join(rows)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--shape", required=True, choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=2, help="blocks written and run, K (default: %(default)s)")
    ap.add_argument("--device", default="cpu", help="torch device of the run: cpu, cuda (default: %(default)s)")
    ap.add_argument("--budget", default="4.5bpw", help="the run's budget (default: %(default)s)")
    ap.add_argument("--shrink", type=int, default=1, help="divide widths and head counts by this (CI)")
    ap.add_argument("--vocab", type=int, help="vocabulary size instead of the shape's (CI)")
    ap.add_argument("--tokens", type=int, help="calibration, Fisher, search and held-out tokens each "
                                               "(default: the run's defaults)")
    ap.add_argument("--trials", type=int, help="Optuna trials (default: the run's)")
    ap.add_argument("--types", help="candidate types, comma-separated (default: the run's)")
    ap.add_argument("--workdir", type=Path, help="keep the model and the run here (default: a temporary folder)")


def measured_run(cfg: RunConfig, n_full: int) -> tuple[dict[str, float], CostEstimate, CostEstimate, int, int | None]:
    """The estimate and ``dynsearch run`` of ``cfg`` (run in a fresh process by :func:`main`, so
    that the peak RSS is the run's alone): (phase seconds, estimate, full-depth estimate, peak
    RSS, peak GPU memory or None)."""
    model = RunModel.open(cfg.model)
    est = estimate(model.source, cfg)
    print(est.format(), flush=True)
    cuda = torch.device(cfg.device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(cfg.device)
    with PeakRSS() as peak:
        result = run(cfg, model, progress=False)
    peak_gpu = torch.cuda.max_memory_allocated(cfg.device) if cuda else None
    return result.seconds, est, full_depth_estimate(model.source, cfg, n_full), peak.peak, peak_gpu


def main(args: argparse.Namespace) -> int:
    shape = bench_shape(args.shape, args.layers, args.shrink, args.vocab)
    n_full = SHAPES[args.shape].n_layer
    spawn = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="dynsearch-scale-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        path = work / f"{args.shape}-{shape.n_layer}x{shape.n_embd}-v{shape.n_vocab}.gguf"
        if not path.exists():  # in a child process: drawing the tables is not the run's memory
            tok = padded_tokenizer(work / f"tokenizer-{shape.n_vocab}.gguf", resolve_model("smollm2-135m"), shape.n_vocab)
            with ProcessPoolExecutor(1, mp_context=spawn) as pool:
                pool.submit(write_synthetic_model, path, shape, 0, tok, QT.BF16).result()
        print(f"{path.name}: {shape.n_params() / 1e9:.2f}B parameters, {path.stat().st_size / 1e9:.2f} GB "
              f"(BF16), {shape.n_layer} of {n_full} layers", flush=True)
        options = {} if args.trials is None else {"trials": args.trials}
        if args.tokens:
            options.update(calib_tokens=args.tokens, fisher_tokens=args.tokens, search_tokens=args.tokens,
                           eval_tokens=args.tokens)
        types = [t.strip() for t in args.types.split(",")] if args.types else default("types")
        cfg = RunConfig.parse(str(path), [args.budget], types, device=args.device, out=str(work / "runs"), **options)
        with ProcessPoolExecutor(1, mp_context=spawn) as pool:
            seconds, est, full, peak_rss, peak_gpu = pool.submit(measured_run, cfg, n_full).result()
    print(report(seconds, est, full, n_full, shape.n_layer, peak_rss, peak_gpu))
    print(full.format().replace("estimate (", f"full depth estimate ({n_full} layers, ", 1))
    return 0
