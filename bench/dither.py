"""A fair reference model: a quantized GGUF with every weight moved off its quantization grid.

    python -m dynsearch.bench dither SRC.gguf -o OUT.gguf --seed N [--dtype f32|bf16]

Why: every model a package ships is already quantized, and a quantized tensor re-quantized to its
own type (for the demo's Q4_1, also to imatrix-weighted Q5_1) comes back exactly: its weights sit
on that type's grid. A quality benchmark on the plain dequantized copy therefore mostly measures
the freedom to pick the lossless type, not a search. Dithering removes that freedom: each weight of
a quantized tensor is dequantized and moved by uniform noise in +-1/2 of its block's quantization
step, so no GGUF type reproduces it and every type costs some error, as on a real full-precision
model.

The step is read from the source block's own scale: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0: the block's
``d`` (32 weights); Q2_K .. Q6_K: the sub-block's ``d * scale`` (16 or 32 weights). The noise has
the distribution of the rounding error of a uniform quantizer of that step (variance step**2 / 12):
the dithered model is one of the full-precision models that round, on the source's own grids, to
the source, about as far from it as the source is from its lost original. Tensors of other types (norms, F16/BF16 matrices) are
copied; every matrix is written as F32 (or BF16: its rounding adds to the noise), vectors as F32,
all metadata is copied, ``general.file_type`` says F32/BF16, and ``dynsearch.dither.seed`` and
``dynsearch.dither.source_file_type`` record the dither. The noise of a tensor depends only on the
seed and its name: the same seed writes the same bytes. The file is written atomically.
"""

from __future__ import annotations

import argparse
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
from gguf import QK_K, LlamaFileType
from gguf.quants import Q4_K

from dynsearch.atomic import atomic_path
from dynsearch.errors import ModelError
from dynsearch.kernels import QT, dequantize, quantize_tensor, type_info
from dynsearch.objectives.io.gguf_source import GGUFSource
from dynsearch.objectives.io.gguf_write import TensorOut, metadata_writer, write_tensors
from dynsearch.objectives.io.resolve import resolve_model
from dynsearch.system import cache_root

SEED_KEY = "dynsearch.dither.seed"
SOURCE_TYPE_KEY = "dynsearch.dither.source_file_type"
OUT_TYPES = {"f32": QT.F32, "bf16": QT.BF16}
_FILE_TYPE = {QT.F32: LlamaFileType.ALL_F32, QT.BF16: LlamaFileType.MOSTLY_BF16}
_FLOAT_TYPES = frozenset({QT.F32, QT.F16, QT.BF16})


# ------------------------------------------------------------------ quantization steps of blocks
# Each reader takes a tensor's blocks, uint8 (n_blocks, type_size), and returns the step of each
# sub-block, float32 (n_blocks, n_sub): the distance between neighbouring values of its grid.
# Layouts: ggml-common.h's block_* structs (ggml_half d is an IEEE half).


def _half(blocks: np.ndarray, at: int) -> np.ndarray:
    """The ggml_half at byte ``at`` of every block, float32 (n_blocks, 1)."""
    return np.ascontiguousarray(blocks[:, at:at + 2]).view(np.float16).astype(np.float32)


def _legacy_steps(blocks: np.ndarray) -> np.ndarray:
    # block_q4_0/q5_0/q8_0 {d, ...}, block_q4_1/q5_1 {d, m, ...}: x = d * q (+ m)
    return np.abs(_half(blocks, 0))


