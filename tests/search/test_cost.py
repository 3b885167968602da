"""The cost model printed before a run (search/cost.py): structure, scaling, the throughput cache."""

import json
import os
import socket

import numpy as np
import pytest
import torch

from dynsearch.bench.synthetic import Shape, write_synthetic_model
from dynsearch.cli import _run_config, build_parser
from dynsearch.errors import DynsearchError
from dynsearch.kernels import effective_type
from dynsearch.objectives.io.gguf_source import GGUFSource
from dynsearch.search.cluster import ProfileBackend
from dynsearch.search.run import cost
from dynsearch.search.run.config import RunConfig
from dynsearch.search.run.cost import BlockPace, CostEstimate, Throughput, throughput


def estimate(src, cfg, tp=None, pace=BlockPace()):
    """cost.estimate with blocks priced at their FLOPs (no timing of a real block: exact sums)."""
    return cost.estimate(src, cfg, tp, pace)

TYPES = ("Q4_0", "Q8_0", "Q4_K")


def _shape(n_layer):  # wide blocks, a small vocabulary: the blocks dominate every term
    return Shape(n_layer=n_layer, n_embd=256, n_ff=512, n_head=4, n_head_kv=2, n_vocab=64, tied=True)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("cost")
    return {n: GGUFSource(write_synthetic_model(d / f"m{n}.gguf", _shape(n), seed=n)) for n in (2, 4)}


def _tp(src, types=TYPES, s=2e-8, flops=1e10):
    """A fixed throughput: ``s`` seconds per weight for every type, times (1 + index of the type)."""
    pairs = {(effective_type(t, src.shape(n)[-1]).name, src.shape(n)[-1])
             for n in src.names() if len(src.shape(n)) >= 2 for t in types}
    order = {t: i for i, t in enumerate(sorted({t for t, _ in pairs}))}
    return Throughput({(t, w): s * (1 + order[t]) for t, w in pairs}, flops)


def _cfg(**kw):
    kw = {"calib_tokens": 1024, "fisher_tokens": 512, "search_tokens": 512, "eval_tokens": 512,
          "trials": 4, "workers": 1, **kw}
    return RunConfig.parse("x", ["5bpw"], TYPES, **kw)


def test_structure_and_profile_time_equal_brute_force(models):
    src = models[2]
    tp = _tp(src)
    est = estimate(src, _cfg(), tp)
    assert isinstance(est, CostEstimate)
    assert est.total_s == pytest.approx(est.stats_s + est.profile_s + est.search_s + est.write_s)
    assert min(est.stats_s, est.profile_s, est.search_s, est.write_s) > 0
    assert est.n_params == sum(int(np.prod(src.shape(n))) for n in src.names())
    assert est.peak_bytes > cost.FLOOR_BYTES and est.disk_bytes > 0
    # profiling, brute force: every 2-D tensor x every distinct written type, kernels + dW H dW^T
    want = 0.0
    for n in src.names():
        shp = src.shape(n)
        if len(shp) < 2:
            continue
        w, n_in = int(np.prod(shp)), shp[-1]
        for t in {effective_type(t, n_in).name for t in TYPES}:
            want += tp.quant_s[(t, n_in)] * w + 2.0 * w * n_in * cost.F64_SLOWDOWN / tp.flops
    assert est.profile_s == pytest.approx(want, rel=1e-12)
    # statistics: one forward over the calibration tokens, forward + backward (3x) over Fisher's,
    # 2 FLOPs per token and matrix weight (norms are not matmuls; the embedding doubles as the head)
    fwd_params = sum(int(np.prod(src.shape(n))) for n in src.names()
                     if n.startswith("blk.") and len(src.shape(n)) == 2) \
        + int(np.prod(src.shape("token_embd.weight")))
    assert est.stats_s == pytest.approx(2.0 * fwd_params * (1024 + 3 * 512) / tp.flops, rel=1e-12)
    text = est.format()
    for word in ("statistics", "profiling", "search", "GGUF", "total", "peak memory", "disk"):
        assert word in text
    # two profiling workers halve profiling; nothing is written with --no-gguf
    assert estimate(src, _cfg(workers=2), tp).profile_s == pytest.approx(est.profile_s / 2)
    assert estimate(src, _cfg(write_gguf=False), tp).write_s == 0.0


