"""K-quants (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) in torch, on any device, giving :mod:`.kquants`' blocks
bit for bit (ggml's ``quantize_row_qX_K_ref`` without an importance vector, ``quantize_row_qX_K_impl``
with one), and their dequantizers.

Layout of the work: a chunk of super-blocks is a (256, B) tensor, element index first, so that a
super-block or a sub-block is a column and its element ``i`` is the contiguous row ``x[i]``. Each
step of the C is one elementwise float32 operation on all columns at once (separate operations, so
nothing is contracted into an FMA); every sum the C accumulates element by element is accumulated
the same way (:func:`_seqsum`, one vector add per element, in C's order), so no reduction order
differs. The searches of :mod:`.scale_search` keep their loops over candidates and iterations, with
all blocks side by side; where the candidates of one loop are independent (make_qx_quants' 18 scales,
make_qp_quants' 8) they are evaluated together along an extra dimension and then compared in C's order.

Details that the bytes depend on:

* ``nearest_int`` is ggml's ``fval + 12582912.f`` bit trick (halves to even, and ggml's values for
  inf); a NaN gives 0, what the C (and numba) get on x86, whose generated NaN is the default
  0xFFC00000 (a GPU's canonical 0x7FFFFFFF would give 4194303).
* ``GGML_FP32_TO_FP16`` is torch's round-to-nearest-even conversion; a NaN becomes 0xFE00, the fp16
  of x86's default NaN, as in ggml and numba.
* ``sqrtf`` is the float64 root rounded to float32 (correctly rounded, as sqrtf); torch's float32
  sqrt on the CPU is off by one ulp for about one input in six.
* Divisions are tensor by tensor: torch's CUDA kernel multiplies by the reciprocal where the divisor
  is a Python or host scalar, and ``scalar / tensor`` goes through ``reciprocal()``.
* uint8 / int8 stores wrap (``& 0xFF``) where the C's do; the MIN/MAX clamps, early exits (all-zero
  blocks, ``max < GROUP_MAX_EPS``, ``max == min``) and ``if (!d) continue`` are kept.

API (merged into :mod:`.torch_quant`'s registry by name)::

    QUANTIZERS["Q4_K"](rows, importance)  # float32 (n_rows, n_per_row), n_per_row % 256 == 0;
                                          # importance float32 (n_per_row,) or None
                                          # -> uint8 (n_rows, row_bytes), = kernels.quantize
    DEQUANTIZERS["Q4_K"](blocks, n_per_row)  # -> float32 (n_rows, n_per_row), = kernels.dequantize
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import Tensor

QK_K = 256
_EPS = float(np.float32(1e-15))  # GROUP_MAX_EPS
_MAGIC = 12582912.0  # 1.5 * 2**23, nearest_int's bias
_F16_NAN = 0xFE00  # GGML_FP32_TO_FP16 of x86's default NaN (0xFFC00000)
CHUNK = 8192  # super-blocks quantized at once: bounds the temporaries (peak ~0.75 GB: Q6_K's 18 trials)


def _f32(v) -> float:
    """``v`` rounded to float32 (what C's float literal or int-to-float conversion gives)."""
    return float(np.float32(v))


# ---------------------------------------------------------------------------------------------
# Scalar-step helpers (elementwise over any shape)


def _ni(v: Tensor) -> Tensor:
    """ggml's ``nearest_int`` (int32); NaN gives 0 as x86's default NaN does."""
    i = ((v + _MAGIC).view(torch.int32) & 0x7FFFFF) - 0x400000
    return torch.where(torch.isnan(v), torch.zeros_like(i), i)


def _div(a, b) -> Tensor:
    """IEEE float32 ``a / b`` with both operands as device tensors (see the module docstring)."""
    if not isinstance(a, Tensor):
        a = torch.full_like(b, a)
    if not isinstance(b, Tensor):
        b = torch.full_like(a, b)
    return torch.div(a, b)


def _where(c: Tensor, a, b) -> Tensor:
    if not isinstance(a, Tensor):
        a = torch.full_like(b, a)
    if not isinstance(b, Tensor):
        b = torch.full_like(a, b)
    return torch.where(c, a, b)


def _sqrt(v: Tensor) -> Tensor:
    """C's ``sqrtf`` (correctly rounded). torch's float32 sqrt on the CPU is SLEEF's 0.5001-ulp one,
    1 ulp off for some inputs; the float64 root rounded to float32 is the correctly rounded float32
    root (a float32's root is never within float64 error of a float32 rounding midpoint)."""
    return torch.sqrt(v.to(torch.float64)).to(torch.float32)


def _fp16(v: Tensor) -> tuple[Tensor, Tensor]:
    """GGML_FP32_TO_FP16 of ``v``: (the fp16 bits as int32 0..65535, the value back as float32)."""
    bits = v.to(torch.float16).view(torch.int16).to(torch.int32) & 0xFFFF
    bits = torch.where(torch.isnan(v), torch.full_like(bits, _F16_NAN), bits)
    return bits, _f16_value(bits)


def _f16_value(bits: Tensor) -> Tensor:
    """float32 of fp16 bit patterns (int, 0..65535); exact, as GGML_FP16_TO_FP32."""
    return ((bits.to(torch.int32) ^ 0x8000) - 0x8000).to(torch.int16).view(torch.float16).to(torch.float32)


def _f16_bytes(bits: Tensor) -> list[Tensor]:
    """The two little-endian bytes of fp16 bits (B,) as rows."""
    return [bits & 0xFF, bits >> 8]


def _int8(v: Tensor) -> Tensor:
    """C's int8_t store of an int: the low byte, sign-extended."""
    return ((v & 0xFF) ^ 0x80) - 0x80


# ---------------------------------------------------------------------------------------------
# Reductions in C's order, over dim 0 (the element index), all columns at once


def _seqsum(p: Tensor) -> Tensor:
    """``float s = 0; for (i = 0; i < n; ++i) s += p[i];`` for every column."""
    acc = torch.zeros_like(p[0])
    for i in range(p.shape[0]):
        acc = acc + p[i]
    return acc


def _first_absmax(x: Tensor) -> tuple[Tensor, Tensor]:
    """``amax = 0, max = 0; for (i) if (fabsf(x[i]) > amax) { amax = fabsf(x[i]); max = x[i]; }``."""
    amax = torch.zeros_like(x[0])
    mx = torch.zeros_like(x[0])
    ax = x.abs()
    for i in range(x.shape[0]):
        upd = ax[i] > amax
        amax = torch.where(upd, ax[i], amax)
        mx = torch.where(upd, x[i], mx)
    return amax, mx


def _max_from_zero(x: Tensor) -> Tensor:
    """``m = 0; for (i) if (x[i] > m) m = x[i];``."""
    m = torch.zeros_like(x[0])
    for i in range(x.shape[0]):
        m = torch.where(x[i] > m, x[i], m)
    return m


def _dist(d: Tensor, use_mad: bool) -> Tensor:
    return d.abs() if use_mad else d * d


# ---------------------------------------------------------------------------------------------
# Sub-blocks as columns: a (256, B) chunk <-> (s, 256/s * B) with column j*B + b = sub-block j of b


def _sub(x: Tensor, s: int) -> Tensor:
    return x.reshape(QK_K // s, s, -1).transpose(0, 1).reshape(s, -1)


def _unsub(x: Tensor, s: int) -> Tensor:
    return x.reshape(s, QK_K // s, -1).transpose(0, 1).reshape(QK_K, -1)


def _per_sub(v: Tensor, s: int) -> Tensor:
    """A per-super-block value (B,) repeated for each of its sub-blocks' columns (256/s * B,)."""
    return v.repeat(QK_K // s)


def _per_elem(v: Tensor, s: int) -> Tensor:
    """Per-sub-block values (256/s, B) repeated over their s elements (256, B)."""
    return v.repeat_interleave(s, dim=0)


# ---------------------------------------------------------------------------------------------
# The scale searches of scale_search.py, over columns


_QX_IS = tuple(list(range(-9, 0)) + list(range(1, 10)))  # make_qx_quants' trial offsets, in C's order
_QP_IS = (-4, -3, -2, -1, 1, 2, 3, 4)  # make_qp_quants'


def _make_qx_quants(x: Tensor, w: Tensor, nmax: int) -> tuple[Tensor, Tensor]:
    """make_qx_quants(n, nmax, x, L, rmse_type=1, qw=w): (scale (N,), L int32 (n, N) in 0..2 nmax-1)."""
    amax, mx = _first_absmax(x)
    zero = amax < _EPS
    iscale = _div(_f32(-nmax), mx)
    l0 = _ni(iscale * x).clamp(-nmax, nmax - 1)
    fl = l0.to(torch.float32)
    wx = w * x
    sumlx = _seqsum(wx * fl)
    suml2 = _seqsum(w * fl * fl)
    scale = _where(suml2 != 0, _div(sumlx, suml2), 0.0)
    best = scale * sumlx
    nums = [_f32(-(np.float32(nmax) + np.float32(0.1) * np.float32(s))) for s in _QX_IS]
    isc = torch.stack([_div(v, mx) for v in nums])  # (18, N)
    lt = _ni(isc * x[:, None]).clamp(-nmax, nmax - 1)  # (n, 18, N)
    ft = lt.to(torch.float32)
    slx = _seqsum(wx[:, None] * ft)
    sl2 = _seqsum(w[:, None] * ft * ft)
    win = torch.full_like(l0[0], -1)
    for c in range(len(_QX_IS)):
        upd = (sl2[c] > 0) & (slx[c] * slx[c] > best * sl2[c])
        scale = torch.where(upd, _div(slx[c], sl2[c]), scale)
        best = torch.where(upd, scale * slx[c], best)
        win = torch.where(upd, c, win)
    picked = lt.gather(1, win.clamp_min(0).long()[None, None].expand(lt.shape[0], 1, -1))[:, 0]
    L = torch.where(win >= 0, picked, l0) + nmax
    return _where(zero, 0.0, scale), torch.where(zero, 0, L)


def _make_q3_quants(x: Tensor, nmax: int) -> tuple[Tensor, Tensor]:
    """make_q3_quants(n, nmax, x, L, do_rmse=true): (scale (N,), L int32 (n, N))."""
    amax, mx = _first_absmax(x)
    zero = amax < _EPS
    iscale = _div(_f32(-nmax), mx)
    L = _ni(iscale * x).clamp(-nmax, nmax - 1)
    fl = L.to(torch.float32)
    w = x * x
    wx = w * x
    sumlx = _seqsum(wx * fl)
    suml2 = _seqsum(w * fl * fl)
    live = ~zero
    for _ in range(5):
        changed = torch.zeros_like(zero)
        for i in range(x.shape[0]):
            li = L[i].to(torch.float32)
            slx = sumlx - wx[i] * li
            sl2 = suml2 - w[i] * li * li
            new_l = _ni(_div(x[i] * sl2, slx)).clamp(-nmax, nmax - 1)
            nl = new_l.to(torch.float32)
            slx2 = slx + wx[i] * nl
            sl22 = sl2 + w[i] * nl * nl
            acc = (live & (slx > 0) & (new_l != L[i]) & (sl22 > 0)
                   & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22))
            L[i] = torch.where(acc, new_l, L[i])
            sumlx = torch.where(acc, slx2, sumlx)
            suml2 = torch.where(acc, sl22, suml2)
            changed |= acc
        if not bool(changed.any()):  # a block that changed nothing would change nothing again
            break
    scale = _where(suml2 > 0, _div(sumlx, suml2), 0.0)
    return _where(zero, 0.0, scale), torch.where(zero, 0, L + nmax)


def _make_qkx2_quants(x: Tensor, w: Tensor, nmax: int, rmin: float, rdelta: float, nstep: int,
                      use_mad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """make_qkx2_quants (and make_qkx3_quants with weights, the same steps): (scale, the_min, L)."""
    n = x.shape[0]
    mn = x[0].clone()
    mx = x[0].clone()
    sum_w = w[0].clone()
    sum_x = sum_w * x[0]
    for i in range(1, n):
        mn = torch.where(x[i] < mn, x[i], mn)
        mx = torch.where(x[i] > mx, x[i], mx)
        sum_w = sum_w + w[i]
        sum_x = sum_x + w[i] * x[i]
    mn = _where(mn > 0, 0.0, mn)
    flat = mx == mn
    iscale = _div(float(nmax), mx - mn)
    scale = _div(1.0, iscale)
    L = _ni(iscale * (x - mn)).clamp(0, nmax)
    best = _seqsum(w * _dist(scale * L.to(torch.float32) + mn - x, use_mad))
    for is_ in range(nstep + 1):
        num = _f32(np.float32(np.float32(rmin) + np.float32(rdelta) * np.float32(is_)) + np.float32(nmax))
        its = _div(num, mx - mn)
        la = _ni(its * (x - mn)).clamp(0, nmax)
        fl = la.to(torch.float32)
        wl = w * fl
        s = _seqsum(torch.stack((wl, wl * fl, wl * x), dim=1))
        sum_l, sum_l2, sum_xl = s[0], s[1], s[2]
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = _div(sum_w * sum_xl - sum_x * sum_l, D)
        this_min = _div(sum_l2 * sum_x - sum_l * sum_xl, D)
        pos = this_min > 0
        this_min = _where(pos, 0.0, this_min)
        this_scale = torch.where(pos, _div(sum_xl, sum_l2), this_scale)
        cur = _seqsum(w * _dist(this_scale * fl + this_min - x, use_mad))
        win = (D > 0) & (cur < best) & ~flat
        L = torch.where(win, la, L)
        best = torch.where(win, cur, best)
        scale = torch.where(win, this_scale, scale)
        mn = torch.where(win, this_min, mn)
    return _where(flat, 0.0, scale), -mn, torch.where(flat, 0, L)


def _make_qp_quants(x: Tensor, qw: Tensor, nmax: int) -> tuple[Tensor, Tensor]:
    """make_qp_quants(n, nmax, x, L, quant_weights=qw): (scale (N,), L (n, N), uint8 values)."""
    mx = torch.zeros_like(x[0])
    for i in range(x.shape[0]):
        mx = torch.where(mx > x[i], mx, x[i])  # MAX(max, x[i])
    zero = mx < _EPS
    iscale = _div(float(nmax), mx)
    scale = _div(1.0, iscale)
    diff = x - scale * (_ni(iscale * x) & 0xFF).to(torch.float32)
    best = _seqsum(qw * diff * diff)
    nums = [_f32(np.float32(np.float32(0.1) * np.float32(s)) + np.float32(nmax)) for s in _QP_IS]
    isc = torch.stack([_div(v, mx) for v in nums])  # (8, N)
    ssc = _div(1.0, isc)
    lt = _ni(isc * x[:, None]).clamp_max(nmax).to(torch.float32)  # (n, 8, N)
    dt = x[:, None] - ssc * lt
    mse = _seqsum(qw[:, None] * dt * dt)
    for t in range(len(_QP_IS)):
        upd = mse[t] < best
        best = torch.where(upd, mse[t], best)
        iscale = torch.where(upd, isc[t], iscale)
    l = _ni(iscale * x).clamp_max(nmax)
    L = l & 0xFF
    fl = l.to(torch.float32)
    wx = qw * x
    sumlx = _seqsum(wx * fl)
    suml2 = _seqsum(qw * fl * fl)
    live = ~zero
    for _ in range(5):
        changed = torch.zeros_like(zero)
        for i in range(x.shape[0]):
            li = L[i].to(torch.float32)
            slx = sumlx - wx[i] * li
            sl2 = suml2 - qw[i] * li * li
            new_l = _ni(_div(x[i] * sl2, slx)).clamp_max(nmax)
            nl = new_l.to(torch.float32)
            slx2 = slx + wx[i] * nl
            sl22 = sl2 + qw[i] * nl * nl
            acc = (live & (slx > 0) & (sl2 > 0) & (new_l != L[i])
                   & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22))
            L[i] = torch.where(acc, new_l & 0xFF, L[i])
            sumlx = torch.where(acc, slx2, sumlx)
            suml2 = torch.where(acc, sl22, suml2)
            changed |= acc
        if not bool(changed.any()):
            break
    scale = _where(suml2 > 0, _div(sumlx, suml2), 0.0)
    return _where(zero, 0.0, scale), torch.where(zero, 0, L)


# ---------------------------------------------------------------------------------------------
# Level layouts: where each of a super-block's 256 levels (or a bit field of it) lives in the block


class _Field:
    """Bits ``(L >> lshift) & mask`` of level ``e`` live at bit ``shift[e]`` of byte ``byte[e]``."""

    def __init__(self, lshift: int, mask: int, byte: np.ndarray, shift: np.ndarray):
        self.lshift, self.mask = lshift, mask
        self.byte, self.shift = byte.astype(np.int64), shift.astype(np.int32)
        self.first = int(self.byte.min())
        nbytes = int(self.byte.max()) - self.first + 1
        n = self.byte.size
        order = np.lexsort((np.arange(n), self.byte))
        self.elems = order.reshape(nbytes, n // nbytes)  # (bytes, levels sharing a byte, in level order)
        assert (self.byte[self.elems] == self.first + np.arange(nbytes)[:, None]).all()
        self.elem_shift = self.shift[self.elems]
        self._dev: dict = {}

    def _t(self, device) -> tuple[Tensor, ...]:
        if device not in self._dev:
            self._dev[device] = tuple(torch.as_tensor(a, device=device) for a in (
                self.elems.T.copy(), self.elem_shift.T.copy(), self.byte, self.shift))
        return self._dev[device]

    def pack(self, L: Tensor) -> Tensor:
        """Bytes (nbytes, B) of levels L (256, B): disjoint bit fields, OR-ed."""
        elems, eshift, _, _ = self._t(L.device)
        f = (L >> self.lshift) & self.mask
        out = None
        for k in range(elems.shape[0]):
            part = f.index_select(0, elems[k]) << eshift[k][:, None]
            out = part if out is None else out | part
        return out

    def unpack(self, b: Tensor) -> Tensor:
        """This field of every level (B, 256) from blocks b (B, nbytes), shifted back into place."""
        _, _, byte, shift = self._t(b.device)
        return ((b.index_select(1, byte) >> shift) & self.mask) << self.lshift


_E = np.arange(QK_K)
_Q6_FIELDS = (  # e = 128 h + 32 k + l
    _Field(0, 0xF, 64 * (_E // 128) + 32 * ((_E // 32) % 2) + _E % 32, 4 * (((_E // 32) % 4) // 2)),
    _Field(4, 0x3, 128 + 32 * (_E // 128) + _E % 32, 2 * ((_E // 32) % 4)),
)
_Q3_FIELDS = (
    _Field(0, 0x3, 32 + 32 * (_E // 128) + _E % 32, 2 * ((_E // 32) % 4)),
    _Field(2, 0x1, _E % 32, _E // 32),  # hmask: bit b of byte m is level 32 b + m
)
_Q2_FIELDS = (_Field(0, 0x3, 16 + 32 * (_E // 128) + _E % 32, 2 * ((_E % 128) // 32)),)
_Q4_FIELDS = (_Field(0, 0xF, 16 + 32 * (_E // 64) + _E % 32, 4 * ((_E // 32) % 2)),)  # e = 64 k + 32 t + l
_Q5_FIELDS = (
    _Field(0, 0xF, 48 + 32 * (_E // 64) + _E % 32, 4 * ((_E // 32) % 2)),
    _Field(4, 0x1, 16 + _E % 32, _E // 32),
)
_J16 = np.arange(16)
# Q3_K's 16 6-bit scales in 12 bytes: low nibble of j at byte j % 8 (shift 4 (j // 8)), high 2 bits
# at byte 8 + j % 4 (shift 2 (j // 4))
_Q3_SC_FIELDS = (_Field(0, 0xF, _J16 % 8, 4 * (_J16 // 8)), _Field(4, 0x3, 8 + _J16 % 4, 2 * (_J16 // 4)))


def _levels(b: Tensor, fields) -> Tensor:
    out = None
    for f in fields:
        v = f.unpack(b)
        out = v if out is None else out | v
    return out


def _pack(L: Tensor, fields) -> list[Tensor]:
    """The fields' bytes (nbytes, B) each, in their order within the block."""
    return [f.pack(L) for f in sorted(fields, key=lambda f: f.first)]


# ---------------------------------------------------------------------------------------------
# Q6_K: ql[128] | qh[64] | scales[16] (int8) | d


def _q6_k(x: Tensor, qw: Tensor | None) -> Tensor:
    B = x.shape[1]
    xs = _sub(x, 16)
    scales, L = _make_qx_quants(xs, xs * xs if qw is None else _sub(qw, 16), 32)
    scales = scales.reshape(16, B)
    L = _unsub(L, 16)
    amax, max_scale = _first_absmax(scales)
    zero = amax < _EPS
    iscale = _div(-128.0, max_scale)
    dbits, d_all = _fp16(_div(1.0, iscale))
    sc = _ni(iscale * scales).clamp_max(127) & 0xFF  # (16, B) bytes
    d = _per_elem(d_all * _int8(sc).to(torch.float32), 16)
    L = torch.where(d != 0, _ni(_div(x, d)).clamp(-32, 31) + 32, L)
    out = torch.cat(_pack(L, _Q6_FIELDS) + [sc, torch.stack(_f16_bytes(dbits))])
    return torch.where(zero, 0, out)


def _dq6_k(b: Tensor) -> Tensor:
    d = _f16_value(b[:, 208] | (b[:, 209] << 8))
    q = _levels(b, _Q6_FIELDS) - 32
    dl = d[:, None] * _int8(b[:, 192:208]).to(torch.float32)
    return dl.repeat_interleave(16, dim=1) * q.to(torch.float32)


# ---------------------------------------------------------------------------------------------
# Q3_K: hmask[32] | qs[64] | scales[12] (6-bit) | d


def _q3_k(x: Tensor, qw: Tensor | None) -> Tensor:
    B = x.shape[1]
    xs = _sub(x, 16)
    if qw is None:  # quantize_row_q3_K_ref
        scales, L = _make_q3_quants(xs, 4)
        scales = scales.reshape(16, B)
        _, max_scale = _first_absmax(scales)
        nz = max_scale != 0
        iscale = _div(-32.0, max_scale)
        Ls = torch.where(nz, _int8(_ni(iscale * scales)).clamp(-32, 31) + 32, 0)
        d_block = _where(nz, _div(1.0, iscale), 0.0)
    else:  # quantize_row_q3_K_impl
        sigma2 = _div(2.0 * _seqsum(x * x), float(QK_K))
        w = _sub(qw, 16) * _sqrt(_per_sub(sigma2, 16) + xs * xs)
        sw = _seqsum(w)
        scales, L = _make_qx_quants(xs, w, 4)
        d_block, Ls = _make_qx_quants(scales.reshape(16, B), sw.reshape(16, B), 32)
    L = _unsub(L, 16)
    sc_bytes = torch.cat(_pack(Ls, _Q3_SC_FIELDS))  # (12, B)
    dbits, d_all = _fp16(d_block)
    sc = _levels(sc_bytes.T, _Q3_SC_FIELDS).T - 32  # (16, B), read back as the C does
    d = _per_elem(d_all * sc.to(torch.float32), 16)
    L = torch.where(d != 0, _ni(_div(x, d)).clamp(-4, 3) + 4, L)
    return torch.cat(_pack(L, _Q3_FIELDS) + [sc_bytes, torch.stack(_f16_bytes(dbits))])


def _dq3_k(b: Tensor) -> Tensor:
    d = _f16_value(b[:, 108] | (b[:, 109] << 8))
    sc = _levels(b[:, 96:108], _Q3_SC_FIELDS) - 32
    q = _levels(b, _Q3_FIELDS) - 4
    dl = d[:, None] * sc.to(torch.float32)
    return dl.repeat_interleave(16, dim=1) * q.to(torch.float32)


# ---------------------------------------------------------------------------------------------
# Q2_K: scales[16] (4-bit scale | 4-bit min << 4) | qs[64] | d | dmin


def _q2_k(x: Tensor, qw: Tensor | None) -> Tensor:
    B = x.shape[1]
    xs = _sub(x, 16)
    if qw is None:  # quantize_row_q2_K_ref
        scales, mins, L = _make_qkx2_quants(xs, xs.abs(), 3, -0.5, 0.1, 15, True)
        scales, mins = scales.reshape(16, B), mins.reshape(16, B)
        max_scale, max_min = _max_from_zero(scales), _max_from_zero(mins)
        has_s, has_m = max_scale > 0, max_min > 0
        sc = torch.where(has_s, _ni(_div(15.0, max_scale) * scales) & 0xFF, 0)
        sc = torch.where(has_m, sc | ((_ni(_div(15.0, max_min) * mins) & 0xF) << 4), sc)
        dbits, d_all = _fp16(_where(has_s, _div(max_scale, 15.0), 0.0))
        mbits, m_all = _fp16(_where(has_m, _div(max_min, 15.0), 0.0))
    else:  # quantize_row_q2_K_impl
        sigma2 = _div(_seqsum(x * x), float(QK_K))
        w = _sub(qw, 16) * _sqrt(_per_sub(sigma2, 16) + xs * xs)
        sw = _seqsum(w).reshape(16, B)
        scales, mins, L = _make_qkx2_quants(xs, w, 3, -0.9, 0.05, 36, False)
        dm, Ls = _make_qp_quants(scales.reshape(16, B), sw, 15)
        mm, Lm = _make_qp_quants(mins.reshape(16, B), sw, 15)
        dbits, d_all = _fp16(dm)
        mbits, m_all = _fp16(mm)
        sc = (Ls | (Lm << 4)) & 0xFF
    L = _unsub(L, 16)
    d = _per_elem(d_all * (sc & 0xF).to(torch.float32), 16)
    dm = _per_elem(m_all * (sc >> 4).to(torch.float32), 16)
    L = torch.where(d != 0, _ni(_div(x + dm, d)).clamp(0, 3), L)
    return torch.cat([sc] + _pack(L, _Q2_FIELDS) + [torch.stack(_f16_bytes(dbits) + _f16_bytes(mbits))])


def _dq2_k(b: Tensor) -> Tensor:
    d = _f16_value(b[:, 80] | (b[:, 81] << 8))
    dmin = _f16_value(b[:, 82] | (b[:, 83] << 8))
    sc = b[:, :16]
    dl = (d[:, None] * (sc & 0xF).to(torch.float32)).repeat_interleave(16, dim=1)
    ml = (dmin[:, None] * (sc >> 4).to(torch.float32)).repeat_interleave(16, dim=1)
    return dl * _levels(b, _Q2_FIELDS).to(torch.float32) - ml


# ---------------------------------------------------------------------------------------------
# Q4_K / Q5_K: d | dmin | scales[12] (6-bit scales and mins) | [qh[32]] | qs


def _scale_min_k4(q: Tensor) -> tuple[Tensor, Tensor]:
    """get_scale_min_k4 of the 8 sub-blocks from the 12 packed bytes q (12, ...): (sc, m) (8, ...)."""
    sc = torch.cat((q[0:4] & 63, (q[8:12] & 0xF) | ((q[0:4] >> 6) << 4)))
    m = torch.cat((q[4:8] & 63, (q[8:12] >> 4) | ((q[4:8] >> 6) << 4)))
    return sc, m


def _pack_scale_min_k4(Ls: Tensor, Lm: Tensor) -> Tensor:
    """The 12 bytes of 8 (scale, min) uint8 pairs (8, B), as the C's stores and |= (uint8 wrap)."""
    lo = (Ls[0:4] | ((Ls[4:8] >> 4) << 6)) & 0xFF
    mid = (Lm[0:4] | ((Lm[4:8] >> 4) << 6)) & 0xFF
    hi = ((Ls[4:8] & 0xF) | ((Lm[4:8] & 0xF) << 4)) & 0xFF
    return torch.cat((lo, mid, hi))


def _k4(x: Tensor, qw: Tensor | None, nmax: int, rmin: float, nstep: int, clamp63: bool,
        fields) -> Tensor:
    B = x.shape[1]
    xs = _sub(x, 32)
    if qw is None:  # quantize_row_q4_K_ref / q5_K_ref
        av_x = _sqrt(_div(_seqsum(xs * xs), 32.0))
        scales, mins, L = _make_qkx2_quants(xs, av_x + xs.abs(), nmax, rmin, 0.1, nstep, False)
        scales, mins = scales.reshape(8, B), mins.reshape(8, B)
        max_scale, max_min = _max_from_zero(scales), _max_from_zero(mins)
        inv_scale = _where(max_scale > 0, _div(63.0, max_scale), 0.0)
        inv_min = _where(max_min > 0, _div(63.0, max_min), 0.0)
        Ls = (_ni(inv_scale * scales) & 0xFF).clamp_max(63)
        Lm = (_ni(inv_min * mins) & 0xFF).clamp_max(63)
        d_block, m_block = _div(max_scale, 63.0), _div(max_min, 63.0)
    else:  # quantize_row_q4_K_impl / q5_K_impl
        sigma2 = _div(2.0 * _seqsum(x * x), float(QK_K))
        w = _sub(qw, 32) * _sqrt(_per_sub(sigma2, 32) + xs * xs)
        sw = _seqsum(w).reshape(8, B)
        scales, mins, L = _make_qkx2_quants(xs, w, nmax, -0.9, 0.05, 36, False)
        d_block, Ls = _make_qp_quants(scales.reshape(8, B), sw, 63)
        m_block, Lm = _make_qp_quants(mins.reshape(8, B), sw, 63)
        if clamp63:  # q5_K_impl clamps, q4_K_impl does not
            Ls, Lm = Ls.clamp_max(63), Lm.clamp_max(63)
    L = _unsub(L, 32)
    q = _pack_scale_min_k4(Ls, Lm)
    dbits, d_all = _fp16(d_block)
    mbits, m_all = _fp16(m_block)
    sc, m = _scale_min_k4(q)
    d = _per_elem(d_all * sc.to(torch.float32), 32)
    dm = _per_elem(m_all * m.to(torch.float32), 32)
    L = torch.where(d != 0, _ni(_div(x + dm, d)).clamp(0, nmax), L)
    return torch.cat([torch.stack(_f16_bytes(dbits) + _f16_bytes(mbits)), q] + _pack(L, fields))


def _q4_k(x: Tensor, qw: Tensor | None) -> Tensor:
    return _k4(x, qw, 15, -1.0, 20, False, _Q4_FIELDS)


def _q5_k(x: Tensor, qw: Tensor | None) -> Tensor:
    return _k4(x, qw, 31, -0.5, 15, True, _Q5_FIELDS)


def _dk4(b: Tensor, fields) -> Tensor:
    d = _f16_value(b[:, 0] | (b[:, 1] << 8))
    dmin = _f16_value(b[:, 2] | (b[:, 3] << 8))
    sc, m = _scale_min_k4(b[:, 4:16].T)
    d1 = (d * sc.to(torch.float32)).T.repeat_interleave(32, dim=1)
    m1 = (dmin * m.to(torch.float32)).T.repeat_interleave(32, dim=1)
    return d1 * _levels(b, fields).to(torch.float32) - m1


def _dq4_k(b: Tensor) -> Tensor:
    return _dk4(b, _Q4_FIELDS)


def _dq5_k(b: Tensor) -> Tensor:
    return _dk4(b, _Q5_FIELDS)


# ---------------------------------------------------------------------------------------------
# Row drivers


_TYPES = {  # name: (super-block bytes, block quantizer, block dequantizer)
    "Q2_K": (84, _q2_k, _dq2_k),
    "Q3_K": (110, _q3_k, _dq3_k),
    "Q4_K": (144, _q4_k, _dq4_k),
    "Q5_K": (176, _q5_k, _dq5_k),
    "Q6_K": (210, _q6_k, _dq6_k),
}


def _quantizer(name: str) -> Callable[[Tensor, Tensor | None], Tensor]:
    nbytes, block_fn, _ = _TYPES[name]

    def quantize(rows: Tensor, importance: Tensor | None = None) -> Tensor:
        if rows.ndim != 2 or rows.shape[1] == 0 or rows.shape[1] % QK_K:
            raise ValueError(f"{name} needs rows (n_rows, a positive multiple of {QK_K}), "
                             f"got shape {tuple(rows.shape)}")
        n_rows, n = rows.shape
        nsb = n // QK_K
        x = rows.to(torch.float32).reshape(n_rows * nsb, QK_K)
        qw = None
        if importance is not None:
            qw = torch.as_tensor(importance).to(device=x.device, dtype=torch.float32).reshape(-1)
            if qw.numel() != n:
                raise ValueError(f"importance must have {n} entries (one per column), got {qw.numel()}")
            qw = qw.reshape(nsb, QK_K)
        out = torch.empty((n_rows * nsb, nbytes), dtype=torch.uint8, device=x.device)
        for c0 in range(0, n_rows * nsb, CHUNK):
            c1 = min(n_rows * nsb, c0 + CHUNK)
            xb = x[c0:c1].T.contiguous()  # (256, B): element first
            wb = None
            if qw is not None:
                sb = torch.arange(c0, c1, device=x.device) % nsb  # super-block index within its row
                wb = qw.index_select(0, sb).T.contiguous()
            out[c0:c1] = block_fn(xb, wb).T.to(torch.uint8)
        return out.reshape(n_rows, nsb * nbytes)

    quantize.__name__ = quantize.__qualname__ = f"quantize_{name.lower()}"
    return quantize


def _dequantizer(name: str) -> Callable[[Tensor, int], Tensor]:
    nbytes, _, block_fn = _TYPES[name]

    def dequantize(blocks: Tensor, n_per_row: int) -> Tensor:
        n_per_row = int(n_per_row)
        if n_per_row <= 0 or n_per_row % QK_K:
            raise ValueError(f"{name} rows are a positive multiple of {QK_K} elements, got {n_per_row}")
        row_bytes = n_per_row // QK_K * nbytes
        if blocks.numel() % row_bytes:
            raise ValueError(f"{blocks.numel()} bytes is not a whole number of {name} rows of "
                             f"{n_per_row} elements ({row_bytes} bytes each)")
        b = blocks.reshape(-1, nbytes).to(torch.int32)
        return block_fn(b).reshape(-1, n_per_row)

    dequantize.__name__ = dequantize.__qualname__ = f"dequantize_{name.lower()}"
    return dequantize


QUANTIZERS: dict[str, Callable[[Tensor, Tensor | None], Tensor]] = {t: _quantizer(t) for t in _TYPES}
DEQUANTIZERS: dict[str, Callable[[Tensor, int], Tensor]] = {t: _dequantizer(t) for t in _TYPES}
