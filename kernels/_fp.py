"""Scalar float helpers shared by every kernel family, bit-exact with ggml's C, and the
little-endian fields (fp16, u16, u32) they read and write inside a block of bytes.

ggml computes in plain float32 (no FMA in libggml-base). In numba, a Python float literal is
float64 and silently promotes the whole expression, so kernels use ``f32(...)`` constants and
these helpers, and never ``fastmath``.
"""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import intrinsic

f32 = np.float32


@intrinsic
def f32_bits(typingctx, x):
    """Reinterpret a float32 as its uint32 bit pattern (a bitcast, no conversion)."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.uint32))

    return types.uint32(types.float32), codegen


@intrinsic
def bits_f32(typingctx, x):
    """Reinterpret the low 32 bits of an integer as a float32."""
    if not isinstance(x, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        v = args[0]
        i32 = context.get_value_type(types.uint32)
        if x.bitwidth > 32:
            v = builder.trunc(v, i32)
        elif x.bitwidth < 32:
            v = builder.zext(v, i32)
        return builder.bitcast(v, context.get_value_type(types.float32))

    return types.float32(x), codegen


_SCALE_TO_INF = f32(2.0**112)
_SCALE_TO_ZERO = f32(2.0**-110)
_EXP_SCALE = f32(2.0**-112)
_MAGIC_BIAS = f32(0.5)


@njit(cache=True, nogil=True, inline="always")
def fp32_to_fp16(f):
    """ggml_compute_fp32_to_fp16: round to nearest even, NaN -> 0x7E00. Returns uint16."""
    f = f32(f)
    base = (abs(f) * _SCALE_TO_INF) * _SCALE_TO_ZERO
    w = f32_bits(f)
    shl1_w = np.uint32(w + w)
    sign = w & np.uint32(0x80000000)
    bias = shl1_w & np.uint32(0xFF000000)
    if bias < np.uint32(0x71000000):
        bias = np.uint32(0x71000000)
    base = bits_f32(np.uint32((bias >> np.uint32(1)) + np.uint32(0x07800000))) + base
    bits = f32_bits(base)
    exp_bits = (bits >> np.uint32(13)) & np.uint32(0x00007C00)
    mantissa_bits = bits & np.uint32(0x00000FFF)
    nonsign = exp_bits + mantissa_bits
    if shl1_w > np.uint32(0xFF000000):
        nonsign = np.uint32(0x7E00)
    return np.uint16((sign >> np.uint32(16)) | nonsign)


@njit(cache=True, nogil=True, inline="always")
def fp16_to_fp32(h):
    """ggml_compute_fp16_to_fp32 (exact). ``h`` is the uint16 bit pattern."""
    w = np.uint32(h) << np.uint32(16)
    sign = w & np.uint32(0x80000000)
    two_w = np.uint32(w + w)
    exp_offset = np.uint32(0xE0 << 23)
    normalized_value = bits_f32(np.uint32((two_w >> np.uint32(4)) + exp_offset)) * _EXP_SCALE
    magic_mask = np.uint32(126 << 23)
    denormalized_value = bits_f32((two_w >> np.uint32(17)) | magic_mask) - _MAGIC_BIAS
    if two_w < np.uint32(1 << 27):
        r = f32_bits(denormalized_value)
    else:
        r = f32_bits(normalized_value)
    return bits_f32(sign | r)


@njit(cache=True, nogil=True, inline="always")
def fp32_to_bf16(f):
    """ggml_compute_fp32_to_bf16: round to nearest even, NaN forced quiet. Returns uint16."""
    u = f32_bits(f32(f))
    if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
        return np.uint16((u >> np.uint32(16)) | np.uint32(64))
    return np.uint16((u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16))


@njit(cache=True, nogil=True, inline="always")
def bf16_to_fp32(h):
    return bits_f32(np.uint32(h) << np.uint32(16))


@njit(cache=True, nogil=True, inline="always")
def nearest_int(fval):
    """ggml's ``nearest_int`` bit trick (fval + 1.5*2**23, then the low mantissa bits), as int32.

    Rounds half to even for |fval| < 2**22 and reproduces ggml bit for bit beyond that range and
    for inf/NaN, which occur when an fp16 scale overflows.
    """
    val = f32(fval) + f32(12582912.0)
    return np.int32(f32_bits(val) & np.uint32(0x007FFFFF)) - np.int32(0x00400000)


@njit(cache=True, nogil=True, inline="always")
def roundf(x):
    """C ``roundf`` on float32: halves away from zero (np.rint rounds halves to even)."""
    x = f32(x)
    ax = abs(x)
    t = np.floor(ax)
    if ax - t >= f32(0.5):
        t = t + f32(1.0)
    return f32(-t) if x < f32(0.0) else f32(t)


# ----------------------------------------------------------------------------- block fields
# ``y`` is a uint8 array (a row or a block of GGUF data), ``o`` a byte offset; little endian.


@njit(cache=True, nogil=True, inline="always")
def get_f16(y, o):
    """The fp16 at ``y[o:o+2]`` as float32."""
    return fp16_to_fp32(get_u16(y, o))


@njit(cache=True, nogil=True, inline="always")
def put_f16(y, o, v):
    """Store float ``v`` as fp16 (ggml_compute_fp32_to_fp16) at ``y[o:o+2]``."""
    put_u16(y, o, fp32_to_fp16(v))


@njit(cache=True, nogil=True, inline="always")
def get_u16(y, o):
    return np.uint16(y[o]) | (np.uint16(y[o + 1]) << np.uint16(8))


@njit(cache=True, nogil=True, inline="always")
def put_u16(y, o, v):
    y[o] = np.uint8(v & 0xFF)
    y[o + 1] = np.uint8((v >> 8) & 0xFF)


@njit(cache=True, nogil=True, inline="always")
def get_u32(y, o):
    return (np.uint32(y[o]) | (np.uint32(y[o + 1]) << np.uint32(8))
            | (np.uint32(y[o + 2]) << np.uint32(16)) | (np.uint32(y[o + 3]) << np.uint32(24)))


@njit(cache=True, nogil=True, inline="always")
def put_u32(y, o, v):
    for k in range(4):
        y[o + k] = np.uint8((v >> np.uint32(8 * k)) & np.uint32(0xFF))