def _q2_k_steps(blocks: np.ndarray) -> np.ndarray:
    # block_q2_K {scales[QK_K/16], qs[QK_K/4], d, dmin}: x = d * (sc & 0xF) * q - dmin * (sc >> 4)
    return _half(blocks, QK_K // 16 + QK_K // 4) * (blocks[:, :QK_K // 16] & 0x0F)


def _q3_k_steps(blocks: np.ndarray) -> np.ndarray:
    # block_q3_K {hmask[QK_K/8], qs[QK_K/4], scales[12], d}: x = d * (sc - 32) * q, 16 scales of
    # 6 bits: the low 4 in the nibbles of bytes 0-7, the high 2 in the bit pairs of bytes 8-11
    at = QK_K // 8 + QK_K // 4
    packed = blocks[:, at:at + 12]
    low = (packed[:, None, :8] >> np.array([0, 4], np.uint8)[:, None]).reshape(-1, 16) & 0x0F
    high = (packed[:, None, 8:] >> np.array([0, 2, 4, 6], np.uint8)[:, None]).reshape(-1, 16) & 0x03
    sc = (low | high << 4).astype(np.float32) - 32
    return np.abs(_half(blocks, at + 12) * sc)


def _q4_k_steps(blocks: np.ndarray) -> np.ndarray:
    # block_q4_K / block_q5_K {d, dmin, scales[12], ...}: x = d * sc * q - dmin * m (8 x 32 weights)
    sc, _ = Q4_K.get_scale_min(np.ascontiguousarray(blocks[:, 4:4 + Q4_K.K_SCALE_SIZE]))
    return _half(blocks, 0) * sc


def _q6_k_steps(blocks: np.ndarray) -> np.ndarray:
    # block_q6_K {ql[QK_K/2], qh[QK_K/4], scales[QK_K/16] (int8), d}: x = d * sc * (q - 32)
    at = QK_K // 2 + QK_K // 4
    sc = np.ascontiguousarray(blocks[:, at:at + QK_K // 16]).view(np.int8).astype(np.float32)
    return np.abs(_half(blocks, at + QK_K // 16) * sc)


_STEPS: dict[QT, Callable[[np.ndarray], np.ndarray]] = {
    QT.Q4_0: _legacy_steps, QT.Q4_1: _legacy_steps, QT.Q5_0: _legacy_steps, QT.Q5_1: _legacy_steps,
    QT.Q8_0: _legacy_steps, QT.Q2_K: _q2_k_steps, QT.Q3_K: _q3_k_steps, QT.Q4_K: _q4_k_steps,
    QT.Q5_K: _q4_k_steps, QT.Q6_K: _q6_k_steps,
}
DITHERABLE = tuple(_STEPS)


def block_steps(data: np.ndarray, qtype: QT) -> np.ndarray:
    """The quantization step of every sub-block of a tensor's GGUF ``data`` (uint8, its blocks in
    order), float32 (n_blocks, n_sub); each sub-block holds ``block_size // n_sub`` weights."""
    return _STEPS[qtype](np.asarray(data, np.uint8).reshape(-1, type_info(qtype).type_size))


# ------------------------------------------------------------------ the dither


def dither_tensor(data: np.ndarray, qtype: QT, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """The dequantized tensor (float32, ``shape``), each weight moved by uniform noise in +-1/2 of
    its sub-block's step."""
    steps = block_steps(data, qtype)  # (n_blocks, n_sub)
    if not np.isfinite(steps).all():
        raise ValueError("a block scale is not a finite number")
    w = dequantize(data, qtype, shape[-1])
    sub = w.reshape(*steps.shape, -1)  # (n_blocks, n_sub, weights per sub-block)
    noise = rng.random(sub.shape, dtype=np.float32)
    noise -= np.float32(0.5)
    noise *= steps[:, :, None]
    sub += noise
    return w.reshape(shape)


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _file_type_name(value: object) -> str:
    try:
        return LlamaFileType(value).name
    except ValueError:
        return "unknown" if value is None else str(value)


def dither_model(src: str | Path, dst: str | Path, seed: int, dtype: QT = QT.F32,
                 progress: bool = False) -> Path:
    """Write ``dst``: the GGUF ``src`` with every quantized tensor dithered (see the module's doc)."""
    src, dst = Path(src), Path(dst)
    if dst.resolve() == src.resolve() or (dst.exists() and src.exists() and dst.samefile(src)):
        raise ModelError(f"{dst}: the output would overwrite the source model")
    if dst.is_dir():
        raise ModelError(f"{dst}: is a folder; the output is a GGUF file")
    if dtype not in _FILE_TYPE:
        raise ValueError(f"dtype must be F32 or BF16, not {dtype.name}")
    source = GGUFSource(src)
    quantized = [n for n in source.names() if source.qtype(n) not in _FLOAT_TYPES]
    if not quantized:
        raise ModelError(f"{src.name}: no quantized tensor to dither (every tensor is F32, F16 or BF16)")
    unknown = sorted({source.qtype(n).name for n in quantized if source.qtype(n) not in _STEPS})
    if unknown:
        raise ModelError(f"{src.name}: cannot dither {', '.join(unknown)} tensors (the quantization step "
                         f"is known for {', '.join(t.name for t in DITHERABLE)})")

    def load(name: str) -> np.ndarray:
        qt, shape = source.qtype(name), source.shape(name)
        if qt in _FLOAT_TYPES:
            return source.load(name)
        try:
            return dither_tensor(source.raw(name), qt, shape, _rng(seed, name))
        except ValueError as e:
            raise ModelError(f"{src.name}: cannot dither {name}: {e}") from None

    tensors = []
    for n in source.names():
        shape = source.shape(n)
        qt = dtype if len(shape) > 1 else QT.F32  # vectors (norms, biases) stay F32, as llama.cpp keeps them
        tensors.append(TensorOut(n, shape, qt, lambda n=n, qt=qt: quantize_tensor(load(n), qt)))
    with atomic_path(dst) as tmp:
        writer = metadata_writer(tmp, source.header,
                                 keep=lambda k: k != "general.file_type" and k not in (SEED_KEY, SOURCE_TYPE_KEY))
        writer.add_file_type(int(_FILE_TYPE[dtype]))
        writer.add_uint64(SEED_KEY, seed)
        writer.add_string(SOURCE_TYPE_KEY, _file_type_name(source.metadata("general.file_type")))
        write_tensors(writer, tensors, desc=f"dither {src.name}", progress=progress)
    return dst


def dithered_copy(src: str | Path, seed: int) -> Path:
    """``src`` dithered with ``seed`` to F32, made once and cached under ``$DYNSEARCH_CACHE/dither``
    (the quality benchmark's reference)."""
    src = Path(src)
    dst = cache_root() / "dither" / f"{src.stem}.{src.stat().st_size}.seed{seed}.F32.gguf"
    if not dst.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        dither_model(src, dst, seed)  # atomic: a killed run leaves no partial reference
    return dst


# ------------------------------------------------------------------ command line


def _seed(text: str) -> int:
    try:
        seed = int(text)
    except ValueError:
        seed = -1
    if not 0 <= seed < 2**64:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to 2**64-1, got {text!r}")
    return seed


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("model", help="the quantized GGUF file to dither (or smollm2-135m, the demo model)")
    ap.add_argument("-o", "--out", required=True, type=Path, help="the dithered GGUF to write")
    ap.add_argument("--seed", required=True, type=_seed, help="seed of the noise: the same seed writes the same bytes")
    ap.add_argument("--dtype", default="f32", type=str.lower, choices=tuple(OUT_TYPES),
                    help="type of the dithered matrices; vectors stay F32 (default: %(default)s)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    src = resolve_model(args.model)
    if not src.is_file():
        raise ModelError(f"{src}: dither reads a GGUF file, not a folder")
    out = dither_model(src, args.out, args.seed, OUT_TYPES[args.dtype], progress=not args.quiet)
    print(f"{out}: {src.name} dithered with seed {args.seed} ({args.dtype.upper()}, "
          f"{out.stat().st_size / 1e6:.1f} MB)")
    return 0
