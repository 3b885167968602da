"""The quality benchmark (bench/quality.py, stock.py, report.py): table/JSON/plot
plumbing, file sizes against gguf-py, and a tiny real run on the demo model (2 stock mixes, 1,024
held-out tokens) where our KL and llama-perplexity's must agree for Q8_0."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from dynsearch.bench import quality as bq
from dynsearch.bench import stock
from dynsearch.bench.report import (
    Entry,
    comparisons,
    format_comparison,
    format_table,
    plot_pareto,
    read_json,
    write_json,
)
from dynsearch.errors import BenchError


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
    for b in ("knapsack", "multipliers"):
        with pytest.raises(BenchError, match="add --with-dynsearch"):
            bq.run_quality(bq.BenchConfig(baselines=(b,), out=str(tmp_path)))
    with pytest.raises(BenchError, match="--dither-seed must lie in"):
        bq.run_quality(bq.BenchConfig(dither=-1, out=str(tmp_path)))
    for bad, msg in ((dict(sweep=-1), "--sweep must be a whole number >= 0"), (dict(n_random=0), "--random"),
                     (dict(trials=0), "--trials"), (dict(run_eval_tokens=100), "--run-eval-tokens .* >= 512")):
        with pytest.raises(BenchError, match=msg):
            bq.run_quality(bq.BenchConfig(out=str(tmp_path), **bad))
    txt = tmp_path / "model.txt"
    txt.write_text("not a model")
    with pytest.raises(BenchError, match="needs a GGUF file"):
        bq.prepare(bq.BenchConfig(model=str(txt)))


def test_cli_options_reach_the_config():
    import argparse

    ap = argparse.ArgumentParser()
    bq.add_arguments(ap)
    cfg = bq.config_from_args(ap.parse_args(["--with-dynsearch", "--types", "Q4_K, Q8_0", "--sweep", "2", "--random", "4",
                                             "--baselines", "knapsack,random", "--trials", "5"]))
    assert (cfg.types, cfg.sweep, cfg.n_random, cfg.baselines, cfg.trials) == (("Q4_K", "Q8_0"), 2, 4,
                                                                              ("knapsack", "random"), 5)
    assert bq.config_from_args(ap.parse_args([])).types == ()  # dynsearch run's defaults
    # the reference: dithered with seed 0 unless asked otherwise (a plain copy has lossless types)
    assert bq.config_from_args(ap.parse_args([])).dither == 0
    assert bq.config_from_args(ap.parse_args(["--dither-seed", "3"])).dither == 3
    assert bq.config_from_args(ap.parse_args(["--no-dither"])).dither is None
    cfg = bq.config_from_args(ap.parse_args(["--with-dynsearch", "--baselines", "multipliers,knapsack"]))
    assert cfg.baselines == ("multipliers", "knapsack")


def test_sweep_sizes_are_geometric_and_strictly_between():
    sizes = [90_000_000, 160_000_000, 100_000_000]
    sw = bq.sweep_sizes(sizes, 3)
    assert len(sw) == 3 and 90_000_000 < sw[0] < sw[1] < sw[2] < 160_000_000
    ratios = [sw[0] / 90e6, sw[1] / sw[0], sw[2] / sw[1], 160e6 / sw[2]]
    assert max(ratios) - min(ratios) < 1e-6  # equal steps in log size
    assert bq.sweep_sizes(sizes, 0) == [] and bq.sweep_sizes([5, 5], 2) == [] and bq.sweep_sizes([], 2) == []
    assert bq.budget_spec(105_455_123) == "105.455123MB"


def _cmp_entries(tmp_path: Path) -> list[Entry]:
    p = tmp_path / "x.gguf"
    S = _stats
    return [
        Entry("Q3_K_M", "stock", p, 93_000_000, 5.4, ours=S(0.10, 0.80, 3, 0.8), llama=S(0.12, 0.9, 3, 0.8)),
        Entry("Q4_K_M", "stock", p, 105_000_000, 6.2, ours=S(0.04, 0.30, 1, 0.9), llama=S(0.045, 0.36, 1, 0.9)),
        Entry("Q8_0", "stock", p, 145_000_000, 8.5, ours=S(0.0016, 0.012, 0.07, 0.98), llama=S(0.005, 0.03, 0.1, 0.96)),
        # made for Q3_K_M's size: meets the targets by ours, not by llama.cpp's 99%
        Entry("dynsearch@Q3_K_M", "dynsearch", p, 92_900_000, 5.4, target="Q3_K_M",
              ours=S(0.05, 0.50, 2, 0.85), llama=S(0.07, 0.80, 2, 0.84)),
        # a sweep point smaller than Q4_K_M and better than the file made for Q4_K_M: it is the one compared
        Entry("dynsearch@100.0MB", "dynsearch", p, 100_000_000, 5.9, ours=S(0.02, 0.2, 1, 0.9), llama=S(0.03, 0.25, 1, 0.9)),
        Entry("dynsearch@Q4_K_M", "dynsearch", p, 104_900_000, 6.1, target="Q4_K_M",
              ours=S(0.025, 0.2, 1, 0.9), llama=S(0.03, 0.25, 1, 0.9)),
        # a file larger than Q4_K_M and much better: never compared with Q4_K_M
        Entry("dynsearch@Q8_0", "dynsearch", p, 144_000_000, 8.4, target="Q8_0",
              ours=S(0.0020, 0.010, 0.05, 0.98), llama=S(0.006, 0.02, 0.1, 0.96)),
        Entry("knapsack@Q4_K_M", "knapsack", p, 104_900_000, 6.1, target="Q4_K_M",
              ours=S(0.03, 0.25, 1, 0.9), llama=S(0.036, 0.3, 1, 0.9)),
        Entry("random1@Q4_K_M", "random", p, 104_000_000, 6.1, target="Q4_K_M", ours=S(0.08, 1, 1, 0.8), llama=S(0.09, 1, 1, 0.8)),
        Entry("random2@Q4_K_M", "random", p, 104_500_000, 6.1, target="Q4_K_M", ours=S(0.12, 1, 1, 0.8), llama=S(0.09, 1, 1, 0.8)),
    ]


def test_comparison_picks_best_dynsearch_file_no_larger_than_the_mix(tmp_path):
    cs = {c.stock.label: c for c in comparisons(_cmp_entries(tmp_path))}
    assert [c.stock.label for c in comparisons(_cmp_entries(tmp_path))] == ["Q3_K_M", "Q4_K_M", "Q8_0"]
    assert cs["Q3_K_M"].dynsearch.label == "dynsearch@Q3_K_M"
    assert cs["Q4_K_M"].dynsearch.label == "dynsearch@100.0MB"  # not the larger dynsearch@Q8_0
    assert cs["Q8_0"].dynsearch.label == "dynsearch@Q8_0"
    q3, q4, q8 = cs["Q3_K_M"], cs["Q4_K_M"], cs["Q8_0"]
    assert q3.targeted and q4.targeted and not q8.targeted
    assert q3.ratio(q3.dynsearch, "ours") == pytest.approx(0.5)
    assert q3.verdict("ours") == "met"  # 0.50x mean, 0.62x 99%
    assert q3.verdict("llama") == "not met (99% 0.89x)"  # 0.58x mean, 0.89x 99%
    assert q4.verdict("ours") == "met"  # 0.50x mean, 0.67x 99%
    assert q4.verdict("llama") == "not met (mean 0.67x)"  # 0.67x mean, 0.69x 99%
    assert q8.verdict("ours") == "worse (mean 1.25x)" and q8.verdict("llama") == "worse (mean 1.20x)"
    assert len(q4.random) == 2 and q4.knapsack.label == "knapsack@Q4_K_M"
    table = format_comparison(_cmp_entries(tmp_path)).splitlines()
    assert len(table) == 2 + 3
    row = [c.strip() for c in table[3].split("|")[1:-1]]
    assert row[0] == "Q4_K_M *" and row[3] == "dynsearch@100.0MB" and row[4] == "100.0"
    assert row[6] == "0.50x, 0.67x" and row[8:10] == ["met", "not met (mean 0.67x)"]
    assert row[10] == "0.75x, 0.80x"  # knapsack / stock
    assert row[11] == "2.00x / 2.50x" and row[12] == "2.00x / 2.00x"  # random best / mean
    assert [c.strip() for c in table[4].split("|")[1:-1]][0] == "Q8_0"  # untargeted: no mark


def test_ablation_lists_each_method_at_each_stock_size(tmp_path):
    from dynsearch.bench.report import ablation_rows, format_ablation

    p, S = tmp_path / "x.gguf", _stats
    entries = _cmp_entries(tmp_path) + [
        Entry("uniform Q4_K", "uniform", p, 90_000_000, 4.5, ours=S(0.2, 1.5, 4, 0.7), llama=S(0.25, 1.6, 4, 0.7)),
        Entry("uniform Q5_K", "uniform", p, 104_000_000, 5.5, ours=S(0.06, 0.5, 2, 0.85), llama=S(0.07, 0.6, 2, 0.85)),
        Entry("uniform Q8_0", "uniform", p, 140_000_000, 8.5, ours=S(0.002, 0.02, 0.1, 0.98), llama=S(0.006, 0.03, 0.1, 0.96)),
        Entry("multipliers@Q4_K_M", "multipliers", p, 104_800_000, 6.1, target="Q4_K_M", evals=24,
              ours=S(0.028, 0.22, 1, 0.9), llama=S(0.033, 0.28, 1, 0.9)),
    ]
    entries[5].evals = 24  # dynsearch@Q4_K_M
    rows = [r for r in ablation_rows(entries) if r["stock"] == "Q4_K_M"]
    assert [r["method"] for r in rows] == ["uniform", "random", "knapsack", "multipliers", "dynsearch"]
    uni, rnd, knap, mult, dyn = rows
    assert uni["file"] == "uniform Q5_K"  # the largest one-type file no larger than the mix
    assert rnd["file"] == "2 draws" and rnd["ours_kld_mean"] == pytest.approx(0.10) and rnd["evals"] == 0
    assert knap["llama_kld_p99"] == 0.3 and mult["evals"] == 24 and dyn["file"] == "dynsearch@Q4_K_M"
    assert dyn["evals"] == 24 and dyn["ours_kld_mean"] == 0.025
    assert {r["stock"] for r in ablation_rows(entries)} == {"Q3_K_M", "Q4_K_M", "Q8_0"}  # mixes something was made for
    table = format_ablation(entries).splitlines()
    assert len(table) == 2 + len(ablation_rows(entries))
    assert "| Q4_K_M (105.0 MB) | multipliers | multipliers@Q4_K_M | 104.8 | 0.0280, 0.0330 | 0.2200, 0.2800 | 24 |" in table


def test_comparison_without_a_small_enough_dynsearch_file(tmp_path):
    e = _cmp_entries(tmp_path)[:3]
    c = comparisons(e)[0]
    assert c.dynsearch is None and c.verdict("ours") == "no file"
    assert "| - | - | - | - | - | no file | no file | - |" in format_comparison(e)
    from dynsearch.bench.report import _x

    assert (_x(0.0012), _x(0.5), _x(0.0), _x(None)) == ("1.2e-03x", "0.50x", "0.00x", "-")  # near-lossless files


# ------------------------------------------------------------------- baselines on a tiny model


TINY_TYPES = ("Q4_0", "Q5_0", "Q8_0")


@pytest.fixture(scope="module")
def tiny_searches(tmp_path_factory):
    """A :class:`bq.Searches` over a 1-layer synthetic llama (rows of 64: 32-blocks only), with an
    imatrix file, as ``prepare_searches`` would make it for two budgets (one stock mix, one sweep point)."""
    from types import SimpleNamespace

    from dynsearch.bench.synthetic import Shape, write_synthetic_model
    from dynsearch.kernels import padded, tensor_nbytes
    from dynsearch.objectives.io.gguf_source import GGUFSource
    from dynsearch.objectives.io.imatrix import ImatrixData, ImatrixEntry, write_imatrix
    from dynsearch.search.budget import parse_budget
    from dynsearch.search.space import SearchSpace, layer_groups

    d = tmp_path_factory.mktemp("baselines")
    model = write_synthetic_model(d / "m.gguf", Shape(n_layer=1, n_embd=64, n_ff=128, n_head=4, n_head_kv=2,
                                                      n_vocab=100), seed=1)
    src = GGUFSource(model)
    names = src.names()
    searched = [n for n in names if len(src.shape(n)) == 2]
    fixed = {n: "F32" for n in names if n not in searched}
    rng = np.random.default_rng(0)
    sizes = np.array([[padded(tensor_nbytes(src.shape(n), t)) for t in TINY_TYPES] for n in searched], dtype=np.int64)
    errors = rng.uniform(0.5, 2, (len(searched), 1)) * np.array([[1.0, 0.3, 0.01]])
    groups, gnames = layer_groups(searched, 1, 1)
    space = SearchSpace(tuple(searched), TINY_TYPES, tuple((TINY_TYPES,) * len(searched)), sizes, errors, groups,
                        tuple(gnames), int(sum(np.prod(src.shape(n)) for n in searched)))
    lo, hi = space.min_size(), space.max_size()
    tensor_budgets = [lo + (hi - lo) // 2, lo + (hi - lo) // 4]
    imat = {n: ImatrixEntry(rng.uniform(0.1, 10, (1, src.shape(n)[-1])).astype(np.float32), np.ones(1, np.int64))
            for n in searched}
    imatrix = write_imatrix(d / "imatrix.gguf", ImatrixData(imat, ["t.txt"], 1, 8))
    prep = SimpleNamespace(space=space, fixed=fixed, names=names, source=src, model_path=model, model_key="k" * 64,
                           cfg=SimpleNamespace(budgets=[parse_budget("1MB"), parse_budget("0.5MB")]),
                           tensor_budgets=tensor_budgets,
                           calib_desc={"description": "test"})
    s = bq.Searches(prep, ["Q4_0", "0.5MB"], ["Q4_0", None], imatrix)
    inp = SimpleNamespace(cache=stock.BenchCache(d / "cache", "m" * 16, "0"))
    (d / "cache").mkdir()
    return inp, s


def _types(path: Path) -> dict[str, str]:
    r = gguf.GGUFReader(str(path))
    return {t.name: t.tensor_type.name for t in r.tensors}


def test_knapsack_baseline_is_the_seed_written_with_the_imatrix(tiny_searches):
    from dynsearch.kernels import quantize
    from dynsearch.recipes.apply import ImatrixFile

    inp, s = tiny_searches
    space = s.prep.space
    (k,) = bq.knapsack_baseline(inp, s, [])  # the sweep point gets no baseline
    assert (k.label, k.kind, k.target, k.note) == ("knapsack@Q4_0", "knapsack", "Q4_0", "")
    seed = space.solve(s.prep.tensor_budgets[0])
    types = _types(k.path)  # read back by gguf-py
    assert {n: types[n] for n in space.names} == space.assignment(seed)
    assert {n: types[n] for n in s.prep.fixed} == s.prep.fixed
    assert len(set(space.assignment(seed).values())) > 1  # a real mix at this budget
    # the data is what quantizing with the imatrix gives (and not what it gives without)
    r = gguf.GGUFReader(str(k.path))
    imat = ImatrixFile.read(s.imatrix)
    name = next(n for n in space.names if types[n] != "Q8_0")
    data = next(t for t in r.tensors if t.name == name).data.tobytes()
    w = s.prep.source.load(name)
    assert data == quantize(w, types[name], imat.get(name)).tobytes()
    assert data != quantize(w, types[name]).tobytes()
    # when dynsearch's own file holds the same assignment, that file is the knapsack entry
    dyn = Entry("dynsearch@Q4_0", "dynsearch", k.path, k.file_bytes, k.bpw, target="Q4_0")
    (k2,) = bq.knapsack_baseline(inp, s, [dyn])
    assert k2.path == k.path and k2.note == "= dynsearch's file"


def test_random_baseline_draws_feasible_distinct_reproducible_files(tiny_searches):
    inp, s = tiny_searches
    space, budget = s.prep.space, s.prep.tensor_budgets[0]
    rs = bq.random_baseline(inp, s, 3, seed=0)
    assert [(e.label, e.kind, e.target) for e in rs] == [(f"random{k}@Q4_0", "random", "Q4_0") for k in (1, 2, 3)]
    choices = [space.choice_of({n: _types(e.path)[n] for n in space.names}) for e in rs]
    assert len({c.tobytes() for c in choices}) == 3
    seed = space.solve(budget)
    for c in choices:
        assert space.size_of(c) <= budget and space.proxy_of(c) >= space.proxy_of(seed)
    mtimes = [e.path.stat().st_mtime_ns for e in rs]
    again = bq.random_baseline(inp, s, 3, seed=0)  # same draws, the files are reused
    assert [e.path for e in again] == [e.path for e in rs] and [e.path.stat().st_mtime_ns for e in again] == mtimes
    assert [e.path for e in bq.random_baseline(inp, s, 1, seed=0)] == [rs[0].path]


# ------------------------------------------------------------------------------ tiny real run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, llama_tool, demo_model):
    from dynsearch.bench import llamacpp

    for t in llamacpp.TOOLS:
        llama_tool(t)
    d = tmp_path_factory.mktemp("bench")
    # the plain dequantized demo: the tests below use that its source format, Q4_1, is lossless there
    cfg = bq.BenchConfig(mixes=("Q4_0", "Q8_0"), baselines=("uniform",), uniform_types=("Q4_0",),
                         calib_tokens=1024, eval_tokens=1024, dither=None,
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
    from dynsearch.objectives.io.gguf_source import GGUFSource

    for e in entries:  # our header-only bpw equals eval's, from the opened model
        assert e.bpw == pytest.approx(bits_per_weight(GGUFSource(e.path)), rel=1e-12)
    assert q4.file_bytes < q8.file_bytes and q4.bpw < q8.bpw == pytest.approx(8.5, abs=0.1)  # Q4_0 mix: Q8_0 embeddings
    for e in entries:
        assert e.ours["n_tokens"] == 510  # the same 2 x 255 scored positions llama-perplexity scores
        assert 0 < e.llama["kld_mean"]
    # uniform: every matrix Q4_0 (llama-quantize --pure), where the stock Q4_0 mix keeps embeddings at Q8_0
    from dynsearch.objectives.io.gguf_header import GGUFHeader

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


def test_multipliers_baseline_runs_the_old_optuna_stage_in_a_study_of_its_own(tiny_searches, monkeypatch):
    import optuna

    from dynsearch.search.study import MOVE_TRIAL_ATTR, SearchSettings

    inp, s = tiny_searches
    space, prep = s.prep, s.prep
    weight = np.linspace(0.5, 3.0, len(space.space.names))  # the truth the proxy misjudges
    evaluated = []

    def truth(choice):
        return float((space.space.errors[np.arange(len(choice)), choice] * weight).sum())

    def kl_of(choice):
        evaluated.append(choice.copy())
        return truth(choice)

    monkeypatch.setattr(prep, "settings", lambda i: SearchSettings(budget=prep.tensor_budgets[i], n_trials=6, seed=0),
                        raising=False)
    monkeypatch.setattr(prep, "study_name", lambda i: f"budget{i}", raising=False)
    monkeypatch.setattr(prep, "kl_of", kl_of, raising=False)
    storage = optuna.storages.InMemoryStorage()
    (m,) = bq.multipliers_baseline(inp, s, progress=False, storage=storage)
    assert (m.label, m.kind, m.target) == ("multipliers@Q4_0", "multipliers", "Q4_0")
    study = optuna.load_study(study_name="budget0-multipliers", storage=storage)
    assert len(study.trials) == 6 and not any(MOVE_TRIAL_ATTR in t.user_attrs for t in study.trials)
    assert not any(k.startswith("pin_") for t in study.trials for k in t.params)
    assert evaluated  # the study measured candidates with the true KL it was given
    choice = space.space.choice_of({n: _types(m.path)[n] for n in space.space.names})
    assert truth(choice) == min(truth(c) for c in evaluated)  # the file is the best measured one
    assert space.space.size_of(choice) <= prep.tensor_budgets[0]
