"""``python -m dynsearch.bench quality MODEL``: llama.cpp's stock mixes against the full-precision
model, measured by llama.cpp and by us on the same held-out tokens; hooks for dynsearch runs at
each stock mix's size and for baselines.

Inputs, identical for every file:

- reference: the model dithered to an F32 GGUF (:func:`dynsearch.bench.dither.dithered_copy`,
  seed ``--dither-seed``, 0 by default): every weight moved off its quantization grid, so that
  no GGUF type reproduces a tensor and none is a lossless shortcut, as on a real full-precision
  model; ``--no-dither``: the plain dequantized copy (:func:`dynsearch.bench.forward.f32_copy`),
  on which the model's source format and its supersets are lossless;
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
import torch

from dynsearch.atomic import atomic_write_bytes, atomic_write_text
from dynsearch.bench import stock
from dynsearch.bench.dither import dithered_copy
from dynsearch.bench.forward import f32_copy
from dynsearch.bench.report import (
    TARGET_MEAN,
    TARGET_P99,
    Entry,
    ablation_rows,
    format_ablation,
    format_comparison,
    format_table,
    plot_pareto,
    write_json,
)
from dynsearch.errors import BenchError
from dynsearch.kernels import padded, tensor_nbytes
from dynsearch.objectives import calibration as cal
from dynsearch.objectives.compare import compare_files
from dynsearch.objectives.io.gguf_header import GGUFHeader
from dynsearch.objectives.io.resolve import DEMO_ALIAS, resolve_model
from dynsearch.objectives.kl import perplexity_chunks
from dynsearch.objectives.tokenizer import Tokenizer
from dynsearch.recipes import schema
from dynsearch.recipes.apply import ImatrixFile, apply_recipe
from dynsearch.search.profile import model_fingerprint
from dynsearch.search.run import pipeline, worker
from dynsearch.search.run.config import DEFAULT_TYPES, RunConfig
from dynsearch.search.run.prepare import Prepared, RunModel
from dynsearch.search.run.prepare import prepare as prepare_run  # this module's prepare() makes the Inputs
from dynsearch.search.run.proxy_check import random_feasible
from dynsearch.search.space import choice_key
from dynsearch.search.study import best_result, open_study, run_study

log = logging.getLogger(__name__)

OURS_VERSION = 1
# uniform: one llama-quantize --pure file per type; knapsack: the proxy's knapsack optimum at each
# stock mix's size (the search's seed, no Optuna stage); random: random feasible assignments there
# multipliers: the Optuna stage before pinned tensors and moves (group multipliers re-solving the
# knapsack, refits), at each stock mix's size with the same trial count as dynsearch's
BASELINES = ("uniform", "knapsack", "random", "multipliers")
DITHER_SEED = 0  # the default reference: the model dithered with this seed (bench/dither.py)


@dataclass(frozen=True)
class BenchConfig:
    model: str = DEMO_ALIAS  # GGUF file or alias; the reference is its dithered (or plain) F32 copy
    dither: int | None = DITHER_SEED  # seed of the dithered reference; None: the plain dequantized copy
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
    types: tuple[str, ...] = ()  # dynsearch's candidate types; empty: DEFAULT_TYPES (never the source format)
    sweep: int = 0  # dynsearch also at this many sizes between the smallest and largest stock mix
    n_random: int = 3  # random feasible assignments per stock mix size ("random" baseline)
    run_eval_tokens: int = 1_024  # held-out tokens of each run's own recipe figure (the bench measures the file)
    out: str = "runs/bench"  # folder for JSON and plot (not bench/, the package; files in the cache stay there)
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
    model = resolve_model(cfg.model)
    if not model.is_file() or model.suffix != ".gguf":
        raise BenchError(f"{model}: the quality benchmark needs a GGUF file (llama.cpp's tools read GGUF)")
    for what, n in (("--calib-tokens", cfg.calib_tokens), ("--eval-tokens", cfg.eval_tokens)):
        if n < 2 * cfg.seq_len:
            raise BenchError(f"{what} {n}: need at least two chunks of {cfg.seq_len} tokens")
    # the reference: dithered, so that no type is lossless (bench/dither.py); plain: the
    # dequantized model itself, on whose grid its source format (and more) lies
    ref = f32_copy(model) if cfg.dither is None else dithered_copy(model, cfg.dither)
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
        "model": str(model), "reference": str(ref), "dither_seed": cfg.dither,
        "llama_cpp_python": cache.version, "cache": str(cache.folder),
        "calibration": {"source": calib.description, "tokens": int(used.size), "text": str(calib_file),
                        "tokens_sha256": cal._array_hash(np.ascontiguousarray(calib.tokens[:n_calib])),
                        "imatrix": str(imatrix), "retokenizes_identically": bool(calib_same)},
        "evaluation": {"text": str(eval_file), "chunks": int(chunks.shape[0]), "seq_len": cfg.seq_len,
                       "scored_tokens": int(chunks.shape[0] * (cfg.seq_len - 1 - cfg.seq_len // 2)),
                       "kld_base": str(base.path), "our_tokenizer_agrees": eval_same},
    }
    return Inputs(model, ref, cache, imatrix, base, chunks, meta)


# --------------------------------------------------------------------------------------- entries


def file_entry(path: Path, label: str, kind: str, target: str | None = None, note: str = "",
               evals: int | None = 0) -> Entry:
    """An :class:`Entry` for a GGUF file with its size and bpw (tensor bytes * 8 / weights);
    ``evals``: the true-KL evaluations the method used to choose it."""
    hdr = GGUFHeader(path)
    nbytes = sum(tensor_nbytes(t.shape, t.qtype) for t in hdr.tensors.values())
    n = sum(int(np.prod(t.shape)) for t in hdr.tensors.values())
    return Entry(label, kind, path, path.stat().st_size, 8.0 * nbytes / n, target, note, evals=evals)


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


def sweep_sizes(sizes: list[int], n: int) -> list[int]:
    """``n`` file sizes spaced geometrically strictly between the smallest and largest of ``sizes``."""
    if n <= 0 or not sizes:
        return []
    lo, hi = min(sizes), max(sizes)
    if hi <= lo:
        return []
    return [int(round(lo * (hi / lo) ** (k / (n + 1)))) for k in range(1, n + 1)]


def budget_spec(file_bytes: int) -> str:
    """A ``dynsearch run --budget`` for a file of ``file_bytes`` bytes (MB, exact to the byte)."""
    return f"{file_bytes / 1e6:.6f}MB"


@dataclass
class Searches:
    """The dynsearch side: one prepared run (statistics and profiles shared) over every budget."""

    prep: Prepared
    labels: list[str]  # per budget: the stock mix it is sized for, or "<size>MB" for a sweep point
    targets: list[str | None]  # per budget: the stock mix's label, None for a sweep point
    imatrix: Path  # the run's imatrix.gguf: every dynsearch, knapsack and random file is written with it


def prepare_searches(inp: Inputs, cfg: BenchConfig, targets: dict[str, int], sweep: list[int],
                     progress: bool = True) -> Searches:
    """``dynsearch run``'s preparation on the reference at the stock sizes and the sweep sizes:
    the same calibration tokens as the stock mixes' imatrix (checked), candidate types without the
    source format."""
    # on the plain copy the source format is lossless: not a candidate; on a dithered one no type is
    types = tuple(t for t in (cfg.types or DEFAULT_TYPES) if cfg.dither is not None or t != cfg.source_format)
    sizes = [*targets.values(), *sweep]
    rc = RunConfig.parse(str(inp.ref), [budget_spec(b) for b in sizes], types,
                         calib=cfg.calib, calib_tokens=cfg.calib_tokens, eval_tokens=cfg.run_eval_tokens,
                         seq_len=cfg.seq_len, trials=cfg.trials, seed=cfg.seed, device=cfg.device,
                         out=str(Path(cfg.out) / "dynsearch"))
    if len(rc.budgets) != len(sizes):  # a repeated budget is searched once: labels would shift
        raise BenchError(f"two of the sizes to search are equal: {sorted(sizes)} bytes")
    prep = prepare_run(rc, RunModel.open(rc.model), progress)
    if prep.calib_desc["sha256"] != inp.meta["calibration"]["tokens_sha256"]:
        raise BenchError("dynsearch run's calibration tokens differ from the ones the stock mixes' imatrix was made on")
    labels = [*targets, *(f"{b / 1e6:.1f}MB" for b in sweep)]
    return Searches(prep, labels, [*targets, *([None] * len(sweep))], pipeline.write_run_imatrix(prep))


def _recipe_stem(prep: Prepared, i: int) -> Path:
    return prep.run_dir / pipeline.recipe_name(prep.model_path, prep.cfg.budgets[i])


def dynsearch_at_sizes(s: Searches, progress: bool = True) -> list[Entry]:
    """Search every budget (the study resumes) and write its recipe and GGUF, as ``dynsearch run``
    does; a budget whose study gained no trial and whose GGUF exists is taken as it is."""
    prep, out = s.prep, []
    result = pipeline.RunResult(imatrix_path=s.imatrix)
    storage = pipeline.open_run_storage(prep.cfg, prep.model_path)
    for i, (label, target) in enumerate(zip(s.labels, s.targets)):
        study = worker.open_budget_study(prep, storage, i)
        ran = worker.work(study, prep.space, prep.settings(i), prep.kl_of, progress=progress)
        gguf = _recipe_stem(prep, i).with_suffix(".gguf")
        if ran or not gguf.is_file():
            pipeline.finish_budget(prep, i, study, result, progress)
            gguf = result.gguf_paths[-1]
        out.append(file_entry(gguf, f"dynsearch@{label}", "dynsearch", target=target,
                              evals=best_result(study).n_complete))
    return out


def write_assignment(s: Searches, choice: np.ndarray, path: Path, kind: str, budget_index: int) -> Path:
    """The GGUF of one assignment of the searched tensors (the rest as the run fixes them), written
    as ``dynsearch apply`` writes a recipe, with the run's imatrix; kept if it exists."""
    if path.is_file():
        return path
    prep = s.prep
    assignment = {**prep.fixed, **prep.space.assignment(choice)}
    assignment = {n: assignment[n] for n in prep.names}
    tensor_bytes = sum(padded(tensor_nbytes(prep.source.shape(n), t)) for n, t in assignment.items())
    n_params = int(sum(int(np.prod(prep.source.shape(n))) for n in prep.names))
    budget = prep.cfg.budgets[budget_index]
    recipe = schema.from_assignment(
        f"{kind}-{budget.spec}", schema.ModelInfo(prep.model_path.stem, prep.source.config.arch, prep.model_key,
                                                  n_params),
        assignment, tensor_bytes, budget, prep.calib_desc, {"baseline": kind, "proxy": prep.space.proxy_of(choice)})
    return apply_recipe(recipe, prep.model_path, path, importance=ImatrixFile.read(s.imatrix), progress=False)


