"""Memory: statistics streamed to disk per layer, tensors read (not mapped), bounded caches."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from dynsearch import system
from dynsearch.bench.synthetic import Shape, write_synthetic_model
from dynsearch.objectives.forward import BlockwiseForward
from dynsearch.objectives.io.gguf_source import GGUFSource
from dynsearch.objectives.stats.capture import ActivationStats, CaptureConfig
from dynsearch.objectives.stats.collect import collect_statistics
from dynsearch.objectives.stats.store import StatsFile, StatsWriter, TensorStats
from dynsearch.search import profile as profile_mod
from dynsearch.search.profile import quant_error

SHAPE = Shape(n_layer=3, n_embd=64, n_ff=128, n_head=4, n_head_kv=2, n_vocab=300, tied=False)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_synthetic_model(tmp_path_factory.mktemp("m") / "m.gguf", SHAPE, seed=3)


def test_stats_file_round_trip_and_damage(tmp_path):
    path = tmp_path / "s.npz"
    x = torch.randn(5, 5)
    with StatsWriter(path) as w:
        w.add("blk.0.attn_q.weight", "xtx", x)
        w.add_stats("token_embd.weight", TensorStats(row_weight=np.arange(3.0), fisher_col=np.ones(2)))
        with pytest.raises(ValueError, match="twice"):
            w.add("blk.0.attn_q.weight", "xtx", x)
    st = StatsFile(path)
    assert set(st) == {"blk.0.attn_q.weight", "token_embd.weight"}
    assert torch.equal(st["blk.0.attn_q.weight"].xtx, x)
    assert st["token_embd.weight"].xtx is None and st.field("token_embd.weight", "importance") is None
    np.testing.assert_array_equal(st.field("token_embd.weight", "row_weight"), np.arange(3.0))
    with np.load(path) as z:  # the np.savez layout other readers use
        assert sorted(z.files) == sorted(["blk.0.attn_q.weight|xtx", "token_embd.weight|row_weight",
                                          "token_embd.weight|fisher_col"])
    bad = tmp_path / "bad.npz"
    with StatsWriter(bad) as w:
        w.add("a", "fisher_out", np.array([1.0, np.nan]))
    with pytest.raises(ValueError, match="not finite"):
        StatsFile(bad)["a"]
    with pytest.raises(RuntimeError), StatsWriter(tmp_path / "never.npz") as w:
        w.add("a", "xtx", x)
        raise RuntimeError("interrupted")
    assert not (tmp_path / "never.npz").exists()


def test_streamed_statistics_equal_in_memory_and_brute_force(model, tmp_path):
    fwd = BlockwiseForward(GGUFSource(model), batch_size=2)
    rng = np.random.default_rng(0)
    calib, fisher = rng.integers(0, SHAPE.n_vocab, (5, 32)), rng.integers(0, SHAPE.n_vocab, (2, 32))
    mem = collect_statistics(fwd, calib, fisher, 0, progress=False)
    disk = collect_statistics(fwd, calib, fisher, 0, progress=False, path=tmp_path / "stats.npz")
    assert isinstance(disk, StatsFile) and set(disk) == set(mem)
    for name in mem:
        a, b = mem[name], disk[name]
        for f in ("xtx", "fisher_out", "importance", "row_weight", "fisher_col"):
            va, vb = getattr(a, f), getattr(b, f)
            assert (va is None) == (vb is None), (name, f)
            if va is not None:
                np.testing.assert_array_equal(np.asarray(va), np.asarray(vb))
    # brute force: X^T X of every input over all calibration tokens, one capture, nothing freed
    ref = ActivationStats(CaptureConfig(second_moment=True))
    fwd.hidden_states(calib, capture=ref)
    for il in range(SHAPE.n_layer):
        for t in ("attn_q", "attn_output", "ffn_up", "ffn_down"):
            name = f"blk.{il}.{t}.weight"
            want = (ref.second_moment(name) / calib.size).float()
            torch.testing.assert_close(disk[name].xtx, want, rtol=1e-6, atol=1e-7)


def test_read_tensor_is_a_copy_equal_to_the_mapped_bytes(model):
    src = GGUFSource(model)
    for name in ("token_embd.weight", "blk.2.ffn_down.weight", "output_norm.weight"):
        raw = src.raw(name)
        assert raw.flags.owndata and raw.flags.writeable
        np.testing.assert_array_equal(raw, src.header.data(name))


def test_load_rows_equals_the_rows_of_the_whole_tensor(model, tmp_path):
    from dynsearch.errors import ModelError
    from dynsearch.kernels import QT

    q8 = write_synthetic_model(tmp_path / "q8.gguf", SHAPE, seed=4, dtype=QT.Q8_0)
    ids = np.array([7, 0, SHAPE.n_vocab - 1, 7, 123])
    for path in (model, q8):
        src = GGUFSource(path)
        for name in ("token_embd.weight", "blk.1.ffn_down.weight"):
            full = src.load(name)
            np.testing.assert_array_equal(src.load_rows(name, ids % full.shape[0]), full[ids % full.shape[0]])
        assert src.load_rows("token_embd.weight", []).shape == (0, SHAPE.n_embd)
        with pytest.raises(ModelError, match="out of range"):
            src.load_rows("token_embd.weight", [SHAPE.n_vocab])
    # the embedding of the forward pass reads only those rows and equals the table lookup
    fwd = BlockwiseForward(GGUFSource(q8))
    tok = ids.reshape(1, -1)
    table = fwd.weight("token_embd.weight")
    torch.testing.assert_close(fwd.embed(tok), torch.nn.functional.embedding(torch.from_numpy(tok), table),
                               rtol=0, atol=0)


def test_quant_error_chunked_equals_one_chunk(monkeypatch):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((37, 16)).astype(np.float32)
    dq = (w + rng.standard_normal(w.shape).astype(np.float32) * 0.01).astype(np.float32)
    x = rng.standard_normal((100, 16))
    st = TensorStats(xtx=torch.from_numpy(x.T @ x / 100).float(), fisher_out=rng.random(37),
                     row_weight=rng.random(37), fisher_col=rng.random(16))
    whole = quant_error(w, dq, st)
    monkeypatch.setattr(profile_mod, "ERROR_CHUNK_BYTES", 8 * 16 * 5)  # 5 rows at a time
    assert quant_error(w, dq, st) == pytest.approx(whole, rel=1e-6)  # float32 d @ H per chunk
    assert quant_error(w, dq, TensorStats()) == pytest.approx(float(((dq - w).astype(np.float64) ** 2).mean()))


def test_head_batch_bounds_the_logits(model):
    fwd = BlockwiseForward(GGUFSource(model), batch_size=4)
    fwd.head_bytes = 4 * 32 * SHAPE.n_vocab * 2  # two sequences of 32 tokens
    assert fwd.head_batch(32) == 2 and fwd.head_batch(1000) == 1 and fwd.head_batch(1) == 4
    h = torch.randn(5, 32, SHAPE.n_embd)
    assert [x.shape[0] for _, x in fwd.head(h)] == [2, 2, 1]


def test_quant_cache_scales_with_the_memory_limit(monkeypatch):
    import resource

    from dynsearch import system as memory
    from dynsearch.objectives.evaluate import QuantCache

    real = resource.getrlimit
    for cap in (6 << 30, 1 << 30):
        monkeypatch.setattr(memory.resource, "getrlimit",
                            lambda r, cap=cap: (cap, cap) if r == resource.RLIMIT_DATA else real(r))
        limit = memory.memory_limit()
        assert limit <= cap and QuantCache().max_bytes == min(2 << 30, limit // 8)


@pytest.mark.slow
def test_memory_limit_reads_a_real_rlimit():
    code = ("import resource; resource.setrlimit(resource.RLIMIT_DATA, (6 << 30, 6 << 30));"
            "from dynsearch.objectives.evaluate import QuantCache; from dynsearch.system import memory_limit;"
            "print(QuantCache().max_bytes, memory_limit())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    cache, limit = map(int, out.split())
    assert limit <= 6 << 30 and cache == min(2 << 30, limit // 8)


_PEAK_CODE = """
import sys, threading, time, numpy as np, torch
from dynsearch.bench.synthetic import Shape, write_synthetic_model
from dynsearch.objectives.io.gguf_source import GGUFSource
from dynsearch.objectives.forward import BlockwiseForward
from dynsearch.objectives.stats.collect import collect_statistics
torch.set_num_threads(1)
def anon():
    for line in open('/proc/self/status'):
        if line.startswith('RssAnon'):
            return int(line.split()[1]) * 1024
