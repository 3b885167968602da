"""Quantizers in torch, on any device, giving the numba kernels' blocks bit for bit (ggml-quants.c's
``quantize_row_*_ref``): the profile's candidates quantized where its error term runs.

Every block is handled side by side as a tensor column; each step is one float32 operation, as in
C (no reduction whose order could differ). Done so far: Q8_0 (which ignores importance weights,
so it is also the profile's quantizer under an imatrix), Q4_0 and Q5_0 without importance
weights. Layouts are :mod:`dynsearch.kernels.legacy`'s::

    blocks = quantize_rows(torch.from_numpy(w).cuda(), "Q4_0")   # uint8 (n_rows, row_bytes)
"""

from __future__ import annotations

import torch

from dynsearch.kernels.legacy import QK  # elements per block of the legacy types (32)
from dynsearch.kernels.types import parse_qtype


def _roundf(x: torch.Tensor) -> torch.Tensor:
    """C ``roundf``: halves away from zero (torch.round rounds them to even)."""
    t = torch.trunc(x)
    half = (x - t).abs() == 0.5  # exact in float32
    return torch.where(half, t + torch.sign(x), torch.round(x))


def _c_int8(x: torch.Tensor) -> torch.Tensor:
    """C ``(int8_t)x`` as x86 does it: truncate to int32 (INT_MIN for NaN / out of range), keep
    the low byte, sign-extended (int64 result)."""
    i = torch.where(x.abs() < 2147483648.0, x, torch.full_like(x, -2147483648.0)).to(torch.int64)
    return ((i & 0xFF) ^ 0x80) - 0x80


def _f16_bytes(d: torch.Tensor) -> torch.Tensor:
    """float32 scales (n,) as their fp16 bytes, little-endian (n, 2)."""
    h = d.to(torch.float16).view(torch.int16).to(torch.int64) & 0xFFFF
    return torch.stack((h & 0xFF, h >> 8), dim=-1).to(torch.uint8)


def _max_abs_signed(xb: torch.Tensor) -> torch.Tensor:
    """Per block (last dim), the element of largest magnitude, the first one on ties (C's ``if
    (amax < fabsf(v))``)."""
    return xb.gather(-1, xb.abs().argmax(-1, keepdim=True))[..., 0]


def _q8_0(xb: torch.Tensor) -> torch.Tensor:
    amax = xb.abs().amax(-1)
    d = amax / 127.0
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    q = _c_int8(_roundf(xb * inv[:, None])) & 0xFF
    return torch.cat((_f16_bytes(d), q.to(torch.uint8)), dim=-1)


def _levels(xb: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0 / Q5_0: the scale ``max / -nmax`` and the levels ``MIN(2 nmax - 1, (int8_t)(x / d + nmax + 0.5))``."""
    d = _max_abs_signed(xb) / float(-nmax)
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    q = torch.clamp_max(_c_int8(xb * inv[:, None] + (nmax + 0.5)), 2 * nmax - 1) & 0xFF
    return d, q


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    return ((q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)).to(torch.uint8)


def _q4_0(xb: torch.Tensor) -> torch.Tensor:
    d, q = _levels(xb, 8)
    return torch.cat((_f16_bytes(d), _nibbles(q)), dim=-1)


def _q5_0(xb: torch.Tensor) -> torch.Tensor:
    d, q = _levels(xb, 16)
    bits = ((q >> 4) & 1) << torch.arange(QK, device=q.device)  # bit j of qh: bit 4 of level j
    qh = bits.sum(-1)  # distinct powers of two: the sum is the bitwise or
    qh_bytes = torch.stack([(qh >> (8 * k)) & 0xFF for k in range(4)], dim=-1).to(torch.uint8)
    return torch.cat((_f16_bytes(d), qh_bytes, _nibbles(q)), dim=-1)


_QUANTIZERS = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q5_0": _q5_0}


def torch_quantizable() -> tuple[str, ...]:
    """The types :func:`quantize_rows` writes."""
    return tuple(_QUANTIZERS)


def quantize_rows(rows: torch.Tensor, qtype: str) -> torch.Tensor:
    """GGUF blocks of float32 ``rows`` (n_rows, n_per_row), uint8 (n_rows, row_bytes), on ``rows``'
    device, equal to :func:`dynsearch.kernels.quantize` without an importance vector."""
    name = parse_qtype(qtype).name
    if name not in _QUANTIZERS:
        raise NotImplementedError(f"{name}: no torch quantizer yet ({', '.join(_QUANTIZERS)} have one)")
    if rows.ndim != 2 or rows.shape[1] == 0 or rows.shape[1] % QK:
        raise ValueError(f"{name} needs rows (n_rows, a positive multiple of {QK}), got shape {tuple(rows.shape)}")
    n_rows, n = rows.shape
    blocks = _QUANTIZERS[name](rows.to(torch.float32).reshape(-1, QK))  # (n_rows * n / QK, block bytes)
    return blocks.reshape(n_rows, -1)
