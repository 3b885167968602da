"""One check of a model's configuration against its own tensors, made when a source opens the model
and before any work, so that hostile or inconsistent metadata is one ModelError line naming the
key, never a hang, a huge allocation or a torch traceback later.

A source names its keys as its file spells them (``key``: a ModelConfig field -> ``"GGUF metadata
llama.embedding_length"`` or ``"config.json hidden_size"``). What is checked:

* the block count against the file's own ``blk.N`` tensors (:func:`check_block_count`, before a
  source builds anything per layer);
* the embedding width, head counts, key/value widths and feed-forward widths against the shapes of
  the tensors that use them, the RoPE dimension count against the head width, the expert counts
  against the expert stacks;
* every tensor's type against the types our kernels read.

Only tensors present are checked; a missing one is reported when a pass needs it.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable, Mapping

from dynsearch.errors import ModelError
from dynsearch.kernels import QT, dequantizable_types
from dynsearch.objectives.io.model import ModelConfig

Key = Callable[[str], str]  # a ModelConfig field -> the key as the file spells it
_BLOCK = re.compile(r"blk\.(\d+)\.")


def block_indices(names: Iterable[str], pattern: re.Pattern = _BLOCK) -> set[int]:
    """The block numbers that tensor names carry (``blk.N.`` unless ``pattern`` says otherwise)."""
    return {int(m.group(1)) for n in names if (m := pattern.match(n))}


def check_block_count(where: str, key: str, n_layer: int, blocks: set[int]) -> None:
    """``n_layer`` blocks, numbered 0 to n_layer-1, each with tensors in the file."""
    if not blocks:
        raise ModelError(f"{where}: {key} = {n_layer}, but the file has no block tensors")
    last = max(blocks)
    if n_layer != last + 1:
        raise ModelError(f"{where}: {key} = {n_layer}, but the file has tensors for blocks 0 to {last}")
    if len(blocks) != n_layer:
        gap = min(set(range(n_layer)) - blocks)
        raise ModelError(f"{where}: {key} = {n_layer}, but block {gap} has no tensors")


def check_model(where: str, key: Key, cfg: ModelConfig, shapes: Mapping[str, tuple[int, ...]],
                qtypes: Mapping[str, QT], n_tokens: int | None = None) -> None:
    """Raise a one-line ModelError unless ``cfg`` fits the tensors' ``shapes`` and every tensor's
    type can be read. ``n_tokens``: the size of the file's own vocabulary, if it has one."""
    check_block_count(where, key("n_layer"), cfg.n_layer, block_indices(shapes))
    readable = set(dequantizable_types())
    for name, qt in qtypes.items():
        if qt not in readable:
            raise ModelError(f"{where}: tensor {name} is {qt.name}, which dynsearch cannot read")
    _check_embeddings(where, key, cfg, shapes, n_tokens)
    _check_attention(where, key, cfg, shapes)
    _check_experts(where, key, cfg, shapes)
    blocks: dict[int, dict[str, tuple[int, ...]]] = {}
    for name, shape in shapes.items():
        if m := _BLOCK.match(name):
            blocks.setdefault(int(m.group(1)), {})[name[m.end():]] = shape
    for il, layer in sorted(blocks.items()):
        for short, (want, fields) in _expected(cfg, layer).items():
            got = layer.get(short)
            if got is not None and got != want:
                raise ModelError(f"{where}: tensor blk.{il}.{short} has shape {got}, the configuration "
                                 f"gives {want} ({', '.join(key(f) for f in fields)})")


def _check_embeddings(where: str, key: Key, cfg: ModelConfig, shapes, n_tokens: int | None) -> None:
    embd = shapes.get("token_embd.weight")
    if embd is None or len(embd) != 2:
        raise ModelError(f"{where}: token_embd.weight is {'missing' if embd is None else f'of shape {embd}'}, "
                         "expected (n_vocab, n_embd)")
    if cfg.n_embd != embd[1]:
        raise ModelError(f"{where}: {key('n_embd')} = {cfg.n_embd}, but token_embd.weight is {embd[1]} wide")
    if n_tokens is not None and n_tokens != embd[0]:
        raise ModelError(f"{where}: the vocabulary has {n_tokens} tokens, but token_embd.weight has {embd[0]} rows")
    for name, want in (("output.weight", embd), ("output_norm.weight", (cfg.n_embd,))):
        if name in shapes and shapes[name] != want:
            raise ModelError(f"{where}: tensor {name} has shape {shapes[name]}, expected {want}")


def _first(shapes, short: str) -> tuple[str, tuple[int, ...]] | None:
    """The first block's tensor ``blk.N.short`` present, with its name."""
    for name, shape in shapes.items():
        if name.endswith("." + short) and _BLOCK.match(name):
            return name, shape
    return None


