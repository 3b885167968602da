"""IQ2_XXS and IQ2_XS quantizers: quantize_row_iq2_xxs_impl / quantize_row_iq2_xs_impl.

Both need an importance matrix (ggml refuses without one). Sub-blocks (32 values for IQ2_XXS,
16 for IQ2_XS) are folded to |x| with even sign parity, and every 8 values snap to the 2-bit
lattice grid (levels 1, 3, 5 before scaling) through the neighbour lists of iq2xs_init_impl.
"""

from __future__ import annotations

import numpy as np
from gguf import QK_K
from numba import njit, prange

from dynsearch.kernels._fp import f32, nearest_int, put_f16
from dynsearch.kernels._iq_search import fmax_c, fold_signs_even, grid_index, imatrix_weights, search_scale, sum_sq
from dynsearch.kernels.scale_search import GROUP_MAX_EPS, make_qp_quants
from dynsearch.kernels.types import QT, type_info

BYTES_IQ2_XXS, BYTES_IQ2_XS = (type_info(t).type_size for t in (QT.IQ2_XXS, QT.IQ2_XS))


@njit(cache=True, nogil=True, parallel=True)
def quantize_iq2_xxs_k(x, qw, out, grid, kmap, nbr):
    n_rows, n_per_row = x.shape
    for r in prange(n_rows):
        weight = np.empty(32, np.float32)
        waux = np.empty(32, np.float32)
        xval = np.empty(32, np.float32)
        L = np.zeros(32, np.int32)
        Laux = np.zeros(32, np.int32)
        on = np.zeros(4, np.bool_)
        on_aux = np.zeros(4, np.bool_)
        Lqp = np.zeros(32, np.uint8)
        scales = np.empty(8, np.float32)
        q2 = np.empty(16, np.uint32)
        for ibl in range(n_per_row // QK_K):
            blk = out[r, ibl * BYTES_IQ2_XXS:(ibl + 1) * BYTES_IQ2_XXS]
            xbl = x[r, ibl * QK_K:(ibl + 1) * QK_K]
            q2[:] = 0
            max_scale = f32(0.0)
            sigma2 = sum_sq(xbl) / f32(QK_K)
            for ib in range(8):
                xb = xbl[32 * ib:32 * ib + 32]
                imatrix_weights(xb, qw[ibl * QK_K + 32 * ib:], True, sigma2, weight, waux)
                signs0 = fold_signs_even(xb, weight, xval, 0)
                signs1 = fold_signs_even(xb, weight, xval, 1)
                signs2 = fold_signs_even(xb, weight, xval, 2)
                signs3 = fold_signs_even(xb, weight, xval, 3)
                mx = xval[0]
                for i in range(1, 32):
                    mx = fmax_c(mx, xval[i])
                if mx < GROUP_MAX_EPS:
                    scales[ib] = f32(0.0)
                    continue
                scale = make_qp_quants(32, 4, xval, Lqp, weight)
                eff_max = scale * f32(3.0)
                if eff_max <= f32(0.0):
                    scales[ib] = f32(0.0)
                    continue
                scale = search_scale(xval, weight, waux, L, Laux, on, on_aux, grid, kmap, nbr,
                                     eff_max, scale, 6, f32(0.1), 3, False, False, True)
                if scale < f32(0.0):  # "should never happen" in ggml; mirrored anyway
                    scale = -scale
                    signs0 = ~signs0 & 127
                    signs1 = ~signs1 & 127
                    signs2 = ~signs2 & 127
                    signs3 = ~signs3 & 127
                for k in range(4):
                    q2[2 * ib] |= np.uint32(grid_index(L, k, kmap)) << np.uint32(8 * k)
                q2[2 * ib + 1] |= np.uint32(signs0 | (signs1 << 7) | (signs2 << 14) | (signs3 << 21))
                scales[ib] = scale
                max_scale = fmax_c(max_scale, scale)
            blk[:] = 0
            if max_scale == f32(0.0):
                continue
            d = max_scale / f32(31.0)
            put_f16(blk, 0, d)
            inv = f32(1.0) / d
            for ib in range(8):
                l = max(0, min(15, nearest_int(f32(0.5) * (inv * scales[ib] - f32(1.0)))))
                q2[2 * ib + 1] |= np.uint32(l) << np.uint32(28)
            for i in range(16):
                for b in range(4):
                    blk[2 + 4 * i + b] = np.uint8((q2[i] >> np.uint32(8 * b)) & np.uint32(0xFF))


@njit(cache=True, nogil=True, parallel=True)
def quantize_iq2_xs_k(x, qw, out, grid, kmap, nbr):
    n_rows, n_per_row = x.shape
    for r in prange(n_rows):
        weight = np.empty(16, np.float32)
        waux = np.empty(16, np.float32)
        xval = np.empty(16, np.float32)
        L = np.zeros(16, np.int32)
        Laux = np.zeros(16, np.int32)
        on = np.zeros(2, np.bool_)
        on_aux = np.zeros(2, np.bool_)
        scales = np.empty(16, np.float32)
        q2 = np.empty(32, np.uint16)
        for ibl in range(n_per_row // QK_K):
            blk = out[r, ibl * BYTES_IQ2_XS:(ibl + 1) * BYTES_IQ2_XS]  # d | qs u16[32] | scales[8]
            xbl = x[r, ibl * QK_K:(ibl + 1) * QK_K]
            q2[:] = 0
            max_scale = f32(0.0)
            sigma2 = sum_sq(xbl) / f32(QK_K)
            for ib in range(16):
                xb = xbl[16 * ib:16 * ib + 16]
                imatrix_weights(xb, qw[ibl * QK_K + 16 * ib:], True, sigma2, weight, waux)
                signs0 = fold_signs_even(xb, weight, xval, 0)
                signs1 = fold_signs_even(xb, weight, xval, 1)
                mx = xval[0]
                for i in range(1, 16):
                    mx = fmax_c(mx, xval[i])
                L[:] = 0
                if mx < GROUP_MAX_EPS:
                    scales[ib] = f32(0.0)
                    continue
                scale = search_scale(xval, weight, waux, L, Laux, on, on_aux, grid, kmap, nbr,
                                     mx, mx / f32(5.0), 9, f32(0.1), 3, True, True, False)
                if scale < f32(0.0):
                    scale = -scale
                    signs0 = ~signs0 & 127
                    signs1 = ~signs1 & 127
                q2[2 * ib] = np.uint16(grid_index(L, 0, kmap) | (signs0 << 9))
                q2[2 * ib + 1] = np.uint16(grid_index(L, 1, kmap) | (signs1 << 9))
                scales[ib] = scale
                max_scale = fmax_c(max_scale, scale)
            blk[:] = 0
            if max_scale == f32(0.0):
                continue
            d = max_scale / f32(31.0)
            put_f16(blk, 0, d)
            inv = f32(1.0) / d
            for ib in range(16):
                l = max(0, min(15, nearest_int(f32(0.5) * (inv * scales[ib] - f32(1.0)))))
                blk[66 + ib // 2] |= np.uint8(l << (4 * (ib % 2)))
            for i in range(32):
                blk[2 + 2 * i] = np.uint8(q2[i] & 0xFF)
                blk[3 + 2 * i] = np.uint8(q2[i] >> 8)
