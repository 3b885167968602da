"""``dynsearch plot``: the Pareto front of a run's studies and the per-layer type heatmap of its
recipes, as PNG files (matplotlib figures of their own: no display needed, no pyplot state touched).

The data preparation (:func:`load_plot_data`, :func:`pareto_front`, :func:`type_grid`) is separate
from the drawing (:func:`plot_pareto`, :func:`plot_types`) so that it can be tested exactly.

* ``pareto.png``: every trial of every study at its size (x) against its true KL on the search
  tokens (the value Optuna minimises, log y; pruned trials have none) and its proxy estimate
  (hollow); the non-dominated trials joined as the Pareto front; each budget as a vertical line;
  each written recipe's held-out KL (the run's confirmation on the disjoint evaluation set) as a
  star at its file size.
* ``types.png`` (``types-<budget>.png`` for several studies): a recipe's types as a matrix, one row per block (plus one row per tensor
  outside the blocks), one column per tensor kind; one colour per type, ordered by bits per weight.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import matplotlib.style
import numpy as np
import optuna
from matplotlib import colormaps
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from optuna.trial import TrialState

from dynsearch.atomic import atomic_path
from dynsearch.errors import PlotError, RecipeError, StorageError
from dynsearch.kernels.types import type_info
from dynsearch.recipes import schema
from dynsearch.search.budget import format_bytes, parse_budget
from dynsearch.search.run.config import STUDY_DB, RunConfig
from dynsearch.search.run.pipeline import slug
from dynsearch.search.run.status import study_status
from dynsearch.search.run.storage import load_study, open_storage
from dynsearch.search.run.worker import RUN_CONFIG_ATTR
from dynsearch.search.space import tensor_kind
from dynsearch.search.study import REFIT_TRIAL_ATTR, SEED_TRIAL_ATTR

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Data: trials, studies, recipes


@dataclass(frozen=True)
class TrialPoint:
    """One trial as the Pareto plot shows it."""

    number: int
    state: str  # "COMPLETE", "PRUNED", ...
    size: int  # bytes of the searched tensors' data (the trial's "size" user attr)
    proxy: float | None  # the proxy's KL estimate
    kl: float | None  # true KL on the search tokens (the trial's value); None unless complete
    seed: bool = False  # the knapsack seed
    refit: bool = False  # proposed by the refit of the proxy to measured KL


@dataclass(frozen=True)
class Chosen:
    """A recipe written for a study: where it landed and what it measured."""

    recipe_path: Path
    file_bytes: int  # the GGUF's size when it was written, else the recipe's estimate
    heldout_kl: float | None  # mean KLD on the held-out tokens (recipe.kl["kld_mean"])
    search_kl: float | None  # the best trial's true KL on the search tokens


@dataclass(frozen=True)
class StudyData:
    """One study (one budget) of a run, ready to plot."""

    name: str
    budget: str  # budget spec ("100MB", "4.5bpw"), or the study name when unknown
    tensor_budget: int | None  # bytes of searched tensor data every candidate fits
    budget_bytes: int | None  # the budget as a file size (a bpw budget: tensor budget + overhead)
    overhead: int | None  # file bytes besides the searched tensors (header, fixed tensors)
    points: list[TrialPoint]
    chosen: Chosen | None = None
    recipe: schema.Recipe | None = field(default=None, repr=False)

    @property
    def completed(self) -> list[TrialPoint]:
        return [p for p in self.points if p.kl is not None]


def trial_points(study: optuna.Study) -> list[TrialPoint]:
    """Every trial that reached the knapsack (it has a size), in trial order."""
    out = []
    for t in study.get_trials(deepcopy=False):
        size = t.user_attrs.get("size")
        if size is None:
            continue
        kl = float(t.value) if t.state == TrialState.COMPLETE and t.value is not None else None
        proxy = t.user_attrs.get("proxy")
        out.append(TrialPoint(t.number, t.state.name, int(size), None if proxy is None else float(proxy), kl,
                              bool(t.user_attrs.get(SEED_TRIAL_ATTR)), bool(t.user_attrs.get(REFIT_TRIAL_ATTR))))
    return out


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated points when both coordinates are minimised, by increasing x.
    A point is dominated when another is no larger in both and smaller in one; of several equal
    points the first is kept."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1], i))
    front, best_y = [], float("inf")
    for i in order:
        if points[i][1] < best_y:
            front.append(i)
            best_y = points[i][1]
    return front


def _study_budget(study: optuna.Study) -> str | None:
    return study_status(study).budget


def _gguf_or_estimate(recipe_path: Path, recipe: schema.Recipe) -> int | None:
    gguf = recipe_path.with_suffix(".gguf")
    if gguf.is_file():
        return gguf.stat().st_size
    est = recipe.achieved.get("bytes_estimate")
    return int(est) if isinstance(est, (int, float)) else None


def _recipe_trial(points: list[TrialPoint], recipe: schema.Recipe) -> TrialPoint | None:
    """The trial a recipe was made from: the one with its recorded search KL (the study may have
    gone on after it was written), else the study's best."""
    done = [p for p in points if p.kl is not None]
    same = [p for p in done if p.kl == recipe.search.get("search_kl")]
    return min(same or done, key=lambda p: (p.kl, p.number)) if done else None


