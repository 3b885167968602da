"""Scalar pieces shared by the grid I-quant quantizers (IQ3, IQ2, IQ1), ported from ggml-quants.c.

All arithmetic is float32 in ggml's operation order; ``grid``/``kmap``/``nbr`` are the tables of
:func:`._iq_grids.quant_tables`.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from dynsearch.kernels._fp import f32, nearest_int

FLT_MAX = f32(3.4028234663852886e38)


@njit(cache=True, nogil=True, inline="always")
def best_neighbour(nbr, start, grid, xval, weight, off, scale, L):
    """iq2/iq3_find_best_neighbour: the candidate grid point nearest (weighted) to xval/scale.

    Writes its levels to ``L[off:off+dim]`` and returns its index.
    """
    dim = grid.shape[1]
    best_d2 = FLT_MAX
    gi = -1
    for j in range(1, np.int32(nbr[start]) + 1):
        g = np.int32(nbr[start + j])
        d2 = f32(0.0)
        for i in range(dim):
            diff = scale * f32(grid[g, i]) - xval[off + i]
            d2 += weight[off + i] * diff * diff
        if d2 < best_d2:
            best_d2 = d2
            gi = g
    if gi < 0:  # ggml aborts here (all distances NaN/inf); never reached for finite input
        gi = np.int32(nbr[start + 1])
    for i in range(dim):
        L[off + i] = (grid[gi, i] - 1) // 2
    return gi


@njit(cache=True, nogil=True)
def imatrix_weights(xb, qw, has_qw, sigma2, weight, waux):
    """weight = qw * sqrt(sigma2 + x^2) (x^2 without imatrix); waux = sqrt(weight)."""
    for i in range(xb.size):
        if has_qw:
            weight[i] = qw[i] * np.sqrt(sigma2 + xb[i] * xb[i])
        else:
            weight[i] = xb[i] * xb[i]
    for i in range(xb.size):
        waux[i] = np.sqrt(weight[i])


@njit(cache=True, nogil=True)
def fold_signs_even(xb, weight, xval, k):
    """|x| of 8 values into xval; if an odd number were negative, flip the least important one.

    Returns the 7 stored sign bits (the 8th is implied by even parity: ksigns_iq2xs).
    """
    nflip = 0
    s = 0
    for i in range(8):
        v = xb[8 * k + i]
        if v >= f32(0.0):
            xval[8 * k + i] = v
        else:
            xval[8 * k + i] = -v
            nflip += 1
            s |= 1 << i
    if nflip % 2:
        imin = 0
        mn = weight[8 * k] * xb[8 * k] * xb[8 * k]
        for i in range(1, 8):
            ax = weight[8 * k + i] * xb[8 * k + i] * xb[8 * k + i]
            if ax < mn:
                mn = ax
                imin = i
        xval[8 * k + imin] = -xval[8 * k + imin]
        s ^= 1 << imin
    return s & 127


@njit(cache=True, nogil=True, inline="always")
def fmax_c(a, b):
    """C's MAX(a, b) macro: ``a > b ? a : b``."""
    return a if a > b else b


@njit(cache=True, nogil=True)
def sum_sq(x):
    s = f32(0.0)
    for i in range(x.size):
        s += x[i] * x[i]
    return s


@njit(cache=True, nogil=True, inline="always")
def weighted_sums(weight, xval, L):
    """sumqx = sum w*x*q, sumq2 = sum w*q*q with q = 2*L+1 (ggml's order)."""
    sumqx = f32(0.0)
    sumq2 = f32(0.0)
    for i in range(xval.size):
        w = weight[i]
        q = f32(2 * L[i] + 1)
        sumqx += w * xval[i] * q
        sumq2 += w * q * q
    return sumqx, sumq2


@njit(cache=True, nogil=True, inline="always")
def _snap(xval, k, dim, kmaxq, inv, L):
    """Round ``dim`` values to levels 0..kmaxq-1 at scale 1/inv; returns the packed pattern."""
    bits = 3 if dim == 4 else 2
    u = 0
    for i in range(dim):
        l = nearest_int(f32(0.5) * (inv * xval[dim * k + i] - f32(1.0)))
        l = max(0, min(kmaxq - 1, l))
        L[dim * k + i] = l
        u |= l << (bits * i)
    return u


@njit(cache=True, nogil=True, inline="always")
def search_scale(xval, weight, waux, L, Laux, on, on_aux, grid, kmap, nbr, mx, scale, n_is, step,
                 kmaxq, init_on, skip_on_grid, always_refine):
    """Scale search + refinement of one sub-block (quantize_row_iq2_*/iq3_*_impl); levels -> L.

    Tries ``id = (2*kmaxq - 1 + is*step) / mx`` for |is| <= n_is, snapping each group of 4/8
    levels to the grid; keeps the best weighted fit, then re-snaps the off-grid groups (all
    groups when ``always_refine``) at the fitted scale and refits it.
    """
    dim = grid.shape[1]
    nk = xval.size // dim
    best = f32(0.0)
    for k in range(nk):
        on[k] = init_on
    for is_ in range(-n_is, n_is + 1):
        inv = (f32(2 * kmaxq - 1) + f32(is_) * step) / mx
        this_scale = f32(1.0) / inv
        for k in range(nk):
            gi = kmap[_snap(xval, k, dim, kmaxq, inv, Laux)]
            on_aux[k] = True
            if gi < 0:
                on_aux[k] = False
                best_neighbour(nbr, -gi - 1, grid, xval, waux, dim * k, this_scale, Laux)
        sumqx, sumq2 = weighted_sums(weight, xval, Laux)
        if sumq2 > f32(0.0) and sumqx * sumqx > best * sumq2:
            scale = sumqx / sumq2
            best = scale * sumqx
            L[:] = Laux
            on[:] = on_aux
    n_off = 0
    for k in range(nk):
        if not on[k]:
            n_off += 1
    if (always_refine or n_off > 0) and scale > f32(0.0):
        inv = f32(1.0) / scale
        for k in range(nk):
            if skip_on_grid and on[k]:
                continue
            gi = kmap[_snap(xval, k, dim, kmaxq, inv, Laux)]
            if gi < 0:
                gi = best_neighbour(nbr, -gi - 1, grid, xval, waux, dim * k, scale, L)
            for i in range(dim):
                L[dim * k + i] = (grid[gi, i] - 1) // 2
        sumqx, sumq2 = weighted_sums(weight, xval, L)
        if sumq2 > f32(0.0):
            scale = sumqx / sumq2
    return scale


@njit(cache=True, nogil=True)
def grid_index(L, k, kmap):
    """kmap entry of the levels of group ``k`` (>= 0 once they lie on the grid)."""
    dim = 4 if kmap.size == 4096 else 8
    bits = 3 if dim == 4 else 2
    u = 0
    for i in range(dim):
        u |= np.int32(L[dim * k + i]) << (bits * i)
    return kmap[u]
