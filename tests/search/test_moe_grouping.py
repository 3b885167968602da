"""Grouping of MoE expert stacks into search variables (``--group-experts``), on a tiny qwen3moe."""

from __future__ import annotations

import numpy as np
import optuna
import pytest

from dynsearch.bench.synthetic import Shape, write_synthetic_model
from dynsearch.errors import DynsearchError
from dynsearch.objectives.io.gguf_source import GGUFSource
from dynsearch.objectives.stats import moe
from dynsearch.search.profile import ProfileCache
from dynsearch.search.run.prepare import build_space
from dynsearch.search.space import EXPERT_GROUPINGS, layer_groups, tensor_kind
from dynsearch.search.study import SearchSettings, best_result, open_study, run_study

optuna.logging.set_verbosity(optuna.logging.WARNING)

N_LAYER = 6
TINY = Shape(n_layer=N_LAYER, n_embd=64, n_ff=128, n_head=4, n_head_kv=2, n_vocab=256, tied=True,
             arch="qwen3moe", n_expert=4, n_expert_used=2, n_ff_exp=32)
EXPS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return GGUFSource(write_synthetic_model(tmp_path_factory.mktemp("g") / "qwen3moe.gguf", TINY, seed=1))


def _searched(src) -> list[str]:
    return [n for n in src.names() if len(src.shape(n)) >= 2 and not moe.is_router(n)]


def _members(names, groups, gnames) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for n, g in zip(names, groups):
        out.setdefault(gnames[g], set()).add(n)
    return out


def test_expert_groups_are_formed_as_stated(source):
    names = _searched(source)
    by_mode = {m: _members(names, *layer_groups(names, N_LAYER, 3, experts=m)) for m in EXPERT_GROUPINGS}

    kind = by_mode["kind"]  # one variable per kind, all layers
    for k in EXPS:
        assert kind[k] == {f"blk.{il}.{k}.weight" for il in range(N_LAYER)}
    layer = by_mode["layer"]  # one variable per layer, its three stacks
    for il in range(N_LAYER):
        assert layer[f"ffn_exps@L{il}"] == {f"blk.{il}.{k}.weight" for k in EXPS}
    none = by_mode["none"]  # like any tensor: kind and band (2 layers per band here)
    for k in EXPS:
        for band in range(3):
            assert none[f"{k}@{band}"] == {f"blk.{il}.{k}.weight" for il in (2 * band, 2 * band + 1)}

    # the other tensors are grouped the same way in every mode
    def others(groups):
        return {g: m for g, m in groups.items() if not any(tensor_kind(n)[0] in EXPS for n in m)}
    assert others(kind) == others(layer) == others(none)
    assert "attn_q@0" in others(kind) and "token_embd" in others(kind)
    counts = {m: len(g) for m, g in by_mode.items()}
    n_other = len(others(kind))
    assert counts == {"kind": n_other + 3, "layer": n_other + N_LAYER, "none": n_other + 9}

    # a dense model is unaffected
    dense = [f"blk.{il}.{k}.weight" for il in range(4) for k in ("attn_q", "ffn_down")]
    assert len({tuple(layer_groups(dense, 4, 2, experts=m)[1]) for m in EXPERT_GROUPINGS}) == 1
    with pytest.raises(DynsearchError, match="expert grouping 'experts'"):
        layer_groups(names, N_LAYER, 3, experts="experts")


@pytest.mark.parametrize("mode", ["kind", "layer"])
def test_grouped_search_respects_budget(source, tmp_path, mode):
    """Profiled for real (the kernels' sizes and errors of every stack, per expert), then an
    Optuna study whose 'truth' weighs ffn_down_exps 4x more than the proxy believes."""
    names = _searched(source)
    cache = ProfileCache(tmp_path / "profile", "m", "s")
    space = build_space(source, names, ("Q3_K", "Q4_K", "Q6_K", "Q8_0"), {}, cache,
                        progress=False, group_experts=mode)
    params = set(space.group_names)
    assert (set(EXPS) <= params) if mode == "kind" else ({f"ffn_exps@L{il}" for il in range(N_LAYER)} <= params)
    weight = np.array([4.0 if tensor_kind(n)[0] == "ffn_down_exps" else 1.0 for n in names])

    def truth(choice):
        return float((space.errors[np.arange(len(choice)), choice] * weight).sum())

    budget = space.min_size() + (space.max_size() - space.min_size()) // 3
    settings = SearchSettings(budget=budget, n_trials=16, seed=0, proxy_slack=1.0)
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = open_study(storage, f"g-{mode}", space, settings)
    run_study(study, space, settings, truth, show_progress=False)
    sized = [t.user_attrs["size"] for t in study.trials if "size" in t.user_attrs]
    assert len(sized) >= 12 and max(sized) <= budget
    assert all(p.startswith("pin_") or any(p.endswith(f"_{g}") for g in space.group_names)
               for p in study.best_trial.params)  # group multipliers, and pinned tensors' types
    res = best_result(study)
    assert res.value <= res.seed_value
    if mode == "kind":  # one variable moves every layer's ffn_down_exps: the search finds the bias
        assert res.value < 0.99 * res.seed_value

    # a study made with one grouping is not resumed with another
    other = build_space(source, names, space.types, {}, cache, progress=False,
                        group_experts="none")
    with pytest.raises(DynsearchError, match="made for another"):
        open_study(storage, study.study_name, other, settings)
