"""IQ3_XXS and IQ3_S quantizers: quantize_row_iq3_xxs_impl(256) and quantize_row_iq3_s_impl.

Each 32-element sub-block is folded to |x| (signs stored apart), then a scale search over
``(15 + 0.2*is) / max`` snaps every 4 values to the nearest point of the 3-bit lattice grid
(through the neighbour lists of iq3xs_init_impl when the rounded point is off the grid).
"""

from __future__ import annotations

import numpy as np
from gguf import QK_K
from numba import njit, prange

from dynsearch.kernels._fp import f32, nearest_int, put_f16
from dynsearch.kernels._iq_search import fmax_c, fold_signs_even, grid_index, imatrix_weights, search_scale, sum_sq
from dynsearch.kernels.types import QT, type_info

BYTES_IQ3_XXS, BYTES_IQ3_S = (type_info(t).type_size for t in (QT.IQ3_XXS, QT.IQ3_S))
GROUP_MAX_EPS_IQ3_XXS = f32(1e-8)


@njit(cache=True, nogil=True, parallel=True)
def quantize_iq3_xxs_k(x, qw, out, grid, kmap, nbr):
    n_rows, n_per_row = x.shape
    has_qw = qw.size > 0
    for r in prange(n_rows):
        weight = np.empty(32, np.float32)
        waux = np.empty(32, np.float32)
        xval = np.empty(32, np.float32)
        L = np.zeros(32, np.int8)
        Laux = np.zeros(32, np.int8)
        on = np.zeros(8, np.bool_)
        on_aux = np.zeros(8, np.bool_)
        scales = np.empty(8, np.float32)
        signs = np.empty(4, np.uint32)
        q3 = np.empty(96, np.uint8)  # qs[64] | scales_and_signs u32[8]
        sas = np.empty(8, np.uint32)
        for ibl in range(n_per_row // QK_K):
            blk = out[r, ibl * BYTES_IQ3_XXS:(ibl + 1) * BYTES_IQ3_XXS]
            xbl = x[r, ibl * QK_K:(ibl + 1) * QK_K]
            q3[:] = 0
            sas[:] = 0
            max_scale = f32(0.0)
            sigma2 = f32(2.0) * sum_sq(xbl) / f32(QK_K)
            for ib in range(8):
                xb = xbl[32 * ib:32 * ib + 32]
                imatrix_weights(xb, qw[ibl * QK_K + 32 * ib:] if has_qw else qw, has_qw, sigma2,
                                weight, waux)
                for k in range(4):
                    signs[k] = fold_signs_even(xb, weight, xval, k)
                mx = xval[0]
                for i in range(1, 32):
                    mx = fmax_c(mx, xval[i])
                L[:] = 0
                if mx < GROUP_MAX_EPS_IQ3_XXS:
                    scales[ib] = f32(0.0)
                    continue
                scale = search_scale(xval, weight, waux, L, Laux, on, on_aux, grid, kmap, nbr,
                                     mx, mx / f32(15.0), 15, f32(0.2), 8, True, True, False)
                if scale < f32(0.0):  # "should never happen" in ggml; mirrored anyway
                    scale = -scale
                    for k in range(4):
                        signs[k] = ~signs[k] & np.uint32(127)
                for k in range(8):
                    q3[8 * ib + k] = np.uint8(grid_index(L, k, kmap))
                sas[ib] = signs[0] | (signs[1] << 7) | (signs[2] << 14) | (signs[3] << 21)
                scales[ib] = scale
                max_scale = fmax_c(max_scale, scale)
            blk[:] = 0
            if max_scale == f32(0.0):
                continue
            d = max_scale / f32(31.0)
            put_f16(blk, 0, d * f32(1.0125))
            inv = f32(1.0) / d
            for ib in range(8):
                l = max(0, min(15, nearest_int(f32(0.5) * (inv * scales[ib] - f32(1.0)))))
                sas[ib] |= np.uint32(l) << np.uint32(28)
            blk[2:66] = q3[:64]
            for ib in range(8):
                for b in range(4):
                    blk[66 + 4 * ib + b] = np.uint8((sas[ib] >> np.uint32(8 * b)) & np.uint32(0xFF))


@njit(cache=True, nogil=True, parallel=True)
def quantize_iq3_s_k(x, qw, out, grid, kmap, nbr):
    n_rows, n_per_row = x.shape
    has_qw = qw.size > 0
    for r in prange(n_rows):
        weight = np.empty(32, np.float32)
        waux = np.empty(32, np.float32)
        xval = np.empty(32, np.float32)
        L = np.zeros(32, np.int8)
        Laux = np.zeros(32, np.int8)
        on = np.zeros(8, np.bool_)
        on_aux = np.zeros(8, np.bool_)
        scales = np.empty(8, np.float32)
        signs = np.empty(4, np.uint8)
        for ibl in range(n_per_row // QK_K):
            blk = out[r, ibl * BYTES_IQ3_S:(ibl + 1) * BYTES_IQ3_S]  # d | qs[64] | qh[8] | signs[32] | scales[4]
            xbl = x[r, ibl * QK_K:(ibl + 1) * QK_K]
            blk[:] = 0
            # ggml advances its qs/signs pointers only past non-zero sub-blocks: mirrored here.
            qs_off = 2
            signs_off = 74
            max_scale = f32(0.0)
            sigma2 = f32(2.0) * sum_sq(xbl) / f32(QK_K)
            for ib in range(8):
                xb = xbl[32 * ib:32 * ib + 32]
                imatrix_weights(xb, qw[ibl * QK_K + 32 * ib:] if has_qw else qw, has_qw, sigma2,
                                weight, waux)
                for k in range(4):
                    s = 0
                    for i in range(8):
                        v = xb[8 * k + i]
                        if v >= f32(0.0):
                            xval[8 * k + i] = v
                        else:
                            xval[8 * k + i] = -v
                            s |= 1 << i
                    signs[k] = s
                mx = xval[0]
                for i in range(1, 32):
                    mx = fmax_c(mx, xval[i])
                L[:] = 0
                if mx == f32(0.0):
                    scales[ib] = f32(0.0)
                    continue
                scale = search_scale(xval, weight, waux, L, Laux, on, on_aux, grid, kmap, nbr,
                                     mx, mx / f32(15.0), 9, f32(0.2), 8, False, False, False)
                if scale < f32(0.0):
                    scale = -scale
                    for k in range(4):
                        signs[k] = ~signs[k]
                for k in range(8):
                    gi = grid_index(L, k, kmap)
                    blk[qs_off + k] = np.uint8(gi & 255)
                    blk[66 + ib] |= np.uint8((gi >> 8) << k)
                qs_off += 8
                for k in range(4):
                    blk[signs_off + k] = signs[k]
                signs_off += 4
                scales[ib] = scale
                max_scale = fmax_c(max_scale, scale)
            if max_scale == f32(0.0):
                continue
            d = max_scale / f32(31.0)
            put_f16(blk, 0, d * f32(1.033))
            inv = f32(1.0) / d
            for ib in range(0, 8, 2):
                l1 = max(0, min(15, nearest_int(f32(0.5) * (inv * scales[ib] - f32(1.0)))))
                l2 = max(0, min(15, nearest_int(f32(0.5) * (inv * scales[ib + 1] - f32(1.0)))))
                blk[106 + ib // 2] = np.uint8(l1 | (l2 << 4))
