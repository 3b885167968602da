"""Legacy 32-wide block quants: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and MXFP4 (ggml-quants.c).

Block layouts (ggml-common.h, little-endian, fp16 scales)::

    Q4_0  d:f16 | qs[16]            x = (q - 8) * d          q in 0..15, qs[j] = q[j] | q[j+16] << 4
    Q4_1  d:f16 m:f16 | qs[16]      x = q * d + m
    Q5_0  d:f16 | qh:u32 | qs[16]   x = (q - 16) * d         bit 4 of q[j] is bit j of qh
    Q5_1  d:f16 m:f16 | qh:u32 | qs[16]   x = q * d + m
    Q8_0  d:f16 | qs:i8[32]         x = q * d
    MXFP4 e:e8m0 | qs[16]           x = kvalues_mxfp4[q] * 2**(e - 128)

Without importance weights ggml uses the ``quantize_row_*_ref`` functions; with them, the
``quantize_row_*_impl`` ones (:mod:`.scale_search`'s ``make_qx_quants`` / ``make_qkx3_quants``
under weights ``qw[j] * sqrt(sigma2 + x[j]**2)``). Q8_0 and MXFP4 ignore importance weights.

Everything is float32 in the C order of operations. C's float -> small-int casts
(``(int8_t)(x + 8.5f)``) are emulated as x86 does them: truncate to int32 (INT_MIN for NaN and
out-of-range values, which happen when ``1/d`` overflows for subnormal blocks), keep the low byte.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from dynsearch.kernels._fp import bits_f32, f32, get_f16, get_u32, put_f16, put_u32, roundf
from dynsearch.kernels.registry import register
from dynsearch.kernels.scale_search import QKX_BATCH, QX_TRIALS, make_qkx3_quants, make_qx_quants
from dynsearch.kernels.types import QT, type_info

QK = type_info(QT.Q4_0).block_size  # elements per block, every type here (32)
# Bytes per block of each type, from the type table.
BYTES_Q4_0, BYTES_Q4_1, BYTES_Q5_0, BYTES_Q5_1, BYTES_Q8_0, BYTES_MXFP4 = (
    type_info(t).type_size for t in (QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.MXFP4))
_F0 = f32(0.0)
_F1 = f32(1.0)
_F05 = f32(0.5)
_I32_LIMIT = f32(2147483648.0)
_FLT_MAX = f32(np.finfo(np.float32).max)
KVALUES_MXFP4 = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=np.int8)
_KVALUES_MXFP4_F32 = KVALUES_MXFP4.astype(np.float32)


# ----------------------------------------------------------------------------- scalar helpers


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _cvt_i32(v):
    """C float -> int conversion as x86's cvttss2si: truncation, INT_MIN for NaN / out of range."""
    if abs(v) < _I32_LIMIT:
        return np.int32(v)
    return np.int32(-2147483648)


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _cvt_i8(v):
    """C ``(int8_t)v``: the low byte of the int32 conversion, sign-extended."""
    return ((_cvt_i32(v) & np.int32(0xFF)) ^ np.int32(0x80)) - np.int32(0x80)


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def e8m0_to_fp32_half(e):
    """ggml_e8m0_to_fp32_half: 2**(e - 128) (subnormal patterns for e < 2)."""
    e = np.uint32(e)
    if e < np.uint32(2):
        return bits_f32(np.uint32(0x00200000) << e)
    return bits_f32((e - np.uint32(1)) << np.uint32(23))


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _row_sigma2(x):
    """``sum(x*x)/n`` accumulated in order, as the *_impl functions do."""
    s = _F0
    for j in range(x.size):
        s += x[j] * x[j]
    return s / f32(x.size)


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _block_weights(xb, qwb, sigma2, weight):
    for j in range(QK):
        weight[j] = qwb[j] * np.sqrt(sigma2 + xb[j] * xb[j])


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _put_nibbles(y, o, L):
    for j in range(16):
        y[o + j] = np.uint8((L[j] & 0x0F) | ((L[j + 16] & 0x0F) << 4))


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _qh_bits(L):
    """Bit 4 of each 5-bit level, packed: bit j of qh is bit 4 of L[j]."""
    qh = np.uint32(0)
    for j in range(QK):
        qh |= np.uint32((L[j] >> 4) & 1) << np.uint32(j)
    return qh


