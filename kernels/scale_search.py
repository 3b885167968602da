"""ggml's block scale searches (ggml-quants.c, same names and argument order), one port of each.

``make_qx_quants``   symmetric scale, levels 0..2*nmax-1 (Q4_0/Q5_0 and Q3_K/Q6_K with weights)
``make_q3_quants``   symmetric, x**2 weights, coordinate refinement (Q3_K without weights)
``make_qkx2_quants`` scale and min, levels 0..nmax (Q2_K/Q4_K/Q5_K without importance weights)
``make_qkx3_quants`` scale and min under importance weights (Q4_1/Q5_1 and Q2_K/Q4_K/Q5_K with them)
``make_qp_quants``   positive-only scale (the K-quants' sub-block scales/mins, IQ2_XXS)

A weights array of size 0 stands for C's NULL. Scratch arrays replace C's stack buffers; the
caller allocates them once per row. Everything is float32 in C's order of operations (no
``fastmath``); ``error_model="numpy"`` gives IEEE division where the C divides by zero.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from dynsearch.kernels._fp import f32, nearest_int

GROUP_MAX_EPS = f32(1e-15)  # ggml's GROUP_MAX_EPS: a group with a smaller maximum is all zero
QX_TRIALS = 18  # make_qx_quants tries iscale = -(nmax + 0.1*is)/max for is in -9..9, is != 0
QKX_BATCH = 8  # trial scales of make_qkx2_quants evaluated side by side

_F0 = f32(0.0)
_F1 = f32(1.0)


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _qx_weight(qw, x, i, rmse_type):
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


@njit(cache=True, nogil=True, error_model="numpy")
def make_qx_quants(n, nmax, x, L, rmse_type, qw, work):
    """Symmetric scale search; fills int8 ``L`` with levels in 0..2*nmax-1 and returns the scale.

    ``work`` is float32 scratch of at least ``n + 3*QX_TRIALS`` entries. The 18 trial scales of
    the C loop are evaluated side by side (each sum still accumulated in C's element order, so the
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
        w[i] = _qx_weight(qw, x, i, rmse_type)
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
        return f32(f32(0.5) * (scale + _F1 / iscale)) if suml2 > _F0 else _F1 / iscale
    best = scale * sumlx
    nc = QX_TRIALS
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
def make_q3_quants(n, nmax, x, L, do_rmse, tmp):
    """Q3_K's symmetric search with x**2 weights and coordinate-wise refinement (``L`` int8).

    ``tmp`` is float32 scratch of at least ``2*n`` entries.
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
    iscale = f32(-nmax) / mx
    if do_rmse:
        w = tmp[:n]  # x*x and x*x*x, exactly as the C recomputes them
        wx = tmp[n:2 * n]
        sumlx = _F0
        suml2 = _F0
        for i in range(n):
            l = max(-nmax, min(nmax - 1, nearest_int(iscale * x[i])))
            L[i] = l
            w[i] = x[i] * x[i]
            wx[i] = w[i] * x[i]
            sumlx += wx[i] * f32(l)
            suml2 += w[i] * f32(l) * f32(l)
        for _ in range(5):
            n_changed = 0
            for i in range(n):
                li = np.int32(L[i])
                fli = f32(li)
                slx = sumlx - wx[i] * fli
                if slx > _F0:
                    sl2 = suml2 - w[i] * fli * fli
                    new_l = np.int32(max(-nmax, min(nmax - 1, nearest_int(x[i] * sl2 / slx))))
                    if new_l != li:
                        fl = f32(new_l)
                        slx += wx[i] * fl
                        sl2 += w[i] * fl * fl
                        if sl2 > _F0 and slx * slx * suml2 > sumlx * sumlx * sl2:
                            L[i] = new_l
                            sumlx = slx
                            suml2 = sl2
                            n_changed += 1
            if n_changed == 0:
                break
        for i in range(n):
            L[i] += nmax
        return sumlx / suml2 if suml2 > _F0 else _F0
    for i in range(n):
        L[i] = max(-nmax, min(nmax - 1, nearest_int(iscale * x[i]))) + nmax
    return _F1 / iscale


@njit(cache=True, nogil=True, error_model="numpy")
def make_qkx2_quants(n, nmax, x, weights, L, tmp, rmin, rdelta, nstep, use_mad):
    """Asymmetric (scale, min) search over ``nstep + 1`` trial scales; ``L`` uint8.

    Returns ``(scale, the_min)`` where ``the_min`` is C's ``*the_min`` (minus the offset).
    ``tmp`` is float32 scratch of ``8 * QKX_BATCH`` entries (it replaces C's ``Laux``).

    A trial depends on the earlier ones only through ``min``, which changes when a trial wins.
    Trials are therefore evaluated ``QKX_BATCH`` at a time assuming ``min`` stays (each sum in
    C's order, so bit-identical), scanned in C's order, and the batch restarts after a win that
    moves ``min``.
    """
    mn = x[0]
    mx = x[0]
    sum_w = weights[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        if x[i] < mn:
            mn = x[i]
        if x[i] > mx:
            mx = x[i]
        w = weights[i]
        sum_w += w
        sum_x += w * x[i]
    if mn > _F0:
        mn = _F0
    if mx == mn:
        for i in range(n):
            L[i] = 0
        return _F0, -mn
    iscale = f32(nmax) / (mx - mn)
    scale = _F1 / iscale
    best_error = _F0
    for i in range(n):
        li = max(0, min(nmax, nearest_int(iscale * (x[i] - mn))))
        L[i] = li
        diff = scale * f32(li) + mn - x[i]
        diff = abs(diff) if use_mad else diff * diff
        best_error += weights[i] * diff
    if nstep < 1:
        return scale, -mn
    G = QKX_BATCH
    its = tmp[0:G]
    s_l = tmp[G:2 * G]
    s_l2 = tmp[2 * G:3 * G]
    s_xl = tmp[3 * G:4 * G]
    t_scale = tmp[4 * G:5 * G]
    t_min = tmp[5 * G:6 * G]
    t_D = tmp[6 * G:7 * G]
    t_err = tmp[7 * G:8 * G]
    is0 = 0
    while is0 <= nstep:
        g = min(G, nstep + 1 - is0)
        rng = mx - mn
        for t in range(g):
            its[t] = (rmin + rdelta * f32(is0 + t) + f32(nmax)) / rng
            s_l[t] = _F0
            s_l2[t] = _F0
            s_xl[t] = _F0
        for i in range(n):
            xi = x[i]
            xm = xi - mn
            w = weights[i]
            for t in range(g):
                fl = f32(max(0, min(nmax, nearest_int(its[t] * xm))))
                s_l[t] += w * fl
                s_l2[t] += w * fl * fl
                s_xl[t] += w * fl * xi
        for t in range(g):
            D = sum_w * s_l2[t] - s_l[t] * s_l[t]
            this_scale = (sum_w * s_xl[t] - sum_x * s_l[t]) / D
            this_min = (s_l2[t] * sum_x - s_l[t] * s_xl[t]) / D
            if this_min > _F0:
                this_min = _F0
                this_scale = s_xl[t] / s_l2[t]
            t_D[t] = D
            t_scale[t] = this_scale
            t_min[t] = this_min
            t_err[t] = _F0
        for i in range(n):
            xi = x[i]
            xm = xi - mn
            w = weights[i]
            for t in range(g):
                fl = f32(max(0, min(nmax, nearest_int(its[t] * xm))))
                diff = t_scale[t] * fl + t_min[t] - xi
                diff = abs(diff) if use_mad else diff * diff
                t_err[t] += w * diff
        nxt = is0 + g
        for t in range(g):
            if t_D[t] > _F0 and t_err[t] < best_error:
                for i in range(n):
                    L[i] = max(0, min(nmax, nearest_int(its[t] * (x[i] - mn))))
                best_error = t_err[t]
                scale = t_scale[t]
                moved = t_min[t] != mn
                mn = t_min[t]
                if moved:  # later trials of this batch assumed the old min
                    nxt = is0 + t + 1
                    break
        is0 = nxt
    return scale, -mn


@njit(cache=True, nogil=True, error_model="numpy")
def make_qkx3_quants(n, nmax, x, weights, L, tmp, rmin, rdelta, nstep, use_mad):
    """make_qkx3_quants with non-NULL ``weights`` (the only way ggml calls it): make_qkx2_quants.

    C's ``max <= min`` test equals qkx2's ``max == min`` because ``min`` is clamped to <= 0 and
    ``max >= min``; every other step is the same.
    """
    return make_qkx2_quants(n, nmax, x, weights, L, tmp, rmin, rdelta, nstep, use_mad)


@njit(cache=True, nogil=True, error_model="numpy")
def make_qp_quants(n, nmax, x, L, quant_weights):
    """Positive-only scale search on levels 0..nmax; returns the scale.

    ``L`` must be uint8 as in ggml: a negative ``x`` (IQ2_XXS's parity-flipped value) wraps its level.
    """
    mx = _F0
    for i in range(n):
        mx = mx if mx > x[i] else x[i]
    if mx < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return _F0
    iscale = f32(nmax) / mx
    for i in range(n):
        L[i] = nearest_int(iscale * x[i])  # stored as uint8, as in the C
    scale = _F1 / iscale
    best_mse = _F0
    for i in range(n):
        diff = x[i] - scale * f32(L[i])
        best_mse += quant_weights[i] * diff * diff
    for is_ in range(-4, 5):
        if is_ == 0:
            continue
        iscale_is = (f32(0.1) * f32(is_) + f32(nmax)) / mx
        scale_is = _F1 / iscale_is
        mse = _F0
        for i in range(n):
            l = min(nmax, nearest_int(iscale_is * x[i]))
            diff = x[i] - scale_is * f32(l)
            mse += quant_weights[i] * diff * diff
        if mse < best_mse:
            best_mse = mse
            iscale = iscale_is
    sumlx = _F0
    suml2 = _F0
    for i in range(n):
        l = min(nmax, nearest_int(iscale * x[i]))
        L[i] = l
        w = quant_weights[i]
        sumlx += w * x[i] * f32(l)
        suml2 += w * f32(l) * f32(l)
    for _ in range(5):
        n_changed = 0
        for i in range(n):
            w = quant_weights[i]
            li = f32(L[i])
            slx = sumlx - w * x[i] * li
            sl2 = suml2 - w * li * li
            if slx > _F0 and sl2 > _F0:
                new_l = min(nmax, nearest_int(x[i] * sl2 / slx))
                if new_l != np.int32(L[i]):
                    slx += w * x[i] * f32(new_l)
                    sl2 += w * f32(new_l) * f32(new_l)
                    if slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new_l
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    return sumlx / suml2 if suml2 > _F0 else _F0
