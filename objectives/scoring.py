"""Log-probabilities of chosen tokens at chosen positions of many variable-length sequences.

What multiple-choice scoring needs (MMLU's answer letters, the log-likelihood of each choice's
continuation): sequences of different lengths are sorted by length, right-padded into buckets of
at most ``max_tokens`` tokens and run through the block-by-block forward; with causal attention the
padding after a sequence never changes the logits of its own positions. Only the requested
positions go through the lm head, so no vocabulary-wide array is held for more than
``head_rows`` positions::

    out = gather_logprobs(forward, [ids_a, ids_b], positions=[[len(ids_a) - 1], [3, 4]],
                          token_ids=[[[330, 49]], [[17], [42]]])
    out[0]   # (1, 2): log p(token 330), log p(token 49) after the last token of ids_a
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def _buckets(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Sequence indices grouped so that (count x longest) stays within max_tokens (one at least)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    out: list[list[int]] = []
    for i in order:
        if out and (len(out[-1]) + 1) * lengths[out[-1][0]] <= max_tokens:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def gather_logprobs(forward, sequences: Sequence[Sequence[int]], positions: Sequence[Sequence[int]],
                    token_ids: Sequence[Sequence[Sequence[int]]], *, max_tokens: int = 8192,
                    head_rows: int = 128, pad_id: int = 0) -> list[np.ndarray]:
    """Per sequence ``i``, a ``(len(positions[i]), m)`` float64 array: the model's log-softmax at
    position ``positions[i][j]`` (predicting the token after it), read at ``token_ids[i][j]``.

    ``forward`` is a :class:`~dynsearch.objectives.forward.BlockwiseForward` (weights and device
    are its own). ``token_ids[i]`` holds one row of ``m`` ids per position, ``m`` the same for all.
    """
    if not (len(sequences) == len(positions) == len(token_ids)):
        raise ValueError("sequences, positions and token_ids must have one entry per sequence")
    lengths = [len(s) for s in sequences]
    ids = [np.asarray(t, dtype=np.int64).reshape(len(p), -1) for t, p in zip(token_ids, positions)]
    for i, (n, pos) in enumerate(zip(lengths, positions)):
        if n == 0 or any(not 0 <= p < n for p in pos):
            raise ValueError(f"sequence {i}: positions must lie in [0, {n})")
        if ids[i].shape[1] != ids[0].shape[1]:
            raise ValueError(f"sequence {i}: {ids[i].shape[1]} token ids per position, expected {ids[0].shape[1]}")
    out: list[np.ndarray] = [np.zeros((0, ids[0].shape[1] if ids else 1))] * len(sequences)
    for bucket in _buckets(lengths, max_tokens):
        T = lengths[bucket[0]]
        toks = np.full((len(bucket), T), pad_id, dtype=np.int64)
        for r, i in enumerate(bucket):
            toks[r, : lengths[i]] = sequences[i]
        hidden = forward.hidden_states(toks)  # (B, T, d)
        rows = torch.as_tensor([r for r, i in enumerate(bucket) for _ in positions[i]], dtype=torch.long)
        cols = torch.as_tensor([p for i in bucket for p in positions[i]], dtype=torch.long)
        picked = hidden[rows.to(hidden.device), cols.to(hidden.device)]  # (P, d)
        del hidden
        vals = head_gather(forward, picked, torch.as_tensor(np.concatenate([ids[i] for i in bucket])), head_rows)
        start = 0
        for i in bucket:
            out[i] = vals[start:start + len(ids[i])]
            start += len(ids[i])
    return out


def head_gather(forward, picked: torch.Tensor, ids: torch.Tensor, head_rows: int = 128) -> np.ndarray:
    """log-softmax of the lm head at hidden states ``picked`` (P, d), read at ``ids`` (P, m), float64.

    The rows go through ``forward.head`` in one call (its weights loaded once), ``head_rows`` x its
    batch size at a time."""
    P, d = picked.shape
    if P == 0:
        return np.zeros((0, ids.shape[1]))
    nb = -(-P // head_rows)
    padded = torch.zeros((nb * head_rows, d), dtype=picked.dtype, device=picked.device)
    padded[:P] = picked
    flat_ids = torch.zeros((nb * head_rows, ids.shape[1]), dtype=torch.long)
    flat_ids[:P] = ids
    parts = []
    for s, logits in forward.head(padded.view(nb, head_rows, d)):  # logits (B, head_rows, V)
        logp = torch.log_softmax(logits.float(), dim=-1).reshape(-1, logits.shape[-1])
        sel = flat_ids[s * head_rows:s * head_rows + logp.shape[0]].to(logp.device)
        parts.append(logp.gather(-1, sel).double().cpu().numpy())
    return np.concatenate(parts, axis=0)[:P]
