"""Checks that run over every registered kernel automatically.

References: ggml's own ``ggml_quantize_chunk`` (ctypes, byte for byte) and gguf-py's numpy
``dequantize``. Family files (test_kernels_<family>.py) add family-specific cases.
"""

from __future__ import annotations

import threading
import time

import gguf
import numpy as np
import pytest
from conftest import DATA_KINDS, make_imatrix, make_rows
from hypothesis import given, settings
from hypothesis import strategies as st

from dynsearch import kernels as K
from dynsearch.kernels import QT

QUANT_TYPES = K.quantizable_types()
DEQUANT_TYPES = K.dequantizable_types()


def _width(qt: QT, wide: bool = False) -> int:
    bs = K.type_info(qt).block_size
    base = 256 if bs <= 256 else bs
    return base * (3 if wide else 1)


# ---------------------------------------------------------------------------------------------
# The type table and byte sizes


def test_type_table_matches_gguf():
    for qt, (bs, ts) in gguf.GGML_QUANT_SIZES.items():
        info = K.type_info(qt)
        assert (info.block_size, info.type_size) == (bs, ts)
        assert K.type_info(qt.name) is info
        assert K.type_info(qt.name.lower()) is info


def test_parse_qtype_errors():
    with pytest.raises(ValueError, match="unknown GGUF type 'Q9_K'"):
        K.parse_qtype("Q9_K")
    with pytest.raises(ValueError, match="unknown GGUF type id 999"):
        K.parse_qtype(999)
    with pytest.raises(TypeError):
        K.parse_qtype(4.5)


@pytest.mark.parametrize("qtype,n_per_row,expected", [
    ("Q4_K", 576, "Q5_0"), ("Q5_K", 576, "Q5_1"), ("Q6_K", 576, "Q8_0"), ("Q2_K", 576, "Q4_0"),
    ("Q3_K", 576, "Q4_0"), ("IQ4_XS", 576, "IQ4_NL"), ("IQ2_XXS", 576, "IQ4_NL"),
    ("Q4_K", 1536, "Q4_K"), ("Q4_0", 576, "Q4_0"), ("Q4_0", 100, "F16"), ("Q6_K", 100, "F16"),
    ("F32", 7, "F32"), ("BF16", 3, "BF16"),
])
def test_llama_cpp_fallback(qtype, n_per_row, expected):
    assert K.effective_type(qtype, n_per_row) == QT[expected]


@settings(max_examples=200, deadline=None)
@given(qt=st.sampled_from(sorted(gguf.GGML_QUANT_SIZES, key=lambda t: t.value)),
       dims=st.lists(st.integers(1, 9), min_size=0, max_size=3), blocks=st.integers(1, 40))
def test_tensor_nbytes_matches_gguf(qt, dims, blocks):
    bs, ts = gguf.GGML_QUANT_SIZES[qt]
    shape = (*dims, blocks * bs)
    expected = gguf.quant_shape_to_byte_shape(shape, qt)
    assert K.tensor_nbytes(shape, qt) == int(np.prod(expected))
    assert K.row_nbytes(qt, blocks * bs) == blocks * ts


@settings(max_examples=100, deadline=None)
@given(qt=st.sampled_from([QT.Q4_K, QT.Q6_K, QT.IQ4_XS, QT.Q4_0, QT.Q8_0, QT.F16]),
       n_rows=st.integers(1, 5000), n_per_row=st.integers(1, 20000))
def test_tensor_nbytes_with_fallback(qt, n_rows, n_per_row):
    eff = K.effective_type(qt, n_per_row)
    assert n_per_row % K.type_info(eff).block_size == 0
    assert K.tensor_nbytes((n_rows, n_per_row), qt, fallback=True) == n_rows * K.row_nbytes(eff, n_per_row)


def test_tensor_nbytes_rejects_bad_shapes():
    with pytest.raises(ValueError, match="not a positive multiple"):
        K.tensor_nbytes((4, 100), "Q4_K")
    with pytest.raises(ValueError, match="invalid tensor shape"):
        K.tensor_nbytes((0, 256), "Q4_K")


# ---------------------------------------------------------------------------------------------
# Bit-exactness with ggml, every registered type


@pytest.mark.oracle
@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("kind", DATA_KINDS)
@pytest.mark.parametrize("with_imatrix", [False, True], ids=["plain", "imatrix"])
def test_quantize_matches_ggml(ggml, qtype, kind, with_imatrix):
    info = K.type_info(qtype)
    if not with_imatrix and info.requires_imatrix:
        pytest.skip(f"ggml refuses {qtype.name} without an imatrix")
    for seed, (n_rows, wide) in enumerate([(1, False), (5, True)]):
        n = _width(qtype, wide)
        x = make_rows(kind, n_rows, n, seed)
        qw = make_imatrix(n, seed) if with_imatrix else None
        ours = K.quantize(x, qtype, qw)
        ref = ggml.quantize(x, qtype, qw)
        bad = np.flatnonzero((ours != ref).any(axis=1))
        assert bad.size == 0, f"{qtype.name}/{kind}: rows {bad.tolist()} differ from ggml"


