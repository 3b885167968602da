"""Random-weight models (llama, and the MoE architectures qwen3moe and llama4) written as GGUF, of
any size, tensor by tensor.

For benchmarks and tests that need a model of a given shape (a SmolLM2-135M look-alike on a GPU
machine that lacks the demo file, or a model larger than the memory limit): each tensor is drawn
from its own seeded generator when the writer reaches it, so peak memory is one tensor, and the
same arguments always give the same bytes. Weights are scaled like a trained model's
(1/sqrt(fan_in)), so activations stay in a realistic range through many layers.

MoE shapes (``Shape.arch`` "qwen3moe" or "llama4"): every layer (qwen3moe) or every
``moe_step``-th layer (llama4, the others dense) routes each token to ``n_expert_used`` of
``n_expert`` experts stacked in ``ffn_{gate,up,down}_exps``; llama4's routed layers add a shared
expert (``ffn_*_shexp``). The token embeddings carry one constant positive column that no block
writes to (its row of every output projection is zero), so it stays positive in the residual stream
and in every FFN input; a router row pointing against it is an expert that is never routed to:
``dead_experts`` lists them (the same experts in every routed layer).
"""

from __future__ import annotations

import argparse
import zlib
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from dynsearch.atomic import atomic_path
from dynsearch.errors import BenchError
from dynsearch.kernels import QT, quantize_tensor
from dynsearch.objectives.io.gguf_header import GGUFHeader
from dynsearch.objectives.io.gguf_write import TensorOut, copy_metadata, write_tensors

VT = gguf.GGUFValueType


@dataclass(frozen=True)
class Shape:
    n_layer: int = 30
    n_embd: int = 576
    n_ff: int = 1536
    n_head: int = 9
    n_head_kv: int = 3
    n_vocab: int = 49152
    tied: bool = True  # token_embd doubles as the output head (SmolLM2, Qwen small models)
    arch: str = "llama"  # "llama", "qwen3moe" or "llama4"
    n_expert: int = 0  # experts per routed layer (MoE architectures)
    n_expert_used: int = 0  # experts each token is routed to
    n_ff_exp: int = 0  # width of one expert (and of llama4's shared expert)
    moe_step: int = 1  # llama4: every moe_step-th layer is routed (interleave_moe_layer_step)
    dead_experts: tuple[int, ...] = ()  # experts whose router row makes them never selected
    logit_scale: float = 1.0  # scale of the untied output head (larger: sharper next-token distributions)

    def __post_init__(self):
        if self.arch not in ("llama", "qwen3moe", "llama4"):
            raise ValueError(f"synthetic models are llama, qwen3moe or llama4, not {self.arch!r}")
        moe = self.arch != "llama"
        if moe and not (0 < self.n_expert_used <= self.n_expert and self.n_ff_exp > 0 and self.moe_step > 0):
            raise ValueError(f"{self.arch} needs 0 < n_expert_used <= n_expert and n_ff_exp > 0")
        if any(not 0 <= e < self.n_expert for e in self.dead_experts) or len(set(self.dead_experts)) < len(self.dead_experts) or \
                len(self.dead_experts) > self.n_expert - self.n_expert_used:
            raise ValueError(f"dead_experts {self.dead_experts}: must be distinct experts, leaving "
                             f"at least n_expert_used = {self.n_expert_used} alive")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def is_moe_layer(self, il: int) -> bool:
        return self.arch == "qwen3moe" or (self.arch == "llama4" and (il + 1) % self.moe_step == 0)

    def n_params(self) -> int:
        return sum(int(np.prod(shp)) for _, shp, _, _ in _tensors(self))


SMOLLM2_135M = Shape()


