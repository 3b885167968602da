"""K-quants: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K (256-element super-blocks), byte-identical with ggml.

Mirrors ggml/src/ggml-quants.c: ``quantize_row_qX_K_ref`` (no importance weights, ``qw.size == 0``)
and ``quantize_row_qX_K_impl`` (with them) on :mod:`.scale_search`'s searches,
``get_scale_min_k4``, and the ``dequantize_row_qX_K`` decoders.

Everything is float32 in the C's operation order: integers are converted with ``f32`` before they
meet a float (numba would otherwise promote to float64), and there is no ``fastmath``.
``error_model="numpy"`` gives IEEE division (inf/NaN) where the C divides by a zero or denormal.

Block layouts (bytes, ggml-common.h; ``d``/``dmin`` are little-endian fp16)::

    Q2_K  84: scales[16] (4-bit scale | 4-bit min << 4) | qs[64] (2-bit) | d | dmin
    Q3_K 110: hmask[32] (high bit) | qs[64] (low 2 bits) | scales[12] (6-bit) | d
    Q4_K 144: d | dmin | scales[12] (6-bit scales and mins) | qs[128] (4-bit)
    Q5_K 176: d | dmin | scales[12] | qh[32] (high bit) | qs[128] (low 4 bits)
    Q6_K 210: ql[128] (low 4 bits) | qh[64] (high 2 bits) | scales[16] (int8) | d
"""

from __future__ import annotations

import numpy as np
from gguf import QK_K
from numba import njit, prange

from dynsearch.kernels._fp import f32, get_f16, nearest_int, put_f16
from dynsearch.kernels.registry import register
from dynsearch.kernels.scale_search import (
    GROUP_MAX_EPS,
    QKX_BATCH,
    QX_TRIALS,
    make_q3_quants,
    make_qkx2_quants,
    make_qkx3_quants,
    make_qp_quants,
    make_qx_quants,
)
from dynsearch.kernels.types import QT, type_info

# Bytes per super-block of each type, from the type table.
BYTES_Q2_K, BYTES_Q3_K, BYTES_Q4_K, BYTES_Q5_K, BYTES_Q6_K = (
    type_info(t).type_size for t in (QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K))

_jit = dict(cache=True, nogil=True, error_model="numpy")
_F0 = f32(0.0)
_F1 = f32(1.0)


# ---------------------------------------------------------------------------------------------
# Scalar helpers


@njit(inline="always", **_jit)
def get_scale_min_k4(j, q):
    """6-bit scale and min of sub-block ``j`` from the 12 packed bytes ``q`` (Q4_K, Q5_K)."""
    if j < 4:
        return np.int32(q[j] & 63), np.int32(q[j + 4] & 63)
    d = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4)
    m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4)
    return np.int32(d), np.int32(m)


# ---------------------------------------------------------------------------------------------
# Row drivers: prange over rows only, per-row scratch allocated once per row.


@njit(inline="always", **_jit)
def _block_qw(qw, i):
    """The importance weights of super-block ``i``, or the empty array (C's NULL)."""
    return qw[QK_K * i:QK_K * (i + 1)] if qw.shape[0] > 0 else qw


# ---------------------------------------------------------------------------------------------
# Q6_K: x = d * scale[16 sub-blocks of 16] * (q - 32), q 6-bit


