"""Locating/building llama.cpp's tools (bench/llamacpp.py); the parser is tested in tests/objectives/test_kl.py."""

from __future__ import annotations

import os
import shutil

import pytest

from dynsearch.bench import llamacpp


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DYNSEARCH_CACHE", str(tmp_path))
    monkeypatch.delenv("DYNSEARCH_LLAMA_BIN", raising=False)
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (its version names the build)")
    return tmp_path / f"llama.cpp-{llamacpp.llama_cpp_version()}"


def _fake_tools(folder):
    folder.mkdir(parents=True)
    for t in llamacpp.TOOLS:
        (folder / t).write_text("#!/bin/sh\n")
        os.chmod(folder / t, 0o755)


def test_find_tool_ignores_interrupted_build(cache):
    _fake_tools(cache / "build.tmp-abc" / "bin")  # staged but never renamed: not a finished build
    assert all(llamacpp.find_tool(t) is None for t in llamacpp.TOOLS)
    _fake_tools(cache / "bin")
    assert llamacpp.find_tool("llama-perplexity") == cache / "bin" / "llama-perplexity"
    with pytest.raises(ValueError):
        llamacpp.find_tool("llama-server")


def test_missing_toolchain_is_one_clear_line(cache, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(llamacpp.LlamaCppBuildError) as e:
        llamacpp.tool_path("llama-quantize")
    msg = str(e.value)
    assert "\n" not in msg and "cmake" in msg and "C++ compiler" in msg
    assert not (cache / "bin").exists()