def test_moe_passes_pay_the_routed_experts_and_the_profile_their_diagonal(tmp_path):
    """An MoE token runs n_expert_used of n_expert experts, and an expert stack's proxy error weighs
    dW^2 by the diagonal of X^T X per expert (objectives/stats/moe.py): brute force on a qwen3moe."""
    shape = Shape(n_layer=2, n_embd=256, n_ff=512, n_head=4, n_head_kv=2, n_vocab=64, tied=True,
                  arch="qwen3moe", n_expert=8, n_expert_used=2, n_ff_exp=256)
    src = GGUFSource(write_synthetic_model(tmp_path / "moe.gguf", shape, seed=0))
    tp = _tp(src)
    est = estimate(src, _cfg(), tp)
    mats = [n for n in src.names() if len(src.shape(n)) >= 2]
    stacks = [n for n in mats if "_exps" in n]
    assert len(stacks) == 6 and all(len(src.shape(n)) == 3 and src.shape(n)[0] == 8 for n in stacks)
    fwd_params = sum(int(np.prod(src.shape(n))) * (2 / 8 if n in stacks else 1)
                     for n in mats if n.startswith("blk.")) + int(np.prod(src.shape("token_embd.weight")))
    assert est.stats_s == pytest.approx(2.0 * fwd_params * (1024 + 3 * 512) / tp.flops, rel=1e-12)
    want = 0.0
    for n in mats:
        shp = src.shape(n)
        w, n_in = int(np.prod(shp)), shp[-1]
        for t in {effective_type(t, n_in).name for t in TYPES}:
            want += tp.quant_s[(t, n_in)] * w + 2.0 * w * (1 if n in stacks else n_in) * cost.F64_SLOWDOWN / tp.flops
    assert est.profile_s == pytest.approx(want, rel=1e-12)
    assert est.parts["stats_disk_bytes"] == sum(4 * (src.shape(n)[0] if n in stacks else src.shape(n)[-1])
                                                * src.shape(n)[-1] for n in mats)


def test_doubling_layers_doubles_statistics_and_profiling_not_peak_memory(models):
    a, b = (estimate(models[n], _cfg(), _tp(models[n])) for n in (2, 4))
    assert b.parts["profile_blocks_s"] == pytest.approx(2 * a.parts["profile_blocks_s"], rel=1e-9)
    for f in ("stats_s", "profile_s", "search_s"):
        assert 1.8 < getattr(b, f) / getattr(a, f) <= 2.0, f  # the head and embedding do not double
    assert 1.5 < b.disk_bytes / a.disk_bytes <= 2.0
    # memory: one block at a time, so the peak does not grow with the layers (beyond the
    # quantized-tensor cache, which holds at most the whole model)
    grow = b.peak_bytes - a.peak_bytes
    assert grow == b.parts["quant_cache_bytes"] - a.parts["quant_cache_bytes"]
    assert b.parts["block_bytes"] == a.parts["block_bytes"] and b.parts["grams_bytes"] == a.parts["grams_bytes"]
    # more trials or more budgets cost more search time
    assert estimate(models[2], _cfg(trials=8), _tp(models[2])).search_s > a.search_s


def test_throughput_is_measured_once_and_cached(tmp_path, monkeypatch):
    calls = []

    def fake_quant(t, n, *a, **k):
        calls.append((t, n))
        return 1e-8 * n

    monkeypatch.setattr(cost, "measure_quant", fake_quant)
    monkeypatch.setattr(cost, "measure_matmul_flops", lambda *a, **k: calls.append("flops") or 5e9)
    path = tmp_path / "throughput.json"
    tp = throughput({("Q4_0", 256), ("Q8_0", 512)}, cache=path)
    assert sorted(calls, key=str) == sorted([("Q4_0", 256), ("Q8_0", 512), "flops"], key=str)
    assert tp.flops == 5e9 and tp.quant_s[("Q8_0", 512)] == pytest.approx(512e-8)
    on_disk = json.loads(path.read_text())[socket.gethostname()]
    assert on_disk["quant"]["Q4_0@256"] == pytest.approx(256e-8)
    calls.clear()
    again = throughput({("Q4_0", 256)}, cache=path)  # all cached: nothing measured
    assert calls == [] and again.quant_s == {("Q4_0", 256): pytest.approx(256e-8)}
    throughput({("Q4_0", 256), ("Q6_K", 256)}, cache=path)  # only the new pair
    assert calls == [("Q6_K", 256)]
    calls.clear()
    path.write_text("{not json")  # a damaged cache is measured again, not an error
    throughput({("Q4_0", 256)}, cache=path)
    assert calls.count("flops") == 1 and ("Q4_0", 256) in calls
    assert json.loads(path.read_text())[socket.gethostname()]["quant"]["Q4_0@256"] == pytest.approx(256e-8)


