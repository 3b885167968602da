"""``python -m dynsearch.bench quality MODEL``: llama.cpp's stock mixes against the full-precision
model, measured by llama.cpp and by us on the same held-out tokens; hooks for dynsearch runs at
each stock mix's size and for baselines.

Inputs, identical for every file:

- reference: the model dequantized to an F32 GGUF (``objectives.bench_forward.f32_copy``);
- calibration: ``load_calibration`` tokens (the shipped chat-format set, or ``--calib``), written
  back as text and given to ``llama-imatrix --parse-special``, which re-tokenizes it to the same ids
  (checked) -- the llama.cpp workflow, and the tokens ``dynsearch run`` collects its imatrix on;
- evaluation: the shipped evaluation documents (disjoint from calibration) as plain text, since
  ``llama-perplexity`` tokenizes its text without parsing special tokens. ``llama-perplexity
  --kl-divergence-base`` stores the chunks it cut; our forward is fed exactly those token ids
  (BOS-swapped like llama.cpp), and our tokenizer's chunks of the same text are checked equal.

Both measures score the second half of each ``seq_len`` chunk. llama.cpp's reference log-probs are
uint16-quantized over a 16-nat range and its candidates multiply quantized activations; ours are
float32 forwards with float64 statistics -- end-to-end figures legitimately differ.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from ..atomic import atomic_write_bytes, atomic_write_text
from ..errors import BenchError
from ..kernels import tensor_nbytes
from ..objectives import calibration as cal
from ..objectives.kl import perplexity_chunks
from . import stock
from .bench_report import Entry, format_table, plot_pareto, write_json
from .models import DEMO_ALIAS, resolve_model
from .pipeline import DEFAULT_TYPES

log = logging.getLogger(__name__)

OURS_VERSION = 1
BASELINES = ("uniform",)  # baselines implemented so far (knapsack-only and random feasible: to come)


@dataclass(frozen=True)
class BenchConfig:
    model: str = DEMO_ALIAS  # GGUF file or alias; the reference is its F32 copy
    mixes: tuple[str, ...] = stock.STOCK_MIXES  # llama.cpp's stock mixes to make and measure
    source_format: str | None = stock.SOURCE_FORMAT  # made too, listed apart; None: skip
    calib: str | None = None  # calibration source for load_calibration; None: the shipped set
    calib_tokens: int = 16_384  # imatrix tokens (as dynsearch run's calib_tokens)
    eval_tokens: int = 8_192  # held-out tokens: eval_tokens // seq_len chunks, half of each scored
    seq_len: int = 512  # llama-perplexity's context
    seed: int = 0  # calibration / evaluation document order
    threads: int = 2  # llama.cpp tools and torch
    device: str = "cpu"  # our forward's torch device
    ours: bool = True  # measure with our forward too (else llama.cpp only)
    baselines: tuple[str, ...] = ()  # subset of BASELINES
    uniform_types: tuple[str, ...] = tuple(t for t in DEFAULT_TYPES if t != stock.SOURCE_FORMAT)
    with_dynsearch: bool = False  # dynsearch run at each stock mix's file size
    trials: int = 24  # Optuna trials per dynsearch budget
    out: str = "bench"  # folder for table, JSON and plot (files in the cache stay there)
    cache: str | None = None  # artifact cache root; None: $DYNSEARCH_CACHE/bench


@dataclass(frozen=True)
class Inputs:
    """What every measurement shares."""

    model: Path  # the model as given (e.g. the Q4_1 demo)
    ref: Path  # its F32 copy: reference, imatrix model, quantization source
    cache: stock.BenchCache
    imatrix: Path
    base: stock.KLBase
    chunks: np.ndarray  # (n_chunk, seq_len) token ids both sides evaluate
    meta: dict  # texts, token checks, commands: goes into the JSON


# ----------------------------------------------------------------------------------------- texts


def calibration_text(tokenizer, tokens: np.ndarray) -> str:
    """Text that ``llama-imatrix --parse-special`` tokenizes back to ``tokens`` (special tokens written
    as their text; a leading BOS left to the tool, which adds it)."""
    flat = [int(t) for t in np.asarray(tokens).ravel()]
    if tokenizer.add_bos and flat and flat[0] == tokenizer.bos_id:
        flat = flat[1:]
    return tokenizer.decode(flat)


def evaluation_text(tokenizer, n_tokens: int, seed: int = 0) -> str:
    """The shipped evaluation documents, shuffled by ``seed``, as plain text (``role: content``
    paragraphs, documents separated by a blank line) of at least ``n_tokens`` tokens."""
    docs = cal.read_documents(cal.SHIPPED["evaluation"])
    order = np.random.default_rng(seed).permutation(len(docs))
    parts, have = [], 0
    for i in order:
        text = cal.document_text(docs[i])
        parts.append(text)
        have += len(tokenizer.encode(text, add_special=False)) + 1
        if have >= n_tokens + 64:  # margin for merges across document boundaries
            break
    text = "\n\n".join(parts)
    n = len(tokenizer.encode(text, add_special=True, parse_special=False))
    if n < n_tokens:
        raise BenchError(f"the shipped evaluation set has {n} tokens, fewer than the {n_tokens} asked for")
    return text


def write_tool_text(cache: stock.BenchCache, stem: str, text: str) -> Path:
    """``text`` as a file for a llama.cpp tool's ``-f``, which drops one trailing newline (one is
    added), named by its content in the cache."""
    data = (text + "\n").encode("utf-8")
    path = cache.path(stem, hashlib.sha256(data).hexdigest(), suffix=".txt")
    if not path.is_file():
        atomic_write_bytes(path, data)
    return path


def read_tool_text(path: Path) -> str:
    """The text a llama.cpp tool reads from ``-f path``: the bytes as they are (no newline
    translation: the texts hold carriage returns), one trailing newline dropped."""
    text = path.read_bytes().decode("utf-8")
    return text[:-1] if text.endswith("\n") else text


# ---------------------------------------------------------------------------------------- inputs


def prepare(cfg: BenchConfig) -> Inputs:
    """Reference, imatrix and KL base of ``cfg.model``, and the evaluation chunks (all cached)."""
    from ..objectives.bench_forward import f32_copy
    from ..objectives.tokenizer import Tokenizer
    from .pipeline import model_fingerprint

    model = resolve_model(cfg.model)
    if not model.is_file() or model.suffix != ".gguf":
        raise BenchError(f"{model}: the quality benchmark needs a GGUF file (llama.cpp's tools read GGUF)")
    for what, n in (("--calib-tokens", cfg.calib_tokens), ("--eval-tokens", cfg.eval_tokens)):
        if n < 2 * cfg.seq_len:
            raise BenchError(f"{what} {n}: need at least two chunks of {cfg.seq_len} tokens")
    ref = f32_copy(model)
    cache = stock.BenchCache.for_model(ref, model_fingerprint(ref), Path(cfg.cache) if cfg.cache else None)
    tok = Tokenizer.from_gguf(ref)

    # one chunk more than used: the text's end cuts a document (maybe a UTF-8 sequence), which
    # then re-tokenizes differently only after the chunks llama-imatrix reads
    n_calib = cfg.calib_tokens // cfg.seq_len
    calib = cal.load_calibration(tok, source=cfg.calib, n_tokens=(n_calib + 1) * cfg.seq_len,
                                 seq_len=cfg.seq_len, seed=cfg.seed)
    n_calib = min(n_calib, max(2, calib.tokens.shape[0] - 1))  # a short --calib file
    used = calib.tokens[:n_calib].ravel()
    calib_file = write_tool_text(cache, "calib", calibration_text(tok, calib.tokens))
    calib_ids = tok.encode(read_tool_text(calib_file), add_special=True, parse_special=True)
    calib_same = calib_ids[: used.size] == [int(t) for t in used]
    if not calib_same:
        log.warning("the calibration text does not re-tokenize to the calibration tokens exactly")
    imatrix = stock.imatrix(cache, ref, calib_file, cfg.seq_len, n_calib, cfg.threads)

    n_chunks = cfg.eval_tokens // cfg.seq_len
    eval_file = write_tool_text(cache, "eval", evaluation_text(tok, n_chunks * cfg.seq_len, cfg.seed))
    base = stock.kld_base(cache, ref, eval_file, cfg.seq_len, n_chunks, cfg.threads)
    kb = stock.llamacpp.read_kld_base(base.path)
    bos = tok.bos_id if tok.add_bos else None
    chunks = kb.tokens.copy()
    if bos is not None:
        chunks[:, 0] = bos
    ours_ids = tok.encode(read_tool_text(eval_file), add_special=True, parse_special=False)
    eval_same = bool(np.array_equal(perplexity_chunks(ours_ids, cfg.seq_len, bos, n_chunks), chunks))
    if not eval_same:
        log.warning("our tokenizer cuts the evaluation text differently from llama-perplexity; "
                    "both sides still use llama-perplexity's chunks")
    meta = {
        "model": str(model), "reference": str(ref), "llama_cpp_python": cache.version, "cache": str(cache.folder),
        "calibration": {"source": calib.description, "tokens": int(used.size), "text": str(calib_file),
                        "imatrix": str(imatrix), "retokenizes_identically": bool(calib_same)},
        "evaluation": {"text": str(eval_file), "chunks": int(chunks.shape[0]), "seq_len": cfg.seq_len,
                       "scored_tokens": int(chunks.shape[0] * (cfg.seq_len - 1 - cfg.seq_len // 2)),
                       "kld_base": str(base.path), "our_tokenizer_agrees": eval_same},
    }
    return Inputs(model, ref, cache, imatrix, base, chunks, meta)


# --------------------------------------------------------------------------------------- entries


def file_entry(path: Path, label: str, kind: str, target: str | None = None, note: str = "") -> Entry:
    """An :class:`Entry` for a GGUF file with its size and bpw (tensor bytes * 8 / weights)."""
    from ..objectives.gguf_header import GGUFHeader

    hdr = GGUFHeader(path)
    nbytes = sum(tensor_nbytes(t.shape, t.qtype) for t in hdr.tensors.values())
    n = sum(int(np.prod(t.shape)) for t in hdr.tensors.values())
    return Entry(label, kind, path, path.stat().st_size, 8.0 * nbytes / n, target, note)


def stock_entries(inp: Inputs, cfg: BenchConfig) -> list[Entry]:
    """llama.cpp's stock mixes of the reference with the imatrix (and the source format, apart)."""
    out = [file_entry(stock.quantize(inp.cache, inp.ref, m, inp.imatrix, threads=cfg.threads), m, "stock")
           for m in cfg.mixes]
    if cfg.source_format:
        p = stock.quantize(inp.cache, inp.ref, cfg.source_format, inp.imatrix, threads=cfg.threads)
        out.append(file_entry(p, cfg.source_format, "source", note="source format"))
    return out


