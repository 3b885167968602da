"""The statistics phase of a run: activations (imatrix, X^T X) and the Fisher pass over the
calibration tokens, block by block, into per-tensor :class:`~.store.TensorStats`."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from dynsearch.objectives.stats.capture import ActivationStats, CaptureConfig
from dynsearch.objectives.stats.fisher import fisher_pass
from dynsearch.objectives.stats.moe import expert_second_moment, is_expert_stack
from dynsearch.objectives.stats.store import StatsFile, StatsWriter, TensorStats

log = logging.getLogger(__name__)


class _HeadGram:
    """Capture for the lm head: X^T X of the normed final hidden states."""

    def __init__(self, stats):
        self.stats = stats
        self.xtx: torch.Tensor | None = None
        self.n = 0

    def __call__(self, name, x):
        if name.startswith("blk."):
            self.stats(name, x)
            return
        xd = x.reshape(-1, x.shape[-1]).double()
        self.xtx = xd.T @ xd if self.xtx is None else self.xtx + xd.T @ xd
        self.n += xd.shape[0]

    def experts(self, name, x, expert_ids, n_expert):  # MoE expert stacks (blocks.moe_ffn)
        self.stats.experts(name, x, expert_ids, n_expert)


class _DictSink:
    """Statistics kept in memory (``collect_statistics`` without a path: tests, benchmarks)."""

    def __init__(self):
        self.stats: dict[str, TensorStats] = {}

    def add(self, name: str, field: str, value) -> None:
        setattr(self.stats.setdefault(name, TensorStats()), field, value)


def collect_statistics(forward, calib_tokens: np.ndarray, fisher_tokens: np.ndarray, seed: int,
                       progress: bool = True, path: Path | None = None) -> Mapping[str, TensorStats]:
    """Per searchable tensor, the :class:`TensorStats` profiling needs.

    Block by block over all calibration sequences at once (their hidden states are the resident
    calibration state), so that each layer's ``X^T X`` is final when its block is done: it is
    then written to ``path`` (a statistics ``.npz``, see :mod:`.store`) and freed, and memory
    does not grow with the number of layers. Without ``path`` the result stays in memory.
    """
    with contextlib.ExitStack() as stack:
        sink = _DictSink() if path is None else stack.enter_context(StatsWriter(path))
        stats = ActivationStats(CaptureConfig(second_moment=True))
        head = _HeadGram(stats)
        with torch.inference_mode():
            hidden = forward.embed(calib_tokens)
        for il in tqdm(range(forward.cfg.n_layer), desc="activations", disable=not progress, unit="block"):
            forward.run_block(il, hidden, capture=head)
            prefix = f"blk.{il}."
            for name in stats.names:
                if name.startswith(prefix) and stats.has_second_moment(name):
                    n = float(stats.count(name).sum())
                    sink.add(name, "xtx", (stats.second_moment(name) / n).float().cpu())
            stats.drop_second_moments(prefix)
        for _ in forward.head(hidden, capture=head):
            pass
        del hidden
        imat = stats.imatrix(["calibration"], calib_tokens.shape[1])
        log.info("fisher pass on %d tokens", fisher_tokens.size)
        sens = fisher_pass(forward, fisher_tokens, seed=seed)

        cfg, spec = forward.cfg, forward.spec
        for name in stats.names:
            if sens.fisher_out.get(name) is not None:
                sink.add(name, "fisher_out", sens.fisher_out[name])
            if imat.importance(name) is not None:
                sink.add(name, "importance", imat.importance(name))
            if is_expert_stack(name):  # per-expert input statistics and routing counts (moe.py)
                e = imat.entries[name]
                sink.add(name, "xdiag", expert_second_moment(e.in_sum2, e.counts,
                                                             float(e.counts.sum()) / cfg.n_expert_used))
                sink.add(name, "expert_counts", e.counts.astype(np.float64))
        head_name = "output.weight" if forward._has_output else "token_embd.weight"
        scale2 = float(cfg.n_embd) if spec.embed_scale else 1.0
        head_xtx = (head.xtx / head.n).float().cpu()
        sink.add(head_name, "xtx", head_xtx)
        sink.add(head_name, "fisher_out", sens.fisher_out[head_name])  # tied: one table, both uses
        sink.add("token_embd.weight", "row_weight", sens.token_counts / sens.token_counts.sum())
        sink.add("token_embd.weight", "fisher_col", sens.fisher_embed * scale2)
    return sink.stats if path is None else StatsFile(path)