def _tensors(shape: Shape) -> list[tuple[str, tuple[int, ...], float, float]]:
    """(name, numpy shape, scale, offset) of every tensor, in llama.cpp's order."""
    d, hd, ff = shape.n_embd, shape.head_dim, shape.n_ff
    out = [("token_embd.weight", (shape.n_vocab, d), 0.05, 0.0), ("output_norm.weight", (d,), 0.1, 1.0)]
    if not shape.tied:
        out.append(("output.weight", (shape.n_vocab, d), shape.logit_scale / np.sqrt(d), 0.0))
    for il in range(shape.n_layer):
        p = f"blk.{il}."
        out += [(p + "attn_norm.weight", (d,), 0.1, 1.0),
                (p + "attn_q.weight", (shape.n_head * hd, d), 1 / np.sqrt(d), 0.0),
                (p + "attn_k.weight", (shape.n_head_kv * hd, d), 1 / np.sqrt(d), 0.0),
                (p + "attn_v.weight", (shape.n_head_kv * hd, d), 1 / np.sqrt(d), 0.0),
                (p + "attn_output.weight", (d, shape.n_head * hd), 1 / np.sqrt(shape.n_head * hd), 0.0)]
        if shape.arch == "qwen3moe":
            out += [(p + "attn_q_norm.weight", (hd,), 0.1, 1.0), (p + "attn_k_norm.weight", (hd,), 0.1, 1.0)]
        out.append((p + "ffn_norm.weight", (d,), 0.1, 1.0))
        if shape.is_moe_layer(il):
            E, fe = shape.n_expert, shape.n_ff_exp
            out += [(p + "ffn_gate_inp.weight", (E, d), 1.0, 0.0),
                    (p + "ffn_gate_exps.weight", (E, fe, d), 1 / np.sqrt(d), 0.0),
                    (p + "ffn_up_exps.weight", (E, fe, d), 1 / np.sqrt(d), 0.0),
                    (p + "ffn_down_exps.weight", (E, d, fe), 1 / np.sqrt(fe), 0.0)]
            if shape.arch == "llama4":
                out += [(p + "ffn_gate_shexp.weight", (fe, d), 1 / np.sqrt(d), 0.0),
                        (p + "ffn_up_shexp.weight", (fe, d), 1 / np.sqrt(d), 0.0),
                        (p + "ffn_down_shexp.weight", (d, fe), 1 / np.sqrt(fe), 0.0)]
        else:
            out += [(p + "ffn_gate.weight", (ff, d), 1 / np.sqrt(d), 0.0),
                    (p + "ffn_up.weight", (ff, d), 1 / np.sqrt(d), 0.0),
                    (p + "ffn_down.weight", (d, ff), 1 / np.sqrt(ff), 0.0)]
    return out


_MASSIVE_COL = 0  # MoE models: the column of token_embd (and so of the residual stream) held constant
_MASSIVE = 0.2  # its value in every embedding row (the others: N(0, 0.05^2))
_WRITES_RESIDUAL = ("attn_output.weight", "ffn_down.weight", "ffn_down_exps.weight", "ffn_down_shexp.weight")