def uniform_baseline(inp: Inputs, cfg: BenchConfig) -> list[Entry]:
    """One file per type with every tensor of that type (``llama-quantize --pure``, same imatrix;
    llama.cpp's fallback applies to rows a 256-block type does not fit)."""
    return [file_entry(stock.quantize(inp.cache, inp.ref, t, inp.imatrix, pure=True, threads=cfg.threads),
                       f"uniform {t}", "uniform") for t in cfg.uniform_types]


def dynsearch_at_sizes(inp: Inputs, cfg: BenchConfig, targets: dict[str, int]) -> list[Entry]:
    """``dynsearch run`` on the reference at each ``{label: file bytes}`` budget, candidate types
    without the source format; one entry per written GGUF, ``target`` naming the stock mix."""
    from .pipeline import RunConfig, run

    types = tuple(t for t in DEFAULT_TYPES if t != cfg.source_format)
    rc = RunConfig(model=str(inp.ref), budgets=tuple(f"{b / 1e6:.6f}MB" for b in targets.values()), types=types,
                   calib=cfg.calib, calib_tokens=cfg.calib_tokens, eval_tokens=cfg.eval_tokens,
                   seq_len=cfg.seq_len, trials=cfg.trials, seed=cfg.seed, device=cfg.device,
                   out=str(Path(cfg.out) / "dynsearch"))
    res = run(rc)
    return [file_entry(p, f"dynsearch@{label}", "dynsearch", target=label)
            for label, p in zip(targets, res.gguf_paths)]