def _assignment_path(inp: Inputs, s: Searches, kind: str, choice: np.ndarray) -> Path:
    return inp.cache.path(kind, choice_key(choice), stock.file_sha256(s.imatrix), s.prep.space.fingerprint(),
                          suffix=".gguf")


def knapsack_baseline(inp: Inputs, s: Searches, dyn: list[Entry]) -> list[Entry]:
    """The proxy's knapsack optimum at each stock mix's size -- the search's seed trial, without the
    Optuna stage -- written with the run's imatrix (the dynsearch file itself when they coincide)."""
    prep, out = s.prep, []
    dyn_by_label = {e.target: e for e in dyn if e.target}
    for i, (label, target) in enumerate(zip(s.labels, s.targets)):
        if target is None:
            continue
        choice = prep.space.solve(prep.tensor_budgets[i])
        d = dyn_by_label.get(target)
        same = d is not None and _assignment_of(d.path, prep) == prep.space.assignment(choice)
        path = d.path if same else write_assignment(s, choice, _assignment_path(inp, s, "knapsack", choice),
                                                     "knapsack", i)
        out.append(file_entry(path, f"knapsack@{label}", "knapsack", target=target,
                              note="= dynsearch's file" if same else ""))
    return out


def multipliers_baseline(inp: Inputs, s: Searches, progress: bool = True, storage=None) -> list[Entry]:
    """The Optuna stage as it was before pinned tensors and moves (``SearchSettings.moves=False``:
    group multipliers re-solving the knapsack, and refits) at each stock mix's size, with the
    same trials, in a study of its own (in ``storage``, default the run's: it resumes); its best
    written with the run's imatrix."""
    prep, out = s.prep, []
    if storage is None:
        storage = pipeline.open_run_storage(prep.cfg, prep.model_path)
    for i, (label, target) in enumerate(zip(s.labels, s.targets)):
        if target is None:
            continue
        settings = replace(prep.settings(i), moves=False)
        study = open_study(storage, f"{prep.study_name(i)}-multipliers", prep.space, settings)
        run_study(study, prep.space, settings, prep.kl_of, show_progress=progress)
        best = best_result(study)
        path = write_assignment(s, best.choice, _assignment_path(inp, s, "multipliers", best.choice), "multipliers", i)
        out.append(file_entry(path, f"multipliers@{label}", "multipliers", target=target, evals=best.n_complete))
    return out