def study_data(study: optuna.Study, recipes: dict[str, tuple[Path, schema.Recipe]]) -> StudyData:
    """A study's trials, budget and file overhead, with its recipe (matched by the study name the
    recipe records under ``search.study``) when one was written.

    The overhead (file bytes besides the searched tensors: header, metadata, fixed tensors) is the
    same for every trial of a study. It is exact when the recipe's GGUF was written (its size minus
    its trial's), else the pipeline's estimate (the byte budget minus the tensor budget, or the
    recipe's ``bytes_estimate`` minus its trial's size)."""
    points = trial_points(study)
    spec = _study_budget(study)
    stored = study.user_attrs.get("budget")
    tensor_budget = None if stored is None else int(stored)
    path, recipe = recipes.get(study.study_name) or (None, None)
    byte_budget = parse_budget(spec).file_bytes if spec else None
    overhead = byte_budget - tensor_budget if byte_budget is not None and tensor_budget is not None else None
    chosen = None
    if recipe is not None:
        trial, file_bytes = _recipe_trial(points, recipe), _gguf_or_estimate(path, recipe)
        if file_bytes is not None:
            chosen = Chosen(path, file_bytes, recipe.kl.get("kld_mean"), recipe.search.get("search_kl"))
            if trial is not None:
                overhead = file_bytes - trial.size
    if byte_budget is None and tensor_budget is not None and overhead is not None:
        byte_budget = tensor_budget + overhead  # the file size a bpw budget allows
    return StudyData(study.study_name, spec or study.study_name, tensor_budget, byte_budget, overhead,
                     points, chosen, recipe)


def run_recipes(folders: Sequence[Path]) -> dict[str, tuple[Path, schema.Recipe]]:
    """Recipes in ``folders`` by the study that made them (a YAML that is not a recipe is skipped)."""
    out: dict[str, tuple[Path, schema.Recipe]] = {}
    for folder in folders:
        for p in sorted(Path(folder).glob("*.yaml")):
            try:
                r = schema.load(p)
            except RecipeError as e:
                log.warning("skipping a YAML that is not a recipe: %s", e)
                continue
            study = r.search.get("study")
            if isinstance(study, str):
                out.setdefault(study, (p, r))
    return out


def _config_folders(study: optuna.Study) -> list[Path]:
    """Where ``dynsearch run`` wrote the study's recipes: ``<out>/*/`` of its stored configuration."""
    text = study.user_attrs.get(RUN_CONFIG_ATTR)
    if not text:
        return []
    out = Path(RunConfig.from_json(text).out)
    return sorted(p for p in out.glob("*") if p.is_dir()) if out.is_dir() else []