# ----------------------------------------------------------------------------------- measurement


def measure_llama(inp: Inputs, entries: list[Entry], threads: int) -> None:
    """``llama-perplexity --kl-divergence`` of every entry against the reference's base file."""
    for e in entries:
        e.llama = stock.kld(inp.cache, e.path, inp.base, stock.file_sha256(e.path), threads)


def measure_ours(inp: Inputs, entries: list[Entry], cfg: BenchConfig, progress: bool = True) -> None:
    """Our forward of every entry's dequantized weights vs the F32 reference on the same chunks
    (cached per file and chunks)."""
    from ..objectives.compare import compare_files

    chunk_key = hashlib.sha256(np.ascontiguousarray(inp.chunks).tobytes()).hexdigest()
    # OURS_VERSION: bump when our forward or statistics change what a cached measurement would hold
    todo: list[tuple[Entry, Path]] = []
    for e in entries:
        path = inp.cache.path("ours", OURS_VERSION, stock.file_sha256(e.path), chunk_key, suffix=".json")
        if path.is_file():
            e.ours = json.loads(path.read_text())
        else:
            todo.append((e, path))
    if not todo:
        return
    results = compare_files([e.path for e, _ in todo], inp.ref, inp.chunks, seq_len=cfg.seq_len,
                            device=cfg.device, progress=progress)
    for (e, path), r in zip(todo, results):
        e.ours = {k: float(v) for k, v in r.kl.to_dict().items() if isinstance(v, (int, float))}
        atomic_write_text(path, json.dumps(e.ours, indent=1))


