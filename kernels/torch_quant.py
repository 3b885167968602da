"""Quantizers in torch, on any device, giving the numba kernels' blocks bit for bit (which are
ggml-quants.c's): the profile's candidates quantized and dequantized where its error term runs.

Public API (every tensor on the input's device)::

    quantize_rows(rows, qtype, importance=None) -> uint8 (n_rows, row_bytes)
    dequantize_rows(blocks, qtype, n_per_row)    -> float32 (n_rows, n_per_row)
    torch_quantizable()                          -> the type names both are defined for

Types, each equal to :func:`dynsearch.kernels.quantize` / :func:`~dynsearch.kernels.dequantize`
bit for bit, with and without an importance vector (the tests check every one, on every input
kind of ``tests/conftest.py`` and on extreme values):

* Q4_0, Q5_0, Q4_1, Q5_1: ``quantize_row_*_ref`` without importance; with it the ``*_impl``
  functions, whose weights ``qw[j] * sqrt(sigma2 + x[j]**2)`` take ``sigma2 = sum(x**2) / n`` over
  the whole row, accumulated sequentially in float32 as C does (a loop over the row's columns,
  each step one vector add over the rows), then ``make_qx_quants`` (Q4_0 / Q5_0: its 18
  candidate scales side by side) or ``make_qkx3_quants`` (Q4_1 / Q5_1: its 37 trials in order,
  since a winning trial moves the minimum the next ones start from).
* Q8_0, which ignores importance weights (as ggml does).
* IQ4_NL, IQ4_XS: ``quantize_row_iq4_nl_impl`` with ``ntry = 7`` (the first scale and the 15
  trial scales side by side).
* Q2_K, Q3_K, Q4_K, Q5_K, Q6_K: :mod:`dynsearch.kernels.torch_kquants`, merged into the registry.

Not yet in torch (the profile quantizes them with the numba kernels on the host): the 2- and
3-bit i-quants (IQ2_*, IQ3_*, IQ1_*), the ternary types and the float types.

How: every block is a row of a (n_blocks, block_size) tensor, all blocks side by side; each step
is one float32 operation as in C (no fused or reordered arithmetic); a sum over a block's
elements is a Python loop of vector adds in C's element order (:func:`_seq_sum`), never a torch
reduction. Divisions always divide by a tensor (CUDA turns ``t / python_float`` into a multiply
by the reciprocal); ``sqrtf`` goes through float64 (torch's float32 sqrt on the CPU is not
correctly rounded); float -> int casts, ``nearest_int``, ``roundf`` and the fp16 conversions are
emulated as the numba kernels do them (x86 semantics for out-of-range values, ggml's NaN
patterns). Only the payload of a NaN that a dequantizer computes from a NaN scale may differ (CUDA
arithmetic writes the canonical NaN); quantizing finite rows never writes such a scale.

The registry is two plain dicts, ``QUANTIZERS`` (type name -> ``f(rows float32 (n_rows,
n_per_row), importance float32 (n_per_row,) | None) -> uint8 (n_rows, row_bytes)``) and
``DEQUANTIZERS`` (type name -> ``f(blocks uint8 (n_rows, row_bytes), n_per_row) -> float32``);
other modules may ``update`` them (and ``NOT_BIT_IDENTICAL``, type -> the reason, for a type
whose blocks can differ from the numba kernels'). The public functions check shapes and values
first, so an entry gets float32 rows of whole blocks and a finite, non-negative importance vector.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from dynsearch.kernels import torch_kquants
from dynsearch.kernels.types import parse_qtype, row_nbytes, type_info

RowQuantizer = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]
RowDequantizer = Callable[[torch.Tensor, int], torch.Tensor]

QK = 32  # elements per block of the legacy types and IQ4_NL, and per sub-block of IQ4_XS
QK_K = 256  # elements per IQ4_XS super-block
GROUP_MAX_EPS = float(np.float32(1e-15))  # ggml's GROUP_MAX_EPS, exactly as the float32 it is
KVALUES_IQ4NL = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)

# Floats of temporaries one block-function call may hold (all candidates of all blocks in it):
# blocks are processed in chunks that keep below it. Larger chunks mean fewer (tiny) kernel
# launches on a GPU, where the launches, not the arithmetic, take the time.
CHUNK_FLOATS = {"cpu": 1 << 24, "other": 1 << 28}


# ---------------------------------------------------------------------------------------------
# scalar semantics of C, elementwise


def _f32(v: float, like: torch.Tensor) -> torch.Tensor:
    """The float32 constant ``v`` as a 0-dim tensor on ``like``'s device: the divisor or dividend
    of a division (a Python float divisor becomes a reciprocal multiply on CUDA)."""
    return torch.full((), float(np.float32(v)), dtype=torch.float32, device=like.device)


def _consts(values, like: torch.Tensor) -> torch.Tensor:
    """float32 constants (computed on the host in float32, as C folds them) on ``like``'s device."""
    return torch.tensor(np.asarray(values, dtype=np.float32), device=like.device)


