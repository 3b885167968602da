"""llama.cpp's side of the quality benchmark: its stock mixes, made and measured by its own tools.

The workflow a llama.cpp user follows, step by step, with the tools built from the installed
llama-cpp-python (:mod:`dynsearch.bench.llamacpp`):

1. ``llama-imatrix -f calib.txt --parse-special`` on the full-precision GGUF -> ``imatrix.gguf``;
2. ``llama-quantize --imatrix imatrix.gguf F32.gguf out.gguf MIX`` for every stock mix
   (``--pure`` for a uniform single-type file);
3. ``llama-perplexity --kl-divergence-base base.kld -f eval.txt`` on the full-precision GGUF, then
   ``llama-perplexity --kl-divergence --kl-divergence-base base.kld`` on every file.

Every artifact lives in a :class:`BenchCache` folder outside the repository, named by a hash of
what produced it (tool version, model, inputs, options), written under a temporary name and renamed
when the tool succeeded, so a rerun reuses it and an interrupted run never leaves a partial file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from dynsearch.atomic import atomic_path, atomic_write_text
from dynsearch.bench import llamacpp
from dynsearch.errors import BenchError
from dynsearch.system import cache_root

log = logging.getLogger(__name__)

# llama.cpp's stock mixes compared in the benchmark (issue 7), from small to large.
STOCK_MIXES = ("Q2_K", "Q3_K_M", "Q4_0", "Q4_K_M", "IQ4_NL", "IQ4_XS", "Q5_K_M", "Q6_K", "Q8_0")
# The demo model ships as Q4_1 (embeddings Q8_0): re-quantizing to Q4_1 is near-lossless, so its
# file is listed apart, marked as the source format, and never a dynsearch candidate type.
SOURCE_FORMAT = "Q4_1"

KLD_THREADS = 2  # the tools' default -t is every core; the benchmark machine is shared


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class BenchCache:
    """``<root>/<model stem>-<model key>/``: every file the benchmark made for one model."""

    folder: Path
    model_key: str  # fingerprint of the full-precision model's bytes
    version: str  # llama-cpp-python version the tools were built from

    @classmethod
    def for_model(cls, model: Path, model_key: str, root: Path | None = None) -> "BenchCache":
        base = Path(root) if root else cache_root() / "bench"
        folder = base / f"{model.stem}-{model_key[:12]}"
        folder.mkdir(parents=True, exist_ok=True)
        return cls(folder, model_key, llamacpp.llama_cpp_version())

    def path(self, stem: str, *inputs: object, suffix: str) -> Path:
        """Path of an artifact named by ``stem`` and a hash of the tool version, model and ``inputs``."""
        return self.folder / f"{stem}-{_key(self.version, self.model_key, *inputs)}{suffix}"


def run_tool(tool: str, args: list[object], log_path: Path) -> str:
    """Run a llama.cpp tool; return its output (stdout + stderr), also kept in ``log_path``.

    Raises BenchError with the tool's last output line when it fails.
    """
    exe = llamacpp.tool_path(tool)
    cmd = [str(exe), *(str(a) for a in args)]
    log.info("$ %s %s", tool, " ".join(cmd[1:]))
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
    out = r.stdout + r.stderr
    atomic_write_text(log_path, "$ " + " ".join(cmd) + "\n" + out)
    if r.returncode != 0:
        last = next((ln for ln in reversed(out.strip().splitlines()) if ln.strip()), "no output")
        raise BenchError(f"{tool} failed (exit {r.returncode}): {last.strip()} (log: {log_path})")
    log.info("%s done in %.0f s", tool, time.perf_counter() - t0)
    return out


def _produce(target: Path, tool: str, args_for, what: str) -> Path:
    """Make ``target`` with ``tool`` unless it exists; ``args_for(tmp)`` gives the arguments writing ``tmp``."""
    if target.is_file():
        log.info("reusing %s: %s", what, target)
        return target
    with atomic_path(target) as tmp:
        run_tool(tool, args_for(tmp), target.with_suffix(".log"))
        if not tmp.is_file() or tmp.stat().st_size == 0:
            raise BenchError(f"{tool} exited 0 but wrote no {what} (log: {target.with_suffix('.log')})")
    return target


# ------------------------------------------------------------------------------------- imatrix


def imatrix(cache: BenchCache, model: Path, text: Path, n_ctx: int, n_chunks: int,
            threads: int = KLD_THREADS) -> Path:
    """``llama-imatrix`` of ``model`` on the calibration ``text`` (special tokens parsed, as the
    chat-format calibration set is written), ``n_chunks`` chunks of ``n_ctx`` tokens."""
    target = cache.path("imatrix", file_sha256(text), n_ctx, n_chunks, suffix=".gguf")
    return _produce(target, "llama-imatrix", lambda tmp: [
        "-m", model, "-f", text, "-o", tmp, "--output-format", "gguf", "--parse-special",
        "-c", n_ctx, "-b", n_ctx, "--chunks", n_chunks, "--no-ppl", "-fa", "off", "-t", threads,
    ], "imatrix")


# ------------------------------------------------------------------------------------ quantize


def quantize(cache: BenchCache, model: Path, mix: str, imatrix_path: Path | None, *, pure: bool = False,
             threads: int = KLD_THREADS) -> Path:
    """``llama-quantize [--pure] [--imatrix I] model out MIX``; cached by model, imatrix, mix and options."""
    imat_key = imatrix_path.name if imatrix_path is not None else "none"  # imatrix names are content keys
    stem = f"{'pure-' if pure else ''}{mix}"
    target = cache.path(stem, imat_key, pure, suffix=".gguf")

    def args(tmp: Path) -> list[object]:
        flags: list[object] = ["--pure"] if pure else []
        if imatrix_path is not None:
            flags += ["--imatrix", imatrix_path]
        return [*flags, model, tmp, mix, threads]

    return _produce(target, "llama-quantize", args, f"{mix} file")


# ------------------------------------------------------------------------------------- KL runs


@dataclass(frozen=True)
class KLBase:
    """llama-perplexity's log-probabilities of the reference on the evaluation text."""

    path: Path  # the --kl-divergence-base file (tokens + uint16 log-probs)
    n_ctx: int


