"""True KL: the model with a candidate's dequantized weights against the reference, end to end.

The reference is computed once: the final residual stream of the evaluation tokens (small:
tokens x d), from which the reference logits are re-derived a few dozen rows at a time beside the
candidate's, so no vocabulary-wide array is held for more than those rows. Candidate weights are
produced lazily, one tensor at a time, by :class:`QuantizedWeights` -- a mapping the block-by-block
forward reads as overrides -- so peak memory stays near one block.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping
from typing import Iterator

import numpy as np
import torch

from dynsearch.kernels import dequantize, quantize_tensor
from dynsearch.objectives.kl import KLAccumulator, mean_kl
from dynsearch.system import memory_limit

CACHE_MAX_BYTES = 2 << 30  # QuantCache's default ceiling
CACHE_SHARE = 8  # ... and at most this fraction (1/8) of the memory the process may use


def default_cache_bytes() -> int:
    """QuantCache's default size: 2 GiB, or an eighth of the memory limit where that is less
    (cgroup, ulimit or RAM: :func:`~dynsearch.system.memory_limit`)."""
    return int(min(CACHE_MAX_BYTES, memory_limit() // CACHE_SHARE))


class QuantCache:
    """Quantized bytes of (tensor, type) pairs, least recently used dropped past ``max_bytes``.

    Trials of a search share most of their (tensor, type) pairs; keeping the compact quantized
    form (not the float weights) lets each true-KL evaluation skip re-quantizing them, for about
    the size of the quantized model per type in memory at most; ``max_bytes`` defaults to
    :func:`default_cache_bytes` (scaled down under a memory cap).
    """

    def __init__(self, max_bytes: int | None = None):
        self.max_bytes = default_cache_bytes() if max_bytes is None else int(max_bytes)
        self._items: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: tuple[str, str], make) -> np.ndarray:
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
                self.hits += 1
                return hit
            self.misses += 1
        value = make()
        if value.nbytes <= self.max_bytes:
            with self._lock:
                if key not in self._items:
                    self._items[key] = value
                    self._bytes += value.nbytes
                while self._bytes > self.max_bytes:
                    _, old = self._items.popitem(last=False)
                    self._bytes -= old.nbytes
        return value


class QuantizedWeights(Mapping):
    """``name -> dequantize(quantize(W, type))`` for the tensors of an assignment, on demand.

    ``importance`` gives the imatrix vector per tensor name (or None), as the written file uses,
    so the weights scored are exactly those the GGUF will hold. ``cache`` (a :class:`QuantCache`)
    keeps quantized bytes between assignments.
    """

    def __init__(self, source, assignment: Mapping[str, str], importance=None,
                 cache: QuantCache | None = None):
        self.source = source
        self.assignment = dict(assignment)
        self.importance = importance or (lambda name: None)
        self.cache = cache

    def _quantized(self, name: str, qtype: str) -> np.ndarray:
        return quantize_tensor(self.source.load(name), qtype, self.importance(name))

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.assignment:
            raise KeyError(name)
        qtype = self.assignment[name]
        shape = self.source.shape(name)
        if qtype == "F32":
            return self.source.load(name)
        if self.cache is None:
            q = self._quantized(name, qtype)
        else:
            q = self.cache.get((name, qtype), lambda: self._quantized(name, qtype))
        return dequantize(q, qtype, shape[-1]).reshape(shape)

    def __contains__(self, name: object) -> bool:  # Mapping's own would build the tensor to find out
        return name in self.assignment

    def __iter__(self) -> Iterator[str]:
        return iter(self.assignment)

    def __len__(self) -> int:
        return len(self.assignment)


class KLEvaluator:
    """Mean KL(reference || candidate) over fixed evaluation tokens (n_seq, T)."""

    def __init__(self, forward, tokens: np.ndarray):
        self.forward = forward
        self.tokens = np.asarray(tokens)
        self.ref_hidden = forward.hidden_states(self.tokens)  # (n_seq, T, d), the reference

    def _pairs(self, overrides: Mapping[str, np.ndarray], positions: slice,
               head_overrides: Mapping[str, np.ndarray] | None = None
               ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """(start, reference log-probs, candidate logits), each (n, n_vocab), per chunk of the
        rows at ``positions`` of every sequence (flattened: sequence-major), a few dozen rows at a
        time (:meth:`BlockwiseForward.head_rows`): no vocabulary-wide array of a whole sequence.
        ``head_overrides``: the output norm and head's weights, where they differ from
        ``overrides`` (a tied embedding's two roles measured apart)."""
        fwd = self.forward
        hidden = fwd.hidden_states(self.tokens, overrides) if overrides else self.ref_hidden
        d = hidden.shape[-1]
        ref_w = fwd.head_weights()
        head = overrides if head_overrides is None else head_overrides
        own = head is not None and any(n in head for n in ("output_norm.weight", fwd.head_name))
        cand_w = fwd.head_weights(head) if own else ref_w  # one copy where the head is kept
        ref_rows = self.ref_hidden[:, positions].reshape(-1, d)
        rows = hidden[:, positions].reshape(-1, d)
        for (s, ref), (_, cand) in zip(fwd.head_rows(ref_rows, log_probs=True, weights=ref_w),
                                       fwd.head_rows(rows, weights=cand_w)):
            yield s, ref, cand

    def mean_kl(self, overrides: Mapping[str, np.ndarray],
                head_overrides: Mapping[str, np.ndarray] | None = None) -> float:
        """Mean over all token positions of KL(ref || candidate); ``head_overrides``: the head's
        weights where they differ from ``overrides`` (see :meth:`_pairs`)."""
        total, count = 0.0, 0
        for _, ref, cand in self._pairs(overrides, slice(None), head_overrides):
            total += mean_kl(ref, cand) * ref.shape[0]
            count += ref.shape[0]
        return total / count

    def stats(self, overrides: Mapping[str, np.ndarray], skip_first_half: bool = True):
        """The full llama-perplexity statistics (second half of each sequence scored, as it does)."""
        acc = KLAccumulator()
        T = self.tokens.shape[1]
        first = T // 2 if skip_first_half else 0
        targets = torch.as_tensor(self.tokens[:, first + 1:], dtype=torch.long).reshape(-1)
        for s, ref, cand in self._pairs(overrides, slice(first, T - 1)):
            acc.update(ref, cand, targets[s:s + ref.shape[0]])
        return acc.result()
