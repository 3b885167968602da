"""Is file B's KL change against file A beyond the token noise? A maintainer script, not part of the
package: run it from the repository root in the project's environment (it imports dynsearch)::

    .venv/bin/python scripts/paired_kl.py REF.gguf BASE.kld A1.gguf B1.gguf [A2.gguf B2.gguf ...]

REF: the reference (``bench quality``'s dithered F32, ``meta.reference`` in its JSON); BASE: the
``llama-perplexity --kl-divergence-base`` file of the held-out text (``meta.evaluation.kld_base``),
whose chunks are scored here as ``bench quality`` scores them (the second half of each chunk). Per
pair it prints the mean KL of A and of B against REF (our forward) and the relative change of B
against A, with the standard error of the paired per-token difference over the evaluation chunks and
over 64 equal blocks of scored tokens. The same tokens on both sides cancel most of the noise of a
file's own KL; what remains is the noise a comparison of two files on these tokens carries.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from dynsearch.bench.llamacpp import read_kld_base
from dynsearch.errors import DynsearchError
from dynsearch.objectives.compare import kl_accumulator, scored_hidden
from dynsearch.objectives.forward import BlockwiseForward
from dynsearch.objectives.io.gguf_source import GGUFSource
from dynsearch.objectives.kl import scored_targets
from dynsearch.objectives.tokenizer import Tokenizer


def per_token_kl(ref_fwd, ref_hidden: torch.Tensor, path: Path, chunks: np.ndarray) -> np.ndarray:
    fwd = BlockwiseForward(GGUFSource(path))
    acc = kl_accumulator(ref_fwd, ref_hidden, fwd, scored_hidden(fwd, chunks), scored_targets(chunks))
    return acc.values()["kld"]


def block_se(diff: np.ndarray, n_blocks: int) -> float:
    """Standard error of the mean of ``diff`` from ``n_blocks`` equal consecutive blocks."""
    means = diff[: diff.size // n_blocks * n_blocks].reshape(n_blocks, -1).mean(axis=1)
    return float(means.std(ddof=1) / np.sqrt(n_blocks))


def report(ref: Path, base: Path, files: list[Path]) -> None:
    """Print one line per (A, B) pair of ``files``."""
    chunks = read_kld_base(base).tokens.copy()
    tok = Tokenizer.from_gguf(ref)
    if tok.add_bos:  # as llama-perplexity scores them (bench quality's prepare does the same)
        chunks[:, 0] = tok.bos_id
    ref_fwd = BlockwiseForward(GGUFSource(ref))
    ref_hidden = scored_hidden(ref_fwd, chunks)
    n_chunks = chunks.shape[0]
    for a, b in zip(files[::2], files[1::2]):
        ka, kb = (per_token_kl(ref_fwd, ref_hidden, p, chunks) for p in (a, b))
        diff, scale = kb - ka, 100 / ka.mean()
        print(f"{a.name} -> {b.name}: {ka.mean():.5f} -> {kb.mean():.5f}, {diff.mean() * scale:+.2f}% "
              f"± {block_se(diff, n_chunks) * scale:.2f}% (1 SE, {n_chunks} chunks) "
              f"± {block_se(diff, 64) * scale:.2f}% (64 blocks); {ka.size} tokens", flush=True)


def main(argv: list[str]) -> int:
    if len(argv) < 4 or len(argv) % 2:
        print(__doc__.split("::")[1].strip().splitlines()[0], file=sys.stderr)
        return 2
    ref, base, *files = (Path(a) for a in argv)
    missing = [str(p) for p in (ref, base, *files) if not p.is_file()]
    if missing:
        print(f"paired_kl: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        report(ref, base, files)
    except (DynsearchError, ValueError) as e:  # a file that is not what its place says
        print(f"paired_kl: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
