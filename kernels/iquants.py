"""I-quants: IQ4_NL, IQ4_XS (quantize + dequantize) and the grid types (dequantize).

Quantizers mirror ``quantize_iq4_nl`` / ``quantize_iq4_xs`` / ``quantize_row_iq4_nl_impl`` in
ggml-quants.c (float32, same operation order, no fastmath); dequantizers mirror gguf-py's
``dequantize_blocks`` of each type. The grid tables (which 8 or 4 magnitudes a grid index stands
for) are decoded from the hex strings gguf-py carries (:mod:`._iq_grids`), never pasted here.

Block layouts (bytes, little endian)::

    IQ4_NL  (32)  d:f16 | qs[16]: nibbles, element j low, j+16 high
    IQ4_XS  (256) d:f16 | scales_h:u16 (2 bits x 8) | scales_l[4] (4 bits x 8) | qs[128]
    IQ2_XXS (256) d:f16 | 8 x (grid idx u8 x4 | u32: signs 4x7 bits, scale 4 bits at 28)
    IQ2_XS  (256) d:f16 | qs:u16[32] (9 bit grid idx, 7 bit sign idx) | scales[8] (4 bits x 16)
    IQ2_S   (256) d:f16 | qs[32] | signs[32] | qh[8] (2 high idx bits x 32) | scales[8]
    IQ3_XXS (256) d:f16 | qs[64] (grid idx) | u32[8]: signs 4x7 bits, scale 4 bits at 28
    IQ3_S   (256) d:f16 | qs[64] | qh[8] (1 high idx bit x 64) | signs[32] | scales[4]
    IQ1_S   (256) d:f16 | qs[32] | qh:u16[8] (3 high idx bits x4, scale 3 bits, delta sign)
    IQ1_M   (256) qs[32] | qh[16] (3 high idx bits + delta sign per nibble) | sc:u16[4]
                  (3 bit scales x 16; d:f16 split over the top nibbles of sc)
"""

from __future__ import annotations

import numpy as np
from gguf import QK_K
from numba import njit, prange

from dynsearch.kernels._fp import f32, fp16_to_fp32, get_f16, get_u16, get_u32, nearest_int, put_f16, put_u16
from dynsearch.kernels._iq2 import quantize_iq2_xs_k, quantize_iq2_xxs_k
from dynsearch.kernels._iq3 import quantize_iq3_s_k, quantize_iq3_xxs_k
from dynsearch.kernels._iq_grids import grid_table, ksigns_table, quant_tables
from dynsearch.kernels.registry import register
from dynsearch.kernels.scale_search import GROUP_MAX_EPS
from dynsearch.kernels.types import QT, type_info

QK4_NL = type_info(QT.IQ4_NL).block_size  # 32
# Bytes per block of each type, from the type table.
(BYTES_IQ4_NL, BYTES_IQ4_XS, BYTES_IQ2_XXS, BYTES_IQ2_XS, BYTES_IQ2_S, BYTES_IQ3_XXS, BYTES_IQ3_S,
 BYTES_IQ1_S, BYTES_IQ1_M) = (type_info(t).type_size for t in (
    QT.IQ4_NL, QT.IQ4_XS, QT.IQ2_XXS, QT.IQ2_XS, QT.IQ2_S, QT.IQ3_XXS, QT.IQ3_S, QT.IQ1_S, QT.IQ1_M))

# kvalues_iq4nl (ggml-common.h): the 16 non-linear 4-bit levels.
KVALUES_IQ4NL = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113],
                         dtype=np.int8)
_KV = KVALUES_IQ4NL.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# scalar helpers


@njit(cache=True, nogil=True, inline="always")
def best_index_iq4(x):
    """best_index_int8(16, kvalues_iq4nl, x): index of the nearest level, ties to the upper one."""
    if x <= _KV[0]:
        return 0
    if x >= _KV[15]:
        return 15
    ml = 0
    mu = 15
    while mu - ml > 1:
        mav = (ml + mu) // 2
        if x < _KV[mav]:
            mu = mav
        else:
            ml = mav
    return mu - 1 if x - _KV[mu - 1] < _KV[mu] - x else mu


# ---------------------------------------------------------------------------------------------
# IQ4_NL / IQ4_XS quantization (quantize_row_iq4_nl_impl with ntry = 7)