L, d = int(sys.argv[1]), sys.argv[2]
m = write_synthetic_model(f'{d}/m{L}.gguf', Shape(L, 256, 2048, 4, 2, 300, True), seed=L)
fwd = BlockwiseForward(GGUFSource(m), batch_size=2)
rng = np.random.default_rng(0)
calib, fisher = rng.integers(0, 300, (2, 64)), rng.integers(0, 300, (2, 64))
collect_statistics(fwd, calib[:, :8], fisher[:, :8], 0, progress=False)  # warm up torch's allocator
base, peak, stop = anon(), [0], threading.Event()
def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], anon()); time.sleep(0.002)
threading.Thread(target=sample, daemon=True).start()
collect_statistics(fwd, calib, fisher, 0, progress=False, path=f'{d}/s{L}.npz')
stop.set()
print(max(peak[0], anon()) - base)
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_statistics_peak_memory_does_not_grow_with_layers(tmp_path):
    """Streamed statistics of a 2- and an 8-layer model whose ffn_down X^T X (2048^2 float64,
    32 MB a layer) dominates: keeping every layer's would add ~190 MB for the 6 more layers."""
    grow = {}
    for n_layer in (2, 8):
        out = subprocess.run([sys.executable, "-c", _PEAK_CODE, str(n_layer), str(tmp_path)],
                             capture_output=True, text=True, check=True).stdout
        grow[n_layer] = int(out.split()[-1])
    print(f"statistics' peak anonymous memory above the warmed-up process: {grow[2] >> 20} MB with 2 "
          f"layers, {grow[8] >> 20} MB with 8")
    assert grow[2] > 16 << 20  # the sampler saw the layer's statistics at all
    assert grow[8] - grow[2] < 48 << 20, {k: v >> 20 for k, v in grow.items()}