def _assignment_of(path: Path, prep) -> dict[str, str]:
    searched = set(prep.space.names)
    return {n: t.qtype.name for n, t in GGUFHeader(path).tensors.items() if n in searched}


def random_baseline(inp: Inputs, s: Searches, n: int, seed: int) -> list[Entry]:
    """``n`` random feasible assignments at each stock mix's size (random types, repaired down to the
    budget, randomly filled back up: ``proxy_check.random_feasible``), written with the run's imatrix."""
    prep, out = s.prep, []
    for i, (label, target) in enumerate(zip(s.labels, s.targets)):
        if target is None:
            continue
        for k in range(n):
            rng = np.random.default_rng([seed, prep.tensor_budgets[i], k])
            choice = random_feasible(prep.space, prep.tensor_budgets[i], rng)
            path = write_assignment(s, choice, _assignment_path(inp, s, "random", choice), "random", i)
            out.append(file_entry(path, f"random{k + 1}@{label}", "random", target=target))
    return out


def imatrix_agreement(ours: Path, theirs: Path) -> dict:
    """How far the run's imatrix (our activations) is from llama-imatrix's on the same tokens: the
    worst per-tensor relative L1 difference over the tensors both hold."""
    a, b = ImatrixFile.read(ours), ImatrixFile.read(theirs)
    worst, name, n = 0.0, "", 0
    for t in a.data.entries:
        va, vb = a.get(t), b.get(t)
        if va is None or vb is None or va.shape != vb.shape:
            continue
        n += 1
        d = float(np.abs(va - vb).sum() / max(np.abs(vb).sum(), 1e-30))
        if d > worst:
            worst, name = d, t
    return {"tensors_compared": n, "worst_relative_l1": worst, "worst_tensor": name}