def test_measured_throughput_is_sane():
    s = cost.measure_quant("Q4_0", 256, n_weights=4096, repeat=1)
    assert 1e-11 < s < 1e-3  # seconds per weight
    assert cost.measure_matmul_flops(n=128, repeat=1) > 1e6


def test_cli_estimate_prints_and_runs_nothing(models, tmp_path, monkeypatch, capsys):
    from dynsearch.cli import main

    monkeypatch.setattr(cost, "throughput", lambda pairs, cache=None, device="cpu": Throughput(
        {p: 1e-8 for p in pairs}, 1e10))
    rc = main(["run", str(models[2].path), "--budget", "5bpw", "--types", "Q4_0,Q8_0", "--out", str(tmp_path / "o"),
               "--estimate", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0 and "estimate (" in out and "peak memory" in out
    assert not (tmp_path / "o").exists()  # nothing run, nothing written


def test_format_taken_puts_each_phase_beside_its_estimate():
    est = cost.CostEstimate(stats_s=2, profile_s=3, search_s=4, write_s=1, peak_bytes=0, disk_bytes=0,
                            workers=1, n_params=1)
    taken = {"statistics": 1.0, "profiling": 2.0, "search": 3.0, "held-out": 0.5, "GGUF": 130.0}
    assert cost.format_taken(taken, est) == (
        "time: statistics 1.0 s (est. 2.0 s), profiling 2.0 s (est. 3.0 s), search 3.5 s (est. 4.0 s), "
        "GGUF 2.2 min (est. 1.0 s); total 2.3 min (est. 10.0 s)")  # search: the trials + held-out
    assert cost.format_taken(taken) == ("time: statistics 1.0 s, profiling 2.0 s, search 3.5 s, "
                                        "GGUF 2.2 min; total 2.3 min")


def test_block_pace_is_measured_on_the_model_and_scales_the_passes(models):
    src = models[2]
    pace = cost.measure_block_pace(src, 64, 1e10)
    assert pace.plain >= 1.0 and pace.capture >= 1.0  # never faster than its FLOPs
    tp = _tp(src)
    base, paced = estimate(src, _cfg(), tp), estimate(src, _cfg(), tp, BlockPace(2.0, 3.0))
    blocks = sum(int(np.prod(src.shape(n))) for n in src.names() if n.startswith("blk.") and len(src.shape(n)) == 2)
    head = int(np.prod(src.shape("token_embd.weight")))
    # statistics: the capture's pace over the calibration tokens, 3x the plain one over Fisher's
    want = 2.0 * (1024 * (3.0 * blocks + head) + 3 * 512 * (2.0 * blocks + head)) / tp.flops
    assert paced.stats_s == pytest.approx(want, rel=1e-12)
    assert paced.search_s > base.search_s and paced.profile_s == base.profile_s


def test_block_pace_runs_on_the_run_device(models, monkeypatch):
    """Every tensor reaching the block math is on the run's device. torch's 'meta' device (shapes
    without data, no GPU needed) refuses a CPU tensor mixed into an operation as CUDA does: the
    random hidden states the pace was timed on were made on the CPU (`--device cuda` crashed in
    rms_norm). The statistics' capture reads values (meta has none): a device check stands in."""
    seen = []

    class DeviceCheck:  # the capture's interface: (tensor name, its input rows)
        def __init__(self, cfg):
            pass

        def __call__(self, name, x):
            seen.append((name, x.device.type))

    monkeypatch.setattr(cost, "ActivationStats", DeviceCheck)
    pace = cost.measure_block_pace(models[2], 16, 1e10, device="meta")
    assert pace.plain >= 1.0 and pace.capture >= 1.0
    assert len(seen) == 2 * 7 and {d for _, d in seen} == {"meta"}  # 7 linear inputs, twice


def test_matmul_rate_and_its_cache_are_per_device(tmp_path, monkeypatch):
    got = []
    monkeypatch.setattr(cost, "measure_matmul_flops", lambda *a, device="cpu", **k: got.append(device) or 1e9)
    monkeypatch.setattr(cost, "measure_quant", lambda t, n, *a, **k: 1e-8)
    timed = []  # the torch quantizers, timed on the device for the pairs they cover
    monkeypatch.setattr(cost, "measure_device_quant", lambda t, n, device, **k: timed.append((t, device)) or 1e-10)
    path = tmp_path / "throughput.json"
    pairs = {("Q4_0", 256), ("IQ3_S", 256)}  # IQ3_S: no torch quantizer
    cpu = throughput(pairs, cache=path)
    assert cpu.flops == 1e9 and cpu.device_quant_s == {} and cpu.profile_quant_s("Q4_0", 256) == 1e-8
    gpu = throughput(pairs, cache=path, device="cuda:1")
    assert gpu.flops == 1e9 and gpu.device_quant_s == {("Q4_0", 256): 1e-10}
    assert gpu.profile_quant_s("Q4_0", 256) == 1e-10 and gpu.profile_quant_s("IQ3_S", 256) == 1e-8
    throughput(pairs, cache=path, device="cuda")  # cached: any CUDA device of this host
    assert got == ["cpu", "cuda:1"] and timed == [("Q4_0", "cuda:1")]
    mine = json.loads(path.read_text())[socket.gethostname()]
    assert set(mine) == {"flops", "flops@cuda", "quant"}
    assert set(mine["quant"]) == {"Q4_0@256", "IQ3_S@256", "Q4_0@256@cuda"}
    assert cost.measure_matmul_flops(n=64, repeat=1, device="meta") > 0  # runs where asked


def test_gpu_profile_runs_the_torch_quantizers_and_error_term_on_the_device_whatever_the_workers(models):
    """On a GPU, what runs there is not divided among the profiling workers; the host's kernels are."""
    src = models[2]
    tp = _tp(src)
    on_dev = Throughput(tp.quant_s, tp.flops, {p: 0.0 for p in tp.quant_s if p[0] == "Q4_0"})
    cpu = estimate(src, _cfg(workers=4), on_dev)
    gpu = {w: estimate(src, _cfg(workers=w, device="meta"), on_dev) for w in (1, 4)}
    host_q = sum(tp.quant_s[(effective_type(t, src.shape(n)[-1]).name, src.shape(n)[-1])] * int(np.prod(src.shape(n)))
                 for n in src.names() if len(src.shape(n)) >= 2
                 for t in {effective_type(t, src.shape(n)[-1]).name for t in TYPES} if t != "Q4_0")
    err = cpu.profile_s * 4 - host_q  # the CPU's error term, divided among its 4 workers
    assert gpu[1].profile_s == pytest.approx(host_q + err, rel=1e-12)
    assert gpu[4].profile_s == pytest.approx(host_q / 4 + err, rel=1e-12)


def test_profiling_uses_every_core_by_default():
    cores = len(os.sched_getaffinity(0))
    assert RunConfig.parse("x", ["5bpw"]).workers == cores
    args = build_parser().parse_args(["run", "m.gguf", "--budget", "5bpw"])
    assert _run_config(args).workers == cores and _run_config(args).profile_backend().n_jobs == cores
    args = build_parser().parse_args(["run", "m.gguf", "--budget", "5bpw", "--workers", "1", "--device", "cpu"])
    assert _run_config(args).profile_backend() == ProfileBackend(n_jobs=1, device="cpu")
    if torch.cuda.is_available():
        args = build_parser().parse_args(["run", "m.gguf", "--budget", "5bpw", "--device", "cuda"])
        assert _run_config(args).profile_backend() == ProfileBackend(n_jobs=cores, device="cuda")
    else:  # --device is checked where it is parsed: one line, before any work
        args = build_parser().parse_args(["run", "m.gguf", "--budget", "5bpw", "--device", "cuda"])
        with pytest.raises(DynsearchError, match="CUDA is not available"):
            _run_config(args)
