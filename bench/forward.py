"""Throughput of our forward pass against llama.cpp's on the same F32 GGUF and tokens.

    python -m dynsearch.bench forward [--model M.gguf] [--chunks 4] [--threads 2]

The model (default: the SmolLM2-135M demo) is first dequantized to an F32 GGUF, cached under
``$DYNSEARCH_CACHE`` (default ``~/.cache/dynsearch``), so both sides compute in float32 on
identical weights. Both evaluate the same chunks of ``--ctx`` tokens with all logits; the time
of a side covers the whole pass (our weights are read from disk block by block inside it), not
the model load. Prints tokens/s of both and their ratio, and the mean KL between them.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from dynsearch.errors import BenchError
from dynsearch.objectives.forward import BlockwiseForward
from dynsearch.objectives.io.gguf_source import GGUFSource
from dynsearch.objectives.io.gguf_write import write_dequantized_copy
from dynsearch.objectives.io.resolve import demo_model_path
from dynsearch.objectives.kl import mean_kl
from dynsearch.system import cache_root


def f32_copy(src: Path) -> Path:
    """``src`` dequantized to an F32 GGUF, made once and cached under ``$DYNSEARCH_CACHE/f32``."""
    cache = cache_root() / "f32"
    dst = cache / f"{src.stem}.{src.stat().st_size}.F32.gguf"
    if not dst.exists():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_suffix(f".tmp{os.getpid()}")
        write_dequantized_copy(src, tmp)
        tmp.rename(dst)
    return dst


def run_llamacpp(path: Path, chunks: np.ndarray, threads: int) -> tuple[float, np.ndarray]:
    try:
        import llama_cpp
    except ImportError:
        raise BenchError("the llama.cpp side needs llama-cpp-python: pip install 'dynsearch[oracle]'") from None

    n_ctx = chunks.shape[1]
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=n_ctx, n_batch=n_ctx,
                          n_threads=threads, n_threads_batch=threads, verbose=False)
    first = None
    t0 = time.perf_counter()
    for c in chunks:
        llm.reset()
        llm.eval(c.tolist())
        if first is None:
            first = np.array(llm.scores[:n_ctx], dtype=np.float32)
    return time.perf_counter() - t0, first


def run_ours(path: Path, chunks: np.ndarray, device: str, batch: int) -> tuple[float, np.ndarray]:
    fwd = BlockwiseForward(GGUFSource(path), device=device, batch_size=batch)
    first = None
    t0 = time.perf_counter()
    for _, logits in fwd.logits(chunks):
        if first is None:
            first = logits[0].float().cpu().numpy()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0, first


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", type=Path, default=None, help="GGUF model (default: the SmolLM2 demo)")
    ap.add_argument("--chunks", type=int, default=4, help="sequences to evaluate")
    ap.add_argument("--ctx", type=int, default=512, help="tokens per sequence")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for both sides")
    ap.add_argument("--device", default="cpu", help="our side's torch device (cpu, cuda)")
    ap.add_argument("--batch", type=int, default=0, help="our sequences per block call (0: all)")


def main(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    path = f32_copy(args.model or demo_model_path())
    n_vocab = GGUFSource(path).config.n_vocab
    chunks = np.random.default_rng(0).integers(0, n_vocab, (args.chunks, args.ctx))
    n_tok = chunks.size

    t_ref, ref = run_llamacpp(path, chunks, args.threads)
    t_ours, ours = run_ours(path, chunks, args.device, args.batch or args.chunks)
    kl = mean_kl(torch.log_softmax(torch.from_numpy(ref).double(), -1), torch.from_numpy(ours), torch.float64)
    print(f"model      {path.name}  ({args.chunks} x {args.ctx} tokens, {args.threads} threads)")
    print(f"llama.cpp  {n_tok / t_ref:9.1f} tok/s  ({t_ref:.2f} s)")
    print(f"dynsearch  {n_tok / t_ours:9.1f} tok/s  ({t_ours:.2f} s, device {args.device})")
    print(f"ratio      {t_ref / t_ours:9.2f}x  (dynsearch / llama.cpp throughput)")
    print(f"mean KL(llama.cpp || ours), first chunk: {kl:.2e}")
    return 0