@pytest.mark.parametrize("qtype", DEQUANT_TYPES, ids=lambda t: t.name)
def test_dequantize_matches_gguf_py_on_random_blocks(qtype):
    info = K.type_info(qtype)
    rng = np.random.default_rng(qtype.value)
    n_per_row = _width(qtype, wide=True)
    raw = rng.integers(0, 256, (4, K.row_nbytes(qtype, n_per_row)), dtype=np.uint8)
    if qtype == QT.F32:
        raw = rng.standard_normal((4, n_per_row)).astype(np.float32).view(np.uint8)
    ours = K.dequantize(raw, qtype, n_per_row)
    ref = gguf.quants.dequantize(raw, qtype).reshape(ours.shape).astype(np.float32)
    nan = np.isnan(ref)
    assert np.array_equal(np.isnan(ours), nan), f"{info.name}: NaN positions differ"
    assert np.array_equal(ours[~nan].view(np.uint32), ref[~nan].view(np.uint32))


@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda t: t.name)
def test_round_trip_through_gguf_py(qtype):
    n = _width(qtype, wide=True)
    x = make_rows("normal", 6, n, 7)
    qw = make_imatrix(n, 7) if K.type_info(qtype).requires_imatrix else None
    q = K.quantize(x, qtype, qw)
    ours = K.dequantize(q, qtype, n)
    ref = gguf.quants.dequantize(q, qtype).reshape(ours.shape).astype(np.float32)
    assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32))
    rel_rms = np.sqrt(np.mean((ours - x) ** 2) / np.mean(x**2))
    assert rel_rms <= _round_trip_bound(qtype), f"{qtype.name}: relative RMS error {rel_rms:.4f}"


def _round_trip_bound(qtype: QT) -> float:
    """Relative RMS error allowed on Gaussian rows: the float formats by their mantissa bits,
    a b-bit block quantizer by 2**(2 - b) (uniform quantization of N(0,1) with a per-block scale
    gives about 2**(1 - b))."""
    floats = {QT.F32: 0.0, QT.F16: 2.0**-11, QT.BF16: 2.0**-8}
    if qtype in floats:
        return floats[qtype]
    return 2.0 ** (2.0 - K.type_info(qtype).bits_per_weight)


# ---------------------------------------------------------------------------------------------
# Properties of the public API


@settings(max_examples=40, deadline=None)
@given(qt=st.sampled_from(QUANT_TYPES), n_rows=st.integers(0, 9), blocks=st.integers(1, 3),
       seed=st.integers(0, 2**16), use_imatrix=st.booleans())
def test_rows_are_independent(qt, n_rows, blocks, seed, use_imatrix):
    """Quantizing rows together or one at a time gives the same bytes (odd row counts included)."""
    n = K.type_info(qt).block_size * blocks
    x = make_rows("heavy", n_rows, n, seed)
    qw = make_imatrix(n, seed) if use_imatrix or K.type_info(qt).requires_imatrix else None
    together = K.quantize(x, qt, qw)
    assert together.shape == (n_rows, K.row_nbytes(qt, n))
    for i in range(n_rows):
        assert np.array_equal(together[i], K.quantize(x[i : i + 1], qt, qw)[0])
    back = K.dequantize(together, qt, n)
    assert back.shape == (n_rows, n) and back.dtype == np.float32


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_is_a_clear_error(bad):
    x = np.ones((2, 256), np.float32)
    x[1, 17] = bad
    for qt in QUANT_TYPES:
        with pytest.raises(ValueError, match=r"NaN or inf \(first at index \(1, 17\)\)"):
            K.quantize(x, qt, make_imatrix(256, 0))


def test_api_argument_errors():
    x = np.ones((2, 256), np.float32)
    with pytest.raises(ValueError, match="must be 2-D"):
        K.quantize(x[0], "Q8_0")
    with pytest.raises(ValueError, match="multiple of 32"):
        K.quantize(np.ones((2, 48), np.float32), "Q8_0")
    with pytest.raises(ValueError, match="imatrix must have 256 entries"):
        K.quantize(x, "F16", np.ones(10, np.float32))
    with pytest.raises(ValueError, match="imatrix has negative entries"):
        K.quantize(x, "F16", -np.ones(256, np.float32))
    with pytest.raises(ValueError, match="not a whole number"):
        K.dequantize(np.zeros(100, np.uint8), "F16", 256)
    with pytest.raises(ValueError, match="unknown GGUF type"):
        K.quantize(x, "Q4_Z")


@pytest.mark.parametrize("qtype", [t for t in QUANT_TYPES if K.type_info(t).requires_imatrix],
                         ids=lambda t: t.name)
def test_types_that_need_an_imatrix_say_so(qtype):
    with pytest.raises(ValueError, match="requires an importance matrix"):
        K.quantize(np.ones((1, 256), np.float32), qtype)


def test_kernels_release_the_gil():
    """A search worker's heartbeat thread keeps running while a kernel works."""
    qt = max(QUANT_TYPES, key=lambda t: (t.value in (QT.Q4_K.value, QT.Q6_K.value), t.value))
    x = make_rows("normal", 512, 4096, 0)
    K.quantize(x[:1], qt)  # compile first
    ticks = 0
    done = threading.Event()

    def work():
        for _ in range(3):
            K.quantize(x, qt)
        done.set()

    t = threading.Thread(target=work)
    start = time.perf_counter()
    t.start()
    while not done.is_set():
        time.sleep(0.002)
        ticks += 1
    t.join()
    elapsed = time.perf_counter() - start
    # With the GIL held for the whole kernel the loop would tick only between calls.
    assert elapsed < 0.05 or ticks >= 0.25 * elapsed / 0.002, (ticks, elapsed)
