"""What a run will cost on this machine, before it starts: time of each phase, peak memory, disk.

From the model's shapes and measured throughput of this machine: each candidate type's
quantize + dequantize kernel timed on a sample of rows (cached per host, type and row width in
``~/.cache/dynsearch/throughput.json``), and torch's float32 matmul rate, which prices the
forward passes (2 x tokens x parameters FLOPs, 3x that for the Fisher pass's backward) and the
profiler's error term (2 x rows x n_in^2 FLOPs per tensor and type: ``dW H dW^T``, in float64).
The blocks' share of a pass is scaled by :class:`BlockPace`, the model's heaviest block timed
once before the estimate (loading, attention and the statistics' capture, which FLOPs miss).
Not priced: reading a model that does not fit the page cache from disk::

    est = estimate(source, cfg)      # cfg: config.RunConfig
    print(est.format())
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dynsearch.atomic import atomic_write_text
from dynsearch.kernels import dequantize, effective_type, quantize, tensor_nbytes
from dynsearch.kernels.torch_quant import dequantize_rows, quantize_rows, torch_quantizable
from dynsearch.objectives.evaluate import default_cache_bytes
from dynsearch.objectives.forward import HEAD_ROWS_BYTES, BlockwiseForward, synchronize, to_device
from dynsearch.objectives.stats.capture import ActivationStats, CaptureConfig, input_group
from dynsearch.objectives.stats.fisher import HEAD_CHUNK_BYTES
from dynsearch.objectives.stats.moe import is_expert_stack
from dynsearch.system import cache_root

SAMPLE_WEIGHTS = 1 << 17  # weights timed per (type, row width): a few ms each once compiled
F64_SLOWDOWN = 2.0  # float64 matmul time over float32 (half the SIMD lanes): the profiler's error term
REVISIT = 0.15  # share of tensors whose (tensor, type) pair a trial quantizes anew (QuantCache misses)
FLOOR_BYTES = 450 << 20  # python + torch + numba + optuna, measured RSS of an idle run process


@dataclass(frozen=True)
class Throughput:
    """Seconds per weight of quantize + dequantize per (type, row width), and matmul FLOP/s."""

    quant_s: dict[tuple[str, int], float]
    flops: float  # float32 matmul FLOP/s of torch on the run's device (this machine's CPUs: all threads)
    # the profile's quantize + dequantize on the run's device, for the pairs its torch quantizers
    # cover (kernels/torch_quant.py); the others, and every trial's and the GGUF's, are quant_s
    device_quant_s: dict[tuple[str, int], float] = field(default_factory=dict)

    def profile_quant_s(self, qtype: str, n_per_row: int) -> float:
        return self.device_quant_s.get((qtype, n_per_row), self.quant_s[(qtype, n_per_row)])


@dataclass
class CostEstimate:
    stats_s: float  # activations + Fisher pass
    profile_s: float  # every tensor x every type
    search_s: float  # reference, the trials, the held-out measurement
    write_s: float  # the GGUF
    peak_bytes: int  # resident memory at the peak
    disk_bytes: int  # statistics cache, Fisher spill, GGUF(s)
    workers: int
    n_params: int
    parts: dict[str, float] = field(default_factory=dict)  # finer items (seconds or bytes)

    @property
    def total_s(self) -> float:
        return self.stats_s + self.profile_s + self.search_s + self.write_s

    def phases(self) -> dict[str, float]:
        """Seconds per phase, keyed as :func:`phase_seconds`."""
        return {"statistics": self.stats_s, "profiling": self.profile_s, "search": self.search_s,
                "GGUF": self.write_s}

    def format(self) -> str:
        def t(s: float) -> str:
            return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"

        def b(x: float) -> str:
            return f"{x / 1e9:.2f} GB" if x >= 1e8 else f"{x / 1e6:.0f} MB"

        return (f"estimate ({self.n_params / 1e6:.0f}M parameters, {self.workers} profiling "
                f"worker{'s' if self.workers > 1 else ''}, this machine's measured throughput):\n"
                f"  statistics {t(self.stats_s)}, profiling {t(self.profile_s)}, search "
                f"{t(self.search_s)}, GGUF {t(self.write_s)}: total {t(self.total_s)}\n"
                f"  peak memory {b(self.peak_bytes)}, disk {b(self.disk_bytes)}")


def format_seconds(x: float) -> str:
    return f"{x:.1f} s" if x < 120 else f"{x / 60:.1f} min" if x < 7200 else f"{x / 3600:.1f} h"


def phase_seconds(seconds: dict[str, float]) -> dict[str, float]:
    """A RunResult's ``seconds`` in the estimate's phases (its search includes the held-out KL)."""
    return {"statistics": seconds.get("statistics", 0.0), "profiling": seconds.get("profiling", 0.0),
            "search": seconds.get("search", 0.0) + seconds.get("held-out", 0.0), "GGUF": seconds.get("GGUF", 0.0)}


def format_taken(seconds: dict[str, float], est: CostEstimate | None = None) -> str:
    """The phases' measured wall time (a RunResult's ``seconds``), each beside its estimate."""
    taken = phase_seconds(seconds)
    guess = None if est is None else est.phases()
    parts = [f"{k} {format_seconds(v)}" + ("" if guess is None else f" (est. {format_seconds(guess[k])})")
             for k, v in taken.items()]
    total = f"total {format_seconds(sum(taken.values()))}" + ("" if est is None else f" (est. {format_seconds(est.total_s)})")
    return f"time: {', '.join(parts)}; {total}"


# ---------------------------------------------------------------------------------------------
# Measurement (cached)


def _cache_path() -> Path:
    return cache_root() / "throughput.json"


def measure_matmul_flops(n: int = 1024, repeat: int = 3, device: str = "cpu") -> float:
    """Float32 matmul FLOP/s on ``device``, best of ``repeat`` (a busy machine's noise only
    slows a run down)."""
    a, h = to_device(torch.randn(4 * n, n), device), to_device(torch.randn(n, n), device)
    a @ h  # warm-up
    synchronize(device)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        a @ h
        synchronize(device)
        best = min(best, time.perf_counter() - t)
    return 2.0 * 4 * n * n * n / max(best, 1e-9)


def measure_quant(qtype: str, n_per_row: int, n_weights: int = SAMPLE_WEIGHTS, repeat: int = 2) -> float:
    """Seconds per weight of quantize (with an importance vector) + dequantize, best of ``repeat``
    on about ``n_weights`` weights (enough that the kernels' fixed costs do not count)."""
    rng = np.random.default_rng(0)
    rows = max(4, n_weights // n_per_row)
    w = rng.standard_normal((rows, n_per_row), dtype=np.float32)
    imp = rng.random(n_per_row, dtype=np.float32) + 0.1
    dequantize(quantize(w[:4], qtype, imp), qtype, n_per_row)  # compile / warm up
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        dequantize(quantize(w, qtype, imp), qtype, n_per_row)
        best = min(best, time.perf_counter() - t)
    return best / w.size


def measure_device_quant(qtype: str, n_per_row: int, device: str, n_weights: int = 1 << 22,
                         repeat: int = 2) -> float:
    """Seconds per weight of the torch quantizer + dequantizer of ``qtype`` on ``device`` (with an
    importance vector, as the profile runs them), best of ``repeat`` on about ``n_weights``
    weights (a GPU needs millions before its launch overheads stop counting)."""
    rows = max(4, n_weights // n_per_row)
    g = torch.Generator().manual_seed(0)
    w = to_device(torch.randn(rows, n_per_row, generator=g), device)
    imp = to_device(torch.rand(n_per_row, generator=g) + 0.1, device)
    dequantize_rows(quantize_rows(w[:4], qtype, imp), qtype, n_per_row)  # warm up
    synchronize(device)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        dequantize_rows(quantize_rows(w, qtype, imp), qtype, n_per_row)
        synchronize(device)
        best = min(best, time.perf_counter() - t)
    return best / w.numel()


def _flops_key(device: str) -> str:
    """The cache's key of the matmul rate on ``device`` ("flops" for the CPU, as before devices)."""
    kind = torch.device(device).type
    return "flops" if kind == "cpu" else f"flops@{kind}"


def throughput(pairs: set[tuple[str, int]], cache: Path | None = None, device: str = "cpu") -> Throughput:
    """Measured throughput of ``(type, width)`` pairs (the kernels, on this host's CPUs) and of
    the matmul on ``device`` (the passes and the profiler's error term), read from / added to
    the per-host cache."""
    path = cache or _cache_path()
    host = socket.gethostname()
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    mine = data.get(host, {}) if isinstance(data, dict) else {}
    changed = False
    fkey = _flops_key(device)
    if not isinstance(mine.get(fkey), (int, float)):
        mine[fkey], changed = measure_matmul_flops(device=device), True
    quant = mine.setdefault("quant", {})
    for t, n in sorted(pairs):
        key = f"{t}@{n}"
        if not isinstance(quant.get(key), (int, float)):
            quant[key], changed = measure_quant(t, n), True
    kind = torch.device(device).type
    on_device = {(t, n) for t, n in pairs if t in torch_quantizable()} if kind != "cpu" else set()
    for t, n in sorted(on_device):
        key = f"{t}@{n}@{kind}"
        if not isinstance(quant.get(key), (int, float)):
            quant[key], changed = measure_device_quant(t, n, device), True
    if changed:
        data = data if isinstance(data, dict) else {}
        data[host] = mine
        try:
            atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True))
        except OSError:
            pass  # a read-only home: measured again next time
    return Throughput({(t, n): float(quant[f"{t}@{n}"]) for t, n in pairs}, float(mine[fkey]),
                      {(t, n): float(quant[f"{t}@{n}@{kind}"]) for t, n in on_device})


# ---------------------------------------------------------------------------------------------
# The model


@dataclass(frozen=True)
class BlockPace:
    """Measured time of the model's heaviest block over what its FLOPs at ``Throughput.flops``
    predict: plainly (the forward of a trial or of the Fisher pass) and with the statistics'
    capture (``X^T X`` in float64, imatrix sums). Weight loading, attention, norms and the
    capture are what a FLOP count misses."""

    plain: float = 1.0
    capture: float = 1.0


def measure_block_pace(source, seq_len: int, flops: float, device: str = "cpu") -> BlockPace:
    """Time the heaviest block of ``source`` (weights loaded from the file, as a pass does) on one
    sequence of ``seq_len`` random hidden states on ``device``, plainly and with the statistics'
    capture; best of two each."""
    fwd = BlockwiseForward(source, device=device, batch_size=1)
    n = fwd.cfg.n_layer
    if n == 0:
        return BlockPace()
    params = [sum(int(np.prod(source.shape(x))) for x in source.names()
                  if x.startswith(f"blk.{il}.") and len(source.shape(x)) >= 2) for il in range(n)]
    il = int(np.argmax(params))
    ideal = 2.0 * seq_len * params[il] / flops
    h0 = torch.randn(1, seq_len, fwd.cfg.n_embd, generator=torch.Generator().manual_seed(0))

    def best(capture) -> float:
        times = []
        for _ in range(2):
            h = to_device(h0.clone(), fwd.device)  # run_block writes into h
            synchronize(fwd.device)
            t = time.perf_counter()
            fwd.run_block(il, h, capture=capture() if capture else None)
            synchronize(fwd.device)
            times.append(time.perf_counter() - t)
        return min(times)

    plain = best(None)
    captured = best(lambda: ActivationStats(CaptureConfig(second_moment=True)))
    return BlockPace(max(1.0, plain / max(ideal, 1e-12)), max(1.0, captured / max(ideal, 1e-12)))


def estimate(source, cfg, tp: Throughput | None = None, pace: BlockPace | None = None) -> CostEstimate:
    """Cost of ``dynsearch run`` with ``cfg`` (a RunConfig) on ``source``, from ``tp`` (default:
    this machine's, measured once and cached) and ``pace`` (default: measured now on the model's
    heaviest block; ``BlockPace()`` prices blocks at their FLOPs alone)."""
    mc = source.config
    names = [n for n in source.names() if len(source.shape(n)) >= 2]
    shapes = {n: source.shape(n) for n in names}
    eff = {n: sorted({effective_type(t, shapes[n][-1]).name for t in cfg.types}) for n in names}
    if tp is None:
        tp = throughput({(t, shapes[n][-1]) for n in names for t in eff[n]}, device=cfg.device)
    workers = max(1, int(cfg.workers))
    n_params = int(sum(int(np.prod(source.shape(n))) for n in source.names()))
    # an MoE token runs n_expert_used of each stack's n_expert experts: the passes pay that share
    routed = mc.n_expert_used / mc.n_expert if mc.n_expert else 1.0
    block_params = sum(int(np.prod(s)) * (routed if is_expert_stack(n) else 1.0)
                       for n, s in shapes.items() if n.startswith("blk."))
    head_name = "output.weight" if "output.weight" in shapes else "token_embd.weight"
    head_params = int(np.prod(shapes[head_name]))

    if pace is None:
        pace = measure_block_pace(source, cfg.seq_len, tp.flops, cfg.device)

    def fwd_s(tokens: int, capture: bool = False) -> float:
        blocks = block_params * (pace.capture if capture else pace.plain)
        return 2.0 * tokens * (blocks + head_params) / tp.flops

    # profiling: per tensor and written type, the kernels + the error term (2 n_rows n_in^2). On a
    # GPU, the torch quantizers and the error term run there, one at a time whatever the workers;
    # the host's kernels (types without a torch quantizer) share the workers
    gpu = torch.device(cfg.device).type != "cpu"
    host, dev = {}, {}
    for n, shp in shapes.items():
        w = int(np.prod(shp))
        on_dev = sum(tp.profile_quant_s(t, shp[-1]) * w for t in eff[n] if (t, shp[-1]) in tp.device_quant_s)
        on_host = sum(tp.quant_s[(t, shp[-1])] * w for t in eff[n] if (t, shp[-1]) not in tp.device_quant_s)
        if is_expert_stack(n):  # per expert, the diagonal of X^T X: (dW^2) h, 2 w FLOPs (moe.expert_error)
            err = len(eff[n]) * 2.0 * w / (tp.flops / F64_SLOWDOWN)
        else:  # in float64: quant_error
            err = len(eff[n]) * 2.0 * w * shp[-1] / (tp.flops / F64_SLOWDOWN)
        host[n] = on_host + (0.0 if gpu else err)
        dev[n] = on_dev + (err if gpu else 0.0)
    profile = {n: host[n] / workers + dev[n] for n in shapes}
    profile_s = sum(profile.values())
    stats_s = fwd_s(cfg.calib_tokens, capture=True) + 3.0 * fwd_s(cfg.fisher_tokens)
    # a trial: the forward on the search tokens and dequantizing every tensor; quantizing only
    # the pairs QuantCache misses (the whole model once, then about REVISIT of it per trial)
    quant_model_s = sum(np.mean([tp.quant_s[(t, shapes[n][-1])] for t in eff[n]]) * int(np.prod(shapes[n]))
                        for n in names)
    trial_s = fwd_s(cfg.search_tokens) + REVISIT * quant_model_s
    n_budgets = len(cfg.budgets)
    search_s = fwd_s(cfg.search_tokens) + n_budgets * (quant_model_s + (cfg.trials + 1) * trial_s
                                                      + 2 * fwd_s(cfg.eval_tokens))
    write_s = n_budgets * quant_model_s if cfg.write_gguf else 0.0

    # memory: the floor, one block's weights twice (the model's and a candidate's), the largest
    # layer's X^T X (float64, per distinct input), the hidden states, the head (the model's and a
    # candidate's) with its chunk of logits and their float64 KL temporaries, or a profiling
    # worker's tensors, whichever is more; the quantized-tensor cache
    d = mc.n_embd
    layers = [[n for n in shapes if n.startswith(f"blk.{il}.")] for il in range(mc.n_layer)]
    block_bytes = max((4 * sum(int(np.prod(shapes[n])) for n in ns) for ns in layers), default=0)
    grams = max((8 * sum({input_group(n): shapes[n][-1] ** 2 for n in ns if len(shapes[n]) == 2}.values())
                 for ns in layers), default=0)
    hidden = 4 * d * (cfg.calib_tokens + cfg.search_tokens + cfg.eval_tokens) * 2
    head = 4 * head_params * 2 + max(12 * HEAD_ROWS_BYTES, 6 * HEAD_CHUNK_BYTES)
    largest = max(4 * int(np.prod(s)) for s in shapes.values())
    per_worker = 3 * largest  # a tensor, its dequantized candidate, chunks of the error term
    qcache = min(default_cache_bytes(), sum(tensor_nbytes(shapes[n], eff[n][-1]) for n in names))
    peak = FLOOR_BYTES + 2 * block_bytes + grams + hidden + max(head, workers * per_worker) + qcache

    # disk: the statistics (X^T X per tensor, float32), the Fisher spill, the GGUF(s)
    stats_disk = sum(4 * (shapes[n][0] if is_expert_stack(n) else shapes[n][-1]) * shapes[n][-1] for n in names)
    spill = 4 * d * cfg.fisher_tokens * mc.n_layer
    gguf = n_budgets * sum(tensor_nbytes(shapes[n], eff[n][len(eff[n]) // 2]) for n in names)
    return CostEstimate(stats_s=stats_s, profile_s=profile_s, search_s=search_s, write_s=write_s,
                        peak_bytes=int(peak), disk_bytes=int(stats_disk + spill + gguf),
                        workers=workers, n_params=n_params,
                        parts={"profile_blocks_s": sum(v for n, v in profile.items() if n.startswith("blk.")), "trial_s": float(trial_s), "forward_token_s": fwd_s(1),
                               "block_bytes": block_bytes, "grams_bytes": grams,
                               "quant_cache_bytes": qcache, "stats_disk_bytes": stats_disk})
