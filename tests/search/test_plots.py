"""`dynsearch plot`: the data behind the Pareto plot and the type heatmap, checked against the
study and the recipe they come from (brute force for the front), and the PNGs it writes."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from dynsearch.cli import main
from dynsearch.recipes import schema
from dynsearch.search.run.config import RunConfig
from dynsearch.search.run.plots import file_axis, load_plot_data, make_plots, pareto_front, type_grid
from dynsearch.search.run.worker import BUDGET_INDEX_ATTR, RUN_CONFIG_ATTR

optuna.logging.set_verbosity(optuna.logging.WARNING)

N_LAYER = 3
KINDS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")
OVERHEAD = 1_234_567  # header + fixed tensors of the fake run, as the byte budget estimates them
GGUF_BYTES = 88_500_000 + OVERHEAD - 200_000  # the written GGUF of the recipe's trial (88.5 MB of searched data)


def brute_front(pts):
    keep = []
    for i, (x, y) in enumerate(pts):
        dominated = any((a <= x and b <= y and (a < x or b < y)) or ((a, b) == (x, y) and j < i)
                        for j, (a, b) in enumerate(pts) if j != i)
        if not dominated:
            keep.append(i)
    return sorted(keep, key=lambda i: pts[i][0])


@pytest.mark.parametrize("seed", range(6))
def test_pareto_front_is_the_brute_force_front(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 40))
    pts = [(float(x), float(y)) for x, y in zip(rng.integers(0, 12, n), rng.integers(0, 12, n))]  # many ties
    assert pareto_front(pts) == brute_front(pts)


def test_pareto_front_edge_cases():
    assert pareto_front([]) == []
    assert pareto_front([(1.0, 5.0)]) == [0]
    assert pareto_front([(2.0, 1.0), (2.0, 1.0)]) == [0]  # equal points: the first
    assert pareto_front([(3.0, 1.0), (1.0, 3.0), (2.0, 2.0), (2.0, 2.5)]) == [1, 2, 0]


def _recipe(types_of, name, study, estimate, kl=0.0123):
    tensors = {"token_embd.weight": types_of("token_embd")}
    for i in range(N_LAYER):
        for k in KINDS:
            tensors[f"blk.{i}.{k}.weight"] = "F32" if k.endswith("norm") else types_of(f"{i}.{k}")
    tensors["output_norm.weight"] = "F32"
    tensors["output.weight"] = types_of("output")
    return schema.Recipe(name=name, model=schema.ModelInfo("Tiny", "llama"), tensors=tensors,
                         budget={"spec": "x"}, achieved={"bytes_estimate": estimate, "bpw": 5.0},
                         kl={"kld_mean": kl}, search={"study": study, "search_kl": 0.011})


def _make_study(storage, name, budget_spec, budget_bytes, trials, index, out):
    study = optuna.create_study(storage=storage, study_name=name)
    study.set_user_attr("budget", budget_bytes - OVERHEAD)
    cfg = RunConfig.parse("smollm2-135m", ["90MB", "110MB"], out=str(out))
    study.set_user_attr(RUN_CONFIG_ATTR, cfg.to_json())
    study.set_user_attr(BUDGET_INDEX_ATTR, index)
    dist = {"m00_attn_q@0": FloatDistribution(-1.5, 1.5)}
    for k, (size, proxy, kl) in enumerate(trials):
        attrs = {"size": size, "proxy": proxy, "choice": f"c{k}"}
        if k == 0:
            attrs["seed"] = True
        state = TrialState.COMPLETE if kl is not None else TrialState.PRUNED
        study.add_trial(create_trial(state=state, value=kl, params={"m00_attn_q@0": 0.0},
                                     distributions=dist, user_attrs=attrs))
    return study


TRIALS_90 = [(88_000_000, 0.02, 0.025), (87_500_000, 0.025, 0.024), (88_500_000, 0.018, 0.019),
             (88_400_000, 0.03, None), (88_200_000, 0.019, 0.0195), (86_000_000, 0.05, 0.05)]
TRIALS_110 = [(108_000_000, 0.005, 0.006), (107_000_000, 0.006, 0.0065), (108_700_000, 0.004, 0.0062)]


@pytest.fixture
def run_dir(tmp_path):
    out = tmp_path / "runs"
    run = out / "Tiny"
    run.mkdir(parents=True)
    storage = f"sqlite:///{run / 'study.db'}"
    _make_study(storage, "Tiny-90MB", "90MB", 90_000_000, TRIALS_90, 0, out)
    _make_study(storage, "Tiny-110MB", "110MB", 110_000_000, TRIALS_110, 1, out)
    rng = np.random.default_rng(0)
    choices = ["Q4_K", "Q5_0", "Q8_0", "Q2_K", "IQ4_NL"]
    picks = {}

    def types_of(key):
        return picks.setdefault(key, choices[int(rng.integers(len(choices)))])

    r = _recipe(types_of, "Tiny-90MB", "Tiny-90MB", 88_500_000 + OVERHEAD)
    schema.save(r, run / "Tiny-90MB.yaml")
    with open(run / "Tiny-90MB.gguf", "wb") as f:  # its GGUF (sparse): 200 kB under the estimate
        f.truncate(GGUF_BYTES)
    (run / "notes.yaml").write_text("just: notes\n")  # not a recipe: skipped
    return run


def test_plot_data_matches_the_stored_trials_and_recipes(run_dir):
    data = {d.budget: d for d in load_plot_data(run_dir)}
    assert set(data) == {"90MB", "110MB"}
    d90, d110 = data["90MB"], data["110MB"]
    assert [(p.size, p.proxy, p.kl) for p in d90.points] == TRIALS_90
    assert [p.state for p in d90.points].count("PRUNED") == 1 and d90.points[0].seed
    # the written GGUF gives the exact overhead; without one, the byte budget's estimate
    assert d90.tensor_budget == 90_000_000 - OVERHEAD and d90.overhead == GGUF_BYTES - 88_500_000
    assert d110.overhead == OVERHEAD and file_axis(data.values())
    assert d90.budget_bytes == 90_000_000 and d110.budget_bytes == 110_000_000
    assert d90.chosen.file_bytes == GGUF_BYTES and d90.chosen.heldout_kl == pytest.approx(0.0123)
    assert d90.chosen.recipe_path == run_dir / "Tiny-90MB.yaml"
    assert d110.chosen is None and d110.recipe is None
    # every completed trial fits its budget on the file-size axis
    for d in data.values():
        assert all(p.size + d.overhead <= d.budget_bytes for p in d.points)
    only = load_plot_data(run_dir, budget="110mb")
    assert [d.name for d in only] == ["Tiny-110MB"]


def test_pareto_of_the_run_is_the_brute_force_front_of_its_completed_trials(run_dir):
    data = load_plot_data(run_dir)
    pts = [(p.size, p.kl) for d in data for p in d.completed]
    front = {pts[i] for i in pareto_front(pts)}
    assert front == {pts[i] for i in brute_front(pts)}
    assert (88_400_000, None) not in front  # the pruned trial has no KL
    assert (86_000_000, 0.05) in front and (88_000_000, 0.025) not in front  # 87.5 MB: 0.024


def test_type_grid_is_the_recipe(run_dir):
    r = schema.load(run_dir / "Tiny-90MB.yaml")
    g = type_grid(r)
    assert g.rows == ["token_embd"] + [f"blk.{i}" for i in range(N_LAYER)] + ["output"]
    assert g.columns == [k for k in KINDS if not k.endswith("norm")]
    for i, k in itertools.product(range(N_LAYER), g.columns):
        assert g.type_at(f"blk.{i}", k) == r.tensors[f"blk.{i}.{k}.weight"]
    assert g.spanning == {0, len(g.rows) - 1}
    assert set(g.cells[0]) == {r.tensors["token_embd.weight"]} and set(g.cells[-1]) == {r.tensors["output.weight"]}
    assert set(g.hidden) == {f"blk.{i}.{k}" for i in range(N_LAYER) for k in ("attn_norm", "ffn_norm")} | {"output_norm"}
    from dynsearch.kernels.types import type_info
    bpw = [type_info(t).bits_per_weight for t in g.types]
    assert bpw == sorted(bpw) and set(g.types) == set(r.tensors.values()) - {"F32"}
    full = type_grid(r, show_f32=True)
    assert full.columns == list(KINDS) and full.type_at("blk.1", "ffn_norm") == "F32" and not full.hidden
    assert full.rows[-2:] == ["output_norm", "output"]


def test_type_grid_of_a_block_missing_a_kind():
    tensors = {"blk.0.attn_q.weight": "Q4_K", "blk.0.ffn_up.weight": "Q8_0", "blk.1.attn_q.weight": "Q6_K"}
    g = type_grid(schema.Recipe("t", schema.ModelInfo("T", "llama"), tensors))
    assert g.rows == ["blk.0", "blk.1"] and g.columns == ["attn_q", "ffn_up"]
    assert g.cells == [["Q4_K", "Q8_0"], ["Q6_K", None]] and g.types == ["Q4_K", "Q6_K", "Q8_0"]


def _is_png(path):
    import matplotlib.image as mpimg

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    return img


def test_cli_plot_run_folder_writes_pngs(run_dir, tmp_path, capsys):
    out = tmp_path / "plots"
    assert main(["plot", str(run_dir), "-o", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(out / "pareto.png"), str(out / "types-90MB.png")]  # 110MB: no recipe
    for p in printed:
        _is_png(tmp_path / p)
    # one budget: plain names, next to the run by default
    assert main(["plot", str(run_dir), "--budget", "90MB"]) == 0
    assert capsys.readouterr().out.split() == [str(run_dir / "pareto.png"), str(run_dir / "types.png")]
    # the storage alone (recipes found where the stored run configuration wrote them)
    url = f"sqlite:///{run_dir / 'study.db'}"
    paths = make_plots(None, tmp_path / "s", storage=url, study_name="Tiny-90MB")
    assert [p.name for p in paths] == ["pareto.png", "types.png"]


def test_cli_plot_recipe_alone(run_dir, tmp_path, capsys):
    assert main(["plot", str(run_dir / "Tiny-90MB.yaml"), "-o", str(tmp_path)]) == 0
    (p,) = capsys.readouterr().out.split()
    assert p == str(tmp_path / "types-Tiny-90MB.png")
    _is_png(tmp_path / p)


@pytest.mark.parametrize("argv, message", [
    (["{tmp}/nowhere"], "no such run folder"),
    (["{tmp}"], "no study.db"),
    (["{run}", "--budget", "70MB"], "no study for budget 70MB (budgets: 110MB, 90MB)"),
    (["{run}", "--budget", "70 parsecs"], "invalid budget"),
    (["{run}", "--study-name", "nope"], "no study 'nope'"),
    (["{tmp}/missing.yaml"], "recipe file not found"),
    (["{run}/Tiny-90MB.yaml", "--budget", "90MB"], "a recipe is plotted alone"),
    ([], "nothing to plot"),
    (["{run}/empty"], "has no completed trial yet"),
])
def test_cli_plot_errors_are_one_line(run_dir, tmp_path, capsys, argv, message):
    empty = run_dir / "empty"
    empty.mkdir()
    st = optuna.create_study(storage=f"sqlite:///{empty / 'study.db'}", study_name="e")
    st.enqueue_trial({"m": 0.0})  # a queued seed, nothing finished
    argv = [a.format(tmp=tmp_path, run=run_dir) for a in argv]
    assert main(["plot", *argv, "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_bpw_budget_takes_its_file_overhead_from_the_recipe(tmp_path):
    """A bpw budget says nothing about the file's fixed bytes: the recipe's estimate minus its
    trial's size gives them; without a recipe the x axis falls back to the searched tensor data."""
    run = tmp_path / "runs" / "Tiny"
    run.mkdir(parents=True)
    storage = f"sqlite:///{run / 'study.db'}"
    for name, budgets in (("Tiny-4.5bpw", ("4.5bpw",)), ("Tiny-5bpw", ("5bpw",))):
        study = optuna.create_study(storage=storage, study_name=name)
        study.set_user_attr("budget", 80_000_000)
        study.set_user_attr(RUN_CONFIG_ATTR, RunConfig.parse("smollm2-135m", budgets,
                                                             out=str(tmp_path / "runs")).to_json())
        dist = {"m": FloatDistribution(-1, 1)}
        for size, kl in ((79_000_000, 0.03), (79_500_000, 0.02)):
            study.add_trial(create_trial(value=kl, params={"m": 0.0}, distributions=dist,
                                         user_attrs={"size": size, "proxy": kl}))
    recipe = _recipe(lambda k: "Q8_0", "Tiny-4.5bpw", "Tiny-4.5bpw", 79_500_000 + 777)
    schema.save(dataclasses.replace(recipe, search={"study": "Tiny-4.5bpw", "search_kl": 0.03}), run / "r.yaml")
    data = {d.budget: d for d in load_plot_data(run)}
    # no GGUF: the recipe's estimate minus its trial's size (the trial with its search KL, 79 MB)
    assert data["4.5bpw"].overhead == 500_777 and data["4.5bpw"].chosen.file_bytes == 79_500_777
    assert data["4.5bpw"].budget_bytes == 80_000_000 + 500_777
    assert data["5bpw"].overhead is None and not file_axis(data.values())
    assert [d.name for d in load_plot_data(run, budget="4.5bpw")] == ["Tiny-4.5bpw"]
    assert file_axis(load_plot_data(run, budget="4.5bpw"))
    paths = make_plots(run, tmp_path / "o")
    assert [p.name for p in paths] == ["pareto.png", "types-4.5bpw.png"]
    _is_png(paths[0])
