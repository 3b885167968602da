"""The unused part of a budget and the reason the run's summary gives for it (search/space.py
``headroom``), against a brute-force scan of every single-tensor move."""

from __future__ import annotations

import numpy as np
import pytest

from dynsearch.search.space import SearchSpace, headroom

TYPES = ("Q4_0", "Q5_0", "Q8_0")


def space(sizes, errors) -> SearchSpace:
    sizes, errors = np.asarray(sizes, np.int64), np.asarray(errors, np.float64)
    n = len(sizes)
    names = tuple(f"blk.{i}.ffn_up.weight" for i in range(n))
    return SearchSpace(names, TYPES, (TYPES,) * n, sizes, errors, np.zeros(n, np.int64), ("all",),
                       n_weights=int(sizes.sum()))


def brute(sp: SearchSpace, choice, budget):
    used = sum(sp.sizes[i, c] for i, c in enumerate(choice))
    moves = [(sp.errors[i, c] - sp.errors[i, j], sp.sizes[i, j] - sp.sizes[i, c], i, j)
             for i, c in enumerate(choice) for j in range(len(sp.types))
             if sp.sizes[i, j] > sp.sizes[i, c] and np.isfinite(sp.errors[i, j])]
    fitting = [m for m in moves if m[1] <= budget - used]
    return budget - used, moves, fitting


@pytest.mark.parametrize("seed", range(20))
def test_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 8))
    sizes = np.sort(rng.integers(10, 200, size=(n, 3)), axis=1)
    errors = np.sort(rng.random((n, 3)), axis=1)[:, ::-1].copy()
    errors[rng.random((n, 3)) < 0.15] = np.inf
    errors[:, 0] = np.where(np.isinf(errors[:, 0]), 1.0, errors[:, 0])  # column 0 always allowed
    sp = space(sizes, errors)
    choice = np.zeros(n, np.int64)
    budget = int(sizes[:, 0].sum() + rng.integers(0, 150))
    unused, moves, fitting = brute(sp, choice, budget)
    h = headroom(sp, choice, budget)
    assert h.unused == unused and h.fitting_steps == len(fitting)
    if moves:
        assert h.cheapest[2] == min(m[1] for m in moves)
    else:
        assert h.cheapest is None
    if fitting:
        assert h.best_step[3] == pytest.approx(max(m[0] for m in fitting))
    else:
        assert h.best_step is None


def test_reasons():
    sp = space([[10, 20, 40], [10, 30, 40]], [[3.0, 2.0, 1.0], [1.0, 1.0, 1.0]])
    choice = np.array([0, 0])
    tight = headroom(sp, choice, 25)  # 5 bytes left, the smallest step needs 10
    assert tight.unused == 5 and tight.reason() == ("nothing else fits: the smallest step up "
                                                    "(blk.0.ffn_up.weight to Q5_0) needs 5 bytes more")
    roomy = headroom(sp, choice, 45)  # 25 left: blk.0 up one type gains 1.0
    assert roomy.best_step == ("blk.0.ffn_up.weight", "Q5_0", 10, 1.0)
    assert "the measured KL chose it" in roomy.reason()
    flat = headroom(sp, np.array([2, 0]), 80)  # blk.0 at its largest; blk.1's steps gain nothing
    assert flat.fitting_steps == 2 and flat.reason().startswith("nothing measurable is gained")
    top = headroom(sp, np.array([2, 2]), 80)
    assert top.unused == 0 and top.reason() == "every tensor is at its largest candidate type"


def test_summary_prints_the_unused_bytes_and_why(capsys):
    from dynsearch.search.run.config import RunConfig
    from dynsearch.search.run.pipeline import RunResult
    from dynsearch.search.run.report import print_summary

    row = {"budget": "100MB", "file_bytes": 99_000_000, "tensor_bytes": 98_000_000, "bpw": 5.0, "proxy": 0.1,
           "seed_kl": 0.02, "search_kl": 0.019, "heldout_mean_kl": 0.021, "heldout": {"kld_p99": 0.2},
           "types": {"Q8_0": 3}, "unused_bytes": 812_345,
           "unused_reason": headroom(space([[10, 20, 40]], [[1.0, 0.5, 0.1]]), np.array([0]), 15).reason()}
    print_summary(RunConfig.parse("m.gguf", ["100MB"]), RunResult(rows=[row, {**row, "unused_bytes": 0}]))
    lines = [ln.strip() for ln in capsys.readouterr().out.splitlines()]
    assert lines.count("unused: 812.35 kB of the budget; nothing else fits: the smallest step up "
                       "(blk.0.ffn_up.weight to Q5_0) needs 5 bytes more") == 1