@njit(cache=True, nogil=True)
def _iq4_sub_scale(xb, wb):
    """Best scale of one 32-element sub-block (the per-block part of quantize_row_iq4_nl_impl)."""
    n = xb.size
    amax = f32(0.0)
    mx = f32(0.0)
    for j in range(n):
        ax = abs(xb[j])
        if ax > amax:
            amax = ax
            mx = xb[j]
    if amax < GROUP_MAX_EPS:
        return f32(0.0)
    d = -mx / _KV[0]
    inv = f32(1.0) / d
    sumqx = f32(0.0)
    sumq2 = f32(0.0)
    for j in range(n):
        q = _KV[best_index_iq4(inv * xb[j])]
        wq = wb[j] * q
        sumqx += wq * xb[j]
        sumq2 += wq * q
    d = sumqx / sumq2 if sumq2 > f32(0.0) else f32(0.0)
    best = d * sumqx
    for itry in range(-7, 8):
        inv = f32(itry - 127) / mx
        sumqx = f32(0.0)
        sumq2 = f32(0.0)
        for j in range(n):
            q = _KV[best_index_iq4(inv * xb[j])]
            wq = wb[j] * q
            sumqx += wq * xb[j]
            sumq2 += wq * q
        if sumq2 > f32(0.0) and sumqx * sumqx > best * sumq2:
            d = sumqx / sumq2
            best = d * sumqx
    return d


@njit(cache=True, nogil=True)
def _iq4_sigma2(x):
    """2 * mean(x**2) over the super-block: the floor of the imatrix weights."""
    sigma2 = f32(0.0)
    for j in range(x.size):
        sigma2 += x[j] * x[j]
    return sigma2 * (f32(2.0) / f32(x.size))


@njit(cache=True, nogil=True)
def _iq4_weights(xb, qwb, has_qw, sigma2, wb):
    """Importance of each element of one 32-element sub-block."""
    for j in range(32):
        if has_qw:
            wb[j] = qwb[j] * np.sqrt(sigma2 + xb[j] * xb[j])
        else:
            wb[j] = xb[j] * xb[j]