# ------------------------------------------------------------------------------------------- run


def run_quality(cfg: BenchConfig, progress: bool = True) -> tuple[list[Entry], dict]:
    """Make, measure and report every file; returns the entries and the JSON's meta."""
    unknown = set(cfg.baselines) - set(BASELINES)
    if unknown:
        raise BenchError(f"unknown baseline(s) {', '.join(sorted(unknown))}; available: {', '.join(BASELINES)}")
    t0 = time.perf_counter()
    inp = prepare(cfg)
    entries = stock_entries(inp, cfg)
    if "uniform" in cfg.baselines:
        entries += uniform_baseline(inp, cfg)
    if cfg.with_dynsearch:
        sizes = {e.label: e.file_bytes for e in entries if e.kind == "stock"}
        entries += dynsearch_at_sizes(inp, cfg, sizes)
    measure_llama(inp, entries, cfg.threads)
    if cfg.ours:
        measure_ours(inp, entries, cfg, progress)
    meta = {**inp.meta, "config": asdict(cfg), "seconds": round(time.perf_counter() - t0, 1)}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "quality.json", entries, meta)
    plot_pareto(out / "quality.png", entries, f"{inp.model.name}: {inp.meta['evaluation']['scored_tokens']} "
                                               f"scored held-out tokens")
    return entries, meta


# ------------------------------------------------------------------------------------------- CLI


def add_arguments(ap: argparse.ArgumentParser) -> None:
    d = BenchConfig()
    ap.add_argument("model", nargs="?", default=d.model, help=f"GGUF file or alias (default: {d.model})")
    ap.add_argument("--mixes", default=",".join(d.mixes), help="comma-separated llama.cpp stock mixes")
    ap.add_argument("--no-source-format", action="store_true", help=f"do not make the {d.source_format} file")
    ap.add_argument("--calib", default=None, help="calibration file (.txt or .jsonl); default: the shipped set")
    ap.add_argument("--calib-tokens", type=int, default=d.calib_tokens)
    ap.add_argument("--eval-tokens", type=int, default=d.eval_tokens)
    ap.add_argument("--seq-len", type=int, default=d.seq_len)
    ap.add_argument("--threads", type=int, default=d.threads)
    ap.add_argument("--device", default=d.device, help="torch device of our forward (cpu, cuda)")
    ap.add_argument("--no-ours", action="store_true", help="measure with llama-perplexity only")
    ap.add_argument("--baselines", default="", help=f"comma-separated, from: {', '.join(BASELINES)}")
    ap.add_argument("--uniform-types", default=",".join(d.uniform_types))
    ap.add_argument("--with-dynsearch", action="store_true", help="dynsearch run at each stock mix's size")
    ap.add_argument("--trials", type=int, default=d.trials, help="Optuna trials per dynsearch budget")
    ap.add_argument("--out", default=d.out, help="folder for quality.json and quality.png")
    ap.add_argument("--cache", default=None, help="artifact cache (default: $DYNSEARCH_CACHE/bench)")


def _split(s: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in s.split(",") if x.strip())


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    return replace(BenchConfig(), model=args.model, mixes=_split(args.mixes),
                   source_format=None if args.no_source_format else BenchConfig.source_format,
                   calib=args.calib, calib_tokens=args.calib_tokens, eval_tokens=args.eval_tokens,
                   seq_len=args.seq_len, threads=args.threads, device=args.device, ours=not args.no_ours,
                   baselines=_split(args.baselines), uniform_types=_split(args.uniform_types),
                   with_dynsearch=args.with_dynsearch, trials=args.trials, out=args.out, cache=args.cache)


def main(args: argparse.Namespace) -> int:
    import torch

    from ..objectives.llamacpp import LlamaCppBuildError

    cfg = config_from_args(args)
    torch.set_num_threads(cfg.threads)
    try:
        entries, meta = run_quality(cfg)
    except LlamaCppBuildError as e:
        raise BenchError(str(e)) from None
    ev = meta["evaluation"]
    print(f"{meta['model']}: {ev['chunks']} chunks x {ev['seq_len']} held-out tokens, "
          f"{ev['scored_tokens']} scored (second half of each chunk); imatrix on {meta['calibration']['tokens']} "
          f"calibration tokens")
    print(format_table(entries))
    print(f"\nwrote {Path(cfg.out) / 'quality.json'} and {Path(cfg.out) / 'quality.png'}")
    return 0

