"""MoE expert stacks in the search: which tensors they are, their per-expert statistics, routing.

An expert stack ``blk.N.ffn_{gate,up,down}_exps.weight`` (n_expert, rows, n_cols) is searched as
one tensor (one GGUF type for all its experts, as llama.cpp stores it), but its error is the sum of
its experts' errors, each weighted by the tokens routed to that expert: the stack has no single
``X^T X``, so its inputs are described per expert by the diagonal second moment

    H_e = sum_{t routed to e} x_t**2 / N      (N: all calibration tokens)

(the llama-imatrix statistics, ``in_sum2`` per expert, over the same N as a dense tensor's
``X^T X / N``) and its outputs by the Fisher of each expert's outputs over its own tokens.

Experts that no calibration token was routed to would get a zero error (any type would look free)
and, in llama-imatrix, no statistics: ``llama-quantize`` then quantizes them with an importance of
all ones (``tools/quantize/quantize.cpp``: a zero-count expert's vector is filled with 1), which the
written file keeps. For the proxy such an expert is given the mean per-token statistics of the
layer's live experts, weighted as if one token had been routed to it: never zero, and small, since
the calibration says it is rarely used.
"""

from __future__ import annotations

import re

import numpy as np

_STACK = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)_exps\.weight$")
DEAD_EXPERT_TOKENS = 1.0  # pseudo-count of tokens a never-routed expert is weighted by


def is_expert_stack(name: str) -> bool:
    return _STACK.match(name) is not None


def is_router(name: str) -> bool:
    """The router ``ffn_gate_inp`` (and shared-expert gates): never quantized by llama-quantize."""
    return re.match(r"^blk\.\d+\.ffn_gate_inp(_shexp)?\.weight$", name) is not None


def _live_mean(rows: np.ndarray, live: np.ndarray) -> np.ndarray:
    return rows[live].mean(axis=0) if live.any() else np.ones(rows.shape[1:], dtype=rows.dtype)


def expert_second_moment(in_sum2: np.ndarray, counts: np.ndarray, n_tokens: float) -> np.ndarray:
    """H_e (n_expert, n_cols), float32: ``in_sum2[e] / n_tokens``; a never-routed expert gets the
    live experts' mean per-routed-token second moment times ``DEAD_EXPERT_TOKENS / n_tokens``."""
    s = np.asarray(in_sum2, dtype=np.float64).reshape(len(counts), -1)
    c = np.asarray(counts, dtype=np.float64)
    if n_tokens <= 0:
        raise ValueError("no calibration tokens")
    live = c > 0
    per_token = s / np.where(live, c, 1.0)[:, None]
    fill = _live_mean(per_token, live)
    out = np.where(live[:, None], s, fill[None, :] * DEAD_EXPERT_TOKENS) / n_tokens
    return out.astype(np.float32)


def fill_dead_experts(per_expert: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Rows (n_expert, ...) of per-routed-token statistics (output Fisher) with the rows of
    never-routed experts replaced by the live experts' mean."""
    rows = np.asarray(per_expert, dtype=np.float64).copy()
    live = np.asarray(counts) > 0
    rows[~live] = _live_mean(rows, live)
    return rows


def routing_table(counts: dict[str, np.ndarray]) -> dict[str, dict]:
    """Per routed layer: tokens routed to each expert (from the ``ffn_gate_exps`` stack's counts),
    and the experts that never fired. For the report."""
    out = {}
    for name, c in sorted(counts.items(), key=lambda kv: int(_STACK.match(kv[0])[1])):
        m = _STACK.match(name)
        if m is None or m[2] != "gate" and f"blk.{m[1]}.ffn_gate_exps.weight" in counts:
            continue
        c = np.asarray(c, dtype=np.int64)
        out[f"blk.{m[1]}"] = {"tokens_per_expert": c.tolist(),
                              "never_routed": [int(e) for e in np.flatnonzero(c == 0)]}
    return out


def expert_error(w: np.ndarray, dq: np.ndarray, xdiag: np.ndarray, fisher_out: np.ndarray | None) -> float:
    """The proxy error of an expert stack (n_expert * rows, n_cols) written as ``dq``:
    ``1/2 sum_e sum_o f_eo sum_i dW_eoi^2 H_ei`` (see the module docstring), expert by expert."""
    h = np.asarray(xdiag, dtype=np.float64)  # (E, in)
    n_expert = h.shape[0]
    w3 = w.reshape(n_expert, -1, w.shape[-1])
    dq3 = dq.reshape(w3.shape)
    f = None if fisher_out is None else np.asarray(fisher_out, dtype=np.float64).reshape(n_expert, -1)
    total = 0.0
    for e in range(n_expert):
        d = (dq3[e].astype(np.float64) - w3[e])
        per_row = (d * d) @ h[e]  # (rows,)
        total += 0.5 * float(per_row.sum() if f is None else f[e] @ per_row)
    return total