# ----------------------------------------------------------------------------- per-row quantizers

@njit(cache=True, nogil=True, error_model="numpy")
def quantize_row_q4_0_ref(x, y):
    for ib in range(x.size // QK):
        xb = x[ib * QK:(ib + 1) * QK]
        o = ib * BYTES_Q4_0
        amax = _F0
        mx = _F0
        for j in range(QK):
            if amax < abs(xb[j]):
                amax = abs(xb[j])
                mx = xb[j]
        d = mx / f32(-8.0)
        id_ = _F1 / d if d != _F0 else _F0
        put_f16(y, o, d)
        for j in range(16):
            q0 = min(15, _cvt_i8(xb[j] * id_ + f32(8.5)))
            q1 = min(15, _cvt_i8(xb[j + 16] * id_ + f32(8.5)))
            y[o + 2 + j] = np.uint8((q0 & 0xFF) | ((q1 << 4) & 0xFF))


@njit(cache=True, nogil=True, error_model="numpy")
def quantize_row_q4_0_impl(x, qw, y, weight, L, work):
    sigma2 = _row_sigma2(x)
    for ib in range(x.size // QK):
        xb = x[ib * QK:(ib + 1) * QK]
        _block_weights(xb, qw[ib * QK:(ib + 1) * QK], sigma2, weight)
        d = make_qx_quants(QK, 8, xb, L, 1, weight, work)
        o = ib * BYTES_Q4_0
        put_f16(y, o, d)
        _put_nibbles(y, o + 2, L)


@njit(cache=True, nogil=True, error_model="numpy")
def quantize_row_q4_1_ref(x, y):
    for ib in range(x.size // QK):
        xb = x[ib * QK:(ib + 1) * QK]
        o = ib * BYTES_Q4_1
        mn = _FLT_MAX
        mx = -_FLT_MAX
        for j in range(QK):
            mn = xb[j] if xb[j] < mn else mn
            mx = xb[j] if xb[j] > mx else mx
        d = (mx - mn) / f32(15.0)
        id_ = _F1 / d if d != _F0 else _F0
        put_f16(y, o, d)
        put_f16(y, o + 2, mn)
        for j in range(16):
            q0 = min(15, _cvt_i8((xb[j] - mn) * id_ + _F05))
            q1 = min(15, _cvt_i8((xb[j + 16] - mn) * id_ + _F05))
            y[o + 4 + j] = np.uint8((q0 & 0xFF) | ((q1 << 4) & 0xFF))


@njit(cache=True, nogil=True, error_model="numpy")
def quantize_row_q4_1_impl(x, qw, y, weight, L, tmp):
    sigma2 = _row_sigma2(x)
    for ib in range(x.size // QK):
        xb = x[ib * QK:(ib + 1) * QK]
        _block_weights(xb, qw[ib * QK:(ib + 1) * QK], sigma2, weight)
        d, the_min = make_qkx3_quants(QK, 15, xb, weight, L, tmp, f32(-0.9), f32(0.05), 36, False)
        o = ib * BYTES_Q4_1
        put_f16(y, o, d)
        put_f16(y, o + 2, -the_min)
        _put_nibbles(y, o + 4, L)


@njit(cache=True, nogil=True, error_model="numpy")
def quantize_row_q5_0_ref(x, y):
    for ib in range(x.size // QK):
        xb = x[ib * QK:(ib + 1) * QK]
        o = ib * BYTES_Q5_0
        amax = _F0
        mx = _F0
        for j in range(QK):
            if amax < abs(xb[j]):
                amax = abs(xb[j])
                mx = xb[j]
        d = mx / f32(-16.0)
        id_ = _F1 / d if d != _F0 else _F0
        put_f16(y, o, d)
        qh = np.uint32(0)
        for j in range(16):
            q0 = min(31, _cvt_i8(xb[j] * id_ + f32(16.5)))
            q1 = min(31, _cvt_i8(xb[j + 16] * id_ + f32(16.5)))
            y[o + 6 + j] = np.uint8((q0 & 0x0F) | ((q1 & 0x0F) << 4))
            qh |= (np.uint32((q0 >> 4) & 1) << np.uint32(j)) | (np.uint32((q1 >> 4) & 1) << np.uint32(j + 16))
        put_u32(y, o + 2, qh)


@njit(cache=True, nogil=True, error_model="numpy")
def quantize_row_q5_0_impl(x, qw, y, weight, L, work):
    sigma2 = _row_sigma2(x)
    for ib in range(x.size // QK):
        xb = x[ib * QK:(ib + 1) * QK]
        _block_weights(xb, qw[ib * QK:(ib + 1) * QK], sigma2, weight)
        d = make_qx_quants(QK, 16, xb, L, 1, weight, work)
        o = ib * BYTES_Q5_0
        put_f16(y, o, d)
        put_u32(y, o + 2, _qh_bits(L))
        _put_nibbles(y, o + 6, L)


@njit(cache=True, nogil=True, error_model="numpy")
def quantize_row_q5_1_impl(x, qw, y, weight, L, tmp):
    sigma2 = _row_sigma2(x)
    for ib in range(x.size // QK):
        xb = x[ib * QK:(ib + 1) * QK]
        _block_weights(xb, qw[ib * QK:(ib + 1) * QK], sigma2, weight)
        d, the_min = make_qkx3_quants(QK, 31, xb, weight, L, tmp, f32(-0.9), f32(0.05), 36, False)
        o = ib * BYTES_Q5_1
        put_f16(y, o, d)
        put_f16(y, o + 2, -the_min)
        put_u32(y, o + 4, _qh_bits(L))
        _put_nibbles(y, o + 8, L)


@njit(cache=True, nogil=True, error_model="numpy")
def quantize_row_q5_1_ref(x, y):
    for ib in range(x.size // QK):
        xb = x[ib * QK:(ib + 1) * QK]
        o = ib * BYTES_Q5_1
        mn = _FLT_MAX
        mx = -_FLT_MAX
        for j in range(QK):
            mn = xb[j] if xb[j] < mn else mn
            mx = xb[j] if xb[j] > mx else mx
        d = (mx - mn) / f32(31.0)
        id_ = _F1 / d if d != _F0 else _F0
        put_f16(y, o, d)
        put_f16(y, o + 2, mn)
        qh = np.uint32(0)
        for j in range(16):  # (uint8_t)(x0 + 0.5f): the low byte, no clamp
            q0 = _cvt_i32((xb[j] - mn) * id_ + _F05)
            q1 = _cvt_i32((xb[j + 16] - mn) * id_ + _F05)
            y[o + 8 + j] = np.uint8((q0 & 0x0F) | ((q1 & 0x0F) << 4))
            qh |= (np.uint32((q0 >> 4) & 1) << np.uint32(j)) | (np.uint32((q1 >> 4) & 1) << np.uint32(j + 16))
        put_u32(y, o + 4, qh)


@njit(cache=True, nogil=True, error_model="numpy")
def quantize_row_q8_0_ref(x, y):
    for ib in range(x.size // QK):
        xb = x[ib * QK:(ib + 1) * QK]
        o = ib * BYTES_Q8_0
        amax = _F0
        for j in range(QK):
            a = abs(xb[j])
            amax = amax if amax > a else a
        d = amax / f32(127.0)
        id_ = _F1 / d if d != _F0 else _F0
        put_f16(y, o, d)
        for j in range(QK):
            y[o + 2 + j] = np.uint8(_cvt_i32(roundf(xb[j] * id_)) & 0xFF)


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def best_index_mxfp4(x, e, kv):
    best = 0
    best_err = abs(kv[0] * e - x)
    for i in range(1, 16):
        err = abs(kv[i] * e - x)
        if err < best_err:
            best = i
            best_err = err
    return best


@njit(cache=True, nogil=True, error_model="numpy")
def quantize_row_mxfp4_ref(x, y, kv):
    for ib in range(x.size // QK):
        xb = x[ib * QK:(ib + 1) * QK]
        o = ib * BYTES_MXFP4
        amax = _F0
        for j in range(QK):
            if amax < abs(xb[j]):
                amax = abs(xb[j])
        e = 0
        if amax > _F0:  # (uint8_t)(floorf(log2f(amax)) - 2 + 127)
            e = _cvt_i32(np.floor(math.log2(amax)) - f32(2.0) + f32(127.0)) & 0xFF
        d = e8m0_to_fp32_half(e)
        y[o] = np.uint8(e)
        for j in range(16):
            q0 = best_index_mxfp4(xb[j], d, kv)
            q1 = best_index_mxfp4(xb[j + 16], d, kv)
            y[o + 1 + j] = np.uint8(q0 | (q1 << 4))


# ----------------------------------------------------------------------------- row drivers

@njit(cache=True, nogil=True, error_model="numpy", parallel=True)
def quantize_q4_0(x, qw, out):
    for r in prange(x.shape[0]):
        if qw.size:
            quantize_row_q4_0_impl(x[r], qw, out[r], np.empty(QK, np.float32), np.empty(QK, np.int8),
                                   np.empty(QK + 3 * QX_TRIALS, np.float32))
        else:
            quantize_row_q4_0_ref(x[r], out[r])


@njit(cache=True, nogil=True, error_model="numpy", parallel=True)
def quantize_q4_1(x, qw, out):
    for r in prange(x.shape[0]):
        if qw.size:
            quantize_row_q4_1_impl(x[r], qw, out[r], np.empty(QK, np.float32), np.empty(QK, np.uint8),
                                   np.empty(8 * QKX_BATCH, np.float32))
        else:
            quantize_row_q4_1_ref(x[r], out[r])


@njit(cache=True, nogil=True, error_model="numpy", parallel=True)
def quantize_q5_0(x, qw, out):
    for r in prange(x.shape[0]):
        if qw.size:
            quantize_row_q5_0_impl(x[r], qw, out[r], np.empty(QK, np.float32), np.empty(QK, np.int8),
                                   np.empty(QK + 3 * QX_TRIALS, np.float32))
        else:
            quantize_row_q5_0_ref(x[r], out[r])


@njit(cache=True, nogil=True, error_model="numpy", parallel=True)
def quantize_q5_1(x, qw, out):
    for r in prange(x.shape[0]):
        if qw.size:
            quantize_row_q5_1_impl(x[r], qw, out[r], np.empty(QK, np.float32), np.empty(QK, np.uint8),
                                   np.empty(8 * QKX_BATCH, np.float32))
        else:
            quantize_row_q5_1_ref(x[r], out[r])


@njit(cache=True, nogil=True, error_model="numpy", parallel=True)
def quantize_q8_0(x, qw, out):
    for r in prange(x.shape[0]):
        quantize_row_q8_0_ref(x[r], out[r])


@njit(cache=True, nogil=True, error_model="numpy", parallel=True)
def quantize_mxfp4(x, qw, out):
    kv = _KVALUES_MXFP4_F32
    for r in prange(x.shape[0]):
        quantize_row_mxfp4_ref(x[r], out[r], kv)


# ----------------------------------------------------------------------------- dequantizers
# The element loops run to ``half = n // nb // 2`` (16, but opaque to the compiler): a loop with
# a known trip count of 16 is fully unrolled and then left scalar, while this one is vectorized.

@njit(cache=True, nogil=True, parallel=True, error_model="numpy")
def dequantize_q4_0(data, out):
    n = out.shape[1]
    nb = n // QK
    half = n // nb // 2
    for r in prange(out.shape[0]):
        y, v = data[r], out[r]
        for ib in range(nb):
            o = ib * BYTES_Q4_0
            d = get_f16(y, o)
            for j in range(half):
                q = np.int32(y[o + 2 + j])
                v[ib * QK + j] = f32((q & np.int32(0x0F)) - np.int32(8)) * d
                v[ib * QK + j + 16] = f32((q >> np.int32(4)) - np.int32(8)) * d


@njit(cache=True, nogil=True, parallel=True, error_model="numpy")
def dequantize_q4_1(data, out):
    n = out.shape[1]
    nb = n // QK
    half = n // nb // 2
    for r in prange(out.shape[0]):
        y, v = data[r], out[r]
        for ib in range(nb):
            o = ib * BYTES_Q4_1
            d = get_f16(y, o)
            m = get_f16(y, o + 2)
            for j in range(half):
                q = np.int32(y[o + 4 + j])
                v[ib * QK + j] = f32(q & np.int32(0x0F)) * d + m
                v[ib * QK + j + 16] = f32(q >> np.int32(4)) * d + m


@njit(cache=True, nogil=True, parallel=True, error_model="numpy")
def dequantize_q5_0(data, out):
    n = out.shape[1]
    nb = n // QK
    half = n // nb // 2
    for r in prange(out.shape[0]):
        y, v = data[r], out[r]
        for ib in range(nb):
            o = ib * BYTES_Q5_0
            d = get_f16(y, o)
            qh = get_u32(y, o + 2)
            for j in range(half):
                q = np.int32(y[o + 6 + j])
                h0 = np.int32((qh >> np.uint32(j)) & np.uint32(1)) << np.int32(4)
                h1 = np.int32((qh >> np.uint32(j + 16)) & np.uint32(1)) << np.int32(4)
                v[ib * QK + j] = f32(((q & np.int32(0x0F)) | h0) - np.int32(16)) * d
                v[ib * QK + j + 16] = f32(((q >> np.int32(4)) | h1) - np.int32(16)) * d


@njit(cache=True, nogil=True, parallel=True, error_model="numpy")
def dequantize_q5_1(data, out):
    n = out.shape[1]
    nb = n // QK
    half = n // nb // 2
    for r in prange(out.shape[0]):
        y, v = data[r], out[r]
        for ib in range(nb):
            o = ib * BYTES_Q5_1
            d = get_f16(y, o)
            m = get_f16(y, o + 2)
            qh = get_u32(y, o + 4)
            for j in range(half):
                q = np.int32(y[o + 8 + j])
                h0 = np.int32((qh >> np.uint32(j)) & np.uint32(1)) << np.int32(4)
                h1 = np.int32((qh >> np.uint32(j + 16)) & np.uint32(1)) << np.int32(4)
                v[ib * QK + j] = f32((q & np.int32(0x0F)) | h0) * d + m
                v[ib * QK + j + 16] = f32((q >> np.int32(4)) | h1) * d + m


@njit(cache=True, nogil=True, parallel=True, error_model="numpy")
def dequantize_q8_0(data, out):
    n = out.shape[1]
    nb = n // QK
    half = n // nb // 2
    for r in prange(out.shape[0]):
        y, v = data[r], out[r]
        qs = y.view(np.int8)
        for ib in range(nb):
            o = ib * BYTES_Q8_0
            d = get_f16(y, o)
            for j in range(2 * half):
                v[ib * QK + j] = f32(qs[o + 2 + j]) * d


@njit(cache=True, nogil=True, parallel=True, error_model="numpy")
def dequantize_mxfp4(data, out):
    kv = _KVALUES_MXFP4_F32
    n = out.shape[1]
    nb = n // QK
    half = n // nb // 2
    for r in prange(out.shape[0]):
        y, v = data[r], out[r]
        for ib in range(nb):
            o = ib * BYTES_MXFP4
            d = e8m0_to_fp32_half(y[o])
            for j in range(half):
                q = y[o + 1 + j]
                v[ib * QK + j] = kv[q & np.uint8(0x0F)] * d
                v[ib * QK + j + 16] = kv[q >> np.uint8(4)] * d


register(QT.Q4_0, quantize=quantize_q4_0, dequantize=dequantize_q4_0)
register(QT.Q4_1, quantize=quantize_q4_1, dequantize=dequantize_q4_1)
register(QT.Q5_0, quantize=quantize_q5_0, dequantize=dequantize_q5_0)
register(QT.Q5_1, quantize=quantize_q5_1, dequantize=dequantize_q5_1)
register(QT.Q8_0, quantize=quantize_q8_0, dequantize=dequantize_q8_0, uses_imatrix=False)
register(QT.MXFP4, quantize=quantize_mxfp4, dequantize=dequantize_mxfp4, uses_imatrix=False)