@njit(**_jit)
def _quantize_block_q6_K(x, qw, y, L, scales, tmp):
    """quantize_row_q6_K_ref / _impl for one super-block (they differ only in ``qw``)."""
    max_scale = _F0
    max_abs_scale = _F0
    for ib in range(QK_K // 16):
        sub = qw[16 * ib:16 * ib + 16] if qw.shape[0] > 0 else qw
        scale = make_qx_quants(16, 32, x[16 * ib:16 * ib + 16], L[16 * ib:16 * ib + 16], 1, sub,
                               tmp)
        scales[ib] = scale
        abs_scale = abs(scale)
        if abs_scale > max_abs_scale:
            max_abs_scale = abs_scale
            max_scale = scale
    if max_abs_scale < GROUP_MAX_EPS:
        y[:] = 0
        return
    iscale = f32(-128.0) / max_scale
    put_f16(y, 208, _F1 / iscale)
    d_all = get_f16(y, 208)
    for ib in range(QK_K // 16):
        y[192 + ib] = np.uint8(min(127, nearest_int(iscale * scales[ib])) & 0xFF)
    for j in range(QK_K // 16):
        d = d_all * f32(np.int8(y[192 + j]))
        if d == _F0:
            continue
        for ii in range(16):
            l = max(-32, min(31, nearest_int(x[16 * j + ii] / d)))
            L[16 * j + ii] = l + 32
    for j in range(0, QK_K, 128):
        ql = j // 2
        qh = 128 + j // 4
        for l in range(32):
            q1 = L[j + l] & 0xF
            q2 = L[j + l + 32] & 0xF
            q3 = L[j + l + 64] & 0xF
            q4 = L[j + l + 96] & 0xF
            y[ql + l] = q1 | (q3 << 4)
            y[ql + l + 32] = q2 | (q4 << 4)
            y[qh + l] = ((L[j + l] >> 4) | ((L[j + l + 32] >> 4) << 2)
                         | ((L[j + l + 64] >> 4) << 4) | ((L[j + l + 96] >> 4) << 6))


@njit(parallel=True, **_jit)
def quantize_q6_K(x, qw, out):
    n_rows, n = x.shape
    for r in prange(n_rows):
        L = np.empty(QK_K, dtype=np.int8)
        scales = np.empty(QK_K // 16, dtype=np.float32)
        tmp = np.empty(2 * 16 + 3 * QX_TRIALS, dtype=np.float32)
        for i in range(n // QK_K):
            _quantize_block_q6_K(x[r, QK_K * i:QK_K * (i + 1)], _block_qw(qw, i),
                                 out[r, BYTES_Q6_K * i:BYTES_Q6_K * (i + 1)], L, scales, tmp)


@njit(parallel=True, **_jit)
def dequantize_q6_K(data, out):
    n_rows, n = out.shape
    for r in prange(n_rows):
        for i in range(n // QK_K):
            b = data[r, BYTES_Q6_K * i:BYTES_Q6_K * (i + 1)]
            y = out[r, QK_K * i:QK_K * (i + 1)]
            d = get_f16(b, 208)
            for half in range(2):  # 128 weights: ql[64], qh[32], 8 scales; y = (d * sc) * (q - 32)
                ql = b[64 * half:64 * half + 64]
                qh = b[128 + 32 * half:160 + 32 * half]
                sc = b[192 + 8 * half:200 + 8 * half]
                yy = y[128 * half:128 * half + 128]
                for s16 in range(2):
                    d1 = d * f32(np.int8(sc[s16]))
                    d2 = d * f32(np.int8(sc[s16 + 2]))
                    d3 = d * f32(np.int8(sc[s16 + 4]))
                    d4 = d * f32(np.int8(sc[s16 + 6]))
                    for l in range(16 * s16, 16 * s16 + 16):
                        a_ = np.int32(ql[l])
                        c_ = np.int32(ql[l + 32])
                        h = np.int32(qh[l])
                        yy[l] = d1 * f32(((a_ & 0xF) | ((h & 3) << 4)) - 32)
                        yy[l + 32] = d2 * f32(((c_ & 0xF) | (((h >> 2) & 3) << 4)) - 32)
                        yy[l + 64] = d3 * f32(((a_ >> 4) | (((h >> 4) & 3) << 4)) - 32)
                        yy[l + 96] = d4 * f32(((c_ >> 4) | (((h >> 6) & 3) << 4)) - 32)


# ---------------------------------------------------------------------------------------------
# Q4_K / Q5_K: x = d * sc[8 sub-blocks of 32] * q - dmin * m, 6-bit sc and m


@njit(inline="always", **_jit)
def _pack_scale_min_k4(y, off, Ls, Lm):
    """Write 8 (scale, min) pairs of up to 6 bits into 12 bytes at ``y[off:]`` (uint8 wrap as C)."""
    for j in range(QK_K // 32):
        ls = np.int32(Ls[j])
        lm = np.int32(Lm[j])
        if j < 4:
            y[off + j] = ls
            y[off + j + 4] = lm
        else:
            y[off + j + 4] = ((ls & 0xF) | ((lm & 0xF) << 4)) & 0xFF
            y[off + j - 4] = (np.int32(y[off + j - 4]) | ((ls >> 4) << 6)) & 0xFF
            y[off + j] = (np.int32(y[off + j]) | ((lm >> 4) << 6)) & 0xFF


@njit(inline="always", **_jit)
def _requantize_k4(x, y, L, nmax):
    """Recompute the levels from the stored fp16 d/dmin and 6-bit scales (Q4_K, Q5_K)."""
    q = y[4:16]
    d_all = get_f16(y, 0)
    m_all = get_f16(y, 2)
    for j in range(QK_K // 32):
        sc, m = get_scale_min_k4(j, q)
        d = d_all * f32(sc)
        if d == _F0:
            continue
        dm = m_all * f32(m)
        for ii in range(32):
            L[32 * j + ii] = max(0, min(nmax, nearest_int((x[32 * j + ii] + dm) / d)))


@njit(**_jit)
def _scales_ref_k4(x, L, tmp, weights, scales, mins, Ls, Lm, nmax, rmin, rdelta, nstep):
    """The search of quantize_row_q4_K_ref / q5_K_ref; returns (max_scale, max_min)."""
    max_scale = _F0
    max_min = _F0
    for j in range(QK_K // 32):
        xs = x[32 * j:32 * j + 32]
        sum_x2 = _F0
        for l in range(32):
            sum_x2 += xs[l] * xs[l]
        av_x = np.sqrt(sum_x2 / f32(32.0))
        for l in range(32):
            weights[l] = av_x + abs(xs[l])
        scales[j], mins[j] = make_qkx2_quants(32, nmax, xs, weights, L[32 * j:32 * j + 32], tmp,
                                              rmin, rdelta, nstep, False)
        if scales[j] > max_scale:
            max_scale = scales[j]
        if mins[j] > max_min:
            max_min = mins[j]
    inv_scale = f32(63.0) / max_scale if max_scale > _F0 else _F0
    inv_min = f32(63.0) / max_min if max_min > _F0 else _F0
    for j in range(QK_K // 32):
        Ls[j] = min(63, nearest_int(inv_scale * scales[j]) & 0xFF)
        Lm[j] = min(63, nearest_int(inv_min * mins[j]) & 0xFF)
    return max_scale / f32(63.0), max_min / f32(63.0)


@njit(**_jit)
def _scales_impl_k4(x, qw, L, tmp, weights, sw, scales, mins, Ls, Lm, nmax, clamp63):
    """The search of quantize_row_q4_K_impl / q5_K_impl; returns (d_block, m_block)."""
    sum_x2 = _F0
    for l in range(QK_K):
        sum_x2 += x[l] * x[l]
    sigma2 = f32(2.0) * sum_x2 / f32(QK_K)
    for j in range(QK_K // 32):
        xs = x[32 * j:32 * j + 32]
        for l in range(32):
            weights[l] = qw[32 * j + l] * np.sqrt(sigma2 + xs[l] * xs[l])
        sumw = _F0
        for l in range(32):
            sumw += weights[l]
        sw[j] = sumw
        scales[j], mins[j] = make_qkx3_quants(32, nmax, xs, weights, L[32 * j:32 * j + 32], tmp,
                                              f32(-0.9), f32(0.05), 36, False)
    d_block = make_qp_quants(QK_K // 32, 63, scales, Ls, sw)
    m_block = make_qp_quants(QK_K // 32, 63, mins, Lm, sw)
    if clamp63:  # quantize_row_q5_K_impl clamps, q4_K_impl does not
        for j in range(QK_K // 32):
            Ls[j] = min(63, Ls[j])
            Lm[j] = min(63, Lm[j])
    return d_block, m_block


@njit(**_jit)
def _quantize_block_q4_K(x, qw, y, L, tmp, weights, sw, scales, mins, Ls, Lm):
    if qw.shape[0] == 0:
        d, dmin = _scales_ref_k4(x, L, tmp, weights, scales, mins, Ls, Lm, 15,
                                 f32(-1.0), f32(0.1), 20)
    else:
        d, dmin = _scales_impl_k4(x, qw, L, tmp, weights, sw, scales, mins, Ls, Lm, 15, False)
    _pack_scale_min_k4(y, 4, Ls, Lm)
    put_f16(y, 0, d)
    put_f16(y, 2, dmin)
    _requantize_k4(x, y, L, 15)
    for j in range(0, QK_K, 64):
        q = 16 + j // 2
        for l in range(32):
            y[q + l] = L[j + l] | (L[j + l + 32] << 4)


@njit(parallel=True, **_jit)
def quantize_q4_K(x, qw, out):
    n_rows, n = x.shape
    for r in prange(n_rows):
        L = np.empty(QK_K, dtype=np.uint8)
        tmp = np.empty(8 * QKX_BATCH, dtype=np.float32)
        weights = np.empty(32, dtype=np.float32)
        sw = np.empty(QK_K // 32, dtype=np.float32)
        scales = np.empty(QK_K // 32, dtype=np.float32)
        mins = np.empty(QK_K // 32, dtype=np.float32)
        Ls = np.empty(QK_K // 32, dtype=np.uint8)
        Lm = np.empty(QK_K // 32, dtype=np.uint8)
        for i in range(n // QK_K):
            _quantize_block_q4_K(x[r, QK_K * i:QK_K * (i + 1)], _block_qw(qw, i),
                                 out[r, BYTES_Q4_K * i:BYTES_Q4_K * (i + 1)], L, tmp, weights, sw, scales, mins,
                                 Ls, Lm)


@njit(parallel=True, **_jit)
def dequantize_q4_K(data, out):
    n_rows, n = out.shape
    for r in prange(n_rows):
        for i in range(n // QK_K):
            b = data[r, BYTES_Q4_K * i:BYTES_Q4_K * (i + 1)]
            y = out[r, QK_K * i:QK_K * (i + 1)]
            d = get_f16(b, 0)
            dmin = get_f16(b, 2)
            q = b[4:16]
            for k in range(4):
                sc, m = get_scale_min_k4(2 * k, q)
                d1 = d * f32(sc)
                m1 = dmin * f32(m)
                sc, m = get_scale_min_k4(2 * k + 1, q)
                d2 = d * f32(sc)
                m2 = dmin * f32(m)
                for l in range(32):
                    v = b[16 + 32 * k + l]
                    y[64 * k + l] = d1 * f32(v & 0xF) - m1
                    y[64 * k + 32 + l] = d2 * f32(v >> 4) - m2


# ---------------------------------------------------------------------------------------------
# Q5_K: as Q4_K with a fifth bit per weight in qh


@njit(**_jit)
def _quantize_block_q5_K(x, qw, y, L, tmp, weights, sw, scales, mins, Ls, Lm):
    if qw.shape[0] == 0:
        d, dmin = _scales_ref_k4(x, L, tmp, weights, scales, mins, Ls, Lm, 31,
                                 f32(-0.5), f32(0.1), 15)
    else:
        d, dmin = _scales_impl_k4(x, qw, L, tmp, weights, sw, scales, mins, Ls, Lm, 31, True)
    _pack_scale_min_k4(y, 4, Ls, Lm)
    put_f16(y, 0, d)
    put_f16(y, 2, dmin)
    _requantize_k4(x, y, L, 31)
    for j in range(32):
        y[16 + j] = 0
    m1 = 1
    m2 = 2
    for n in range(0, QK_K, 64):
        ql = 48 + n // 2
        for j in range(32):
            l1 = np.int32(L[n + j])
            if l1 > 15:
                l1 -= 16
                y[16 + j] |= m1
            l2 = np.int32(L[n + j + 32])
            if l2 > 15:
                l2 -= 16
                y[16 + j] |= m2
            y[ql + j] = l1 | (l2 << 4)
        m1 <<= 2
        m2 <<= 2


@njit(parallel=True, **_jit)
def quantize_q5_K(x, qw, out):
    n_rows, n = x.shape
    for r in prange(n_rows):
        L = np.empty(QK_K, dtype=np.uint8)
        tmp = np.empty(8 * QKX_BATCH, dtype=np.float32)
        weights = np.empty(32, dtype=np.float32)
        sw = np.empty(QK_K // 32, dtype=np.float32)
        scales = np.empty(QK_K // 32, dtype=np.float32)
        mins = np.empty(QK_K // 32, dtype=np.float32)
        Ls = np.empty(QK_K // 32, dtype=np.uint8)
        Lm = np.empty(QK_K // 32, dtype=np.uint8)
        for i in range(n // QK_K):
            _quantize_block_q5_K(x[r, QK_K * i:QK_K * (i + 1)], _block_qw(qw, i),
                                 out[r, BYTES_Q5_K * i:BYTES_Q5_K * (i + 1)], L, tmp, weights, sw, scales, mins,
                                 Ls, Lm)


@njit(parallel=True, **_jit)
def dequantize_q5_K(data, out):
    n_rows, n = out.shape
    for r in prange(n_rows):
        for i in range(n // QK_K):
            b = data[r, BYTES_Q5_K * i:BYTES_Q5_K * (i + 1)]
            y = out[r, QK_K * i:QK_K * (i + 1)]
            d = get_f16(b, 0)
            dmin = get_f16(b, 2)
            q = b[4:16]
            for k in range(4):
                sc, m = get_scale_min_k4(2 * k, q)
                d1 = d * f32(sc)
                m1 = dmin * f32(m)
                sc, m = get_scale_min_k4(2 * k + 1, q)
                d2 = d * f32(sc)
                m2 = dmin * f32(m)
                u1 = 1 << (2 * k)
                u2 = 2 << (2 * k)
                for l in range(32):
                    v = b[48 + 32 * k + l]
                    h = b[16 + l]
                    y[64 * k + l] = d1 * f32((v & 0xF) + (16 if h & u1 else 0)) - m1
                    y[64 * k + 32 + l] = d2 * f32((v >> 4) + (16 if h & u2 else 0)) - m2


# ---------------------------------------------------------------------------------------------
# Q3_K: x = d * (scale6 - 32) * (q - 4), q 3-bit (2 low bits in qs, high bit in hmask)


@njit(inline="always", **_jit)
def _q3_scale(y, j):
    """Signed 6-bit scale of sub-block ``j`` from the 12 bytes at ``y[96:108]``."""
    if j < 8:
        sc = np.int32(y[96 + j]) & 0xF
    else:
        sc = np.int32(y[96 + j - 8]) >> 4
    return (sc | (((np.int32(y[96 + 8 + j % 4]) >> (2 * (j // 4))) & 3) << 4)) - 32


@njit(**_jit)
def _finish_block_q3_K(x, y, L, Ls, d_block):
    """Pack the 6-bit scales ``Ls`` (0..63), store d, requantize and pack the 3-bit levels."""
    for j in range(12):
        y[96 + j] = 0
    for j in range(QK_K // 16):
        l = np.int32(Ls[j])
        if j < 8:
            y[96 + j] = l & 0xF
        else:
            y[96 + j - 8] |= (l & 0xF) << 4
        l >>= 4
        y[96 + 8 + j % 4] |= (l << (2 * (j // 4))) & 0xFF
    put_f16(y, 108, d_block)
    d_all = get_f16(y, 108)
    for j in range(QK_K // 16):
        d = d_all * f32(_q3_scale(y, j))
        if d == _F0:
            continue
        for ii in range(16):
            L[16 * j + ii] = max(-4, min(3, nearest_int(x[16 * j + ii] / d))) + 4
    for j in range(32):
        y[j] = 0
    for b in range(8):  # bit b of hmask[m] is the high bit of weight 32*b + m
        for m in range(32):
            lv = np.int32(L[32 * b + m])
            hi = np.int32(lv > 3)
            y[m] |= hi << b
            L[32 * b + m] = lv - 4 * hi
    for j in range(0, QK_K, 128):
        q = 32 + j // 4
        for l in range(32):
            y[q + l] = L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4) | (L[j + l + 96] << 6)


@njit(**_jit)
def _quantize_block_q3_K(x, qw, y, L, Ls, weight, sw, scales, tmp):
    if qw.shape[0] == 0:  # quantize_row_q3_K_ref
        max_scale = _F0
        amax = _F0
        for j in range(QK_K // 16):
            scales[j] = make_q3_quants(16, 4, x[16 * j:16 * j + 16], L[16 * j:16 * j + 16], True,
                                       tmp)
            scale = abs(scales[j])
            if scale > amax:
                amax = scale
                max_scale = scales[j]
        if max_scale != _F0:
            iscale = f32(-32.0) / max_scale
            for j in range(QK_K // 16):
                l = np.int32(np.int8(nearest_int(iscale * scales[j])))
                Ls[j] = max(-32, min(31, l)) + 32
            d_block = _F1 / iscale
        else:
            for j in range(QK_K // 16):
                Ls[j] = 0
            d_block = _F0
    else:  # quantize_row_q3_K_impl
        sumx2 = _F0
        for j in range(QK_K):
            sumx2 += x[j] * x[j]
        sigma2 = f32(2.0) * sumx2 / f32(QK_K)
        for j in range(QK_K // 16):
            for l in range(16):
                xl = x[16 * j + l]
                weight[l] = qw[16 * j + l] * np.sqrt(sigma2 + xl * xl)
            sumw = _F0
            for l in range(16):
                sumw += weight[l]
            sw[j] = sumw
            scales[j] = make_qx_quants(16, 4, x[16 * j:16 * j + 16], L[16 * j:16 * j + 16], 1, weight,
                                       tmp)
        d_block = make_qx_quants(QK_K // 16, 32, scales, Ls, 1, sw, tmp)
    _finish_block_q3_K(x, y, L, Ls, d_block)


@njit(parallel=True, **_jit)
def quantize_q3_K(x, qw, out):
    n_rows, n = x.shape
    for r in prange(n_rows):
        L = np.empty(QK_K, dtype=np.int8)
        Ls = np.empty(QK_K // 16, dtype=np.int8)
        weight = np.empty(16, dtype=np.float32)
        sw = np.empty(QK_K // 16, dtype=np.float32)
        scales = np.empty(QK_K // 16, dtype=np.float32)
        tmp = np.empty(2 * 16 + 3 * QX_TRIALS, dtype=np.float32)
        for i in range(n // QK_K):
            _quantize_block_q3_K(x[r, QK_K * i:QK_K * (i + 1)], _block_qw(qw, i),
                                 out[r, BYTES_Q3_K * i:BYTES_Q3_K * (i + 1)], L, Ls, weight, sw, scales, tmp)


@njit(parallel=True, **_jit)
def dequantize_q3_K(data, out):
    n_rows, n = out.shape
    for r in prange(n_rows):
        for i in range(n // QK_K):
            b = data[r, BYTES_Q3_K * i:BYTES_Q3_K * (i + 1)]
            y = out[r, QK_K * i:QK_K * (i + 1)]
            d_all = get_f16(b, 108)
            for half in range(2):
                for k in range(4):
                    shift = 2 * k
                    m = 1 << (4 * half + k)
                    for s in range(2):
                        dl = d_all * f32(_q3_scale(b, 8 * half + 2 * k + s))
                        o = 128 * half + 32 * k + 16 * s
                        q = 32 + 32 * half + 16 * s
                        for l in range(16):
                            v = np.int32((b[q + l] >> shift) & 3) - (0 if b[16 * s + l] & m else 4)
                            y[o + l] = dl * f32(v)


# ---------------------------------------------------------------------------------------------
# Q2_K: x = d * sc4 * q - dmin * m4, q 2-bit, 16 sub-blocks of 16


@njit(**_jit)
def _finish_block_q2_K(x, y, L):
    """Requantize from the stored d/dmin/scales (bytes 0..16, 80..84) and pack the 2-bit levels."""
    d_all = get_f16(y, 80)
    m_all = get_f16(y, 82)
    for j in range(QK_K // 16):
        d = d_all * f32(y[j] & 0xF)
        if d == _F0:
            continue
        dm = m_all * f32(y[j] >> 4)
        for ii in range(16):
            L[16 * j + ii] = max(0, min(3, nearest_int((x[16 * j + ii] + dm) / d)))
    for j in range(0, QK_K, 128):
        q = 16 + j // 4
        for l in range(32):
            y[q + l] = L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4) | (L[j + l + 96] << 6)


@njit(**_jit)
def _quantize_block_q2_K(x, qw, y, L, tmp, weights, sw, scales, mins, Ls, Lm):
    q4scale = f32(15.0)
    if qw.shape[0] == 0:  # quantize_row_q2_K_ref
        max_scale = _F0
        max_min = _F0
        for j in range(QK_K // 16):
            for l in range(16):
                weights[l] = abs(x[16 * j + l])
            scales[j], mins[j] = make_qkx2_quants(16, 3, x[16 * j:16 * j + 16], weights,
                                                  L[16 * j:16 * j + 16], tmp,
                                                  f32(-0.5), f32(0.1), 15, True)
            if scales[j] > max_scale:
                max_scale = scales[j]
            if mins[j] > max_min:
                max_min = mins[j]
        if max_scale > _F0:
            iscale = q4scale / max_scale
            for j in range(QK_K // 16):
                y[j] = nearest_int(iscale * scales[j]) & 0xFF
            put_f16(y, 80, max_scale / q4scale)
        else:
            for j in range(QK_K // 16):
                y[j] = 0
            put_f16(y, 80, _F0)
        if max_min > _F0:
            iscale = q4scale / max_min
            for j in range(QK_K // 16):
                y[j] |= (nearest_int(iscale * mins[j]) << 4) & 0xFF
            put_f16(y, 82, max_min / q4scale)
        else:
            put_f16(y, 82, _F0)
    else:  # quantize_row_q2_K_impl
        sumx2 = _F0
        for j in range(QK_K):
            sumx2 += x[j] * x[j]
        sigma2 = sumx2 / f32(QK_K)
        for j in range(QK_K // 16):
            for l in range(16):
                xl = x[16 * j + l]
                weights[l] = qw[16 * j + l] * np.sqrt(sigma2 + xl * xl)
            sumw = _F0
            for l in range(16):
                sumw += weights[l]
            sw[j] = sumw
            scales[j], mins[j] = make_qkx3_quants(16, 3, x[16 * j:16 * j + 16], weights,
                                                  L[16 * j:16 * j + 16], tmp,
                                                  f32(-0.9), f32(0.05), 36, False)
        dm = make_qp_quants(QK_K // 16, 15, scales, Ls, sw)
        mm = make_qp_quants(QK_K // 16, 15, mins, Lm, sw)
        put_f16(y, 80, dm)
        put_f16(y, 82, mm)
        for j in range(QK_K // 16):
            y[j] = (np.int32(Ls[j]) | (np.int32(Lm[j]) << 4)) & 0xFF
    _finish_block_q2_K(x, y, L)


@njit(parallel=True, **_jit)
def quantize_q2_K(x, qw, out):
    n_rows, n = x.shape
    for r in prange(n_rows):
        L = np.empty(QK_K, dtype=np.uint8)
        tmp = np.empty(8 * QKX_BATCH, dtype=np.float32)
        weights = np.empty(16, dtype=np.float32)
        sw = np.empty(QK_K // 16, dtype=np.float32)
        scales = np.empty(QK_K // 16, dtype=np.float32)
        mins = np.empty(QK_K // 16, dtype=np.float32)
        Ls = np.empty(QK_K // 16, dtype=np.uint8)
        Lm = np.empty(QK_K // 16, dtype=np.uint8)
        for i in range(n // QK_K):
            _quantize_block_q2_K(x[r, QK_K * i:QK_K * (i + 1)], _block_qw(qw, i),
                                 out[r, BYTES_Q2_K * i:BYTES_Q2_K * (i + 1)], L, tmp, weights, sw, scales, mins,
                                 Ls, Lm)


@njit(parallel=True, **_jit)
def dequantize_q2_K(data, out):
    n_rows, n = out.shape
    for r in prange(n_rows):
        for i in range(n // QK_K):
            b = data[r, BYTES_Q2_K * i:BYTES_Q2_K * (i + 1)]
            y = out[r, QK_K * i:QK_K * (i + 1)]
            d = get_f16(b, 80)
            dmin = get_f16(b, 82)
            for j in range(QK_K // 16):  # sub-block j: 16 weights, bits 2*((j//2)%4) of qs
                sc = b[j]
                dl = d * f32(sc & 0xF)
                ml = dmin * f32(sc >> 4)
                shift = 2 * ((j // 2) % 4)
                q = 16 + 32 * (j // 8) + 16 * (j % 2)
                for l in range(16):
                    y[16 * j + l] = dl * f32((b[q + l] >> shift) & 3) - ml


register(QT.Q2_K, quantize=quantize_q2_K, dequantize=dequantize_q2_K)
register(QT.Q3_K, quantize=quantize_q3_K, dequantize=dequantize_q3_K)
register(QT.Q4_K, quantize=quantize_q4_K, dequantize=dequantize_q4_K)
register(QT.Q6_K, quantize=quantize_q6_K, dequantize=dequantize_q6_K)
register(QT.Q5_K, quantize=quantize_q5_K, dequantize=dequantize_q5_K)
