"""The search space: per tensor, the candidate types with their exact sizes and proxy errors.

A :class:`SearchSpace` is plain numeric data computed once by profiling; everything the search
does afterwards (knapsack seeds, Optuna trials) is cheap arithmetic on it. Tensors are grouped by
kind (``attn_q``, ``ffn_down``, ...) and by a band of layers, so that Optuna can move a few
dozen sensitivity multipliers instead of hundreds of tensor types. MoE expert stacks
(``ffn_{gate,up,down}_exps``) can be grouped otherwise, see :data:`EXPERT_GROUPINGS`.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import numpy as np

from dynsearch.errors import DynsearchError
from dynsearch.search import knapsack

_BLK = re.compile(r"^blk\.(\d+)\.(.+?)(?:\.weight)?$")


def tensor_kind(name: str) -> tuple[str, int]:
    """(kind, layer) of a GGUF tensor name; layer -1 outside the blocks."""
    m = _BLK.match(name)
    if m:
        return m.group(2), int(m.group(1))
    return name.removesuffix(".weight"), -1


_EXPS = re.compile(r"^ffn_(gate|up|down)_exps$")

# How the expert stacks of an MoE model share search variables (log-multipliers):
#   "kind"  - one per kind over all layers: ffn_gate_exps, ffn_up_exps, ffn_down_exps (3 in all)
#   "layer" - one per layer for its three stacks: ffn_exps@L0, ffn_exps@L1, ... (n_layer in all)
#   "none"  - like any other tensor: per kind and band of layers (3 x n_bands)
# "kind" is the default: in a large MoE model the stacks hold almost all bytes, and the proxy
# already ranks their experts and layers by routed statistics, so what its multipliers mainly
# correct is the bias between gate/up (inside the SiLU product) and down (straight onto the
# residual); 3 variables leave the study's few dozen trials to the attention groups, where
# "layer" would add one per layer (48 for Qwen3-30B-A3B) and make a 24-trial TPE study close to
# random sampling.
EXPERT_GROUPINGS = ("kind", "layer", "none")
DEFAULT_EXPERT_GROUPING = "kind"


def layer_groups(names: list[str], n_layer: int, n_bands: int,
                 experts: str = DEFAULT_EXPERT_GROUPING) -> tuple[np.ndarray, list[str]]:
    """Group index per tensor: (kind, band of layers); tensors outside blocks form their own;
    expert stacks as ``experts`` says (:data:`EXPERT_GROUPINGS`)."""
    if experts not in EXPERT_GROUPINGS:
        raise DynsearchError(f"expert grouping {experts!r}: expected one of {', '.join(EXPERT_GROUPINGS)}")
    keys: list[str] = []
    index: dict[str, int] = {}
    out = np.empty(len(names), dtype=np.int64)
    for i, name in enumerate(names):
        kind, layer = tensor_kind(name)
        if layer < 0:
            key = kind
        elif experts == "kind" and _EXPS.match(kind):
            key = kind
        elif experts == "layer" and _EXPS.match(kind):
            key = f"ffn_exps@L{layer}"
        else:
            band = min(n_bands - 1, layer * n_bands // max(1, n_layer))
            key = f"{kind}@{band}"
        if key not in index:
            index[key] = len(keys)
            keys.append(key)
        out[i] = index[key]
    return out, keys


@dataclass(frozen=True)
class SearchSpace:
    """Numbers the search works on. Row ``i`` is tensor ``names[i]``, column ``j`` type ``types[j]``."""

    names: tuple[str, ...]
    types: tuple[str, ...]  # candidate type names as requested (before llama.cpp's fallback)
    written: tuple[tuple[str, ...], ...]  # per tensor and column: the type actually written
    sizes: np.ndarray  # (n, m) int64: bytes of the tensor data, alignment padding included
    errors: np.ndarray  # (n, m) float64: proxy error; inf where the type is not allowed
    groups: np.ndarray  # (n,) int64 group index
    group_names: tuple[str, ...]
    n_weights: int  # total number of weights of all tensors

    def __post_init__(self):
        n, m = len(self.names), len(self.types)
        if self.sizes.shape != (n, m) or self.errors.shape != (n, m) or self.groups.shape != (n,):
            raise ValueError("search space arrays do not match its names and types")

    def min_size(self) -> int:
        return knapsack.min_size(self.sizes, self.errors)

    def max_size(self) -> int:
        return knapsack.max_size(self.sizes, self.errors)

    def allowed(self, i: int) -> list[int]:
        """The columns (candidate types) tensor ``i`` may take."""
        return [j for j in range(len(self.types)) if np.isfinite(self.errors[i, j])]

    def size_of(self, choice: np.ndarray) -> int:
        return int(self.sizes[np.arange(len(choice)), choice].sum())

    def proxy_of(self, choice: np.ndarray) -> float:
        return float(self.errors[np.arange(len(choice)), choice].sum())

    def solve(self, budget: int, log_multipliers: np.ndarray | None = None,
              fixed: dict[int, int] | None = None) -> np.ndarray:
        """The proxy-optimal choice within ``budget``, optionally with per-group cost multipliers
        and with some tensors held at a given column (``fixed``: row -> column; the knapsack
        re-solves the others in the bytes those leave). A ValueError where nothing fits."""
        costs = self.errors
        if log_multipliers is not None:
            costs = costs * np.exp(np.asarray(log_multipliers, dtype=np.float64))[self.groups][:, None]
        if fixed:
            costs = costs.copy()
            for i, j in fixed.items():
                if not np.isfinite(self.errors[i, j]):
                    raise ValueError(f"{self.names[i]}: {self.types[j]} is not allowed")
                keep = costs[i, j]
                costs[i, :] = np.inf
                costs[i, j] = keep
        return knapsack.solve_dp(self.sizes, costs, budget).choice

    def assignment(self, choice: np.ndarray) -> dict[str, str]:
        """Tensor name -> written type name (llama.cpp's fallback applied), in model order."""
        return {n: self.written[i][int(c)] for i, (n, c) in enumerate(zip(self.names, choice))}

    def choice_of(self, assignment: dict[str, str]) -> np.ndarray:
        """Inverse of :meth:`assignment` (first column that writes the requested type)."""
        out = np.empty(len(self.names), dtype=np.int64)
        for i, n in enumerate(self.names):
            try:
                out[i] = self.written[i].index(assignment[n])
            except (KeyError, ValueError):
                raise ValueError(f"{n}: type {assignment.get(n)!r} is not a candidate") from None
        return out

    def fingerprint(self) -> str:
        """Hash of everything a stored trial value depends on (guards resumed studies)."""
        h = hashlib.sha256()
        for part in (self.names, self.types, self.written, self.group_names):
            h.update(repr(part).encode())
        for arr in (self.sizes, self.errors, self.groups):
            h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()[:16]


def choice_key(choice: np.ndarray) -> str:
    """A compact, stable string of a choice (stored with each trial)."""
    return "".join(chr(48 + int(c)) for c in choice)


def parse_choice_key(key: str) -> np.ndarray:
    return np.array([ord(ch) - 48 for ch in key], dtype=np.int64)


@dataclass(frozen=True)
class Headroom:
    """What a choice leaves of its budget, and why nothing more was spent (:func:`headroom`)."""

    unused: int  # bytes of tensor data the budget allows beyond the choice
    fitting_steps: int  # single-tensor moves to a larger type that fit in ``unused``
    best_step: tuple[str, str, int, float] | None  # (tensor, type, extra bytes, proxy gain) of the best one
    cheapest: tuple[str, str, int] | None  # (tensor, type, extra bytes): the smallest move to a larger type

    def reason(self) -> str:
        """One line, for the run's summary."""
        if self.best_step is None:
            if self.cheapest is None:
                return "every tensor is at its largest candidate type"
            name, qtype, extra = self.cheapest
            return (f"nothing else fits: the smallest step up ({name} to {qtype}) needs "
                    f"{extra - self.unused} bytes more")
        name, qtype, extra, gain = self.best_step
        if gain <= 0:
            return (f"nothing measurable is gained: {self.fitting_steps} single-tensor steps up fit, "
                    "none lowers the proxy error")
        return (f"the measured KL chose it: the best step that fits ({name} to {qtype}, +{extra} bytes) "
                f"lowers the proxy error by {gain:.3g}, but the search's true-KL trials preferred this recipe")


def headroom(space: SearchSpace, choice: np.ndarray, budget: int) -> Headroom:
    """The unused part of ``budget`` (bytes of searched tensor data) under ``choice``, with the
    single-tensor moves to a larger type that would fit in it and the best of them by the proxy."""
    rows = np.arange(len(choice))
    cur_size, cur_err = space.sizes[rows, choice], space.errors[rows, choice]
    unused = int(budget - cur_size.sum())
    extra = space.sizes - cur_size[:, None]
    allowed = np.isfinite(space.errors) & (extra > 0)
    cheapest = best = None
    if allowed.any():
        i, j = np.unravel_index(np.argmin(np.where(allowed, extra, np.iinfo(np.int64).max)), extra.shape)
        cheapest = (space.names[i], space.written[i][j], int(extra[i, j]))
    fits = allowed & (extra <= unused)
    if fits.any():
        gain = np.where(fits, cur_err[:, None] - space.errors, -np.inf)
        i, j = np.unravel_index(np.argmax(gain), gain.shape)
        best = (space.names[i], space.written[i][j], int(extra[i, j]), float(gain[i, j]))
    return Headroom(unused=max(unused, 0), fitting_steps=int(fits.sum()), best_step=best, cheapest=cheapest)
