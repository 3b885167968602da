"""Plain float storage: F32, F16, BF16 (ggml_fp32_to_fp16_row, ggml_fp32_to_bf16_row_ref).

Importance weights do not apply to these types.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from dynsearch.kernels._fp import bf16_to_fp32, fp16_to_fp32, fp32_to_bf16, fp32_to_fp16
from dynsearch.kernels.registry import register
from dynsearch.kernels.types import QT


@njit(cache=True, nogil=True, parallel=True)
def quantize_f32(x, qw, out):
    n_rows, n = x.shape
    for r in prange(n_rows):
        y = out[r].view(np.float32)
        for i in range(n):
            y[i] = x[r, i]


@njit(cache=True, nogil=True, parallel=True)
def dequantize_f32(data, out):
    n_rows, n = out.shape
    for r in prange(n_rows):
        v = data[r].view(np.float32)
        for i in range(n):
            out[r, i] = v[i]


@njit(cache=True, nogil=True, parallel=True)
def quantize_f16(x, qw, out):
    n_rows, n = x.shape
    for r in prange(n_rows):
        y = out[r].view(np.uint16)
        for i in range(n):
            y[i] = fp32_to_fp16(x[r, i])


@njit(cache=True, nogil=True, parallel=True)
def dequantize_f16(data, out):
    n_rows, n = out.shape
    for r in prange(n_rows):
        h = data[r].view(np.uint16)
        for i in range(n):
            out[r, i] = fp16_to_fp32(h[i])


@njit(cache=True, nogil=True, parallel=True)
def quantize_bf16(x, qw, out):
    n_rows, n = x.shape
    for r in prange(n_rows):
        y = out[r].view(np.uint16)
        for i in range(n):
            y[i] = fp32_to_bf16(x[r, i])


@njit(cache=True, nogil=True, parallel=True)
def dequantize_bf16(data, out):
    n_rows, n = out.shape
    for r in prange(n_rows):
        h = data[r].view(np.uint16)
        for i in range(n):
            out[r, i] = bf16_to_fp32(h[i])


register(QT.F32, quantize=quantize_f32, dequantize=dequantize_f32, uses_imatrix=False)
register(QT.F16, quantize=quantize_f16, dequantize=dequantize_f16, uses_imatrix=False)
register(QT.BF16, quantize=quantize_bf16, dequantize=dequantize_bf16, uses_imatrix=False)