def test_head_rows_bound_the_logits_and_equal_the_batched_head(model, monkeypatch):
    from dynsearch.objectives import forward as forward_mod

    fwd = BlockwiseForward(GGUFSource(model), batch_size=4)
    monkeypatch.setattr(forward_mod, "HEAD_ROWS_BYTES", 4 * SHAPE.n_vocab * 7)  # 7 rows of logits
    h = torch.randn(3, 10, SHAPE.n_embd)
    for log_probs in (False, True):
        whole = torch.cat([x for _, x in fwd.head(h, log_probs=log_probs)]).reshape(30, -1)
        chunks = list(fwd.head_rows(h.reshape(30, -1), log_probs=log_probs))
        assert [s for s, _ in chunks] == [0, 7, 14, 21, 28]
        assert [x.shape for _, x in chunks] == [(7, SHAPE.n_vocab)] * 4 + [(2, SHAPE.n_vocab)]
        torch.testing.assert_close(torch.cat([x for _, x in chunks]), whole, rtol=1e-6, atol=1e-6)


def test_kl_evaluator_in_row_chunks_equals_full_logits(model, monkeypatch):
    """The run's true KL (a few rows of logits at a time) against KL computed directly from every
    position's full logits, in float64 with numpy."""
    from dynsearch.objectives import forward as forward_mod
    from dynsearch.objectives.evaluate import KLEvaluator, QuantizedWeights

    src = GGUFSource(model)
    fwd = BlockwiseForward(src, batch_size=2)
    tokens = np.random.default_rng(5).integers(0, SHAPE.n_vocab, (3, 12))
    assignment = {n: "Q4_0" for n in src.names() if len(src.shape(n)) == 2}
    cand = QuantizedWeights(src, assignment)
    built = []
    real_get = QuantizedWeights.__getitem__
    monkeypatch.setattr(QuantizedWeights, "__getitem__", lambda self, n: built.append(n) or real_get(self, n))
    monkeypatch.setattr(forward_mod, "HEAD_ROWS_BYTES", 4 * SHAPE.n_vocab * 5)  # 5 rows at a time
    ev = KLEvaluator(fwd, tokens)
    got, stats = ev.mean_kl(cand), ev.stats(cand)
    # each candidate tensor built once per pass (Mapping's own __contains__ would build it twice)
    assert sorted(built) == sorted(2 * list(assignment))

    def logp(overrides):
        x = np.concatenate([t.numpy() for _, t in fwd.logits(tokens, overrides)]).astype(np.float64)
        x -= x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    p_log, q_log = logp(None), logp({n: cand[n] for n in assignment})
    kl = (np.exp(p_log) * (p_log - q_log)).sum(-1)  # (n_seq, T)
    assert got == pytest.approx(kl.mean(), rel=1e-4)
    scored = kl[:, 6:11]  # llama-perplexity's positions: the second half, each predicting a next token
    assert stats.n_tokens == scored.size
    assert stats.kld_mean == pytest.approx(scored.mean(), rel=1e-6)
    nll_q = -np.take_along_axis(q_log[:, 6:11], tokens[:, 7:, None], -1)[..., 0]
    assert np.log(stats.ppl_q) == pytest.approx(nll_q.mean(), rel=1e-6)


def _rss_anon() -> int:
    with open("/proc/self/status") as f:
        return next(int(x.split()[1]) * 1024 for x in f if x.startswith("RssAnon"))


@pytest.mark.skipif(system._TRIM is None or system._INFO is None or not sys.platform.startswith("linux"),
                    reason="glibc's malloc_trim and mallinfo2 (Linux) are not available")
def test_trim_gives_freed_heap_memory_back_beyond_keep():
    # 100 KB arrays come from malloc's heap (under its mmap threshold); keeping every tenth
    # pins the heap, so freeing the others leaves ~270 MB free inside it, which plain free()
    # does not return to the system
    arrays = [np.ones(100_000 // 8) for _ in range(3000)]
    kept = arrays[::10]
    del arrays
    assert system.free_bytes() > 200e6
    assert not system.trim(keep=1 << 40)  # less free than keep: nothing done
    before = _rss_anon()
    assert system.trim(keep=0)
    assert before - _rss_anon() > 150e6
    assert all(float(a[0]) == 1.0 for a in kept)  # live data untouched
