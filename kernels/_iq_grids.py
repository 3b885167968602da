"""Lattice tables of the grid I-quants, decoded once (lazily) from the hex strings in gguf-py.

gguf-py's quant classes carry each ggml grid (``iq2xxs_grid``, ``iq3s_grid``, ``iq1s_grid``, ...)
packed as hex digits of 2- or 3-bit level indices plus a ``grid_map`` from index to level. Here
they become small integer arrays: row ``i`` holds the 8 (IQ2, IQ1) or 4 (IQ3) levels of grid
point ``i`` exactly as the bytes of ggml's uint64/uint32 grid entry (IQ1 levels are -1, 0, 1).
"""

from __future__ import annotations

from functools import cache
from math import ceil, log2

import numpy as np
from gguf import quants as gq

from .types import QT

_GRID_CLASSES = {
    QT.IQ2_XXS: gq.IQ2_XXS, QT.IQ2_XS: gq.IQ2_XS, QT.IQ2_S: gq.IQ2_S,
    QT.IQ3_XXS: gq.IQ3_XXS, QT.IQ3_S: gq.IQ3_S, QT.IQ1_S: gq.IQ1_S, QT.IQ1_M: gq.IQ1_M,
}


@cache
def grid_table(qtype: QT) -> np.ndarray:
    """The grid of ``qtype`` as (n_points, 8 or 4) levels: uint8 (IQ2, IQ3) or int8 (IQ1)."""
    cls = _GRID_CLASSES[qtype]
    levels = np.array(cls.grid_map, dtype=np.int16)
    bits = ceil(log2(len(levels)))
    per_byte = 8 // bits
    hexdigits = np.frombuffer(cls.grid_hex, dtype=np.uint8)
    nibbles = np.where(hexdigits > 0x40, hexdigits + 9, hexdigits) & 0x0F
    packed = (nibbles[0::2] << 4) | nibbles[1::2]
    shifts = np.arange(0, 8, 8 // per_byte, dtype=np.uint8)
    idx = (packed[:, None] >> shifts[None, :]) & ((1 << bits) - 1)
    dtype = np.int8 if levels.min() < 0 else np.uint8
    grid = levels[idx.reshape(-1)].astype(dtype).reshape(cls.grid_shape)
    grid.setflags(write=False)
    return grid


@cache
def ksigns_table() -> np.ndarray:
    """ksigns_iq2xs: 7 sign bits plus an eighth that makes the count of minus signs even."""
    t = np.frombuffer(gq.IQ2_XXS.ksigns, dtype=np.uint8).copy()
    t.setflags(write=False)
    return t
