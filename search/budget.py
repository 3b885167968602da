"""Disk budgets: parsing what users type and turning it into bytes of tensor data.

``100MB`` and ``16GB`` are decimal (10**6, 10**9 bytes), ``95MiB`` and ``16GiB`` binary, ``4.5bpw``
is bits per weight over all tensor data (llama.cpp's BPW: tensor bytes * 8 / weights). A byte
budget covers the whole GGUF file, so the file's fixed overhead (header, metadata, tensor infos,
alignment) is subtracted before the tensors share what is left.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dynsearch.errors import BudgetError

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*$")
MAX_RANGE_BUDGETS = 64  # budgets one LOW..HIGH/N range may expand to (each is a search)


@dataclass(frozen=True)
class Budget:
    """A parsed budget: either whole-file bytes or bits per weight."""

    spec: str  # what the user typed, normalised ("100MB", "4.5bpw")
    file_bytes: int | None = None
    bpw: float | None = None

    def tensor_bytes(self, n_weights: int, overhead_bytes: int) -> int:
        """Bytes the tensor data may take (alignment padding included in tensor sizes)."""
        if self.bpw is not None:
            return int(self.bpw * n_weights / 8.0)
        assert self.file_bytes is not None
        return self.file_bytes - overhead_bytes


def parse_budget(text: str) -> Budget:
    m = _RE.match(str(text))
    if not m:
        raise BudgetError(f"invalid budget {text!r}: use a number with GB, GiB, MB, MiB or bpw "
                          "(e.g. 16GB, 95MiB, 4.5bpw)")
    value, unit = float(m.group(1)), m.group(2).lower()
    if value <= 0:
        raise BudgetError(f"invalid budget {text!r}: must be positive")
    if unit == "bpw":
        if not 0.5 <= value <= 32:
            raise BudgetError(f"invalid budget {text!r}: bits per weight must lie in [0.5, 32]")
        return Budget(spec=f"{value:g}bpw", bpw=value)
    if unit not in _UNITS:
        raise BudgetError(f"invalid budget {text!r}: unknown unit {m.group(2)!r} "
                          "(use GB, GiB, MB, MiB or bpw)")
    nbytes = int(value * _UNITS[unit])
    number = f"{int(value)}" if value.is_integer() else f"{value:.15g}"  # 105455000B, 1000000.5KB
    return Budget(spec=f"{number}{m.group(2) or 'B'}", file_bytes=nbytes)


def expand_budgets(specs) -> list[str]:
    """Budget arguments with ranges expanded: ``60MB..120MB/4`` is 4 budgets evenly spaced from
    60MB to 120MB (both ends included, the unit of the first end; ``3bpw..6bpw/7`` likewise), so
    that one run gives a family of recipes from one profiling pass."""
    out: list[str] = []
    for spec in specs:
        text = str(spec)
        if ".." not in text:
            out.append(text)
            continue
        rng, _, count = text.partition("/")
        lo_s, _, hi_s = rng.partition("..")
        try:
            n = int(count)
        except ValueError:
            n = 0
        if not 2 <= n <= MAX_RANGE_BUDGETS:
            raise BudgetError(f"invalid budget range {text!r}: use LOW..HIGH/N with 2 <= N <= "
                              f"{MAX_RANGE_BUDGETS} (e.g. 60MB..120MB/4)")
        lo, hi = parse_budget(lo_s), parse_budget(hi_s)
        if (lo.bpw is None) != (hi.bpw is None):
            raise BudgetError(f"invalid budget range {text!r}: both ends in bytes or both in bpw")
        a, b = (lo.bpw, hi.bpw) if lo.bpw is not None else (lo.file_bytes, hi.file_bytes)
        if not a < b:
            raise BudgetError(f"invalid budget range {text!r}: the low end must be below the high end")
        m = _RE.match(lo_s)
        unit = m.group(2) if m else ""
        scale = 1.0 if lo.bpw is not None else float(_UNITS[unit.lower()])
        for k in range(n):
            v = (a + (b - a) * k / (n - 1)) / scale
            out.append(f"{v:.15g}{unit}")  # exact: both ends stay where the user put them
    return out


def format_bytes(n: int) -> str:
    """Decimal units as llama.cpp and model hubs print file sizes."""
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def check_reachable(budget: Budget, tensor_budget: int, smallest: int, largest: int) -> None:
    """A clear error, before any work, when no assignment can meet the budget."""
    if tensor_budget < smallest:
        raise BudgetError(
            f"budget {budget.spec} is unreachable: the smallest assignment of the candidate types "
            f"needs {format_bytes(smallest)} of tensor data, the budget leaves {format_bytes(tensor_budget)}")
    if tensor_budget >= largest:
        raise BudgetError(
            f"budget {budget.spec} is above the largest possible file ({format_bytes(largest)} of "
            "tensor data with every tensor at its largest candidate type): nothing to search")