def load_plot_data(run_dir: str | Path | None = None, storage: str | None = None,
                   study_name: str | None = None, budget: str | None = None) -> list[StudyData]:
    """The studies of a run folder (its ``study.db`` and recipes), or of ``storage`` (with the
    recipes found where the study's run wrote them), optionally one study or one budget."""
    folder = Path(run_dir) if run_dir is not None else None
    if folder is not None and not folder.is_dir():
        raise PlotError(f"{folder}: no such run folder (give a folder written by `dynsearch run`, "
                        "a recipe .yaml, or --storage URL)")
    if storage is None:
        if folder is None:
            raise PlotError("nothing to plot: give a run folder, a recipe .yaml, or --storage URL")
        db = folder / STUDY_DB
        if not db.is_file():
            raise PlotError(f"{folder}: no {STUDY_DB} in this folder (a run with --storage keeps its "
                            "studies there: give the same --storage URL)")
        storage = f"sqlite:///{db.resolve()}"
    st = open_storage(storage, create=False)
    if study_name is not None:
        studies = [load_study(st, study_name)]
    else:
        names = sorted(s.study_name for s in optuna.get_all_study_summaries(st, include_best_trial=False))
        if not names:
            raise StorageError("no study in this storage")
        studies = [optuna.load_study(study_name=n, storage=st) for n in names]
    if budget is not None:
        wanted = parse_budget(budget)
        want = (wanted.file_bytes, wanted.bpw)
        budgets = {s.study_name: _study_budget(s) for s in studies}
        studies = [s for s in studies if budgets[s.study_name]
                   and (parse_budget(budgets[s.study_name]).file_bytes, parse_budget(budgets[s.study_name]).bpw) == want]
        want = wanted.spec
        if not studies:
            have = ", ".join(sorted({b for b in budgets.values() if b})) or "none recorded"
            raise PlotError(f"no study for budget {want} (budgets: {have})")
    folders = [folder] if folder is not None else sorted({f for s in studies for f in _config_folders(s)})
    recipes = run_recipes(folders)
    data = [study_data(s, recipes) for s in studies]
    empty = [d.name for d in data if not d.completed]
    if len(empty) == len(data):
        raise PlotError(f"study {empty[0]!r} has no completed trial yet" if len(empty) == 1 else
                        f"none of the {len(empty)} studies has a completed trial yet")
    for name in empty:
        log.warning("study %r has no completed trial yet: not plotted", name)
    return sorted((d for d in data if d.completed), key=lambda d: (d.tensor_budget or 0, d.name))


# ---------------------------------------------------------------------------------------------
# Data: the type matrix of a recipe


@dataclass(frozen=True)
class TypeGrid:
    """A recipe's types laid out as rows (blocks, then the tensors outside them) by columns
    (tensor kinds, in model order). ``cells[r][c]`` is a type name or None where a block has no
    tensor of that kind; a row outside the blocks holds its one tensor's type in every column."""

    rows: list[str]  # "blk.0" ... or the tensor's name without ".weight" ("token_embd", "output")
    columns: list[str]  # "attn_q", "attn_k", ... as they first appear
    cells: list[list[str | None]]
    spanning: frozenset[int]  # rows outside the blocks (one tensor, drawn across the row)
    types: list[str]  # every type shown, by increasing bits per weight
    hidden: dict[str, str]  # tensors left out (F32 in every block: the norms)

    def type_at(self, row: str, column: str) -> str | None:
        return self.cells[self.rows.index(row)][self.columns.index(column)]


def _bpw(name: str) -> float:
    return type_info(name).bits_per_weight


def type_grid(recipe: schema.Recipe, show_f32: bool = False) -> TypeGrid:
    """The matrix :func:`plot_types` draws. Kinds that are F32 in every block (the norms, never
    quantized) are left out unless ``show_f32``; so are 1-D F32 tensors outside the blocks."""
    blocks: dict[int, dict[str, str]] = {}
    outside: dict[str, str] = {}
    kinds: list[str] = []
    for name, t in recipe.tensors.items():
        kind, layer = tensor_kind(name)
        if layer < 0:
            outside[kind] = t
            continue
        blocks.setdefault(layer, {})[kind] = t
        if kind not in kinds:
            kinds.append(kind)
    hidden: dict[str, str] = {}
    if not show_f32:
        for k in list(kinds):
            if all(b.get(k, "F32") == "F32" for b in blocks.values()):
                kinds.remove(k)
                hidden.update({f"blk.{i}.{k}": "F32" for i, b in blocks.items() if k in b})
        for k in [k for k, t in outside.items() if t == "F32"]:
            hidden[k] = outside.pop(k)
    first = [k for k in outside if k == "token_embd"]
    last = [k for k in outside if k != "token_embd"]
    rows = first + [f"blk.{i}" for i in sorted(blocks)] + last
    cells, spanning = [], set()
    for r in rows:
        if r.startswith("blk.") and r not in outside:
            b = blocks[int(r[4:])]
            cells.append([b.get(k) for k in kinds])
        else:
            spanning.add(len(cells))
            cells.append([outside[r]] * max(1, len(kinds)))
    shown = {t for row in cells for t in row if t is not None}
    return TypeGrid(rows, kinds or ["tensor"], cells, frozenset(spanning),
                    sorted(shown, key=lambda t: (_bpw(t), t)), hidden)