# ----------------------------------------------------------------------------------- measurement


def measure_llama(inp: Inputs, entries: list[Entry], threads: int) -> None:
    """``llama-perplexity --kl-divergence`` of every entry against the reference's base file."""
    for e in entries:
        e.llama = stock.kld(inp.cache, e.path, inp.base, stock.file_sha256(e.path), threads)


def measure_ours(inp: Inputs, entries: list[Entry], cfg: BenchConfig, progress: bool = True) -> None:
    """Our forward of every entry's dequantized weights vs the F32 reference on the same chunks
    (cached per file and chunks)."""
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


def measure(inp: Inputs, entries: list[Entry], cfg: BenchConfig, progress: bool = True) -> None:
    """Both measures of every entry (each cached per file)."""
    measure_llama(inp, entries, cfg.threads)
    if cfg.ours:
        measure_ours(inp, entries, cfg, progress)


# ------------------------------------------------------------------------------------------- run


def run_quality(cfg: BenchConfig, progress: bool = True) -> tuple[list[Entry], dict]:
    """Make, measure and report every file; returns the entries and the JSON's meta."""
    unknown = set(cfg.baselines) - set(BASELINES)
    if unknown:
        raise BenchError(f"unknown baseline(s) {', '.join(sorted(unknown))}; available: {', '.join(BASELINES)}")
    if cfg.dither is not None and not 0 <= cfg.dither < 2**64:
        raise BenchError(f"--dither-seed must lie in 0 .. 2**64-1, got {cfg.dither}")
    for flag, v, least in (("--trials", cfg.trials, 1), ("--sweep", cfg.sweep, 0), ("--random", cfg.n_random, 1),
                           ("--run-eval-tokens", cfg.run_eval_tokens, cfg.seq_len)):
        if isinstance(v, bool) or not isinstance(v, int) or v < least:
            raise BenchError(f"{flag} must be a whole number >= {least}, got {v!r}")
    if ({"knapsack", "random", "multipliers"} & set(cfg.baselines)) and not cfg.with_dynsearch:
        raise BenchError("the knapsack, random and multipliers baselines come from dynsearch's profiled search "
                         "space: add --with-dynsearch")
    t0 = time.perf_counter()
    inp = prepare(cfg)
    entries = stock_entries(inp, cfg)
    if "uniform" in cfg.baselines:
        entries += uniform_baseline(inp, cfg)
    measure(inp, entries, cfg, progress)
    extra: dict = {}
    if cfg.with_dynsearch:
        sizes = {e.label: e.file_bytes for e in entries if e.kind == "stock"}
        s = prepare_searches(inp, cfg, sizes, sweep_sizes(list(sizes.values()), cfg.sweep), progress)
        extra["imatrix_agreement"] = imatrix_agreement(s.imatrix, inp.imatrix)
        stages = [lambda: dynsearch_at_sizes(s, progress)]
        if "knapsack" in cfg.baselines:
            stages.append(lambda: knapsack_baseline(inp, s, [e for e in entries if e.kind == "dynsearch"]))
        if "random" in cfg.baselines:
            stages.append(lambda: random_baseline(inp, s, cfg.n_random, cfg.seed))
        if "multipliers" in cfg.baselines:
            stages.append(lambda: multipliers_baseline(inp, s, progress))
        for stage in stages:  # each stage measured before the next, so that every finished file is cached
            new = stage()
            measure(inp, new, cfg, progress)
            entries += new
    meta = {**inp.meta, **extra, "config": asdict(cfg), "ablation": ablation_rows(entries),
            "seconds": round(time.perf_counter() - t0, 1)}
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
    ap.add_argument("--dither-seed", type=int, default=d.dither, dest="dither",
                    help="the reference is the model dithered with this seed (default: %(default)s)")
    ap.add_argument("--no-dither", action="store_const", const=None, dest="dither",
                    help="the reference is the plain dequantized model (its source format is then lossless)")
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
    ap.add_argument("--types", default="", help="dynsearch's candidate types, comma-separated (default: dynsearch "
                    "run's, without the source format)")
    ap.add_argument("--sweep", type=int, default=d.sweep,
                    help="dynsearch also at N sizes spaced geometrically between the smallest and largest stock mix")
    ap.add_argument("--random", type=int, default=d.n_random, dest="n_random",
                    help="random feasible assignments per stock mix size (--baselines random)")
    ap.add_argument("--run-eval-tokens", type=int, default=d.run_eval_tokens,
                    help="held-out tokens of each dynsearch run's own recipe figure (every file is measured anyway)")
    ap.add_argument("--out", default=d.out, help="folder for quality.json and quality.png")
    ap.add_argument("--cache", default=None, help="artifact cache (default: $DYNSEARCH_CACHE/bench)")


