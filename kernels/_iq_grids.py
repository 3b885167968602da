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
from numba import njit

from dynsearch.kernels.types import QT

_GRID_CLASSES = {
    QT.IQ2_XXS: gq.IQ2_XXS, QT.IQ2_XS: gq.IQ2_XS, QT.IQ2_S: gq.IQ2_S,
    QT.IQ3_XXS: gq.IQ3_XXS, QT.IQ3_S: gq.IQ3_S, QT.IQ1_S: gq.IQ1_S, QT.IQ1_M: gq.IQ1_M,
}


def _level_indices(cls) -> tuple[np.ndarray, int]:
    """(n_points, 8 or 4) indices into ``cls.grid_map``, and the bits per index."""
    bits = ceil(log2(len(cls.grid_map)))
    per_byte = 8 // bits
    hexdigits = np.frombuffer(cls.grid_hex, dtype=np.uint8)
    nibbles = np.where(hexdigits > 0x40, hexdigits + 9, hexdigits) & 0x0F
    packed = (nibbles[0::2] << 4) | nibbles[1::2]
    shifts = np.arange(0, 8, 8 // per_byte, dtype=np.uint8)
    idx = (packed[:, None] >> shifts[None, :]) & ((1 << bits) - 1)
    return idx.reshape(cls.grid_shape).astype(np.uint8), bits


@cache
def grid_table(qtype: QT) -> np.ndarray:
    """The grid of ``qtype`` as (n_points, 8 or 4) levels: uint8 (IQ2, IQ3) or int8 (IQ1)."""
    cls = _GRID_CLASSES[qtype]
    levels = np.array(cls.grid_map, dtype=np.int16)
    idx, _ = _level_indices(cls)
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


# Neighbour search of iq2xs_init_impl / iq3xs_init_impl: for every level pattern off the grid, the
# grid points at the ``nwant`` smallest squared distances, ordered by (distance, index).
_KMAP_SIZE = {2: 43692, 3: 4096}
_NWANT = {QT.IQ2_XXS: 2, QT.IQ2_XS: 2, QT.IQ2_S: 1, QT.IQ1_S: 3, QT.IQ1_M: 3,
          QT.IQ3_XXS: 2, QT.IQ3_S: 3}


@njit(cache=True, nogil=True)
def _build_neighbours(pos, bits, kmap_size, nwant):
    n_grid, dim = pos.shape
    mask = (1 << bits) - 1
    kmap = np.full(kmap_size, -1, np.int32)
    for g in range(n_grid):
        u = 0
        for k in range(dim):
            u |= ((pos[g, k] - 1) // 2) << (bits * k)
        kmap[u] = g
    nbr = np.empty(16, np.uint16)
    n_nbr = 0
    d2 = np.empty(n_grid, np.int32)
    p = np.empty(dim, np.int32)
    for i in range(kmap_size):
        if kmap[i] >= 0:
            continue
        for k in range(dim):
            p[k] = 2 * ((i >> (bits * k)) & mask) + 1
        for g in range(n_grid):
            s = 0
            for k in range(dim):
                t = np.int32(pos[g, k]) - p[k]
                s += t * t
            d2[g] = s
        if n_nbr + 1 + n_grid > nbr.size:
            grown = np.empty(2 * nbr.size + n_grid + 1, np.uint16)
            grown[:n_nbr] = nbr[:n_nbr]
            nbr = grown
        start = n_nbr
        kmap[i] = -(start + 1)
        n_nbr += 1
        last = -1
        for _ in range(nwant):  # the next larger distinct distance, then its points by index
            nxt = np.iinfo(np.int32).max
            for g in range(n_grid):
                if d2[g] > last and d2[g] < nxt:
                    nxt = d2[g]
            if nxt == np.iinfo(np.int32).max:
                break
            for g in range(n_grid):
                if d2[g] == nxt:
                    nbr[n_nbr] = g
                    n_nbr += 1
            last = nxt
        nbr[start] = n_nbr - start - 1
    return kmap, nbr[:n_nbr].copy()


@cache
def quant_tables(qtype: QT) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ggml's quantizer tables of ``qtype``: (grid, kmap, neighbours).

    ``grid`` (n_points, 8 or 4) int8 holds 2*level+1; ``kmap[u]`` for a packed level pattern
    ``u`` is its grid index, or ``-(offset + 1)`` where ``neighbours[offset]`` is the count of the
    candidate grid indices that follow it.
    """
    idx, bits = _level_indices(_GRID_CLASSES[qtype])
    pos = (2 * idx.astype(np.int8) + 1).astype(np.int8)
    kmap, nbr = _build_neighbours(pos, bits, _KMAP_SIZE[bits], _NWANT[qtype])
    for a in (pos, kmap, nbr):
        a.setflags(write=False)
    return pos, kmap, nbr
