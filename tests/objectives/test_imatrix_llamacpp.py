"""End to end: our imatrix of the demo model against ``llama-imatrix``'s on the same text.

Both run on an F32 copy of the demo model (its Q4_1/Q8_0 weights dequantized), llama-imatrix with
``-b 512`` (one chunk per batch: with several sequences per batch llama.cpp splits them into equal
ubatches and skips the leftover ones under 16 tokens, which no per-chunk forward reproduces), an
F32 KV cache and no flash attention (its default F16 cache perturbs everything after the first
attention by ~1e-3). Then the only differences are float32 summation order: measured 2026-11,
3 chunks of 512: per-tensor relative L1 <= 1.7e-6, per-column relative <= 1.2e-4 (one small column),
median per-tensor max 2e-6.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from dynsearch.objectives.io.imatrix import read_imatrix, write_imatrix
from dynsearch.objectives.stats.capture import ActivationStats, calibration_chunks, collect

N_CTX, N_CHUNKS = 512, 2

pytestmark = pytest.mark.slow


def _text(min_chars: int) -> str:
    from dynsearch.objectives import calibration

    docs = calibration.read_documents(Path(calibration.__file__).parent / "data" / "calib.jsonl.gz")
    parts, size = [], 0
    for d in docs:
        parts.append(calibration.document_text(d))
        size += len(parts[-1])
        if size >= min_chars:
            break
    return "\n\n".join(parts)


@pytest.fixture(scope="module")
def both(tmp_path_factory, ggml, demo_model):
    """(ours, llama-imatrix's) ImatrixData on the same chunks of the F32 demo model."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from dynsearch import kernels
    from dynsearch.bench import llamacpp
    from dynsearch.objectives.forward import BlockwiseForward
    from dynsearch.objectives.io.gguf_source import GGUFSource
    from dynsearch.objectives.io.gguf_write import write_dequantized_copy

    try:
        exe = llamacpp.tool_path("llama-imatrix")
    except llamacpp.LlamaCppBuildError as e:
        pytest.skip(f"llama-imatrix unavailable: {e}")
    d = tmp_path_factory.mktemp("imatrix_e2e")
    model = demo_model
    text_file = d / "text.txt"
    text_file.write_text(_text(6 * N_CTX * (N_CHUNKS + 1)))

    # tokens as llama-imatrix makes them: common_tokenize(add_special=true, parse_special=false)
    vocab = llama_cpp.Llama(model_path=str(model), vocab_only=True, verbose=False)
    tokens = vocab.tokenize(text_file.read_text().encode(), add_bos=True, special=False)
    adds_bos = len(vocab.tokenize(b"a", add_bos=True)) > len(vocab.tokenize(b"a", add_bos=False))
    chunks = calibration_chunks(tokens, N_CTX, N_CHUNKS, bos_id=vocab.token_bos() if adds_bos else None)
    assert len(chunks) == N_CHUNKS

    def dequantize(data, qtype, n_per_row):  # test scaffolding: ggml where our kernels lack a type
        try:
            return kernels.dequantize(data, qtype, n_per_row)
        except NotImplementedError:
            return ggml.dequantize(data, qtype.name, n_per_row)

    f32 = write_dequantized_copy(model, d / "f32.gguf", "F32", dequantize=dequantize)
    stats = collect(BlockwiseForward(GGUFSource(f32), "cpu", batch_size=1), chunks, ActivationStats())
    ours = write_imatrix(d / "ours.gguf", stats.imatrix([str(text_file)], N_CTX))

    theirs = d / "llama.gguf"
    cmd = [exe, "-m", f32, "-f", text_file, "-o", theirs, "-c", N_CTX, "-b", N_CTX, "--chunks", N_CHUNKS,
           "-ctk", "f32", "-ctv", "f32", "-fa", "off", "--no-ppl", "-t", 2]
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    return read_imatrix(ours), read_imatrix(theirs)


def test_same_tensors_counts_and_metadata(both):
    ours, theirs = both
    assert sorted(ours.entries) == sorted(theirs.entries)
    assert len(theirs.entries) == 7 * 30  # q k v o gate up down per block; no output (tied, not collected)
    for name, e in theirs.entries.items():
        np.testing.assert_array_equal(ours.entries[name].counts, e.counts, err_msg=name)
    assert (ours.chunk_count, ours.chunk_size, ours.datasets) == (theirs.chunk_count, theirs.chunk_size,
                                                                theirs.datasets)
    assert theirs.chunk_count == N_CHUNKS


def test_importance_matches_llama_imatrix(both):
    ours, theirs = both
    worst_l1, worst_col = 0.0, 0.0
    for name in theirs.entries:
        a, b = ours.importance(name).astype(np.float64), theirs.importance(name).astype(np.float64)
        l1 = np.abs(a - b).sum() / np.abs(b).sum()
        col = float((np.abs(a - b) / np.abs(b)).max())
        assert l1 < 2e-5 and col < 2e-3, f"{name}: relative L1 {l1:.2e}, worst column {col:.2e}"
        worst_l1, worst_col = max(worst_l1, l1), max(worst_col, col)
    print(f"imatrix vs llama-imatrix: worst relative L1 {worst_l1:.2e}, worst column {worst_col:.2e}")


def test_shared_inputs_stored_separately_with_same_values(both):
    for im in both:
        for il in (0, 29):
            q = im.entries[f"blk.{il}.attn_q.weight"].in_sum2
            for other in ("attn_k", "attn_v"):
                np.testing.assert_array_equal(im.entries[f"blk.{il}.{other}.weight"].in_sum2, q)
            np.testing.assert_array_equal(im.entries[f"blk.{il}.ffn_up.weight"].in_sum2,
                                          im.entries[f"blk.{il}.ffn_gate.weight"].in_sum2)
