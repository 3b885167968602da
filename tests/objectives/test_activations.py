"""The capture hook's statistics against brute force written after imatrix.cpp's collect_imatrix loops."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dynsearch.objectives.io.imatrix import read_imatrix, write_imatrix
from dynsearch.objectives.stats.capture import (
    ActivationStats,
    CaptureConfig,
    calibration_chunks,
    collect,
    imatrix_collects,
    input_group,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _x(rng, *shape, scale=1.0):
    return torch.from_numpy((rng.standard_normal(shape) * scale).astype(np.float32))


@pytest.mark.parametrize("device", DEVICES)
def test_dense_sums_and_counts(device):
    rng = np.random.default_rng(0)
    stats = ActivationStats()
    calls = [_x(rng, 40, 24, scale=3), _x(rng, 2, 17, 24), _x(rng, 64, 24, scale=0.01)]
    for x in calls:
        stats("blk.3.ffn_down.weight", x.to(device))
    want = np.zeros(24)
    for x in calls:  # acc[j] += x[j] * x[j] over every row, count += rows
        for row in x.reshape(-1, 24).double().numpy():
            want += row * row
    im = stats.imatrix(["t.txt"], chunk_size=32)
    e = im.entries["blk.3.ffn_down.weight"]
    np.testing.assert_allclose(e.in_sum2[0], want, rtol=1e-6)
    assert e.counts.tolist() == [40 + 34 + 64] and im.chunk_count == 138 // 32


def test_which_calls_llama_imatrix_keeps():
    rng = np.random.default_rng(1)
    stats = ActivationStats()
    stats("blk.0.attn_q.weight", _x(rng, 15, 8))  # < 16 rows: skipped
    stats("blk.0.attn_k.weight", _x(rng, 16, 8))
    stats("output.weight", _x(rng, 32, 8))
    stats("token_embd.weight", _x(rng, 32, 8))
    assert stats.names == ["blk.0.attn_k.weight"]
    with_output = ActivationStats(CaptureConfig(process_output=True))
    with_output("output.weight", _x(rng, 32, 8))
    assert with_output.names == ["output.weight"]
    assert imatrix_collects("blk.1.ffn_up.weight") and not imatrix_collects("output.weight")


@pytest.mark.parametrize("per_slot", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_moe_per_expert(per_slot, device):
    rng = np.random.default_rng(2)
    n_tok, n_used, n_expert, d = 9, 2, 5, 12  # few tokens: MUL_MAT_ID is always collected
    x = _x(rng, n_tok, n_used, d) if per_slot else _x(rng, n_tok, d)
    ids = torch.from_numpy(rng.choice(4, (n_tok, n_used)))  # expert 4 never routed to
    stats = ActivationStats()
    stats("blk.0.ffn_down_exps.weight", x.to(device), expert_ids=ids.to(device), n_expert=n_expert)
    want, counts = np.zeros((n_expert, d)), np.zeros(n_expert, np.int64)
    for idx in range(n_used):  # collect_imatrix: i11 = idx % src1->ne[1]
        for row in range(n_tok):
            ex = int(ids[row, idx])
            v = (x[row, idx] if per_slot else x[row]).double().numpy()
            want[ex] += v * v
            counts[ex] += 1
    e = stats.imatrix(["t"], 512).entries["blk.0.ffn_down_exps.weight"]
    np.testing.assert_allclose(e.in_sum2, want, rtol=1e-6)
    np.testing.assert_array_equal(e.counts, counts)
    assert e.counts[4] == 0


def test_non_finite_inputs_raise():
    x = torch.ones(20, 4)
    x[3, 1] = float("nan")
    with pytest.raises(ValueError):
        ActivationStats()("blk.0.attn_v.weight", x)


@pytest.mark.parametrize("device", DEVICES)
def test_second_moment_shared_within_a_layer(device):
    rng = np.random.default_rng(4)
    stats = ActivationStats(CaptureConfig(second_moment=True))
    xs = [_x(rng, 32, 16).to(device) for _ in range(3)]
    for x in xs:
        for name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.attn_v.weight"):
            stats(name, x.clone())  # a copy: sharing is recognised by content, not identity
        stats("blk.0.attn_output.weight", x * 2)
    want = sum(x.double().cpu().numpy().T @ x.double().cpu().numpy() for x in xs)
    q = stats.second_moment("blk.0.attn_q.weight")
    assert q is stats.second_moment("blk.0.attn_v.weight")  # one matrix for the shared input
    np.testing.assert_allclose(q.cpu().numpy(), want, rtol=1e-10)
    np.testing.assert_allclose(stats.second_moment("blk.0.attn_output.weight").cpu().numpy(), 4 * want, rtol=1e-10)
    # the diagonal of X^T X is the imatrix sum
    np.testing.assert_allclose(np.diag(want), stats.imatrix(["t"], 32).entries["blk.0.attn_k.weight"].in_sum2[0],
                               rtol=1e-6)
    with pytest.raises(ValueError):
        stats("blk.0.attn_k.weight", xs[0] + 1)  # claims to share q's input but does not


def test_second_moment_filter_and_groups():
    stats = ActivationStats(CaptureConfig(second_moment=True, second_moment_filter=lambda n: "ffn_down" not in n))
    stats("blk.1.ffn_down.weight", torch.ones(16, 4))
    stats("blk.1.ffn_up.weight", torch.ones(16, 4))
    with pytest.raises(KeyError):
        stats.second_moment("blk.1.ffn_down.weight")
    assert stats.second_moment("blk.1.ffn_gate.weight") is stats.second_moment("blk.1.ffn_up.weight")
    assert input_group("blk.12.attn_k.weight") == "blk.12.attn_in"
    assert input_group("blk.12.ffn_gate.weight") == input_group("blk.12.ffn_up.weight") == "blk.12.ffn_in"
    assert input_group("blk.12.ffn_down.weight") == "blk.12.ffn_down.weight"


def test_imatrix_file_from_stats(tmp_path):
    rng = np.random.default_rng(5)
    stats = ActivationStats()
    for _ in range(3):
        x = _x(rng, 64, 8)
        stats("blk.0.attn_q.weight", x)
        stats("blk.0.attn_k.weight", x)
    im = stats.imatrix(["calib.txt"], 64)
    back = read_imatrix(write_imatrix(tmp_path / "a.gguf", im))
    assert back.chunk_count == 3 and back.chunk_size == 64 and back.datasets == ["calib.txt"]
    np.testing.assert_array_equal(back.importance("blk.0.attn_q.weight"), back.importance("blk.0.attn_k.weight"))


def test_calibration_chunks():
    toks = np.arange(100, 100 + 2600)
    chunks = calibration_chunks(toks, 512, bos_id=1)
    assert len(chunks) == 5  # 2600 // 512, tail dropped
    for i, c in enumerate(chunks):
        assert c[0] == 1 and np.array_equal(c[1:], toks[i * 512 + 1:(i + 1) * 512])
    assert len(calibration_chunks(toks, 512, n_chunks=2)) == 2
    assert calibration_chunks(toks, 512, bos_id=None)[1][0] == toks[512]
    assert calibration_chunks(toks, 512, skip_chunks=1)[0][5] == toks[512 + 5]
    with pytest.raises(ValueError):
        calibration_chunks(toks[:1000], 512)


class _FakeForward:
    """Stands in for BlockwiseForward: one 'linear' per chunk batch, and an lm head."""

    def __init__(self):
        self.batches = []

    def hidden_states(self, tokens, overrides=None, capture=None):
        self.batches.append(tokens.shape)
        x = torch.as_tensor(tokens, dtype=torch.float32)
        capture("blk.0.ffn_down.weight", x.reshape(-1, 1))
        return x[..., None]

    def head(self, hidden, overrides=None, capture=None, log_probs=False):
        capture("output.weight", hidden.reshape(-1, 1))
        yield 0, hidden


@pytest.mark.parametrize("process_output", [False, True])
def test_collect_runs_every_chunk_once(process_output):
    chunks = calibration_chunks(np.arange(1, 5 * 32 + 7), 32)
    fwd = _FakeForward()
    stats = collect(fwd, chunks, ActivationStats(CaptureConfig(process_output=process_output)), chunks_per_pass=2)
    assert fwd.batches == [(2, 32), (2, 32), (1, 32)]
    want = float(sum((c.astype(np.float64) ** 2).sum() for c in chunks))
    im = stats.imatrix(["t"], 32)
    assert im.entries["blk.0.ffn_down.weight"].in_sum2[0, 0] == pytest.approx(want, rel=1e-6)
    assert im.chunk_count == 5 and ("output.weight" in im.entries) == process_output