def _split(s: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in s.split(",") if x.strip())


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    return replace(BenchConfig(), model=args.model, mixes=_split(args.mixes), dither=args.dither,
                   source_format=None if args.no_source_format else BenchConfig.source_format,
                   calib=args.calib, calib_tokens=args.calib_tokens, eval_tokens=args.eval_tokens,
                   seq_len=args.seq_len, threads=args.threads, device=args.device, ours=not args.no_ours,
                   baselines=_split(args.baselines), uniform_types=_split(args.uniform_types),
                   with_dynsearch=args.with_dynsearch, trials=args.trials, types=_split(args.types), sweep=args.sweep, n_random=args.n_random,
                   run_eval_tokens=args.run_eval_tokens, out=args.out, cache=args.cache)


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    torch.set_num_threads(cfg.threads)
    entries, meta = run_quality(cfg)
    ev = meta["evaluation"]
    print(f"{meta['model']}: {ev['chunks']} chunks x {ev['seq_len']} held-out tokens, "
          f"{ev['scored_tokens']} scored (second half of each chunk); imatrix on {meta['calibration']['tokens']} "
          f"calibration tokens")
    print(format_table(entries))
    if any(e.kind == "dynsearch" for e in entries):
        print(f"\ndynsearch's best file of equal or smaller size against each stock mix (* : targets {TARGET_MEAN:.2f}x "
              f"mean, {TARGET_P99:.2f}x 99% KLD; others: not worse):")
        print(format_comparison(entries))
        print("\nablation: each method's file at each stock mix's size (held-out KLD, both measures):")
        print(format_ablation(entries))
    print(f"\nwrote {Path(cfg.out) / 'quality.json'} and {Path(cfg.out) / 'quality.png'}")
    return 0