def _inv_or_zero(d: torch.Tensor) -> torch.Tensor:
    """C's ``d ? 1/d : 0`` (``d != 0`` for the float compare)."""
    return torch.where(d != 0, torch.div(_f32(1.0, d), d), torch.zeros_like(d))


def _sqrtf(x: torch.Tensor) -> torch.Tensor:
    """C ``sqrtf``, correctly rounded: through float64, whose square root rounded to float32 is
    the float32 one (torch's float32 sqrt on the CPU is off by an ulp for about 1 value in 6)."""
    return torch.sqrt(x.to(torch.float64)).to(torch.float32)


def _roundf(x: torch.Tensor) -> torch.Tensor:
    """C ``roundf``: halves away from zero (torch.round rounds them to even)."""
    t = torch.trunc(x)
    half = (x - t).abs() == 0.5  # exact in float32
    return torch.where(half, t + torch.sign(x), torch.round(x))


def _c_int32(x: torch.Tensor) -> torch.Tensor:
    """C float -> int32 as x86's cvttss2si: truncation, INT_MIN for NaN and out-of-range (int64)."""
    return torch.where(x.abs() < 2147483648.0, x, torch.full_like(x, -2147483648.0)).to(torch.int64)


def _c_int8(x: torch.Tensor) -> torch.Tensor:
    """C ``(int8_t)x``: the low byte of the int32 conversion, sign-extended (int64)."""
    return ((_c_int32(x) & 0xFF) ^ 0x80) - 0x80


def _nearest_int(x: torch.Tensor) -> torch.Tensor:
    """ggml's ``nearest_int`` bit trick (x + 1.5 * 2**23, the low mantissa bits), int32, exactly as
    :func:`dynsearch.kernels._fp.nearest_int` (so also for inf / NaN)."""
    v = (x + 12582912.0).contiguous()
    return (v.view(torch.int32) & 0x007FFFFF) - 0x00400000


def _f16_bytes(d: torch.Tensor) -> torch.Tensor:
    """float32 scales (...,) as their fp16 bytes, little-endian (..., 2): round to nearest even,
    NaN as ggml writes it (sign | 0x7E00; CUDA's conversion gives 0x7FFF)."""
    h = d.to(torch.float16).view(torch.int16).to(torch.int64) & 0xFFFF
    h = torch.where(d.isnan(), torch.where(torch.signbit(d), 0xFE00, 0x7E00), h)
    return torch.stack((h & 0xFF, h >> 8), dim=-1).to(torch.uint8)


def _f16_at(blk: torch.Tensor, o: int) -> torch.Tensor:
    """The fp16 at bytes ``o, o+1`` of each block (N, bytes) as float32 (N,), as ggml's
    fp16_to_fp32 gives it, NaN payloads included (a signalling NaN comes back quiet); built from
    the bits, since torch's own conversion changes NaN payloads on some paths."""
    h = _u_at(blk, o, 2)
    sign, exp, mant = (h & 0x8000) << 16, (h >> 10) & 0x1F, h & 0x3FF
    normal = sign | ((exp + 112) << 23) | (mant << 13)
    special = sign | 0x7F800000 | (mant << 13) | torch.where(mant != 0, 0x00400000, 0)  # inf, NaN
    bits = torch.where(exp == 0x1F, special, normal).to(torch.int32).view(torch.float32)
    sub = mant.to(torch.float32) * float(2.0 ** -24)  # zero and subnormals: exact
    return torch.where(exp == 0, torch.where(sign != 0, -sub, sub), bits)


def _u_at(blk: torch.Tensor, o: int, n: int) -> torch.Tensor:
    """The little-endian unsigned integer of ``n`` bytes at ``o`` of each block, int64 (N,)."""
    v = torch.zeros(blk.shape[0], dtype=torch.int64, device=blk.device)
    for k in range(n):
        v |= blk[:, o + k].to(torch.int64) << (8 * k)
    return v


def _le_bytes(v: torch.Tensor, n: int) -> torch.Tensor:
    """int64 (N,) as ``n`` little-endian bytes (N, n)."""
    return torch.stack([(v >> (8 * k)) & 0xFF for k in range(n)], dim=-1).to(torch.uint8)


