"""Helpers shared by tests in several folders (tests/ is on pytest's pythonpath)."""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import torch

from dynsearch.search.space import SearchSpace, layer_groups, tensor_kind

KL_MAX = 1e-4  # mean KL(llama.cpp || ours) a correct forward pass stays below


def _english_text() -> str:
    """Deterministic English prose: docstrings of stdlib modules and their public members."""
    import argparse  # noqa: E401
    import collections
    import functools
    import json
    import logging
    import pathlib
    import textwrap

    parts = []
    for mod in (argparse, collections, functools, json, logging, pathlib, textwrap):
        parts.append(inspect.getdoc(mod) or "")
        for name, obj in sorted(vars(mod).items()):
            if not name.startswith("_") and (inspect.isclass(obj) or inspect.isfunction(obj)):
                parts.append(inspect.getdoc(obj) or "")
    return "\n\n".join(p for p in parts if p)


def english_chunks(llama_cpp, vocab_gguf: Path, n_ctx: int, n_chunks: int) -> np.ndarray:
    """(n_chunks, n_ctx) tokens of English text, tokenized by llama.cpp with the vocabulary of the
    GGUF ``vocab_gguf`` (the demo model's)."""
    vocab = llama_cpp.Llama(model_path=str(vocab_gguf), vocab_only=True, verbose=False)
    toks = vocab.tokenize(_english_text().encode(), add_bos=False, special=False)
    assert len(toks) >= n_ctx * n_chunks, f"only {len(toks)} tokens of text"
    return np.asarray(toks[: n_ctx * n_chunks], dtype=np.int64).reshape(n_chunks, n_ctx)


def llamacpp_logprobs(llama_cpp, path: Path, chunks: np.ndarray, **options) -> torch.Tensor:
    """llama.cpp's log-probabilities at every position of each chunk (one context per chunk);
    ``options`` go to ``Llama`` (e.g. ``type_k=0, type_v=0`` for an F32 KV cache)."""
    n_ctx = chunks.shape[1]
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=n_ctx, n_batch=n_ctx,
                          n_threads=2, verbose=False, **options)
    out = []
    for c in chunks:
        llm.reset()
        llm.eval(c.tolist())
        out.append(torch.from_numpy(np.array(llm.scores[: len(c)], dtype=np.float64)))
    del llm
    return torch.log_softmax(torch.stack(out), dim=-1)


def synthetic_space(seed=0, n_layer=6):
    rng = np.random.default_rng(seed)
    kinds = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_up", "ffn_down"]
    names = ["token_embd.weight"] + [f"blk.{i}.{k}.weight" for i in range(n_layer) for k in kinds]
    types = ("Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")
    bits = np.array([3.44, 4.5, 5.5, 6.56, 8.5])
    n_w = rng.integers(50_000, 200_000, len(names))
    sizes = (n_w[:, None] * bits[None, :] / 8).astype(np.int64)
    errors = n_w[:, None] * 4.0 ** (-bits[None, :]) * rng.uniform(0.5, 2, (len(names), 1))
    groups, gnames = layer_groups(names, n_layer, 2)
    space = SearchSpace(tuple(names), types, tuple((types,) * len(names)), sizes, errors, groups,
                        tuple(gnames), int(n_w.sum()))
    # the truth weighs ffn_down 4x more than the proxy believes: the search can find that
    weight = np.array([4.0 if tensor_kind(n)[0] == "ffn_down" else 1.0 for n in names])
    return space, weight


def true_kl(space, weight):
    def evaluate(choice):
        return float((space.errors[np.arange(len(choice)), choice] * weight).sum())
    return evaluate