def _draw(name: str, shape: tuple[int, ...], scale: float, offset: float, seed: int,
          dead_experts: tuple[int, ...] = (), moe: bool = False) -> np.ndarray:
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    w = rng.standard_normal(shape, dtype=np.float32) * np.float32(scale) + np.float32(offset)
    if len(shape) >= 2 and offset == 0.0 and not name.endswith("ffn_gate_inp.weight"):
        # a few outlier columns, as trained weights have
        cols = rng.choice(shape[-1], size=max(1, shape[-1] // 64), replace=False)
        w[..., cols] *= np.float32(4.0)
    if moe and name == "token_embd.weight":
        w[:, _MASSIVE_COL] = np.float32(_MASSIVE)
    if moe and name.endswith(_WRITES_RESIDUAL):  # (..., d, in): nothing is added to that column
        w[..., _MASSIVE_COL, :] = 0.0
    if name.endswith("ffn_gate_inp.weight"):  # routers ignore the massive column, except the dead
        w[:, _MASSIVE_COL] = 0.0
        w[list(dead_experts), _MASSIVE_COL] = np.float32(-1e3)
    return w


def write_synthetic_model(dst: str | Path, shape: Shape = SMOLLM2_135M, seed: int = 0,
                          tokenizer_from: str | Path | None = None, dtype: QT = QT.F32) -> Path:
    """Write a random llama model of ``shape`` to ``dst`` (atomically), one tensor at a time.

    ``tokenizer_from``: a GGUF whose ``tokenizer.*`` keys are copied (its vocabulary must have
    ``shape.n_vocab`` tokens), so that the model can be run on text; without it, only token ids.
    """
    dst = Path(dst)
    arch = shape.arch
    with atomic_path(dst) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_name(f"synthetic-{arch}-{shape.n_layer}x{shape.n_embd}")
        if tokenizer_from is not None:
            copy_metadata(GGUFHeader(tokenizer_from), writer, lambda k: k.startswith("tokenizer."))
        for key, value, vt in ((f"{arch}.context_length", 8192, VT.UINT32),
                               (f"{arch}.embedding_length", shape.n_embd, VT.UINT32),
                               (f"{arch}.block_count", shape.n_layer, VT.UINT32),
                               (f"{arch}.feed_forward_length", shape.n_ff, VT.UINT32),
                               (f"{arch}.attention.head_count", shape.n_head, VT.UINT32),
                               (f"{arch}.attention.head_count_kv", shape.n_head_kv, VT.UINT32),
                               (f"{arch}.rope.dimension_count", shape.head_dim, VT.UINT32),
                               (f"{arch}.attention.layer_norm_rms_epsilon", 1e-5, VT.FLOAT32),
                               (f"{arch}.rope.freq_base", 100000.0, VT.FLOAT32),
                               (f"{arch}.vocab_size", shape.n_vocab, VT.UINT32),
                               *_moe_keys(shape)):
            writer.add_key_value(key, value, vt)
        outs = []
        moe = arch != "llama"
        for name, shp, scale, offset in _tensors(shape):
            # routers stay F32, as llama-quantize leaves them
            qt = dtype if len(shp) >= 2 and not name.endswith("ffn_gate_inp.weight") else QT.F32
            outs.append(TensorOut(name, shp, qt, lambda n=name, s=shp, sc=scale, o=offset, q=qt:
                                  quantize_tensor(_draw(n, s, sc, o, seed, shape.dead_experts, moe), q)))
        write_tensors(writer, outs)
    return dst


def _moe_keys(shape: Shape) -> list[tuple[str, object, VT]]:
    arch = shape.arch
    if arch == "llama":
        return []
    keys = [(f"{arch}.expert_count", shape.n_expert, VT.UINT32),
            (f"{arch}.expert_used_count", shape.n_expert_used, VT.UINT32),
            (f"{arch}.expert_feed_forward_length", shape.n_ff_exp, VT.UINT32),
            (f"{arch}.attention.key_length", shape.head_dim, VT.UINT32),
            (f"{arch}.attention.value_length", shape.head_dim, VT.UINT32)]
    if arch == "llama4":
        keys.append((f"{arch}.interleave_moe_layer_step", shape.moe_step, VT.UINT32))
    return keys


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", type=int, default=SMOLLM2_135M.n_layer)
    ap.add_argument("--embd", type=int, default=SMOLLM2_135M.n_embd)
    ap.add_argument("--ff", type=int, default=SMOLLM2_135M.n_ff)
    ap.add_argument("--heads", type=int, default=SMOLLM2_135M.n_head)
    ap.add_argument("--kv-heads", type=int, default=SMOLLM2_135M.n_head_kv)
    ap.add_argument("--vocab", type=int, default=SMOLLM2_135M.n_vocab)
    ap.add_argument("--untied", action="store_true", help="a separate output.weight")
    ap.add_argument("--arch", default="llama", choices=["llama", "qwen3moe", "llama4"])
    ap.add_argument("--experts", type=int, default=0, help="experts per routed layer (MoE)")
    ap.add_argument("--experts-used", type=int, default=0, help="experts per token (MoE)")
    ap.add_argument("--ff-exp", type=int, default=0, help="width of one expert (MoE)")
    ap.add_argument("--moe-step", type=int, default=1, help="llama4: every n-th layer is routed")
    ap.add_argument("--dead-experts", type=int, nargs="*", default=[],
                    help="experts the router never selects (MoE)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer-from", type=Path, help="copy tokenizer.* keys from this GGUF")
    ap.add_argument("--dtype", default="F32", type=str.upper, choices=["F32", "F16", "BF16"],
                    help="type of the 2-D tensors (default: %(default)s)")


def main(a: argparse.Namespace) -> int:
    try:
        shape = Shape(a.layers, a.embd, a.ff, a.heads, a.kv_heads, a.vocab, not a.untied, a.arch,
                      a.experts, a.experts_used, a.ff_exp, a.moe_step, tuple(a.dead_experts))
    except ValueError as e:
        raise BenchError(f"synthetic model shape: {e}") from None
    path = write_synthetic_model(a.out, shape, a.seed, a.tokenizer_from, QT[a.dtype])
    print(f"{path}: {shape.n_params() / 1e6:.1f}M parameters, {path.stat().st_size / 1e6:.1f} MB")
    return 0