@njit(cache=True, nogil=True)
def _pack_iq4(L, qs):
    """q4[16*i + j] = L[32*i + j] | L[32*i + 16 + j] << 4."""
    for i in range(L.size // 32):
        for j in range(16):
            qs[16 * i + j] = np.uint8(L[32 * i + j] | (L[32 * i + 16 + j] << 4))


@njit(cache=True, nogil=True, parallel=True)
def quantize_iq4_nl(x, qw, out):
    n_rows, n_per_row = x.shape
    has_qw = qw.size > 0
    nb = n_per_row // QK4_NL
    for r in prange(n_rows):
        wb = np.empty(32, np.float32)
        L = np.empty(32, np.uint8)
        for ib in range(nb):
            xb = x[r, ib * 32:(ib + 1) * 32]
            if has_qw:
                _iq4_weights(xb, qw[ib * 32:(ib + 1) * 32], True, _iq4_sigma2(xb), wb)
            else:
                _iq4_weights(xb, xb, False, f32(0.0), wb)
            d = _iq4_sub_scale(xb, wb)
            blk = out[r, ib * BYTES_IQ4_NL:(ib + 1) * BYTES_IQ4_NL]
            put_f16(blk, 0, d)
            inv = f32(1.0) / d if d != f32(0.0) else f32(0.0)
            for j in range(32):
                L[j] = best_index_iq4(inv * xb[j])
            _pack_iq4(L, blk[2:])


@njit(cache=True, nogil=True, parallel=True)
def quantize_iq4_xs(x, qw, out):
    n_rows, n_per_row = x.shape
    has_qw = qw.size > 0
    nb = n_per_row // QK_K
    for r in prange(n_rows):
        wb = np.empty(32, np.float32)
        L = np.empty(QK_K, np.uint8)
        scales = np.empty(8, np.float32)
        for ibl in range(nb):
            xs = x[r, ibl * QK_K:(ibl + 1) * QK_K]
            sigma2 = _iq4_sigma2(xs) if has_qw else f32(0.0)
            blk = out[r, ibl * BYTES_IQ4_XS:(ibl + 1) * BYTES_IQ4_XS]
            max_scale = f32(0.0)
            amax_scale = f32(0.0)
            for ib in range(8):
                xb = xs[ib * 32:(ib + 1) * 32]
                qwb = qw[ibl * QK_K + ib * 32:ibl * QK_K + (ib + 1) * 32] if has_qw else xb
                _iq4_weights(xb, qwb, has_qw, sigma2, wb)
                d = _iq4_sub_scale(xb, wb)
                scales[ib] = d
                if abs(d) > amax_scale:
                    amax_scale = abs(d)
                    max_scale = d
            d = -max_scale / f32(32.0)
            put_f16(blk, 0, d)
            inv = f32(1.0) / d if d != f32(0.0) else f32(0.0)
            scales_h = 0
            for ib in range(8):
                ls = min(31, max(-32, nearest_int(inv * scales[ib])))
                dl = d * f32(ls)
                idl = f32(1.0) / dl if dl != f32(0.0) else f32(0.0)
                for j in range(32):
                    L[ib * 32 + j] = best_index_iq4(idl * xs[ib * 32 + j])
                ls += 32
                if ib % 2 == 0:
                    blk[4 + ib // 2] = np.uint8(ls & 0xF)
                else:
                    blk[4 + ib // 2] |= np.uint8((ls & 0xF) << 4)
                scales_h |= (ls >> 4) << (2 * ib)
            put_u16(blk, 2, scales_h)
            _pack_iq4(L, blk[8:])


# ---------------------------------------------------------------------------------------------
# dequantization (gguf-py's dequantize_blocks; all products in float32 in its order)


@njit(cache=True, nogil=True, parallel=True)
def dequantize_iq4_nl(data, out):
    n_rows, n = out.shape
    for r in prange(n_rows):
        for ib in range(n // 32):
            blk = data[r, ib * BYTES_IQ4_NL:(ib + 1) * BYTES_IQ4_NL]
            d = get_f16(blk, 0)
            for j in range(16):
                q = blk[2 + j]
                out[r, ib * 32 + j] = d * _KV[q & 0xF]
                out[r, ib * 32 + j + 16] = d * _KV[q >> 4]


@njit(cache=True, nogil=True, parallel=True)
def dequantize_iq4_xs(data, out):
    n_rows, n = out.shape
    for r in prange(n_rows):
        for ibl in range(n // QK_K):
            blk = data[r, ibl * BYTES_IQ4_XS:(ibl + 1) * BYTES_IQ4_XS]
            d = get_f16(blk, 0)
            scales_h = get_u16(blk, 2)
            for ib in range(8):
                ls = ((blk[4 + ib // 2] >> (4 * (ib % 2))) & 0xF) | (((scales_h >> (2 * ib)) & 3) << 4)
                dl = d * f32(np.int32(ls) - 32)
                y = out[r, ibl * QK_K + ib * 32:]
                for j in range(16):
                    q = blk[8 + ib * 16 + j]
                    y[j] = dl * _KV[q & 0xF]
                    y[j + 16] = dl * _KV[q >> 4]


@njit(cache=True, nogil=True, inline="always")
def _put_grid8(y, db, g, signs):
    """y[j] = db * g[j] * (bit j of signs ? -1 : 1) for the 8 grid values ``g``."""
    for j in range(8):
        v = db * f32(g[j])
        y[j] = -v if (signs >> j) & 1 else v


@njit(cache=True, nogil=True, parallel=True)
def dequantize_iq2_xxs_k(data, out, grid, ksigns):
    n_rows, n = out.shape
    for r in prange(n_rows):
        for ibl in range(n // QK_K):
            blk = data[r, ibl * BYTES_IQ2_XXS:(ibl + 1) * BYTES_IQ2_XXS]
            d = get_f16(blk, 0)
            for ib in range(8):
                aux1 = get_u32(blk, 2 + 8 * ib + 4)
                db = d * (f32(0.5) + f32(aux1 >> np.uint32(28))) * f32(0.25)
                for l in range(4):
                    g = grid[blk[2 + 8 * ib + l]]
                    s = ksigns[(aux1 >> np.uint32(7 * l)) & np.uint32(127)]
                    _put_grid8(out[r, ibl * QK_K + ib * 32 + l * 8:], db, g, s)


@njit(cache=True, nogil=True, parallel=True)
def dequantize_iq2_xs_k(data, out, grid, ksigns):
    n_rows, n = out.shape
    for r in prange(n_rows):
        for ibl in range(n // QK_K):
            blk = data[r, ibl * BYTES_IQ2_XS:(ibl + 1) * BYTES_IQ2_XS]
            d = get_f16(blk, 0)
            for k in range(16):  # 16 groups of 16 elements, one 4-bit scale each
                sc = (blk[66 + k // 2] >> (4 * (k % 2))) & 0xF
                db = d * (f32(0.5) + f32(sc)) * f32(0.25)
                for l in range(2):
                    q = get_u16(blk, 2 + 2 * (2 * k + l))
                    _put_grid8(out[r, ibl * QK_K + 16 * k + 8 * l:], db, grid[q & 511], ksigns[q >> 9])


@njit(cache=True, nogil=True, parallel=True)
def dequantize_iq2_s_k(data, out, grid):
    n_rows, n = out.shape
    for r in prange(n_rows):
        for ibl in range(n // QK_K):
            blk = data[r, ibl * BYTES_IQ2_S:(ibl + 1) * BYTES_IQ2_S]
            d = get_f16(blk, 0)
            for k in range(16):
                sc = (blk[74 + k // 2] >> (4 * (k % 2))) & 0xF
                db = d * (f32(0.5) + f32(sc)) * f32(0.25)
                for l in range(2):
                    i = 2 * k + l
                    idx = np.int32(blk[2 + i]) | (np.int32((blk[66 + i // 4] >> (2 * (i % 4))) & 3) << 8)
                    _put_grid8(out[r, ibl * QK_K + 8 * i:], db, grid[idx], blk[34 + i])


@njit(cache=True, nogil=True, parallel=True)
def dequantize_iq3_xxs_k(data, out, grid, ksigns):
    n_rows, n = out.shape
    for r in prange(n_rows):
        for ibl in range(n // QK_K):
            blk = data[r, ibl * BYTES_IQ3_XXS:(ibl + 1) * BYTES_IQ3_XXS]
            d = get_f16(blk, 0)
            for ib in range(8):
                aux = get_u32(blk, 66 + 4 * ib)
                db = d * (f32(0.5) + f32(aux >> np.uint32(28))) * f32(0.5)
                for l in range(4):
                    s = ksigns[(aux >> np.uint32(7 * l)) & np.uint32(127)]
                    y = out[r, ibl * QK_K + ib * 32 + l * 8:]
                    for h in range(2):
                        g = grid[blk[2 + 8 * ib + 2 * l + h]]
                        for j in range(4):
                            v = db * f32(g[j])
                            y[4 * h + j] = -v if (s >> (4 * h + j)) & 1 else v


@njit(cache=True, nogil=True, parallel=True)
def dequantize_iq3_s_k(data, out, grid):
    n_rows, n = out.shape
    for r in prange(n_rows):
        for ibl in range(n // QK_K):
            blk = data[r, ibl * BYTES_IQ3_S:(ibl + 1) * BYTES_IQ3_S]
            d = get_f16(blk, 0)
            for ib in range(8):
                sc = (blk[106 + ib // 2] >> (4 * (ib % 2))) & 0xF
                db = d * f32(1 + 2 * sc)
                for l in range(4):
                    s = blk[74 + 4 * ib + l]
                    y = out[r, ibl * QK_K + ib * 32 + l * 8:]
                    for h in range(2):
                        i = 8 * ib + 2 * l + h
                        idx = np.int32(blk[2 + i]) | (np.int32((blk[66 + i // 8] >> (i % 8)) & 1) << 8)
                        g = grid[idx]
                        for j in range(4):
                            v = db * f32(g[j])
                            y[4 * h + j] = -v if (s >> (4 * h + j)) & 1 else v


IQ1S_DELTA = f32(0.125)


@njit(cache=True, nogil=True, parallel=True)
def dequantize_iq1_s_k(data, out, grid):
    n_rows, n = out.shape
    for r in prange(n_rows):
        for ibl in range(n // QK_K):
            blk = data[r, ibl * BYTES_IQ1_S:(ibl + 1) * BYTES_IQ1_S]
            d = get_f16(blk, 0)
            for ib in range(8):
                qh = np.int32(get_u16(blk, 34 + 2 * ib))
                dl = d * f32(2 * ((qh >> 12) & 7) + 1)
                delta = -IQ1S_DELTA if qh & 0x8000 else IQ1S_DELTA
                for l in range(4):
                    g = grid[np.int32(blk[2 + 4 * ib + l]) | (((qh >> (3 * l)) & 7) << 8)]
                    y = out[r, ibl * QK_K + ib * 32 + l * 8:]
                    for j in range(8):
                        y[j] = dl * (f32(g[j]) + delta)


@njit(cache=True, nogil=True, parallel=True)
def dequantize_iq1_m_k(data, out, grid):
    n_rows, n = out.shape
    for r in prange(n_rows):
        for ibl in range(n // QK_K):
            blk = data[r, ibl * BYTES_IQ1_M:(ibl + 1) * BYTES_IQ1_M]
            sc0 = np.int32(get_u16(blk, 48))
            sc1 = np.int32(get_u16(blk, 50))
            sc2 = np.int32(get_u16(blk, 52))
            sc3 = np.int32(get_u16(blk, 54))
            dh = ((sc0 & 0xF000) >> 12) | ((sc1 & 0xF000) >> 8) | ((sc2 & 0xF000) >> 4) | (sc3 & 0xF000)
            d = fp16_to_fp32(np.uint16(dh))
            for k in range(16):  # 16 groups of 16 elements, one 3-bit scale each
                sc = np.int32(get_u16(blk, 48 + 2 * (k // 4)))
                dl = d * f32(2 * ((sc >> (3 * (k % 4))) & 7) + 1)
                for l in range(2):
                    i = 2 * k + l
                    nib = (np.int32(blk[32 + i // 2]) >> (4 * (i % 2))) & 0xF
                    delta = -IQ1S_DELTA if nib & 8 else IQ1S_DELTA
                    g = grid[np.int32(blk[i]) | ((nib & 7) << 8)]
                    y = out[r, ibl * QK_K + 8 * i:]
                    for j in range(8):
                        y[j] = dl * (f32(g[j]) + delta)


# The registered dequantizers: fetch the (cached) grid tables, then run the kernel.

def dequantize_iq2_xxs(data, out):
    dequantize_iq2_xxs_k(data, out, grid_table(QT.IQ2_XXS), ksigns_table())


def dequantize_iq2_xs(data, out):
    dequantize_iq2_xs_k(data, out, grid_table(QT.IQ2_XS), ksigns_table())


def dequantize_iq2_s(data, out):
    dequantize_iq2_s_k(data, out, grid_table(QT.IQ2_S))


def dequantize_iq3_xxs(data, out):
    dequantize_iq3_xxs_k(data, out, grid_table(QT.IQ3_XXS), ksigns_table())


def dequantize_iq3_s(data, out):
    dequantize_iq3_s_k(data, out, grid_table(QT.IQ3_S))


def dequantize_iq1_s(data, out):
    dequantize_iq1_s_k(data, out, grid_table(QT.IQ1_S))


def dequantize_iq1_m(data, out):
    dequantize_iq1_m_k(data, out, grid_table(QT.IQ1_M))


# The registered grid quantizers: fetch ggml's (lazily built, cached) neighbour tables first.

def quantize_iq2_xxs(x, qw, out):
    quantize_iq2_xxs_k(x, qw, out, *quant_tables(QT.IQ2_XXS))


def quantize_iq2_xs(x, qw, out):
    quantize_iq2_xs_k(x, qw, out, *quant_tables(QT.IQ2_XS))


def quantize_iq3_xxs(x, qw, out):
    quantize_iq3_xxs_k(x, qw, out, *quant_tables(QT.IQ3_XXS))


def quantize_iq3_s(x, qw, out):
    quantize_iq3_s_k(x, qw, out, *quant_tables(QT.IQ3_S))


register(QT.IQ4_NL, quantize=quantize_iq4_nl, dequantize=dequantize_iq4_nl)
register(QT.IQ4_XS, quantize=quantize_iq4_xs, dequantize=dequantize_iq4_xs)
register(QT.IQ2_XXS, quantize=quantize_iq2_xxs, dequantize=dequantize_iq2_xxs)
register(QT.IQ2_XS, quantize=quantize_iq2_xs, dequantize=dequantize_iq2_xs)
register(QT.IQ2_S, dequantize=dequantize_iq2_s)
register(QT.IQ3_XXS, quantize=quantize_iq3_xxs, dequantize=dequantize_iq3_xxs)
register(QT.IQ3_S, quantize=quantize_iq3_s, dequantize=dequantize_iq3_s)
register(QT.IQ1_S, dequantize=dequantize_iq1_s)
register(QT.IQ1_M, dequantize=dequantize_iq1_m)