def _check_attention(where: str, key: Key, cfg: ModelConfig, shapes) -> None:
    """Each attention key against the first tensor that shows it, so the message names one key."""
    def fail(field: str, value: int, why: str) -> ModelError:
        return ModelError(f"{where}: {key(field)} = {value}, {why}")

    q, k, v = _first(shapes, "attn_q.weight"), _first(shapes, "attn_k.weight"), _first(shapes, "attn_v.weight")
    if q is None:  # the head width is seen nowhere else
        raise ModelError(f"{where}: no attention weights (blk.N.attn_q.weight)")
    rows = q[1][0]
    if rows % cfg.n_head:
        raise fail("n_head", cfg.n_head, f"which does not divide the {rows} rows of {q[0]}")
    if cfg.head_dim != rows // cfg.n_head:
        raise fail("head_dim", cfg.head_dim, f"but {q[0]} has {rows} rows for {cfg.n_head} heads")
    if cfg.n_head_kv > cfg.n_head or cfg.n_head % cfg.n_head_kv:
        raise fail("n_head_kv", cfg.n_head_kv, f"which does not divide the {cfg.n_head} query heads")
    if k is not None and k[1][0] != cfg.n_head_kv * cfg.head_dim:
        raise fail("n_head_kv", cfg.n_head_kv, f"but {k[0]} has {k[1][0]} rows for heads of {cfg.head_dim}")
    if v is not None and v[1][0] != cfg.n_head_kv * cfg.head_dim_v:
        raise fail("head_dim_v", cfg.head_dim_v, f"but {v[0]} has {v[1][0]} rows for {cfg.n_head_kv} heads")
    if cfg.n_rot <= 0 or cfg.n_rot > cfg.head_dim or cfg.n_rot % 2:
        raise fail("n_rot", cfg.n_rot, f"not an even count of at most the head width {cfg.head_dim}")
    freqs = shapes.get("rope_freqs.weight")
    if freqs is not None and freqs != (cfg.n_rot // 2,):
        raise ModelError(f"{where}: tensor rope_freqs.weight has shape {freqs}, {key('n_rot')} = "
                         f"{cfg.n_rot} needs ({cfg.n_rot // 2},)")


def _check_experts(where: str, key: Key, cfg: ModelConfig, shapes) -> None:
    if cfg.n_expert_used > cfg.n_expert:
        raise ModelError(f"{where}: {key('n_expert_used')} = {cfg.n_expert_used}, more than "
                         f"{key('n_expert')} = {cfg.n_expert}")
    router = _first(shapes, "ffn_gate_inp.weight")
    if router is not None and (router[1][0] != cfg.n_expert or cfg.n_expert_used < 1):
        raise ModelError(f"{where}: {key('n_expert')} = {cfg.n_expert}, {key('n_expert_used')} = "
                         f"{cfg.n_expert_used}, but {router[0]} routes to {router[1][0]} experts")


def _expected(cfg: ModelConfig, layer: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
    """The shape each known tensor of one block must have, with the fields it comes from.
    Feed-forward widths not in the metadata (0) are the block's own up projection's, so that
    gate, up and down agree."""
    d, hd, hdv, e = cfg.n_embd, cfg.head_dim, cfg.head_dim_v, cfg.n_expert
    q, kv, vo = cfg.n_head * hd, cfg.n_head_kv * hd, cfg.n_head_kv * hdv
    ff = cfg.n_ff or _rows(layer, "ffn_up.weight")
    ff_exp = cfg.n_ff_exp or _rows(layer, "ffn_up_exps.weight", 1)
    ff_sh = _rows(layer, "ffn_up_shexp.weight")
    embd, heads_k, heads_v = ("n_embd",), ("n_embd", "n_head", "head_dim"), ("n_embd", "n_head_kv", "head_dim_v")
    ffn, exps = ("n_embd", "n_ff"), ("n_embd", "n_expert", "n_ff_exp")
    out = {n: ((d,), embd) for n in ("attn_norm.weight", "ffn_norm.weight", "post_attention_norm.weight",
                                     "post_ffw_norm.weight")}
    out.update({
        "attn_q.weight": ((q, d), heads_k), "attn_q.bias": ((q,), heads_k),
        "attn_k.weight": ((kv, d), ("n_embd", "n_head_kv", "head_dim")), "attn_k.bias": ((kv,), ("n_head_kv", "head_dim")),
        "attn_v.weight": ((vo, d), heads_v), "attn_v.bias": ((vo,), heads_v),
        "attn_output.weight": ((d, cfg.n_head * hdv), ("n_embd", "n_head", "head_dim_v")),
        "attn_q_norm.weight": ((hd,), ("head_dim",)), "attn_k_norm.weight": ((hd,), ("head_dim",)),
        "ffn_gate.weight": ((ff, d), ffn), "ffn_up.weight": ((ff, d), ffn), "ffn_down.weight": ((d, ff), ffn),
        "ffn_gate_inp.weight": ((e, d), ("n_embd", "n_expert")), "ffn_gate_exps.weight": ((e, ff_exp, d), exps),
        "ffn_up_exps.weight": ((e, ff_exp, d), exps), "ffn_down_exps.weight": ((e, d, ff_exp), exps),
        "ffn_gate_shexp.weight": ((ff_sh, d), embd), "ffn_up_shexp.weight": ((ff_sh, d), embd),
        "ffn_down_shexp.weight": ((d, ff_sh), embd)})
    return out


def _rows(layer: Mapping[str, tuple[int, ...]], short: str, axis: int = 0) -> int:
    shape = layer.get(short)
    return shape[axis] if shape is not None and len(shape) > axis else 0
