"""Statistics of the inputs of every linear layer over the calibration tokens (the capture hook).

The forward pass calls an :class:`ActivationStats` for each weight matrix it multiplies with
``(gguf_name, x)``, ``x`` being the matmul's input rows ``(..., n_cols)`` (CPU or CUDA). It keeps,
per tensor, what ``llama-imatrix`` keeps (tools/imatrix/imatrix.cpp ``collect_imatrix``):

* dense weights: ``in_sum2 += sum_t x_t**2`` per column and ``count += n_tokens``; only tensors
  named ``blk.*`` (plus ``output.weight`` with ``process_output``, llama-imatrix's
  ``--process-output``), and only calls with at least ``min_tokens`` (16) rows — llama-imatrix
  skips smaller matmuls. Tensors that share an input (``attn_q``/``attn_k``/``attn_v``,
  ``ffn_gate``/``ffn_up``) each get their own, identical, entry, as in llama-imatrix.
* MoE expert stacks (``MUL_MAT_ID``): per expert, the squared inputs of the tokens routed to it and
  their number; pass ``expert_ids`` (n_tokens, n_used) and ``n_expert``; ``x`` is ``(n_tokens,
  n_cols)`` (one input broadcast to every selected expert: gate/up) or ``(n_tokens, n_used,
  n_cols)`` (one per slot: down). Collected whatever the number of rows, as in llama-imatrix.

With ``second_moment`` it also accumulates ``X^T X`` (float64, ``(n_cols, n_cols)``) for the
error proxy, once per distinct input: tensors of one :func:`input_group` share one matrix (a
layer's q/k/v, its gate/up). Sharing is checked, not assumed: a group member's input must have the
same ``(X^T X) r`` for a fixed random ``r`` as the group's first member in that call, else
ValueError. MoE expert stacks get no ``X^T X``. Sums accumulate in float64 (llama.cpp: float32) and are rounded once at the end.

:func:`calibration_chunks` cuts a token stream into exactly the chunks llama-imatrix evaluates.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np
import torch

from dynsearch.objectives.io.imatrix import ImatrixData, ImatrixEntry

# Tensors fed the same input within one layer (a tensor not listed is its own group).
_SHARED_INPUTS = re.compile(
    r"^(?P<blk>blk\.\d+\.)(?:(?P<attn>attn_q|attn_k|attn_v|attn_q_a|attn_kv_a_mqa)"
    r"|(?P<ffn>ffn_gate|ffn_up|ffn_gate_shexp|ffn_up_shexp|ffn_gate_inp))\.weight$")


def input_group(name: str) -> str:
    """The key of the input ``name`` reads: ``blk.N.attn_in`` for q/k/v, ``blk.N.ffn_in`` for gate/up."""
    m = _SHARED_INPUTS.match(name)
    if m is None:
        return name
    return m["blk"] + ("attn_in" if m["attn"] else "ffn_in")


def imatrix_collects(name: str, process_output: bool = False) -> bool:
    """Whether llama-imatrix keeps statistics for weight ``name`` (``blk.*``, or ``output.weight``)."""
    return name.startswith("blk.") or (process_output and name == "output.weight")


@dataclass(frozen=True)
class CaptureConfig:
    process_output: bool = False  # also collect output.weight (llama-imatrix --process-output)
    min_tokens: int = 16  # dense matmuls on fewer rows are skipped (llama-imatrix's rule)
    second_moment: bool = False  # also accumulate X^T X per distinct input (float64, d x d)
    # which tensors get X^T X when second_moment is on (None: all collected dense tensors)
    second_moment_filter: Callable[[str], bool] | None = None


class _Gram:
    """X^T X of one input group, and the fingerprint of the input last added (for the sharing check)."""

    def __init__(self, n_cols: int, device: torch.device):
        self.xtx = torch.zeros((n_cols, n_cols), dtype=torch.float64, device=device)
        gen = torch.Generator().manual_seed(n_cols)
        self.probe = torch.randn(n_cols, 1, generator=gen, dtype=torch.float64).to(device)
        self.leader: str | None = None  # first tensor name seen in this group
        self.fingerprint: torch.Tensor | None = None  # (X^T X) probe of the leader's last input


class ActivationStats:
    """The capture hook: call it with ``(gguf_name, x)`` for every matmul input of the forward pass."""

    def __init__(self, config: CaptureConfig = CaptureConfig()):
        self.config = config
        self._sum2: dict[str, torch.Tensor] = {}  # float64 (n_mat, n_cols)
        self._counts: dict[str, torch.Tensor] = {}  # int64 (n_mat,)
        self._grams: dict[str, _Gram] = {}  # by input group

    # ------------------------------------------------------------------------------ collection

    def __call__(self, name: str, x: torch.Tensor, expert_ids: torch.Tensor | None = None,
                 n_expert: int | None = None) -> None:
        if expert_ids is not None:
            self._add_moe(name, x, expert_ids, n_expert)
            return
        if not imatrix_collects(name, self.config.process_output):
            return
        rows = x.reshape(-1, x.shape[-1])  # (n_tokens, n_cols)
        if rows.shape[0] < self.config.min_tokens:
            return
        xd = rows.to(torch.float64)
        sq = (xd * xd).sum(0, keepdim=True)  # (1, n_cols)
        _check_finite(name, sq)
        self._accumulate(name, sq, torch.tensor([rows.shape[0]], device=rows.device))
        if self.config.second_moment and (self.config.second_moment_filter is None
                                          or self.config.second_moment_filter(name)):
            self._add_gram(name, xd)

    def experts(self, name: str, x: torch.Tensor, expert_ids: torch.Tensor, n_expert: int) -> None:
        """The MoE capture method :func:`~dynsearch.objectives.blocks.moe_ffn` calls for an expert
        stack: ``x`` (n_tokens, n_cols) or (n_tokens, n_used, n_cols), ``expert_ids`` (n_tokens, n_used)."""
        self._add_moe(name, x, expert_ids, n_expert)

    def _add_moe(self, name: str, x: torch.Tensor, ids: torch.Tensor, n_expert: int | None) -> None:
        if n_expert is None:
            raise ValueError(f"{name}: n_expert is needed with expert_ids")
        ids = ids.reshape(ids.shape[0], -1).to(torch.int64)  # (n_tokens, n_used)
        if int(ids.min()) < 0 or int(ids.max()) >= n_expert:
            raise ValueError(f"{name}: expert ids outside [0, {n_expert})")
        xd = x.to(torch.float64)
        if xd.dim() == 2:  # one input for all selected experts
            xd = xd[:, None, :].expand(-1, ids.shape[1], -1)
        xd = xd.reshape(ids.numel(), -1)  # (n_tokens * n_used, n_cols)
        flat = ids.reshape(-1)
        sq = torch.zeros((n_expert, xd.shape[1]), dtype=torch.float64, device=xd.device)
        sq.index_add_(0, flat, xd * xd)
        _check_finite(name, sq)
        self._accumulate(name, sq, torch.bincount(flat, minlength=n_expert))

    def _accumulate(self, name: str, sq: torch.Tensor, count: torch.Tensor) -> None:
        if name not in self._sum2:
            self._sum2[name] = torch.zeros_like(sq)
            self._counts[name] = torch.zeros_like(count, dtype=torch.int64)
        elif self._sum2[name].shape != sq.shape:
            raise ValueError(f"{name}: inconsistent input shape {tuple(sq.shape)} vs {tuple(self._sum2[name].shape)}")
        self._sum2[name] += sq
        self._counts[name] += count

    def _add_gram(self, name: str, xd: torch.Tensor) -> None:
        group = input_group(name)
        g = self._grams.get(group)
        if g is None:
            g = self._grams[group] = _Gram(xd.shape[1], xd.device)
        fp = xd.T @ (xd @ g.probe)  # (X^T X) r, O(n d)
        if g.leader is None or g.leader == name:
            g.leader, g.fingerprint = name, fp
            g.xtx.addmm_(xd.T, xd)
            return
        ref = g.fingerprint
        if ref is None or ref.shape != fp.shape or not torch.allclose(fp, ref, rtol=1e-9, atol=1e-9 * float(ref.abs().max())):
            raise ValueError(f"{name} does not read the same input as {g.leader} (group {group}); "
                             "call the hook for the group's first tensor first, with the same rows")

    # ------------------------------------------------------------------------------ results

    @property
    def names(self) -> list[str]:
        return sorted(self._sum2)

    def count(self, name: str) -> np.ndarray:
        """Tokens summed for ``name`` (per expert for MoE tensors)."""
        return self._counts[name].cpu().numpy()

    def second_moment(self, name: str) -> torch.Tensor:
        """``sum_t x_t x_t^T`` of ``name``'s input, float64 (n_cols, n_cols); shared within an input group."""
        g = self._grams.get(input_group(name))
        if g is None:
            raise KeyError(f"no second moment for {name} (second_moment off, filtered out, or never called)")
        return g.xtx

    def has_second_moment(self, name: str) -> bool:
        return input_group(name) in self._grams

    def drop_second_moments(self, prefix: str) -> None:
        """Free the ``X^T X`` of every input group whose name starts with ``prefix`` (a finished
        layer's, ``blk.N.``, once read out): the matrices are the bulk of the statistics."""
        for group in [g for g in self._grams if g.startswith(prefix)]:
            del self._grams[group]

    def imatrix(self, datasets: Sequence[str], chunk_size: int) -> ImatrixData:
        """The statistics as llama-imatrix would save them after these chunks of ``chunk_size`` tokens."""
        entries = {n: ImatrixEntry(self._sum2[n].to(torch.float32).cpu().numpy(), self.count(n))
                   for n in self.names}
        max_count = max((int(e.counts.max()) for e in entries.values()), default=0)
        return ImatrixData(entries, list(datasets), max_count // chunk_size if chunk_size else 0, chunk_size)


class _Forward(Protocol):  # objectives.forward.BlockwiseForward
    def hidden_states(self, tokens, overrides=None, capture=None) -> torch.Tensor: ...

    def head(self, hidden, overrides=None, capture=None, log_probs=False): ...


def collect(forward: _Forward, chunks: Sequence[np.ndarray], stats: ActivationStats,
            chunks_per_pass: int = 8) -> ActivationStats:
    """Run ``chunks`` (each ``n_ctx`` tokens, see :func:`calibration_chunks`) through ``forward``,
    feeding every matmul input to ``stats``; the lm head only runs when it is collected
    (``process_output``). ``chunks_per_pass`` bounds the resident hidden states."""
    for s in range(0, len(chunks), chunks_per_pass):
        tokens = np.stack(chunks[s:s + chunks_per_pass])  # (n_seq, n_ctx)
        hidden = forward.hidden_states(tokens, capture=stats)
        if stats.config.process_output:
            for _ in forward.head(hidden, capture=stats):
                pass
    return stats


def _check_finite(name: str, v: torch.Tensor) -> None:
    if not bool(torch.isfinite(v).all()):
        raise ValueError(f"non-finite activations in the input of {name}")


def calibration_chunks(tokens: Sequence[int] | np.ndarray, n_ctx: int, n_chunks: int = -1,
                       bos_id: int | None = None, skip_chunks: int = 0) -> list[np.ndarray]:
    """The token chunks ``llama-imatrix -c n_ctx --chunks n_chunks [--chunk skip]`` evaluates.

    ``tokens`` is the whole text tokenized as llama-imatrix does (``common_tokenize`` with
    add_special: a leading BOS where the vocab adds one; special tokens not parsed). Every chunk is
    ``n_ctx`` consecutive tokens, its first replaced by ``bos_id`` when the vocab adds BOS; all of
    its tokens count. The tail shorter than ``n_ctx`` is dropped; llama-imatrix refuses texts
    shorter than ``2 * n_ctx`` tokens, and so does this.
    """
    toks = np.asarray(tokens, dtype=np.int64)
    if skip_chunks > 0:
        if (skip_chunks + 2) * n_ctx >= toks.size:
            raise ValueError(f"not enough tokens left after removing {skip_chunks} chunks")
        toks = toks[skip_chunks * n_ctx:]
    if toks.size < 2 * n_ctx:
        raise ValueError(f"llama-imatrix needs at least {2 * n_ctx} tokens for n_ctx={n_ctx}; got {toks.size}")
    n_max = toks.size // n_ctx
    n = n_max if n_chunks < 0 else min(n_chunks, n_max)
    chunks = []
    for i in range(n):
        c = toks[i * n_ctx:(i + 1) * n_ctx].copy()
        if bos_id is not None:
            c[0] = bos_id
        chunks.append(c)
    return chunks
