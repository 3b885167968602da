"""``dynsearch eval``: GGUF files against a reference GGUF, with llama-perplexity's KL statistics.

The reference runs once: its final residual stream at the scored positions is kept (tokens x d,
small) and its log-probabilities are re-derived from it batch by batch, so no vocabulary-wide array
is held for all tokens and the KL is exact (not top-k). Each candidate is read with our forward pass
(its weights dequantized by our kernels) on the same chunks. Scoring follows ``llama-perplexity
--kl-divergence`` (:mod:`dynsearch.objectives.kl`): chunks of ``seq_len`` tokens, BOS in the first
position when the vocab adds one, the second half of each chunk scored.

Multiple choice (``mc_items``): the first items of the shipped multiple-choice set
(:func:`~dynsearch.objectives.calibration.load_mc_items`) as ``Question: ...\\nAnswer:`` followed by
`` <choice>``; a choice scores its mean log-likelihood per token (llama-perplexity's multiple-choice
rule), the answer is the best choice, and the flips are questions whose answer changes.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from dynsearch.atomic import atomic_write_text
from dynsearch.errors import CalibrationError, ModelError
from dynsearch.kernels import tensor_nbytes
from dynsearch.objectives.calibration import load_evaluation, load_mc_items
from dynsearch.objectives.forward import BlockwiseForward
from dynsearch.objectives.io.gguf_source import GGUFSource
from dynsearch.objectives.kl import (
    FlipStats,
    KLAccumulator,
    KLStats,
    mc_flips,
    perplexity_chunks,
    scored_positions,
    scored_targets,
)
from dynsearch.objectives.scoring import gather_logprobs
from dynsearch.objectives.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FileComparison:
    """One candidate file against the reference."""

    path: Path
    file_bytes: int  # size on disk
    bpw: float  # bits per weight of the tensor data, as llama.cpp prints it (8 x tensor bytes / weights)
    kl: KLStats
    flips: FlipStats | None  # multiple-choice flips vs the reference; None when not measured

    def to_dict(self) -> dict:
        return {"path": str(self.path), "file_bytes": self.file_bytes, "bpw": self.bpw,
                "kl": self.kl.to_dict(), "flips": self.flips.to_dict() if self.flips else None}


# ------------------------------------------------------------------------------------- models


def bits_per_weight(source) -> float:
    """8 x tensor bytes / number of weights (llama.cpp's "BPW")."""
    names = source.names()
    n = sum(int(np.prod(source.shape(t))) for t in names)
    nbytes = sum(tensor_nbytes(source.shape(t), source.qtype(t)) for t in names)
    return 8.0 * nbytes / n


def check_same_model(ref, cand, tok_ref, tok_cand) -> None:
    """Raise :class:`ModelError` unless both files hold the same tensors (names, shapes) and vocab."""
    what = f"{cand.path.name} and {ref.path.name} are not the same model"
    r, c = ref.names(), cand.names()
    if set(r) != set(c):
        diff = sorted(set(r) ^ set(c))
        raise ModelError(f"{what}: tensor {diff[0]} is in only one of them ({len(diff)} differ)")
    for n in r:
        if ref.shape(n) != cand.shape(n):
            raise ModelError(f"{what}: {n} has shape {cand.shape(n)} vs {ref.shape(n)}")
    if ref.config != cand.config:
        raise ModelError(f"{what}: hyper-parameters differ ({cand.config.arch} vs {ref.config.arch})")
    if tok_ref.vocab.tokens != tok_cand.vocab.tokens or tok_ref.add_bos != tok_cand.add_bos:
        raise ModelError(f"{what}: their vocabularies differ")


def _open(path: Path):
    if not path.is_file():
        raise ModelError(f"{path}: no such file")
    return GGUFSource(path), Tokenizer.from_gguf(path)


# ------------------------------------------------------------------------------------- tokens


def evaluation_chunks(tokenizer, tokens: np.ndarray | None = None, text: Path | None = None,
                      n_tokens: int = 8192, seq_len: int = 512) -> np.ndarray:
    """``(n_chunk, seq_len)`` windows as llama-perplexity cuts them.

    ``tokens`` (any shape, flattened; all of it used) or else ``n_tokens`` of ``text`` (None: the
    shipped held-out evaluation set, disjoint from calibration)."""
    if tokens is None:
        ev = load_evaluation(tokenizer, source=text, n_tokens=n_tokens, seq_len=seq_len)
        tokens = ev.tokens
    stream = np.asarray(tokens, dtype=np.int32).reshape(-1)
    bos = tokenizer.bos_id if tokenizer.add_bos else None
    try:
        return perplexity_chunks(stream, seq_len, bos)
    except ValueError as e:
        raise CalibrationError(f"{text or 'evaluation tokens'}: {e}") from None


# ------------------------------------------------------------------------------ multiple choice


@dataclass(frozen=True)
class MCSet:
    """Token sequences of every (question, choice) and where each choice's tokens start."""

    sequences: list[list[int]]
    starts: list[int]  # index of the first continuation token in each sequence
    n_choices: list[int]  # per question
    labels: list[int]

    @classmethod
    def build(cls, tokenizer, n_items: int) -> "MCSet":
        items = load_mc_items()[:n_items]
        seqs, starts, n_ch, labels = [], [], [], []
        for it in items:
            prompt = f"Question: {it['question']}\nAnswer:"
            base = tokenizer.encode(prompt, add_special=True, parse_special=False)
            for choice in it["choices"]:
                full = tokenizer.encode(f"{prompt} {choice}", add_special=True, parse_special=False)
                start = next((i for i, (a, b) in enumerate(zip(base, full)) if a != b), len(base))
                seqs.append(full)
                starts.append(max(1, min(start, len(full) - 1)))
            n_ch.append(len(it["choices"]))
            labels.append(int(it["answer"]))
        return cls(seqs, starts, n_ch, labels)

    def scores(self, forward) -> list[list[float]]:
        """Per question, each choice's mean log-likelihood per continuation token."""
        pos = [list(range(s - 1, len(q) - 1)) for q, s in zip(self.sequences, self.starts)]
        ids = [[[t] for t in q[s:]] for q, s in zip(self.sequences, self.starts)]
        lp = gather_logprobs(forward, self.sequences, pos, ids)
        means = [float(a.mean()) for a in lp]
        out, i = [], 0
        for n in self.n_choices:
            out.append(means[i:i + n])
            i += n
        return out


# ------------------------------------------------------------------------------------- compare


def scored_hidden(forward, chunks: np.ndarray) -> torch.Tensor:
    """The final residual stream at the scored positions, (n_chunk, n_scored, d)."""
    return forward.hidden_states(chunks)[:, scored_positions(chunks.shape[1])].clone()


def kl_accumulator(ref_fwd, ref_hidden: torch.Tensor, fwd, hidden: torch.Tensor,
                   targets: np.ndarray) -> KLAccumulator:
    """Per-token KL of the scored rows (:func:`scored_hidden` of both forwards), a few dozen rows
    at a time (``head_rows``); ``.result()`` gives the statistics, ``.values()`` the tokens."""
    acc = KLAccumulator()
    d = hidden.shape[-1]
    tgt = torch.as_tensor(np.asarray(targets).reshape(-1), dtype=torch.long)
    for (s, ref), (_, cand) in zip(ref_fwd.head_rows(ref_hidden.reshape(-1, d)),
                                   fwd.head_rows(hidden.reshape(-1, d))):
        acc.update(ref, cand, tgt[s:s + ref.shape[0]])
    return acc


def compare_files(candidates: Sequence[Path], ref: Path, tokens: np.ndarray | None = None, *,
                  text: Path | None = None, n_tokens: int = 8192, seq_len: int = 512,
                  device: str = "cpu", mc_items: int = 0, progress: bool = True) -> list[FileComparison]:
    """KL statistics (and multiple-choice flips) of each candidate GGUF against ``ref``.

    ``tokens``: evaluation tokens to use whole (any shape, flattened, cut into ``seq_len`` chunks);
    otherwise ``n_tokens`` tokens of ``text`` (None: the shipped held-out set). Every candidate
    must be the same model as ``ref`` (tensor names and shapes, hyper-parameters, vocabulary).
    """
    ref_src, ref_tok = _open(Path(ref))
    opened = [_open(Path(c)) for c in candidates]
    for src, tok in opened:  # every mismatch is reported before any costly work
        check_same_model(ref_src, src, ref_tok, tok)
    chunks = evaluation_chunks(ref_tok, tokens, text, n_tokens, seq_len)
    targets = scored_targets(chunks)
    mc = MCSet.build(ref_tok, mc_items) if mc_items > 0 else None

    bar = tqdm(total=len(opened) + 1, desc="eval", unit="model", disable=not progress)
    ref_fwd = BlockwiseForward(ref_src, device=device)
    ref_hidden = scored_hidden(ref_fwd, chunks)
    ref_mc = mc.scores(ref_fwd) if mc else None
    bar.update()
    out = []
    for src, _ in opened:
        fwd = BlockwiseForward(src, device=device)
        kl = kl_accumulator(ref_fwd, ref_hidden, fwd, scored_hidden(fwd, chunks), targets).result()
        flips = mc_flips(ref_mc, mc.scores(fwd), mc.labels) if mc else None
        out.append(FileComparison(src.path, src.path.stat().st_size, bits_per_weight(src), kl, flips))
        log.info("%s: mean KLD %.6f over %d tokens", src.path.name, kl.kld_mean, kl.n_tokens)
        bar.update()
    bar.close()
    return out


# ------------------------------------------------------------------------------------ printing


_ROWS = (  # (label, key in KLStats.to_dict(), scale, format)
    ("Mean KLD", "kld_mean", 1, "{:.6f}"), ("Mean KLD err", "kld_mean_err", 1, "{:.6f}"),
    ("Median KLD", "kld_median", 1, "{:.6f}"), ("90% KLD", "kld_p90", 1, "{:.6f}"),
    ("95% KLD", "kld_p95", 1, "{:.6f}"), ("99% KLD", "kld_p99", 1, "{:.6f}"),
    ("99.9% KLD", "kld_p99_9", 1, "{:.6f}"), ("Max KLD", "kld_max", 1, "{:.6f}"),
    ("Same top p %", "same_top_p", 100, "{:.3f}"), ("RMS Δp %", "dp_rms", 100, "{:.3f}"),
    ("Mean Δp %", "dp_mean", 100, "{:.3f}"), ("1% Δp %", "dp_p1", 100, "{:.3f}"),
    ("99% Δp %", "dp_p99", 100, "{:.3f}"), ("PPL(Q)", "ppl_q", 1, "{:.4f}"),
    ("PPL(base)", "ppl_base", 1, "{:.4f}"), ("PPL ratio", "ppl_ratio", 1, "{:.5f}"),
)


def flips_line(f: FlipStats) -> str:
    s = f"Multiple choice: {f.n_flips} of {f.n_questions} answers flipped ({100 * f.flip_rate:.2f} ± {100 * f.flip_rate_err:.2f} %)"
    if f.acc_ref is not None:
        s += (f"; accuracy {100 * f.acc_cand:.2f}% vs reference {100 * f.acc_ref:.2f}% "
              f"(right->wrong {f.right_to_wrong}, wrong->right {f.wrong_to_right})")
    return s


def report(c: FileComparison) -> str:
    """One candidate: size line, llama-perplexity's statistics table, the flips line."""
    lines = [f"{c.path.name}: {c.file_bytes / 1e6:.2f} MB, {c.bpw:.3f} bpw", "", c.kl.table()]
    if c.flips is not None:
        lines += ["", flips_line(c.flips)]
    return "\n".join(lines)


def side_by_side(results: Sequence[FileComparison]) -> str:
    """Several candidates as columns: size, bpw, KL statistics, flips."""
    head = ["", *[c.path.name for c in results]]
    rows = [["File size MB", *[f"{c.file_bytes / 1e6:.2f}" for c in results]],
            ["Bits per weight", *[f"{c.bpw:.3f}" for c in results]],
            ["Tokens", *[str(c.kl.n_tokens) for c in results]]]
    for label, key, scale, fmt in _ROWS:
        rows.append([label, *[fmt.format(scale * c.kl.to_dict()[key]) for c in results]])
    if any(c.flips is not None for c in results):
        rows.append(["MC flips", *[f"{c.flips.n_flips}/{c.flips.n_questions}" if c.flips else "-" for c in results]])
        rows.append(["MC accuracy %", *[f"{100 * c.flips.acc_cand:.2f}" if c.flips else "-" for c in results]])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    fmt_row = lambda r: "  ".join([r[0].ljust(widths[0]), *[v.rjust(w) for v, w in zip(r[1:], widths[1:])]])  # noqa: E731
    return "\n".join([fmt_row(head), *[fmt_row(r) for r in rows]])


def run_eval(candidates: Sequence[Path], ref: Path, *, text: Path | None = None, n_tokens: int = 8192,
             seq_len: int = 512, mc_items: int = 0, device: str = "cpu", json_out: Path | None = None,
             progress: bool = True) -> str:
    """``dynsearch eval``: compare, write the JSON (atomically) where asked, return the printout."""
    if not candidates:
        raise ModelError("eval: give a CANDIDATE.gguf, or --compare A.gguf B.gguf ...")
    if n_tokens < 2 * seq_len or seq_len < 4:
        raise CalibrationError(f"--tokens {n_tokens} must be at least twice --seq-len {seq_len} (two chunks)")
    results = compare_files(candidates, ref, text=text, n_tokens=n_tokens, seq_len=seq_len, device=device,
                            mc_items=mc_items, progress=progress)
    if json_out is not None:
        doc = {"ref": str(ref), "text": str(text) if text else "shipped evaluation set", "seq_len": seq_len,
               "mc_items": mc_items, "candidates": [c.to_dict() for c in results]}
        atomic_write_text(json_out, json.dumps(doc, indent=2, allow_nan=True) + "\n")
    head = f"reference: {Path(ref).name}\n\n"
    if len(results) == 1:
        return head + report(results[0])
    flips = [f"{c.path.name}: {flips_line(c.flips)}" for c in results if c.flips is not None]
    return head + side_by_side(results) + ("\n\n" + "\n".join(flips) if flips else "")