# ---------------------------------------------------------------------------------------------
# Drawing


def _own_style(draw):
    """Draw with matplotlib's default style whatever the caller set (Optuna's plots switch the
    whole process to ggplot), and leave the caller's style as it was."""
    @functools.wraps(draw)
    def wrapper(*args, **kwargs):
        with matplotlib.style.context("default"):
            return draw(*args, **kwargs)

    return wrapper


def _figure(width: float, height: float):
    """A figure of its own (no pyplot, no global backend switch: safe in threads, in scripts
    without a display and inside notebooks, whose inline backend stays as it is)."""
    fig = Figure(figsize=(width, height))
    return fig, fig.subplots()


def save_png(fig, path: Path) -> Path:
    """Write ``fig`` as PNG atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return path


def file_axis(data: Sequence[StudyData]) -> bool:
    """True when every study's file overhead is known, so trials can be placed at their file size
    (searched tensor data + overhead); otherwise the plot's x axis is the searched tensor data."""
    return all(d.overhead is not None for d in data)


@_own_style
def plot_pareto(path: str | Path, data: Sequence[StudyData], title: str = "") -> Path:
    """The Pareto PNG of one or more studies (see the module docstring)."""
    as_file = file_axis(data)
    fig, ax = _figure(8, 5.5)
    colours = colormaps["tab10"]
    front_pts = []
    for k, d in enumerate(data):
        c = colours(k % 10)
        off = d.overhead if as_file else 0
        xs = np.array([(p.size + off) / 1e6 for p in d.points])
        prox = [(x, p.proxy) for x, p in zip(xs, d.points) if p.proxy and p.proxy > 0]
        if prox:
            ax.scatter(*zip(*prox), s=18, facecolors="none", edgecolors=c, alpha=0.5,
                       label=f"{d.budget}: proxy")
        done = [(x, p.kl) for x, p in zip(xs, d.points) if p.kl is not None and p.kl > 0]
        if done:
            ax.scatter(*zip(*done), s=24, color=c, alpha=0.85, label=f"{d.budget}: true KL")
        front_pts += done
        line = d.budget_bytes if as_file else d.tensor_budget
        if line is not None:
            ax.axvline(line / 1e6, color=c, ls="--", lw=1, alpha=0.8)
        if d.chosen is not None and d.chosen.heldout_kl and as_file:
            ax.scatter([d.chosen.file_bytes / 1e6], [d.chosen.heldout_kl], marker="*", s=160, color=c,
                       edgecolors="black", zorder=5, label=f"{d.budget}: recipe, held-out KL")
    if front_pts:
        front = [front_pts[i] for i in pareto_front(front_pts)]
        ax.plot(*zip(*front), "-", color="black", lw=1.2, marker="o", mfc="none", ms=9,
                label="Pareto front (true KL)", zorder=4)
    ax.set_yscale("log")
    ax.set_xlabel("file size (MB)" if as_file else "searched tensor data (MB)")
    ax.set_ylabel("KL vs full precision (nats/token)")
    ax.set_title(title or "trials: size vs KL (dashed: budgets)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_png(fig, Path(path))


@_own_style
def plot_types(path: str | Path, grid: TypeGrid, title: str = "") -> Path:
    """The type heatmap PNG of a :class:`TypeGrid`."""
    n_types = len(grid.types)
    palette = colormaps["viridis"](np.linspace(0.0, 1.0, max(n_types, 2)))[:n_types]
    index = {t: i for i, t in enumerate(grid.types)}
    mat = np.ma.masked_invalid(np.array(
        [[np.nan if t is None else index[t] for t in row] for row in grid.cells], dtype=float))
    n_rows, n_cols = mat.shape
    fig, ax = _figure(max(6.5, 2.8 + 0.75 * n_cols), 1.8 + 0.22 * n_rows)
    cmap = ListedColormap(palette).with_extremes(bad="white")
    ax.imshow(mat, cmap=cmap, norm=BoundaryNorm(np.arange(n_types + 1) - 0.5, n_types), aspect="auto",
              interpolation="nearest")
    small = n_rows <= 64
    for r, row in enumerate(grid.cells):
        cols = [n_cols // 2] if r in grid.spanning else range(n_cols)
        for c in cols:
            t = row[c]
            if t is not None and small:
                light = index[t] < n_types / 2
                ax.text(c, r, f"{grid.rows[r]}: {t}" if r in grid.spanning else t, ha="center",
                        va="center", fontsize=6, color="white" if light else "black")
        if r in grid.spanning:
            ax.axhline(r - 0.5, color="white", lw=1.5)
            ax.axhline(r + 0.5, color="white", lw=1.5)
    ax.set_xticks(range(n_cols), grid.columns, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n_rows), grid.rows, fontsize=6 if n_rows > 40 else 8)
    handles = [Patch(color=palette[i], label=f"{t} ({_bpw(t):.2f} bpw)") for i, t in enumerate(grid.types)]
    ax.legend(handles=handles, bbox_to_anchor=(1.02, 1), loc="upper left", fontsize=8, title="type")
    note = f"\n({len(grid.hidden)} F32 tensors not shown)" if grid.hidden else ""
    ax.set_title((title or "types per tensor") + note, fontsize=9)
    ax.grid(False)
    fig.tight_layout()
    return save_png(fig, Path(path))


# ---------------------------------------------------------------------------------------------
# The command


def recipe_title(recipe: schema.Recipe) -> str:
    a = recipe.achieved
    size = format_bytes(int(a["bytes_estimate"])) if isinstance(a.get("bytes_estimate"), (int, float)) else ""
    bpw = f", {a['bpw']:.3f} bpw" if isinstance(a.get("bpw"), (int, float)) else ""
    kl = f", held-out KL {recipe.kl['kld_mean']:.4g}" if "kld_mean" in recipe.kl else ""
    return f"{recipe.name}: {size}{bpw}{kl}"


def plot_recipe(recipe_path: str | Path, out_dir: str | Path) -> Path:
    """``types-<recipe name>.png`` of one recipe file."""
    recipe = schema.load(recipe_path)
    return plot_types(Path(out_dir) / f"types-{recipe.name}.png", type_grid(recipe), recipe_title(recipe))


def make_plots(target: str | Path | None, out_dir: str | Path | None = None, storage: str | None = None,
               study_name: str | None = None, budget: str | None = None) -> list[Path]:
    """What ``dynsearch plot`` writes: for a recipe .yaml its heatmap; for a run folder (or a
    storage) ``pareto.png`` and one ``types-<budget>.png`` per study with a recipe. ``out_dir``
    defaults to the run folder (the recipe's folder)."""
    if target is not None and Path(target).suffix.lower() in (".yaml", ".yml"):
        if storage or study_name or budget:
            raise PlotError("a recipe is plotted alone: --storage, --study-name and --budget apply to "
                            "a run folder")
        return [plot_recipe(target, out_dir or Path(target).parent)]
    data = load_plot_data(target, storage, study_name, budget)
    out = Path(out_dir) if out_dir is not None else Path(target) if target is not None else Path(".")
    title = (data[0].recipe.model.name + ": " if data[0].recipe is not None else "") + \
        ", ".join(d.budget for d in data)
    paths = [plot_pareto(out / "pareto.png", data, title=f"{title} (dashed: budgets)")]
    for d in data:
        if d.recipe is None:
            log.warning("study %r has no recipe (yet): no type heatmap", d.name)
            continue
        name = "types.png" if len(data) == 1 else f"types-{slug(d.budget)}.png"
        paths.append(plot_types(out / name, type_grid(d.recipe), recipe_title(d.recipe)))
    return paths
