"""Results of the quality benchmark: one :class:`Entry` per GGUF file, the side-by-side table, the
JSON file and the Pareto plot (size vs mean KLD, log scale)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from matplotlib.figure import Figure

from dynsearch.atomic import atomic_write_text
from dynsearch.search.run.plots import save_png

# Kinds of entries, in the order the table and the plot's legend list them.
KINDS = ("stock", "source", "uniform", "knapsack", "random", "multipliers", "dynsearch")
# Columns measured both ways: (statistic key of KLStats.to_dict / parse_kl_printout, header).
METRICS = (("kld_mean", "mean KLD"), ("kld_p99", "99% KLD"), ("kld_max", "max KLD"), ("same_top_p", "same top"))


@dataclass
class Entry:
    """One measured GGUF file."""

    label: str  # "Q4_K_M", "uniform Q4_K", "dynsearch@Q4_K_M"
    kind: str  # one of KINDS
    path: Path
    file_bytes: int
    bpw: float  # tensor bytes * 8 / weights, as llama.cpp prints it
    target: str | None = None  # the stock mix whose file size this entry was made for
    note: str = ""  # e.g. "source format" for the demo's own Q4_1
    ours: dict[str, float] = field(default_factory=dict)  # our forward vs the F32 reference
    llama: dict[str, float] = field(default_factory=dict)  # llama-perplexity --kl-divergence
    evals: int | None = None  # true-KL evaluations the method used (a search's completed trials)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown entry kind {self.kind!r}; known: {', '.join(KINDS)}")

    def to_dict(self) -> dict:
        return {"label": self.label, "kind": self.kind, "path": str(self.path), "file_bytes": self.file_bytes,
                "bpw": self.bpw, "target": self.target, "note": self.note, "ours": self.ours, "llama": self.llama,
                "evals": self.evals}

    @classmethod
    def from_dict(cls, d: dict) -> "Entry":
        return cls(d["label"], d["kind"], Path(d["path"]), int(d["file_bytes"]), float(d["bpw"]), d.get("target"),
                   d.get("note", ""), dict(d.get("ours") or {}), dict(d.get("llama") or {}), d.get("evals"))


def ordered(entries: Sequence[Entry]) -> list[Entry]:
    """Stock mixes by size, the source format after them, then the other kinds by size."""
    return sorted(entries, key=lambda e: (KINDS.index(e.kind), e.file_bytes))


def _fmt(key: str, v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if v == 0:
        return "0"
    if key == "same_top_p":
        return f"{100 * v:.2f}%"
    return f"{v:.4f}" if v >= 0.01 else f"{v:.2e}"


def _ratio(e: Entry, by_label: dict[str, Entry], side: str) -> str:
    ref = by_label.get(e.target or "")
    if e.kind == "stock" or ref is None:
        return ""
    a, b = getattr(e, side).get("kld_mean"), getattr(ref, side).get("kld_mean")
    return _x(a / b) if a is not None and b else "-"


def format_table(entries: Sequence[Entry]) -> str:
    """Markdown table: per file size, bpw, and for each metric ours | llama.cpp side by side; entries
    made for a stock mix's size also get their mean KLD as a ratio of that mix's (by each measure)."""
    rows = ordered(entries)
    by_label = {e.label: e for e in entries if e.kind == "stock"}
    with_ratio = any(e.target for e in rows)
    head = ["type", "size MB", "bpw"]
    for _, name in METRICS:
        head += [f"{name} ours", f"{name} llama.cpp"]
    if with_ratio:
        head += ["mean KLD / stock (ours, llama.cpp)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in rows:
        label = e.label + (f" ({e.note})" if e.note else "")
        cells = [label, f"{e.file_bytes / 1e6:.1f}", f"{e.bpw:.3f}"]
        for key, _ in METRICS:
            cells += [_fmt(key, e.ours.get(key)), _fmt(key, e.llama.get(key))]
        if with_ratio:
            r = (_ratio(e, by_label, "ours"), _ratio(e, by_label, "llama"))
            cells.append(f"{r[0]}, {r[1]}" if r[0] else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# The targets on the dithered demo, by llama.cpp's measure: dynsearch at equal or smaller size than
# each of these stock mixes reaches at most these fractions of the mix's mean and 99% KLD (and is
# no worse than any other stock mix).
TARGET_MIXES = ("Q3_K_M", "Q4_0", "Q4_K_M", "IQ4_NL", "IQ4_XS", "Q5_K_M", "Q6_K")
TARGET_MEAN, TARGET_P99 = 0.60, 0.70
SIDES = (("ours", "ours"), ("llama", "llama.cpp"))


@dataclass(frozen=True)
class Comparison:
    """One stock mix against dynsearch's best file of equal or smaller size, and the baselines made
    at the mix's size (ratios: their statistic over the mix's, by each measure)."""

    stock: Entry
    dynsearch: Entry | None  # lowest mean KLD (ours, else llama.cpp's) among dynsearch files <= the mix's size
    knapsack: Entry | None
    random: list[Entry]
    targeted: bool  # one of TARGET_MIXES: the TARGET_MEAN / TARGET_P99 targets apply

    def ratio(self, e: Entry | None, side: str, key: str = "kld_mean") -> float | None:
        if e is None:
            return None
        a, b = getattr(e, side).get(key), getattr(self.stock, side).get(key)
        return a / b if a is not None and b else None

    def verdict(self, side: str) -> str:
        """``met`` / ``not met (...)`` against the targets for a targeted mix, else ``not worse`` /
        ``worse (...)`` (both mean and 99% KLD no larger than the mix's); ``-`` when unmeasured."""
        m, p = self.ratio(self.dynsearch, side), self.ratio(self.dynsearch, side, "kld_p99")
        if m is None or p is None:
            return "-" if self.dynsearch is not None else "no file"
        lm, lp = (TARGET_MEAN, TARGET_P99) if self.targeted else (1.0, 1.0)
        misses = [f"{name} {r:.2f}x" for name, r, lim in (("mean", m, lm), ("99%", p, lp)) if r > lim]
        if self.targeted:
            return "met" if not misses else f"not met ({', '.join(misses)})"
        return "not worse" if not misses else f"worse ({', '.join(misses)})"


def _best(entries: Sequence[Entry]) -> Entry | None:
    def key(e: Entry) -> float:
        v = e.ours.get("kld_mean", e.llama.get("kld_mean"))
        return math.inf if v is None else v

    return min(entries, key=key, default=None)


def comparisons(entries: Sequence[Entry], targets: Sequence[str] = TARGET_MIXES) -> list[Comparison]:
    """Per stock mix (by size): the best dynsearch file no larger than it, its knapsack and random
    baselines."""
    out = []
    for s in sorted((e for e in entries if e.kind == "stock"), key=lambda e: e.file_bytes):
        dyn = _best([e for e in entries if e.kind == "dynsearch" and e.file_bytes <= s.file_bytes])
        knap = next((e for e in entries if e.kind == "knapsack" and e.target == s.label), None)
        rnd = [e for e in entries if e.kind == "random" and e.target == s.label]
        out.append(Comparison(s, dyn, knap, rnd, s.label in targets))
    return out


def _x(r: float | None) -> str:
    if r is None:
        return "-"
    return f"{r:.2f}x" if r >= 0.01 or r == 0 else f"{r:.1e}x"  # a near-lossless file: 1.2e-03x, not 0.00x


def format_comparison(entries: Sequence[Entry], targets: Sequence[str] = TARGET_MIXES) -> str:
    """Markdown table, one row per stock mix: dynsearch's best file of equal or smaller size, its mean
    and 99% KLD as ratios of the mix's by both measures, a verdict per measure (targets TARGET_MEAN x mean
    and TARGET_P99 x 99% for the targeted mixes, marked *, else "not worse"), and the
    knapsack-only and random baselines at the mix's size as mean-KLD ratios (random: best / mean of
    the draws)."""
    head = ["stock mix", "size MB", "mean KLD (ours, llama.cpp)", "dynsearch file", "size MB",
            "mean KLD (ours, llama.cpp)", "mean ratio (ours, llama.cpp)", "99% ratio (ours, llama.cpp)",
            "verdict ours", "verdict llama.cpp", "knapsack mean ratio (ours, llama.cpp)",
            "random mean ratio best / avg (ours)", "random mean ratio best / avg (llama.cpp)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def both(e: Entry, key: str = "kld_mean") -> str:
        return ", ".join(_fmt(key, getattr(e, side).get(key)) for side, _ in SIDES)

    for c in comparisons(entries, targets):
        s, d = c.stock, c.dynsearch

        def rat(e: Entry, key: str = "kld_mean", c=c) -> str:
            return ", ".join(_x(c.ratio(e, side, key)) for side, _ in SIDES)

        cells = [s.label + (" *" if c.targeted else ""), f"{s.file_bytes / 1e6:.1f}", both(s)]
        cells += [d.label, f"{d.file_bytes / 1e6:.1f}", both(d), rat(d), rat(d, "kld_p99")] if d else ["-"] * 5
        cells += [c.verdict(side) for side, _ in SIDES]
        cells.append(rat(c.knapsack) if c.knapsack else "-")
        for side, _ in SIDES:
            rs = [r for r in (c.ratio(e, side) for e in c.random) if r is not None]
            cells.append(f"{min(rs):.2f}x / {sum(rs) / len(rs):.2f}x" if rs else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


ABLATION = ("uniform", "random", "knapsack", "multipliers", "dynsearch")  # the ablation's methods, in order


def ablation_rows(entries: Sequence[Entry]) -> list[dict]:
    """Per stock mix made for (its size), each method's file: held-out mean and 99% KLD by both
    measures and the true-KL evaluations it used. uniform: the largest one-type file no larger
    than the mix; random: the mean of the draws (evaluations: none); knapsack: the proxy's
    optimum (the search's seed, no evaluation); multipliers: the Optuna stage of group
    multipliers alone; dynsearch: the search."""
    rows = []
    for s in sorted((e for e in entries if e.kind == "stock"), key=lambda e: e.file_bytes):
        made = [e for e in entries if e.target == s.label]
        if not made:
            continue
        for kind in ABLATION:
            if kind == "uniform":
                es = [e for e in entries if e.kind == "uniform" and e.file_bytes <= s.file_bytes]
                es = [max(es, key=lambda e: e.file_bytes)] if es else []
            else:
                es = [e for e in made if e.kind == kind]
            if not es:
                continue
            row = {"stock": s.label, "stock_bytes": s.file_bytes, "method": kind,
                   "file": es[0].label if len(es) == 1 else f"{len(es)} draws",
                   "file_bytes": max(e.file_bytes for e in es),
                   "evals": es[0].evals if len(es) == 1 else 0}
            for side, _ in SIDES:
                for key in ("kld_mean", "kld_p99"):
                    vs = [getattr(e, side).get(key) for e in es]
                    row[f"{side}_{key}"] = None if None in vs else sum(vs) / len(vs)
            rows.append(row)
    return rows


def format_ablation(entries: Sequence[Entry]) -> str:
    """Markdown table of :func:`ablation_rows`."""
    head = ["stock size", "method", "file", "size MB", "mean KLD (ours, llama.cpp)", "99% KLD (ours, llama.cpp)",
            "true-KL evals"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in ablation_rows(entries):
        both = [", ".join(_fmt(k, r[f"{side}_{k}"]) for side, _ in SIDES) for k in ("kld_mean", "kld_p99")]
        evals = "-" if r["evals"] is None else str(r["evals"])
        lines.append("| " + " | ".join([f"{r['stock']} ({r['stock_bytes'] / 1e6:.1f} MB)", r["method"], r["file"],
                                        f"{r['file_bytes'] / 1e6:.1f}", *both, evals]) + " |")
    return "\n".join(lines)


def write_json(path: Path, entries: Sequence[Entry], meta: dict) -> Path:
    """``{"meta": ..., "entries": [...]}``, written atomically."""
    doc = {"meta": meta, "entries": [e.to_dict() for e in ordered(entries)]}
    return atomic_write_text(path, json.dumps(doc, indent=2, default=str) + "\n")


def read_json(path: Path) -> tuple[list[Entry], dict]:
    doc = json.loads(Path(path).read_text())
    return [Entry.from_dict(d) for d in doc["entries"]], doc["meta"]


def plot_pareto(path: Path, entries: Sequence[Entry], title: str = "") -> Path:
    """PNG: file size (MB) against mean KLD (log scale), llama.cpp's measure filled, ours hollow;
    one colour per kind, each kind's points joined in size order (random draws: points only)."""
    fig = Figure(figsize=(8, 5.5))  # no pyplot: no global backend switch
    ax = fig.subplots()
    colours = dict(zip(KINDS, ("tab:blue", "tab:gray", "tab:orange", "tab:purple", "tab:brown", "tab:olive",
                               "tab:green")))
    for kind in KINDS:
        group = sorted((e for e in entries if e.kind == kind), key=lambda e: e.file_bytes)
        for side, filled in (("llama", True), ("ours", False)):
            pts = [(e.file_bytes / 1e6, e) for e in group if (getattr(e, side).get("kld_mean") or 0) > 0]
            if not pts:
                continue
            xs, ys = [x for x, _ in pts], [getattr(e, side)["kld_mean"] for _, e in pts]
            style = "none" if kind == "random" else "-" if filled else ":"  # random draws: points only
            ax.plot(xs, ys, linestyle=style, marker="o", color=colours[kind], alpha=0.9,
                    markerfacecolor=colours[kind] if filled else "none",
                    label=f"{kind} ({'llama.cpp' if filled else 'ours'})")
            if filled and kind in ("stock", "source"):  # the other kinds by colour: their labels would pile up
                for x, (_, e) in zip(xs, pts):
                    ax.annotate(e.label, (x, getattr(e, side)["kld_mean"]), fontsize=7, xytext=(3, 3),
                                textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel("file size (MB)")
    ax.set_ylabel("mean KLD vs full precision (nats/token)")
    ax.set_title(title or "size vs mean KLD")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, path)