def kld_base(cache: BenchCache, model: Path, text: Path, n_ctx: int, n_chunks: int,
             threads: int = KLD_THREADS) -> KLBase:
    """``llama-perplexity --kl-divergence-base`` of the reference ``model`` on ``text``."""
    target = cache.path("base", file_sha256(text), n_ctx, n_chunks, suffix=".kld")
    _produce(target, "llama-perplexity", lambda tmp: [
        "-m", model, "-f", text, "--kl-divergence-base", tmp, "-c", n_ctx, "-b", n_ctx,
        "--chunks", n_chunks, "-fa", "off", "-t", threads,
    ], "KL-divergence base")
    base = llamacpp.read_kld_base(target)
    if base.n_chunk != n_chunks:
        raise BenchError(f"{text} gives llama-perplexity {base.n_chunk} chunks of {n_ctx}, "
                         f"{n_chunks} were asked for: the evaluation text is too short")
    return KLBase(target, n_ctx)


def kld(cache: BenchCache, candidate: Path, base: KLBase, candidate_key: str,
        threads: int = KLD_THREADS) -> dict[str, float]:
    """``llama-perplexity --kl-divergence`` statistics of ``candidate`` against ``base``, parsed
    (:func:`~dynsearch.bench.llamacpp.parse_kl_printout` keys); the printout is cached."""
    target = cache.path("kld", candidate_key, base.path.name, suffix=".txt")
    if target.is_file():
        return llamacpp.parse_kl_printout(target.read_text())
    out = run_tool("llama-perplexity", [
        "-m", candidate, "--kl-divergence-base", base.path, "--kl-divergence",
        "-c", base.n_ctx, "-b", base.n_ctx, "-fa", "off", "-t", threads,
    ], target.with_suffix(".log"))
    try:
        stats = llamacpp.parse_kl_printout(out)
    except ValueError as e:
        raise BenchError(f"llama-perplexity on {candidate.name}: {e} (log: {target.with_suffix('.log')})") from None
    atomic_write_text(target, out)
    return stats