# ---------------------------------------------------------------------------------------------
# C's loops over a block, with every block side by side (the block is the last dim)


def _seq_sum(t: torch.Tensor, from_first: bool = False) -> torch.Tensor:
    """C's ``s = 0; for (j...) s += t[j];`` over the last dim, in float32 and in order (a torch
    reduction would add in another order). ``from_first``: ``s = t[0]`` and then the rest."""
    cols = t.movedim(-1, 0).contiguous()
    s = cols[0].clone() if from_first else torch.zeros_like(cols[0])
    for j in range(1 if from_first else 0, cols.shape[0]):
        s.add_(cols[j])
    return s


def _first_equal(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Per row, the first element equal to ``v`` (the sign of a zero is the element's own)."""
    idx = (x == v[..., None]).to(torch.int8).argmax(-1, keepdim=True)  # the first maximum
    return x.gather(-1, idx)[..., 0]


def _max_abs_signed(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """C's ``amax = 0, max = 0; for (j...) if (fabsf(x[j]) > amax) {amax = fabsf(x[j]); max = x[j];}``
    per row: (amax, max); NaN never wins, an all-zero row gives +0."""
    a = x.abs()
    a = torch.where(a.isnan(), torch.zeros_like(a), a)
    amax = a.amax(-1)
    idx = (a == amax[..., None]).to(torch.int8).argmax(-1, keepdim=True)  # the first maximum
    return amax, torch.where(amax > 0, x.gather(-1, idx)[..., 0], 0.0)


def _min_max(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of finite ``x``, C's running ``if (x[j] < min) min = x[j]`` and ``max`` alike: the
    first minimum and the first maximum (a signed zero is the first one's)."""
    return _first_equal(x, x.amin(-1)), _first_equal(x, x.amax(-1))


def _chunked(fn: Callable[..., torch.Tensor], fanout: int, *arrays: torch.Tensor | None) -> torch.Tensor:
    """``fn(*arrays)`` (blocks along dim 0), in chunks of blocks whose temporaries, about
    ``fanout`` floats per element, stay below :data:`CHUNK_FLOATS`."""
    x = arrays[0]
    n = x.shape[0]
    budget = CHUNK_FLOATS["cpu" if x.device.type == "cpu" else "other"]
    step = max(1, budget // max(1, x[0].numel() * fanout))
    if step >= n:
        return fn(*arrays)
    return torch.cat([fn(*(a if a is None else a[i:i + step] for a in arrays)) for i in range(0, n, step)])


def _row_sigma2(x: torch.Tensor) -> torch.Tensor:
    """``sum(x*x) / n_per_row`` of each row, accumulated in the row's order (the *_impl functions)."""
    return torch.div(_seq_sum(x * x), _f32(x.shape[1], x))


def _impl_weights(x: torch.Tensor, imp: torch.Tensor) -> torch.Tensor:
    """The legacy *_impl weights ``qw[j] * sqrt(sigma2 + x[j]*x[j])`` as blocks (n_blocks, QK)."""
    sigma2 = _row_sigma2(x)
    return (imp[None, :] * _sqrtf(sigma2[:, None] + x * x)).reshape(-1, QK)


# ---------------------------------------------------------------------------------------------
# packing


def _pack_ref4(q: torch.Tensor) -> torch.Tensor:
    """Q4_0 / Q4_1 ref: ``(uint8_t)(q0 | q1 << 4)`` of the levels j and j + 16."""
    return ((q[:, :16] & 0xFF) | ((q[:, 16:] << 4) & 0xFF)).to(torch.uint8)


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """``(q0 & 0x0F) | (q1 & 0x0F) << 4`` of the levels j and j + 16 of each 32 (..., 32k) -> (..., 16k)."""
    q = q.reshape(*q.shape[:-1], -1, 2, 16)
    return ((q[..., 0, :] & 0x0F) | ((q[..., 1, :] & 0x0F) << 4)).reshape(*q.shape[:-3], -1).to(torch.uint8)


def _qh_bytes(q: torch.Tensor) -> torch.Tensor:
    """Bit 4 of each of the 32 levels, packed little-endian: bit j of the u32 is bit 4 of level j."""
    bits = ((q.to(torch.int64) >> 4) & 1) << torch.arange(QK, device=q.device)
    return _le_bytes(bits.sum(-1), 4)  # distinct powers of two: the sum is the bitwise or


def _unpack_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(N, 16k) bytes -> (N, 32k) levels (int64): per 16 bytes, the low nibbles then the high ones."""
    q = qs.to(torch.int64).reshape(qs.shape[0], -1, 1, 16)
    return torch.cat((q & 0x0F, q >> 4), dim=2).reshape(qs.shape[0], -1)


# ---------------------------------------------------------------------------------------------
# legacy types without importance (quantize_row_*_ref)


def _q8_0_ref(xb: torch.Tensor) -> torch.Tensor:
    amax = xb.abs().amax(-1)  # finite inputs: C's running max
    d = torch.div(amax, _f32(127.0, amax))
    q = _c_int8(_roundf(xb * _inv_or_zero(d)[:, None])) & 0xFF
    return torch.cat((_f16_bytes(d), q.to(torch.uint8)), dim=-1)


def _sym_ref(xb: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0 / Q5_0 ref: ``d = max / -nmax``, levels ``MIN(2 nmax - 1, (int8_t)(x / d + nmax + 0.5))``."""
    _, mx = _max_abs_signed(xb)
    d = torch.div(mx, _f32(-nmax, mx))
    q = torch.clamp_max(_c_int8(xb * _inv_or_zero(d)[:, None] + (nmax + 0.5)), 2 * nmax - 1)
    return d, q


def _q4_0_ref(xb: torch.Tensor) -> torch.Tensor:
    d, q = _sym_ref(xb, 8)
    return torch.cat((_f16_bytes(d), _pack_ref4(q)), dim=-1)


def _q5_0_ref(xb: torch.Tensor) -> torch.Tensor:
    d, q = _sym_ref(xb, 16)
    return torch.cat((_f16_bytes(d), _qh_bytes(q), _pack_nibbles(q)), dim=-1)


def _asym_ref(xb: torch.Tensor, nmax: int):
    """Q4_1 / Q5_1 ref: ``d = (max - min) / nmax`` and ``(x - min) / d + 0.5`` (not yet cast)."""
    mn, mx = _min_max(xb)
    d = torch.div(mx - mn, _f32(nmax, mx))
    v = (xb - mn[:, None]) * _inv_or_zero(d)[:, None] + 0.5
    return d, mn, v


def _q4_1_ref(xb: torch.Tensor) -> torch.Tensor:
    d, mn, v = _asym_ref(xb, 15)
    q = torch.clamp_max(_c_int8(v), 15)
    return torch.cat((_f16_bytes(d), _f16_bytes(mn), _pack_ref4(q)), dim=-1)


def _q5_1_ref(xb: torch.Tensor) -> torch.Tensor:
    d, mn, v = _asym_ref(xb, 31)
    q = _c_int32(v)  # (uint8_t)(x + 0.5f): the low bits, no clamp
    return torch.cat((_f16_bytes(d), _f16_bytes(mn), _qh_bytes(q), _pack_nibbles(q)), dim=-1)


# ---------------------------------------------------------------------------------------------
# legacy types with importance (quantize_row_*_impl)

_QX_IS = [i for i in range(-9, 10) if i != 0]  # make_qx_quants' candidate offsets, in C's order


def _make_qx_quants(xb: torch.Tensor, w: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """make_qx_quants(n, nmax, x, L, rmse_type=1, qw): (scale (B,), levels 0..2 nmax - 1 (B, n) int32).

    The first scale and the 18 candidates are all evaluated (each sum in C's element order), then
    compared in C's order."""
    amax, mx = _max_abs_signed(xb)
    cands = torch.div(_consts([-nmax] + [-(np.float32(nmax) + np.float32(0.1) * np.float32(i)) for i in _QX_IS], xb)[None, :],
                      mx[:, None])  # (B, 19): iscale, then the candidates
    levels = torch.clamp(_nearest_int(cands[:, :, None] * xb[:, None, :]), -nmax, nmax - 1)  # (B, 19, n)
    fl = levels.to(torch.float32)
    wfl = w[:, None, :] * fl
    sums = _seq_sum(torch.stack(((w * xb)[:, None, :] * fl, wfl * fl), dim=-2))  # (B, 19, 2)
    slx, sl2 = sums[..., 0], sums[..., 1]
    scale = torch.where(sl2[:, 0] != 0, torch.div(slx[:, 0], sl2[:, 0]), torch.zeros_like(amax))
    best = scale * slx[:, 0]
    win = torch.zeros_like(amax, dtype=torch.int64)
    for c in range(1, cands.shape[1]):
        ok = (sl2[:, c] > 0) & (slx[:, c] * slx[:, c] > best * sl2[:, c])
        scale = torch.where(ok, torch.div(slx[:, c], sl2[:, c]), scale)
        best = torch.where(ok, scale * slx[:, c], best)
        win = torch.where(ok, c, win)
    L = levels.gather(1, win[:, None, None].expand(-1, 1, xb.shape[1]))[:, 0] + nmax
    zero = amax < GROUP_MAX_EPS
    return torch.where(zero, 0.0, scale), torch.where(zero[:, None], 0, L)


def _make_qkx3_quants(xb: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float = -0.9, rdelta: float = 0.05,
                      nstep: int = 36) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """make_qkx3_quants(n, nmax, x, weights, L, &the_min, Laux, rmin, rdelta, nstep, false):
    (scale, min (C's ``-the_min``), levels 0..nmax (B, n) int32). The trials run in C's order,
    all blocks side by side: a winning trial moves the minimum the next trials start from."""
    mn, mx = _min_max(xb)
    sums = _seq_sum(torch.stack((w, w * xb), dim=-2), from_first=True)  # sum_w, sum_x from x[0]
    sum_w, sum_x = sums[:, 0], sums[:, 1]
    mn = mn0 = torch.where(mn > 0, 0.0, mn)
    flat = mx == mn
    iscale = torch.div(_f32(nmax, xb), mx - mn)
    scale = torch.div(_f32(1.0, xb), iscale)
    L = torch.clamp(_nearest_int(iscale[:, None] * (xb - mn[:, None])), 0, nmax)
    diff = scale[:, None] * L.to(torch.float32) + mn[:, None] - xb
    best = _seq_sum(w * (diff * diff))
    f32 = np.float32
    nums = _consts([f32(rmin) + f32(rdelta) * f32(i) + f32(nmax) for i in range(nstep + 1)], xb)
    for i in range(nstep + 1):
        its = torch.div(nums[i], mx - mn)
        laux = torch.clamp(_nearest_int(its[:, None] * (xb - mn[:, None])), 0, nmax)
        fl = laux.to(torch.float32)
        wl = w * fl
        s = _seq_sum(torch.stack((wl, wl * fl, wl * xb), dim=-2))
        s_l, s_l2, s_xl = s[:, 0], s[:, 1], s[:, 2]
        D = sum_w * s_l2 - s_l * s_l
        this_scale = torch.div(sum_w * s_xl - sum_x * s_l, D)
        this_min = torch.div(s_l2 * sum_x - s_l * s_xl, D)
        pos = this_min > 0
        this_min = torch.where(pos, 0.0, this_min)
        this_scale = torch.where(pos, torch.div(s_xl, s_l2), this_scale)
        diff = this_scale[:, None] * fl + this_min[:, None] - xb
        mad = _seq_sum(w * (diff * diff))
        win = (D > 0) & (mad < best)
        L = torch.where(win[:, None], laux, L)
        best = torch.where(win, mad, best)
        scale = torch.where(win, this_scale, scale)
        mn = torch.where(win, this_min, mn)
    return torch.where(flat, 0.0, scale), torch.where(flat, mn0, mn), torch.where(flat[:, None], 0, L)


def _q4_0_impl(xb: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    d, L = _make_qx_quants(xb, w, 8)
    return torch.cat((_f16_bytes(d), _pack_nibbles(L)), dim=-1)


def _q5_0_impl(xb: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    d, L = _make_qx_quants(xb, w, 16)
    return torch.cat((_f16_bytes(d), _qh_bytes(L), _pack_nibbles(L)), dim=-1)


def _q4_1_impl(xb: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    d, mn, L = _make_qkx3_quants(xb, w, 15)
    return torch.cat((_f16_bytes(d), _f16_bytes(mn), _pack_nibbles(L)), dim=-1)


def _q5_1_impl(xb: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    d, mn, L = _make_qkx3_quants(xb, w, 31)
    return torch.cat((_f16_bytes(d), _f16_bytes(mn), _qh_bytes(L), _pack_nibbles(L)), dim=-1)


# Temporaries per element of a chunk (see _chunked), generously: the reference paths hold a few
# block-sized tensors, make_qx_quants 19 candidates, make_qkx3_quants one trial at a time.
_FANOUT_REF, _FANOUT_QX, _FANOUT_QKX, _FANOUT_IQ4 = 8, 160, 24, 192


def _legacy(ref: Callable, impl: Callable, fanout_impl: int) -> RowQuantizer:
    def rows_fn(x: torch.Tensor, imp: torch.Tensor | None) -> torch.Tensor:
        xb = x.reshape(-1, QK)
        if imp is None:
            out = _chunked(ref, _FANOUT_REF, xb)
        else:
            out = _chunked(impl, fanout_impl, xb, _impl_weights(x, imp))
        return out.reshape(x.shape[0], -1)
    return rows_fn


def _q8_0_rows(x: torch.Tensor, imp: torch.Tensor | None) -> torch.Tensor:
    return _chunked(_q8_0_ref, _FANOUT_REF, x.reshape(-1, QK)).reshape(x.shape[0], -1)


# ---------------------------------------------------------------------------------------------
# IQ4_NL / IQ4_XS (quantize_row_iq4_nl_impl, ntry = 7)


def _kvalues(like: torch.Tensor) -> torch.Tensor:
    return _consts(KVALUES_IQ4NL, like)


def _best_index_iq4(x: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
    """best_index_int8(16, kvalues_iq4nl, x) elementwise (int64): the binary search's result,
    nearest level, ties to the upper one, NaN to 15 (its compares all fail, as in C)."""
    ml = torch.zeros(x.shape, dtype=torch.int64, device=x.device)
    for k in range(1, 15):  # the search ends on the last k with !(x < kv[k])
        ml += ~(x < kv[k])
    mu = ml + 1
    idx = torch.where(x - kv[ml] < kv[mu] - x, ml, mu)
    idx = torch.where(x >= kv[15], 15, idx)
    return torch.where(x <= kv[0], 0, idx)


def _iq4_scales(xb: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The scale of each 32-element block (B,): the first estimate ``-max / values[0]`` refined by
    the weighted least squares, then the 15 trials ``(itry + values[0]) / max`` in order."""
    kv = _kvalues(xb)
    amax, mx = _max_abs_signed(xb)
    d0 = torch.div(-mx, _f32(KVALUES_IQ4NL[0], xb))
    inv = torch.cat((torch.div(_f32(1.0, xb), d0)[:, None],
                     torch.div(_consts([itry + KVALUES_IQ4NL[0] for itry in range(-7, 8)], xb)[None, :],
                               mx[:, None])), dim=1)  # (B, 16)
    q = kv[_best_index_iq4(inv[:, :, None] * xb[:, None, :], kv)]  # (B, 16, 32)
    wq = w[:, None, :] * q
    sums = _seq_sum(torch.stack((wq * xb[:, None, :], wq * q), dim=-2))  # (B, 16, 2)
    sqx, sq2 = sums[..., 0], sums[..., 1]
    d = torch.where(sq2[:, 0] > 0, torch.div(sqx[:, 0], sq2[:, 0]), torch.zeros_like(amax))
    best = d * sqx[:, 0]
    for t in range(1, 16):
        ok = (sq2[:, t] > 0) & (sqx[:, t] * sqx[:, t] > best * sq2[:, t])
        d = torch.where(ok, torch.div(sqx[:, t], sq2[:, t]), d)
        best = torch.where(ok, d * sqx[:, t], best)
    return torch.where(amax < GROUP_MAX_EPS, 0.0, d)


def _iq4_weights(x: torch.Tensor, imp: torch.Tensor | None) -> torch.Tensor:
    """Weights of super-blocks ``x`` (S, n): ``x*x``, or ``qw * sqrt(sigma2 + x*x)`` with
    ``sigma2 = 2 * sum(x*x) / n`` over the super-block (``imp`` (S, n), the vector per block)."""
    if imp is None:
        return x * x
    sigma2 = _seq_sum(x * x) * float(np.float32(2.0) / np.float32(x.shape[1]))
    return imp * _sqrtf(sigma2[:, None] + x * x)


def _iq4_nl_blocks(xb: torch.Tensor, imp: torch.Tensor | None) -> torch.Tensor:
    d = _iq4_scales(xb, _iq4_weights(xb, imp))
    L = _best_index_iq4(_inv_or_zero(d)[:, None] * xb, _kvalues(xb))
    return torch.cat((_f16_bytes(d), _pack_nibbles(L)), dim=-1)


def _iq4_xs_blocks(xs: torch.Tensor, imp: torch.Tensor | None) -> torch.Tensor:
    S = xs.shape[0]
    w = _iq4_weights(xs, imp)
    scales = _iq4_scales(xs.reshape(-1, QK), w.reshape(-1, QK)).reshape(S, -1)  # (S, 8)
    _, max_scale = _max_abs_signed(scales)
    d = torch.div(-max_scale, _f32(32.0, xs))
    ls = torch.clamp(_nearest_int(_inv_or_zero(d)[:, None] * scales), -32, 31).to(torch.int64)
    dl = d[:, None] * ls.to(torch.float32)
    L = _best_index_iq4(_inv_or_zero(dl)[:, :, None] * xs.reshape(S, -1, QK), _kvalues(xs))  # (S, 8, 32)
    ls = ls + 32
    scales_l = ((ls[:, 0::2] & 0xF) | ((ls[:, 1::2] & 0xF) << 4)).to(torch.uint8)  # (S, 4)
    scales_h = ((ls >> 4) << (2 * torch.arange(ls.shape[1], device=xs.device))).sum(-1)  # disjoint bits
    return torch.cat((_f16_bytes(d), _le_bytes(scales_h, 2), scales_l, _pack_nibbles(L.reshape(S, -1))), dim=-1)


def _iq4_nl_rows(x: torch.Tensor, imp: torch.Tensor | None) -> torch.Tensor:
    qw = None if imp is None else imp.reshape(1, -1, QK).expand(x.shape[0], -1, -1).reshape(-1, QK)
    return _chunked(_iq4_nl_blocks, _FANOUT_IQ4, x.reshape(-1, QK), qw).reshape(x.shape[0], -1)


def _iq4_xs_rows(x: torch.Tensor, imp: torch.Tensor | None) -> torch.Tensor:
    qw = None if imp is None else imp.reshape(1, -1, QK_K).expand(x.shape[0], -1, -1).reshape(-1, QK_K)
    return _chunked(_iq4_xs_blocks, _FANOUT_IQ4, x.reshape(-1, QK_K), qw).reshape(x.shape[0], -1)


# ---------------------------------------------------------------------------------------------
# dequantizers (the numba kernels' float32 products, in their order)


def _blocks(data: torch.Tensor, name: str) -> torch.Tensor:
    return data.reshape(-1, type_info(name).type_size)


def _dq_q4_0(data: torch.Tensor, n: int) -> torch.Tensor:
    b = _blocks(data, "Q4_0")
    q = _unpack_nibbles(b[:, 2:])
    return ((q - 8).to(torch.float32) * _f16_at(b, 0)[:, None]).reshape(-1, n)


def _dq_q4_1(data: torch.Tensor, n: int) -> torch.Tensor:
    b = _blocks(data, "Q4_1")
    q = _unpack_nibbles(b[:, 4:])
    return (q.to(torch.float32) * _f16_at(b, 0)[:, None] + _f16_at(b, 2)[:, None]).reshape(-1, n)


def _q5_levels(b: torch.Tensor, o_qh: int) -> torch.Tensor:
    qh = _u_at(b, o_qh, 4)
    h = ((qh[:, None] >> torch.arange(QK, device=b.device)) & 1) << 4
    return _unpack_nibbles(b[:, o_qh + 4:]) | h


def _dq_q5_0(data: torch.Tensor, n: int) -> torch.Tensor:
    b = _blocks(data, "Q5_0")
    return ((_q5_levels(b, 2) - 16).to(torch.float32) * _f16_at(b, 0)[:, None]).reshape(-1, n)


def _dq_q5_1(data: torch.Tensor, n: int) -> torch.Tensor:
    b = _blocks(data, "Q5_1")
    return (_q5_levels(b, 4).to(torch.float32) * _f16_at(b, 0)[:, None] + _f16_at(b, 2)[:, None]).reshape(-1, n)


def _dq_q8_0(data: torch.Tensor, n: int) -> torch.Tensor:
    b = _blocks(data, "Q8_0")
    q = b[:, 2:].contiguous().view(torch.int8).to(torch.float32)
    return (q * _f16_at(b, 0)[:, None]).reshape(-1, n)


def _dq_iq4_nl(data: torch.Tensor, n: int) -> torch.Tensor:
    b = _blocks(data, "IQ4_NL")
    return (_f16_at(b, 0)[:, None] * _kvalues(b)[_unpack_nibbles(b[:, 2:])]).reshape(-1, n)


def _dq_iq4_xs(data: torch.Tensor, n: int) -> torch.Tensor:
    b = _blocks(data, "IQ4_XS")
    scales_h = _u_at(b, 2, 2)
    ib = torch.arange(QK_K // QK, device=b.device)
    ls = ((b[:, 4 + ib // 2].to(torch.int64) >> (4 * (ib % 2))) & 0xF) | (((scales_h[:, None] >> (2 * ib)) & 3) << 4)
    dl = _f16_at(b, 0)[:, None] * (ls - 32).to(torch.float32)  # (N, 8)
    q = _kvalues(b)[_unpack_nibbles(b[:, 8:])].reshape(b.shape[0], -1, QK)
    return (dl[:, :, None] * q).reshape(-1, n)


QUANTIZERS: dict[str, RowQuantizer] = {
    "Q4_0": _legacy(_q4_0_ref, _q4_0_impl, _FANOUT_QX),
    "Q4_1": _legacy(_q4_1_ref, _q4_1_impl, _FANOUT_QKX),
    "Q5_0": _legacy(_q5_0_ref, _q5_0_impl, _FANOUT_QX),
    "Q5_1": _legacy(_q5_1_ref, _q5_1_impl, _FANOUT_QKX),
    "Q8_0": _q8_0_rows,
    "IQ4_NL": _iq4_nl_rows,
    "IQ4_XS": _iq4_xs_rows,
}
DEQUANTIZERS: dict[str, RowDequantizer] = {
    "Q4_0": _dq_q4_0, "Q4_1": _dq_q4_1, "Q5_0": _dq_q5_0, "Q5_1": _dq_q5_1, "Q8_0": _dq_q8_0,
    "IQ4_NL": _dq_iq4_nl, "IQ4_XS": _dq_iq4_xs,
}
# type -> why its torch blocks may differ from the numba kernels' (the tests then hold the
# profile's error to 1e-6 relative instead of the blocks to equality). Empty: every type above is
# bit-identical, with and without importance weights.
NOT_BIT_IDENTICAL: dict[str, str] = {}
QUANTIZERS.update(torch_kquants.QUANTIZERS)  # Q2_K .. Q6_K
DEQUANTIZERS.update(torch_kquants.DEQUANTIZERS)


# ---------------------------------------------------------------------------------------------
# public API


def torch_quantizable() -> tuple[str, ...]:
    """The types :func:`quantize_rows` and :func:`dequantize_rows` are defined for."""
    return tuple(t for t in QUANTIZERS if t in DEQUANTIZERS)


def _lookup(table: dict, qtype, what: str):
    name = parse_qtype(qtype).name
    if name not in table:
        raise NotImplementedError(f"{name}: no torch {what} ({', '.join(table)} have one)")
    return name, table[name]


def quantize_rows(rows: torch.Tensor, qtype, importance: torch.Tensor | None = None) -> torch.Tensor:
    """GGUF blocks of ``rows`` (n_rows, n_per_row), uint8 (n_rows, row_bytes), on ``rows``' device,
    equal to :func:`dynsearch.kernels.quantize` (``importance``: the imatrix vector, (n_per_row,),
    any device; ignored by the types ggml quantizes without it)."""
    name, fn = _lookup(QUANTIZERS, qtype, "quantizer")
    info = type_info(name)
    if rows.ndim != 2 or rows.shape[1] == 0 or rows.shape[1] % info.block_size:
        raise ValueError(f"{name} needs rows (n_rows, a positive multiple of {info.block_size}), "
                         f"got shape {tuple(rows.shape)}")
    n_rows, n = rows.shape
    x = rows.to(torch.float32).contiguous()
    if not bool(torch.isfinite(x).all()):
        raise ValueError("input rows contain NaN or inf")
    imp = None
    if importance is not None:
        imp = importance.to(device=x.device, dtype=torch.float32).reshape(-1).contiguous()
        if imp.shape != (n,):
            raise ValueError(f"importance must have {n} entries (one per column), got {imp.numel()}")
        if not bool(torch.isfinite(imp).all()) or bool((imp < 0).any()):
            raise ValueError("importance has NaN, inf or negative entries")
    elif info.requires_imatrix:
        raise ValueError(f"{name} requires an importance matrix (imatrix)")
    if n_rows == 0:
        return torch.empty((0, row_nbytes(name, n)), dtype=torch.uint8, device=x.device)
    return fn(x, imp)


def dequantize_rows(blocks: torch.Tensor, qtype, n_per_row: int) -> torch.Tensor:
    """float32 (n_rows, n_per_row) of GGUF ``blocks`` (uint8 (n_rows, row_bytes)), on their device,
    equal to :func:`dynsearch.kernels.dequantize`."""
    name, fn = _lookup(DEQUANTIZERS, qtype, "dequantizer")
    nbytes = row_nbytes(name, int(n_per_row))
    if blocks.dtype != torch.uint8 or blocks.ndim != 2 or blocks.shape[1] != nbytes:
        raise ValueError(f"{name} rows of {n_per_row} elements are uint8 (n_rows, {nbytes}), "
                         f"got {blocks.dtype} {tuple(blocks.shape)}")
    if blocks.shape[0] == 0:
        return torch.empty((0, int(n_per_row)), dtype=torch.float32, device=blocks.device)
    return fn(blocks.contiguous(), int(n_per_row))
