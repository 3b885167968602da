"""Legacy 32-wide block quants: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and MXFP4 (ggml-quants.c).

Block layouts (ggml-common.h, little-endian, fp16 scales)::

    Q4_0  d:f16 | qs[16]            x = (q - 8) * d          q in 0..15, qs[j] = q[j] | q[j+16] << 4
    Q4_1  d:f16 m:f16 | qs[16]      x = q * d + m
    Q5_0  d:f16 | qh:u32 | qs[16]   x = (q - 16) * d         bit 4 of q[j] is bit j of qh
    Q5_1  d:f16 m:f16 | qh:u32 | qs[16]   x = q * d + m
    Q8_0  d:f16 | qs:i8[32]         x = q * d
    MXFP4 e:e8m0 | qs[16]           x = kvalues_mxfp4[q] * 2**(e - 128)

Without importance weights ggml uses the ``quantize_row_*_ref`` functions; with them, the
``quantize_row_*_impl`` ones (``make_qx_quants`` / ``make_qkx3_quants`` under weights
``qw[j] * sqrt(sigma2 + x[j]**2)``). Q8_0 and MXFP4 ignore importance weights.

Everything is float32 in the C order of operations. C's float -> small-int casts
(``(int8_t)(x + 8.5f)``) are emulated as x86 does them: truncate to int32 (INT_MIN for NaN and
out-of-range values, which happen when ``1/d`` overflows for subnormal blocks), keep the low byte.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from numba import njit, prange

from dynsearch.kernels._fp import f32, bits_f32, fp16_to_fp32, fp32_to_fp16, nearest_int, roundf
from dynsearch.kernels.registry import register
from dynsearch.kernels.types import QT

QK = 32  # elements per block, every type here
GROUP_MAX_EPS = f32(1e-15)
_F0 = f32(0.0)
_F1 = f32(1.0)
_F05 = f32(0.5)
_I32_LIMIT = f32(2147483648.0)
_FLT_MAX = f32(np.finfo(np.float32).max)
KVALUES_MXFP4 = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=np.int8)
_KVALUES_MXFP4_F32 = KVALUES_MXFP4.astype(np.float32)
_WORK = QK + 3 * 18  # scratch floats of make_qx_quants
LANES = 8  # blocks that make_qkx3_quants searches side by side (one AVX2 vector of float32)


class _Qkx3Scratch(NamedTuple):
    X: np.ndarray  # (QK, LANES) float32 blocks, one per column
    W: np.ndarray  # (QK, LANES) float32 importance weights
    L: np.ndarray  # (QK, LANES) uint8 levels
    Laux: np.ndarray  # (QK, LANES) uint8
    d: np.ndarray  # (LANES,) float32 scales
    m: np.ndarray  # (LANES,) float32 -mins
    st: np.ndarray  # (13, LANES) float32 per-block search state
    Lb: np.ndarray  # (QK,) uint8 levels of one block


@njit(cache=True, nogil=True)
def _qkx3_scratch():
    return _Qkx3Scratch(np.empty((QK, LANES), np.float32), np.empty((QK, LANES), np.float32),
                        np.empty((QK, LANES), np.uint8), np.empty((QK, LANES), np.uint8),
                        np.empty(LANES, np.float32), np.empty(LANES, np.float32),
                        np.empty((13, LANES), np.float32), np.empty(QK, np.uint8))


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
def _put_f16(y, o, h):
    y[o] = np.uint8(h & np.uint16(0xFF))
    y[o + 1] = np.uint8(h >> np.uint16(8))


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _get_f16(y, o):
    return fp16_to_fp32(np.uint16(y[o]) | (np.uint16(y[o + 1]) << np.uint16(8)))


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _put_u32(y, o, v):
    for k in range(4):
        y[o + k] = np.uint8((v >> np.uint32(8 * k)) & np.uint32(0xFF))


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _get_u32(y, o):
    return (np.uint32(y[o]) | (np.uint32(y[o + 1]) << np.uint32(8))
            | (np.uint32(y[o + 2]) << np.uint32(16)) | (np.uint32(y[o + 3]) << np.uint32(24)))


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def e8m0_to_fp32_half(e):
    """ggml_e8m0_to_fp32_half: 2**(e - 128) (subnormal patterns for e < 2)."""
    e = np.uint32(e)
    if e < np.uint32(2):
        return bits_f32(np.uint32(0x00200000) << e)
    return bits_f32((e - np.uint32(1)) << np.uint32(23))


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _weight(qw, x, i, rmse_type):
    """The per-element weight of make_qx_quants: ``qw ? qw[i] : f(rmse_type, x[i])``."""
    if qw.size:
        return qw[i]
    if rmse_type == 1:
        return x[i] * x[i]
    if rmse_type == 2:
        return _F1
    if rmse_type == 3:
        return abs(x[i])
    return np.sqrt(abs(x[i]))


# ----------------------------------------------------------------------------- shared searches

@njit(cache=True, nogil=True, error_model="numpy")
def make_qx_quants(n, nmax, x, L, rmse_type, qw, work):
    """ggml's make_qx_quants: symmetric scale search; ``qw`` empty means NULL. Fills int8 ``L``
    with levels in 0..2*nmax-1 and returns the scale (float32).

    ``work`` is float32 scratch of at least ``n + 3*18`` entries. The 18 trial scales of the C
    loop are evaluated side by side (each sum still accumulated in C's element order, so the
    result is bit-identical) and then compared in C's order.
    """
    mx = _F0
    amax = _F0
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            mx = x[i]
    if amax < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return _F0
    fnmax = f32(nmax)
    iscale = f32(-fnmax) / mx
    if rmse_type == 0:
        for i in range(n):
            L[i] = nmax + max(-nmax, min(nmax - 1, nearest_int(iscale * x[i])))
        return _F1 / iscale
    return_early = False
    if rmse_type < 0:
        rmse_type = -rmse_type
        return_early = True
    w = work[:n]
    for i in range(n):
        w[i] = _weight(qw, x, i, rmse_type)
    sumlx = _F0
    suml2 = _F0
    for i in range(n):
        l = max(-nmax, min(nmax - 1, nearest_int(iscale * x[i])))
        L[i] = l + nmax
        fl = f32(l)
        sumlx += w[i] * x[i] * fl
        suml2 += w[i] * fl * fl
    scale = sumlx / suml2 if suml2 != _F0 else _F0
    if return_early:
        return f32(_F05 * (scale + _F1 / iscale)) if suml2 > _F0 else _F1 / iscale
    best = scale * sumlx
    nc = 18  # is = -9..-1, 1..9
    isc = work[n:n + nc]
    slx = work[n + nc:n + 2 * nc]
    sl2 = work[n + 2 * nc:n + 3 * nc]
    for c in range(nc):
        isc[c] = f32(-(fnmax + f32(0.1) * f32(c - 9 if c < 9 else c - 8))) / mx
        slx[c] = _F0
        sl2[c] = _F0
    for i in range(n):
        xi = x[i]
        wi = w[i]
        wx = wi * xi
        for c in range(nc):
            fl = f32(max(-nmax, min(nmax - 1, nearest_int(isc[c] * xi))))
            slx[c] += wx * fl
            sl2[c] += wi * fl * fl
    win = -1
    for c in range(nc):
        if sl2[c] > _F0 and slx[c] * slx[c] > best * sl2[c]:
            win = c
            scale = slx[c] / sl2[c]
            best = scale * slx[c]
    if win >= 0:
        for i in range(n):
            L[i] = nmax + max(-nmax, min(nmax - 1, nearest_int(isc[win] * x[i])))
    return scale


@njit(cache=True, nogil=True, error_model="numpy")
def make_qkx3_quants(nmax, x, weights, L, Laux, rmin, rdelta, nstep, use_mad, scale_out, min_out, st):
    """ggml's make_qkx3_quants, run on B independent groups at once (SIMD across groups).

    ``x``, ``weights``: float32 (n, B), group b in column b; C's ``weights == NULL`` means
    ``weights = x*x``, which the caller fills in. ``L``, ``Laux``: uint8 (n, B), levels 0..nmax.
    Writes C's return value to ``scale_out[b]`` and ``*the_min`` to ``min_out[b]``. ``st``: float32
    scratch (13, B). Each group follows C's steps, sums and comparisons exactly (bit-identical);
    only independent groups share a vector.
    """
    n, B = x.shape
    mn, mx, sum_w, sum_x, scale, best_mad = st[0], st[1], st[2], st[3], st[4], st[5]
    isc, s_l, s_l2, s_xl, mad, t_scale, t_min = st[6], st[7], st[8], st[9], st[10], st[11], st[12]
    fnmax = f32(nmax)
    for b in range(B):
        mn[b] = x[0, b]
        mx[b] = x[0, b]
        sum_w[b] = weights[0, b]
        sum_x[b] = weights[0, b] * x[0, b]
    for i in range(1, n):
        for b in range(B):
            xi = x[i, b]
            mn[b] = xi if xi < mn[b] else mn[b]
            mx[b] = xi if xi > mx[b] else mx[b]
            sum_w[b] += weights[i, b]
            sum_x[b] += weights[i, b] * xi
    for b in range(B):
        mn[b] = _F0 if mn[b] > _F0 else mn[b]
        min_out[b] = -mn[b]  # kept for groups with max <= min, which C returns here
        isc[b] = fnmax / (mx[b] - mn[b])
        scale[b] = _F1 / isc[b]
        best_mad[b] = _F0
    for i in range(n):
        for b in range(B):
            l = max(0, min(nmax, nearest_int(isc[b] * (x[i, b] - mn[b]))))
            L[i, b] = l
            diff = scale[b] * f32(l) + mn[b] - x[i, b]
            diff = abs(diff) if use_mad else diff * diff
            best_mad[b] += weights[i, b] * diff
    for is_ in range(nstep + 1 if nstep >= 1 else 0):
        for b in range(B):
            isc[b] = (rmin + rdelta * f32(is_) + fnmax) / (mx[b] - mn[b])
            s_l[b] = _F0
            s_l2[b] = _F0
            s_xl[b] = _F0
            mad[b] = _F0
        for i in range(n):
            for b in range(B):
                l = max(0, min(nmax, nearest_int(isc[b] * (x[i, b] - mn[b]))))
                Laux[i, b] = l
                fl = f32(l)
                wl = weights[i, b] * fl
                s_l[b] += wl
                s_l2[b] += wl * fl
                s_xl[b] += wl * x[i, b]
        for b in range(B):
            D = sum_w[b] * s_l2[b] - s_l[b] * s_l[b]
            this_scale = (sum_w[b] * s_xl[b] - sum_x[b] * s_l[b]) / D
            this_min = (s_l2[b] * sum_x[b] - s_l[b] * s_xl[b]) / D
            if this_min > _F0:
                this_min = _F0
                this_scale = s_xl[b] / s_l2[b]
            t_scale[b] = this_scale
            t_min[b] = this_min
            isc[b] = D  # isc is free until the next step: keep D there
        for i in range(n):
            for b in range(B):
                diff = t_scale[b] * f32(Laux[i, b]) + t_min[b] - x[i, b]
                diff = abs(diff) if use_mad else diff * diff
                mad[b] += weights[i, b] * diff
        for b in range(B):
            acc = isc[b] > _F0 and mad[b] < best_mad[b]
            best_mad[b] = mad[b] if acc else best_mad[b]
            scale[b] = t_scale[b] if acc else scale[b]
            mn[b] = t_min[b] if acc else mn[b]
            mad[b] = _F1 if acc else _F0  # now the "take Laux" flag
        for i in range(n):
            for b in range(B):
                L[i, b] = Laux[i, b] if mad[b] != _F0 else L[i, b]
    for b in range(B):
        if mx[b] <= -min_out[b]:  # C's early return: max <= min (after min was capped at 0)
            scale_out[b] = _F0
            for i in range(n):
                L[i, b] = 0
        else:
            scale_out[b] = scale[b]
            min_out[b] = -mn[b]


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
        o = ib * 18
        amax = _F0
        mx = _F0
        for j in range(QK):
            if amax < abs(xb[j]):
                amax = abs(xb[j])
                mx = xb[j]
        d = mx / f32(-8.0)
        id_ = _F1 / d if d != _F0 else _F0
        _put_f16(y, o, fp32_to_fp16(d))
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
        o = ib * 18
        _put_f16(y, o, fp32_to_fp16(d))
        _put_nibbles(y, o + 2, L)


@njit(cache=True, nogil=True, error_model="numpy")
def quantize_row_q4_1_ref(x, y):
    for ib in range(x.size // QK):
        xb = x[ib * QK:(ib + 1) * QK]
        o = ib * 20
        mn = _FLT_MAX
        mx = -_FLT_MAX
        for j in range(QK):
            mn = xb[j] if xb[j] < mn else mn
            mx = xb[j] if xb[j] > mx else mx
        d = (mx - mn) / f32(15.0)
        id_ = _F1 / d if d != _F0 else _F0
        _put_f16(y, o, fp32_to_fp16(d))
        _put_f16(y, o + 2, fp32_to_fp16(mn))
        for j in range(16):
            q0 = min(15, _cvt_i8((xb[j] - mn) * id_ + _F05))
            q1 = min(15, _cvt_i8((xb[j + 16] - mn) * id_ + _F05))
            y[o + 4 + j] = np.uint8((q0 & 0xFF) | ((q1 << 4) & 0xFF))


@njit(cache=True, nogil=True, error_model="numpy")
def _qkx3_row_impl(x, qw, y, nmax, bsize, s):
    """quantize_row_q4_1_impl / q5_1_impl: make_qkx3_quants on LANES blocks at a time; block b
    gets (d, m) and its levels in column b of ``s.L``, passed on to ``_put_q4_1`` / ``_put_q5_1``."""
    sigma2 = _row_sigma2(x)
    nb = x.size // QK
    for b0 in range(0, nb, LANES):
        nbk = min(LANES, nb - b0)
        for b in range(LANES):  # pad the last batch with zero blocks (C's max <= min case)
            for j in range(QK):
                xv = x[(b0 + b) * QK + j] if b < nbk else _F0
                s.X[j, b] = xv
                s.W[j, b] = qw[(b0 + b) * QK + j] * np.sqrt(sigma2 + xv * xv) if b < nbk else _F0
        make_qkx3_quants(nmax, s.X, s.W, s.L, s.Laux, f32(-0.9), f32(0.05), 36, False, s.d, s.m, s.st)
        for b in range(nbk):
            o = (b0 + b) * bsize
            _put_f16(y, o, fp32_to_fp16(s.d[b]))
            _put_f16(y, o + 2, fp32_to_fp16(-s.m[b]))
            for j in range(QK):
                s.Lb[j] = s.L[j, b]
            if bsize == 24:
                _put_u32(y, o + 4, _qh_bits(s.Lb))
                _put_nibbles(y, o + 8, s.Lb)
            else:
                _put_nibbles(y, o + 4, s.Lb)


@njit(cache=True, nogil=True, error_model="numpy")
def quantize_row_q5_0_ref(x, y):
    for ib in range(x.size // QK):
        xb = x[ib * QK:(ib + 1) * QK]
        o = ib * 22
        amax = _F0
        mx = _F0
        for j in range(QK):
            if amax < abs(xb[j]):
                amax = abs(xb[j])
                mx = xb[j]
        d = mx / f32(-16.0)
        id_ = _F1 / d if d != _F0 else _F0
        _put_f16(y, o, fp32_to_fp16(d))
        qh = np.uint32(0)
        for j in range(16):
            q0 = min(31, _cvt_i8(xb[j] * id_ + f32(16.5)))
            q1 = min(31, _cvt_i8(xb[j + 16] * id_ + f32(16.5)))
            y[o + 6 + j] = np.uint8((q0 & 0x0F) | ((q1 & 0x0F) << 4))
            qh |= (np.uint32((q0 >> 4) & 1) << np.uint32(j)) | (np.uint32((q1 >> 4) & 1) << np.uint32(j + 16))
        _put_u32(y, o + 2, qh)


@njit(cache=True, nogil=True, error_model="numpy")
def quantize_row_q5_0_impl(x, qw, y, weight, L, work):
    sigma2 = _row_sigma2(x)
    for ib in range(x.size // QK):
        xb = x[ib * QK:(ib + 1) * QK]
        _block_weights(xb, qw[ib * QK:(ib + 1) * QK], sigma2, weight)
        d = make_qx_quants(QK, 16, xb, L, 1, weight, work)
        o = ib * 22
        _put_f16(y, o, fp32_to_fp16(d))
        _put_u32(y, o + 2, _qh_bits(L))
        _put_nibbles(y, o + 6, L)


@njit(cache=True, nogil=True, error_model="numpy")
def quantize_row_q5_1_ref(x, y):
    for ib in range(x.size // QK):
        xb = x[ib * QK:(ib + 1) * QK]
        o = ib * 24
        mn = _FLT_MAX
        mx = -_FLT_MAX
        for j in range(QK):
            mn = xb[j] if xb[j] < mn else mn
            mx = xb[j] if xb[j] > mx else mx
        d = (mx - mn) / f32(31.0)
        id_ = _F1 / d if d != _F0 else _F0
        _put_f16(y, o, fp32_to_fp16(d))
        _put_f16(y, o + 2, fp32_to_fp16(mn))
        qh = np.uint32(0)
        for j in range(16):  # (uint8_t)(x0 + 0.5f): the low byte, no clamp
            q0 = _cvt_i32((xb[j] - mn) * id_ + _F05)
            q1 = _cvt_i32((xb[j + 16] - mn) * id_ + _F05)
            y[o + 8 + j] = np.uint8((q0 & 0x0F) | ((q1 & 0x0F) << 4))
            qh |= (np.uint32((q0 >> 4) & 1) << np.uint32(j)) | (np.uint32((q1 >> 4) & 1) << np.uint32(j + 16))
        _put_u32(y, o + 4, qh)


@njit(cache=True, nogil=True, error_model="numpy")
def quantize_row_q8_0_ref(x, y):
    for ib in range(x.size // QK):
        xb = x[ib * QK:(ib + 1) * QK]
        o = ib * 34
        amax = _F0
        for j in range(QK):
            a = abs(xb[j])
            amax = amax if amax > a else a
        d = amax / f32(127.0)
        id_ = _F1 / d if d != _F0 else _F0
        _put_f16(y, o, fp32_to_fp16(d))
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
        o = ib * 17
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
                                   np.empty(_WORK, np.float32))
        else:
            quantize_row_q4_0_ref(x[r], out[r])


@njit(cache=True, nogil=True, error_model="numpy", parallel=True)
def quantize_q4_1(x, qw, out):
    for r in prange(x.shape[0]):
        if qw.size:
            _qkx3_row_impl(x[r], qw, out[r], 15, 20, _qkx3_scratch())
        else:
            quantize_row_q4_1_ref(x[r], out[r])


@njit(cache=True, nogil=True, error_model="numpy", parallel=True)
def quantize_q5_0(x, qw, out):
    for r in prange(x.shape[0]):
        if qw.size:
            quantize_row_q5_0_impl(x[r], qw, out[r], np.empty(QK, np.float32), np.empty(QK, np.int8),
                                   np.empty(_WORK, np.float32))
        else:
            quantize_row_q5_0_ref(x[r], out[r])


@njit(cache=True, nogil=True, error_model="numpy", parallel=True)
def quantize_q5_1(x, qw, out):
    for r in prange(x.shape[0]):
        if qw.size:
            _qkx3_row_impl(x[r], qw, out[r], 31, 24, _qkx3_scratch())
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
            o = ib * 18
            d = _get_f16(y, o)
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
            o = ib * 20
            d = _get_f16(y, o)
            m = _get_f16(y, o + 2)
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
            o = ib * 22
            d = _get_f16(y, o)
            qh = _get_u32(y, o + 2)
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
            o = ib * 24
            d = _get_f16(y, o)
            m = _get_f16(y, o + 2)
            qh = _get_u32(y, o + 4)
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
            o = ib * 34
            d = _get_f16(y, o)
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
            o = ib * 17
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
