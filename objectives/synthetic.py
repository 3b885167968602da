"""Random-weight llama-architecture models written as GGUF, of any size, tensor by tensor.

For benchmarks and tests that need a model of a given shape (a SmolLM2-135M look-alike on a GPU
machine that lacks the demo file, or a model larger than the memory limit): each tensor is drawn
from its own seeded generator when the writer reaches it, so peak memory is one tensor, and the
same arguments always give the same bytes. Weights are scaled like a trained model's
(1/sqrt(fan_in)), so activations stay in a realistic range through many layers.
"""

from __future__ import annotations

import argparse
import zlib
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from ..atomic import atomic_path
from ..kernels import QT
from .gguf_header import GGUFHeader
from .gguf_write import TensorOut, copy_metadata, encode, write_tensors

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

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def n_params(self) -> int:
        d, hd = self.n_embd, self.head_dim
        per_layer = (d * self.n_head * hd * 2 + d * self.n_head_kv * hd * 2 + 3 * d * self.n_ff + 2 * d)
        return self.n_layer * per_layer + self.n_vocab * d * (1 if self.tied else 2) + d


SMOLLM2_135M = Shape()


def _tensors(shape: Shape) -> list[tuple[str, tuple[int, ...], float, float]]:
    """(name, numpy shape, scale, offset) of every tensor, in llama.cpp's order."""
    d, hd, ff = shape.n_embd, shape.head_dim, shape.n_ff
    out = [("token_embd.weight", (shape.n_vocab, d), 0.05, 0.0), ("output_norm.weight", (d,), 0.1, 1.0)]
    if not shape.tied:
        out.append(("output.weight", (shape.n_vocab, d), 1 / np.sqrt(d), 0.0))
    for il in range(shape.n_layer):
        p = f"blk.{il}."
        out += [(p + "attn_norm.weight", (d,), 0.1, 1.0),
                (p + "attn_q.weight", (shape.n_head * hd, d), 1 / np.sqrt(d), 0.0),
                (p + "attn_k.weight", (shape.n_head_kv * hd, d), 1 / np.sqrt(d), 0.0),
                (p + "attn_v.weight", (shape.n_head_kv * hd, d), 1 / np.sqrt(d), 0.0),
                (p + "attn_output.weight", (d, shape.n_head * hd), 1 / np.sqrt(shape.n_head * hd), 0.0),
                (p + "ffn_norm.weight", (d,), 0.1, 1.0),
                (p + "ffn_gate.weight", (ff, d), 1 / np.sqrt(d), 0.0),
                (p + "ffn_up.weight", (ff, d), 1 / np.sqrt(d), 0.0),
                (p + "ffn_down.weight", (d, ff), 1 / np.sqrt(ff), 0.0)]
    return out


def _draw(name: str, shape: tuple[int, ...], scale: float, offset: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    w = rng.standard_normal(shape, dtype=np.float32) * np.float32(scale) + np.float32(offset)
    if len(shape) == 2 and offset == 0.0:  # a few outlier columns, as trained weights have
        cols = rng.choice(shape[1], size=max(1, shape[1] // 64), replace=False)
        w[:, cols] *= np.float32(4.0)
    return w


def write_synthetic_model(dst: str | Path, shape: Shape = SMOLLM2_135M, seed: int = 0,
                          tokenizer_from: str | Path | None = None, dtype: QT = QT.F32) -> Path:
    """Write a random llama model of ``shape`` to ``dst`` (atomically), one tensor at a time.

    ``tokenizer_from``: a GGUF whose ``tokenizer.*`` keys are copied (its vocabulary must have
    ``shape.n_vocab`` tokens), so that the model can be run on text; without it, only token ids.
    """
    dst = Path(dst)
    arch = "llama"
    with atomic_path(dst) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_name(f"synthetic-llama-{shape.n_layer}x{shape.n_embd}")
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
                               (f"{arch}.vocab_size", shape.n_vocab, VT.UINT32)):
            writer.add_key_value(key, value, vt)
        outs = []
        for name, shp, scale, offset in _tensors(shape):
            qt = dtype if len(shp) == 2 else QT.F32
            outs.append(TensorOut(name, shp, qt, lambda n=name, s=shp, sc=scale, o=offset, q=qt:
                                  encode(_draw(n, s, sc, o, seed), q)))
        write_tensors(writer, outs)
    return dst


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Write a random-weight llama GGUF of a given shape.")
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", type=int, default=SMOLLM2_135M.n_layer)
    ap.add_argument("--embd", type=int, default=SMOLLM2_135M.n_embd)
    ap.add_argument("--ff", type=int, default=SMOLLM2_135M.n_ff)
    ap.add_argument("--heads", type=int, default=SMOLLM2_135M.n_head)
    ap.add_argument("--kv-heads", type=int, default=SMOLLM2_135M.n_head_kv)
    ap.add_argument("--vocab", type=int, default=SMOLLM2_135M.n_vocab)
    ap.add_argument("--untied", action="store_true", help="a separate output.weight")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer-from", type=Path, help="copy tokenizer.* keys from this GGUF")
    ap.add_argument("--dtype", default="F32", type=str.upper, choices=["F32", "F16", "BF16"],
                    help="type of the 2-D tensors (default: %(default)s)")
    a = ap.parse_args(argv)
    shape = Shape(a.layers, a.embd, a.ff, a.heads, a.kv_heads, a.vocab, not a.untied)
    path = write_synthetic_model(a.out, shape, a.seed, a.tokenizer_from, QT[a.dtype])
    print(f"{path}: {shape.n_params() / 1e6:.1f}M parameters, {path.stat().st_size / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
