"""GPU vs CPU: the steps of a search timed on both devices, with their results compared.

    python -m dynsearch.bench device [--model M.gguf] [--seqs 8] [--ctx 512]

Without ``--model`` a random-weight model shaped like SmolLM2-135M is written to a temporary
folder (the demo file need not be present). For each device: the forward pass (hidden states and
log-probabilities), the activation statistics + Fisher pass that profiling needs, and one true-KL
evaluation of a Q4_0 candidate. Prints seconds per device, the speedup, and how far the CUDA
results are from the CPU ones (they must agree within float tolerance).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dynsearch.bench.synthetic import SMOLLM2_135M, write_synthetic_model
from dynsearch.objectives.evaluate import KLEvaluator, QuantCache, QuantizedWeights
from dynsearch.objectives.forward import BlockwiseForward
from dynsearch.objectives.io.gguf_source import GGUFSource
from dynsearch.objectives.stats.collect import collect_statistics


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(device: str, fn):
    _sync(device)
    t = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t, out


def run_device(path: Path, device: str, tokens: np.ndarray, batch: int) -> dict:
    src = GGUFSource(path)
    fwd = BlockwiseForward(src, device=device, batch_size=batch)
    out: dict = {}

    def forward():
        h = fwd.hidden_states(tokens)
        return [lp[:, -1].float().cpu() for _, lp in fwd.head(h, log_probs=True)]

    forward()  # warm-up (CUDA context, kernels)
    out["forward_s"], lps = _timed(device, forward)
    out["last_logprobs"] = torch.cat(lps)
    n_f = max(1, len(tokens) // 2)
    out["stats_s"], stats = _timed(device, lambda: collect_statistics(fwd, tokens, tokens[:n_f], 0, False))
    name = "blk.0.ffn_down.weight"
    out["xtx"] = stats[name].xtx.double()
    out["fisher"] = np.asarray(stats[name].fisher_out, dtype=np.float64)
    ev = KLEvaluator(fwd, tokens)
    qtypes = {n: "Q4_0" for n in src.names() if len(src.shape(n)) == 2}
    cache = QuantCache()
    warm = QuantizedWeights(src, qtypes, cache=cache)  # quantization runs on the CPU either way:
    for n in qtypes:                                   # fill the cache so only the forward is timed
        warm[n]
    out["kl_s"], out["kl"] = _timed(device, lambda: ev.mean_kl(QuantizedWeights(src, qtypes, cache=cache)))
    return out


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", type=Path, help="F32/F16 GGUF (default: a random SmolLM2-135M-shaped model)")
    ap.add_argument("--seqs", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4, help="sequences per block call")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")


def main(a: argparse.Namespace) -> int:
    if a.threads:
        torch.set_num_threads(a.threads)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    with tempfile.TemporaryDirectory() as tmp:
        path = a.model or write_synthetic_model(Path(tmp) / "synthetic.gguf", SMOLLM2_135M)
        n_vocab = GGUFSource(path).config.n_vocab
        tokens = np.random.default_rng(0).integers(0, n_vocab, (a.seqs, a.ctx))
        res = {d: run_device(path, d, tokens, a.batch) for d in devices}
    n_tok = tokens.size
    print(f"model {path.name if a.model else 'synthetic SmolLM2-135M shape'}: {a.seqs} x {a.ctx} tokens, "
          f"{torch.get_num_threads()} CPU threads"
          + (f", GPU {torch.cuda.get_device_name()}" if "cuda" in res else ", no CUDA device"))
    print(f"{'step':28} " + " ".join(f"{d + ' s':>10}" for d in devices) + (f" {'speedup':>8}" if len(devices) > 1 else ""))
    for key, label in (("forward_s", f"forward ({n_tok} tokens)"), ("stats_s", "statistics + Fisher"),
                       ("kl_s", "true KL of a candidate")):
        row = f"{label:28} " + " ".join(f"{res[d][key]:>10.3f}" for d in devices)
        if len(devices) > 1:
            row += f" {res['cpu'][key] / res['cuda'][key]:>7.1f}x"
        print(row)
    if "cuda" in res:
        c, g = res["cpu"], res["cuda"]
        p, q = c["last_logprobs"].double(), g["last_logprobs"].double()
        kl = float((p.exp() * (p - q)).sum(-1).mean())
        xtx = float((c["xtx"] - g["xtx"]).abs().max() / c["xtx"].abs().max())
        fis = float(np.abs(c["fisher"] - g["fisher"]).mean() / np.abs(c["fisher"]).mean())
        print(f"CUDA vs CPU: KL of log-probs {kl:.2e}; X^T X max rel diff {xtx:.2e}; "
              f"Fisher mean rel diff {fis:.2e}; true KL {c['kl']:.6f} vs {g['kl']:.6f}")
    return 0

