"""llama.cpp's command-line tools (llama-quantize, llama-perplexity, llama-imatrix), built once and cached.

The tools are built with cmake from the llama-cpp-python sdist whose version is installed (its
``vendor/llama.cpp`` is the exact llama.cpp the Python bindings run), into a cache folder outside
the repository::

    $DYNSEARCH_CACHE/llama.cpp-<ver>/bin/llama-perplexity      (or ~/.cache/dynsearch/...)

The build runs in a temporary folder that is renamed to ``bin/`` only when every tool exists, so an
interrupted build is never taken for a finished one; a lock file keeps two processes from building
at once. ``python -m dynsearch.bench llamacpp build`` prebuilds.

Also here: :func:`parse_kl_printout`, the parser of ``llama-perplexity --kl-divergence``'s output,
and :func:`read_kld_base`, the reader of its ``--kl-divergence-base`` log-probability file.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Iterator

import numpy as np

from dynsearch.errors import LlamaCppBuildError
from dynsearch.system import cache_root

log = logging.getLogger(__name__)

TOOLS = ("llama-quantize", "llama-perplexity", "llama-imatrix")
SDIST_NAME = "llama-cpp-python"


# --------------------------------------------------------------------------------------------- paths


def llama_cpp_version() -> str:
    """Version of the installed llama-cpp-python (the sdist built must match it)."""
    try:
        return metadata.version(SDIST_NAME)
    except metadata.PackageNotFoundError as e:
        raise LlamaCppBuildError(f"{SDIST_NAME} is not installed; `pip install {SDIST_NAME}`") from e


def build_dir(version: str | None = None) -> Path:
    return cache_root() / f"llama.cpp-{version or llama_cpp_version()}"


def _exe(name: str) -> str:
    return name + (".exe" if os.name == "nt" else "")


def find_tool(name: str) -> Path | None:
    """Path of an already-built tool, or None (never builds). ``$DYNSEARCH_LLAMA_BIN`` overrides."""
    if name not in TOOLS:
        raise ValueError(f"unknown llama.cpp tool {name!r}; known: {', '.join(TOOLS)}")
    override = os.environ.get("DYNSEARCH_LLAMA_BIN")
    dirs = [Path(override)] if override else []
    try:
        dirs.append(build_dir() / "bin")
    except LlamaCppBuildError:
        pass
    for d in dirs:
        p = d / _exe(name)
        if p.is_file() and os.access(p, os.X_OK):
            return p
    return None


def tool_path(name: str) -> Path:
    """Path of a tool, building all of :data:`TOOLS` on first use (minutes; progress is logged)."""
    p = find_tool(name)
    if p is None:
        build()
        p = find_tool(name)
    if p is None:  # pragma: no cover - build() checks every tool exists
        raise LlamaCppBuildError(f"{name} missing after build in {build_dir()}")
    return p


# --------------------------------------------------------------------------------------------- build


def _check_toolchain() -> None:
    """Raise a one-line error naming what is missing to build (cmake, a C and a C++ compiler)."""
    need = {"cmake": ("cmake",), "a C compiler": ("cc", "gcc", "clang"),
            "a C++ compiler": ("c++", "g++", "clang++")}
    missing = [what for what, names in need.items() if not any(shutil.which(n) for n in names)]
    if missing:
        raise LlamaCppBuildError(
            f"cannot build llama.cpp tools: {', '.join(missing)} not found on PATH "
            "(e.g. `apt-get install cmake build-essential`)")


@contextmanager
def _lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another process is building llama.cpp tools; waiting for %s", path)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _sdist(version: str, root: Path) -> Path:
    """The llama-cpp-python sdist tarball: cached, else /tmp/dl, else ``pip download`` (PyPI)."""
    fname = f"llama_cpp_python-{version}.tar.gz"
    for cand in (root / fname, Path("/tmp/dl") / fname):
        if cand.is_file():
            return cand
    root.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s==%s sdist from PyPI", SDIST_NAME, version)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           f"{SDIST_NAME}=={version}", "-d", str(root)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0 or not (root / fname).is_file():
        raise LlamaCppBuildError(f"pip download of {SDIST_NAME}=={version} failed: "
                                 f"{(r.stderr or r.stdout).strip().splitlines()[-1:]}")
    return root / fname


def _run(cmd: list[str], cwd: Path, logfile: Path) -> None:
    log.info("$ %s", " ".join(cmd))
    with open(logfile, "a") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        r = subprocess.run(cmd, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        tail = logfile.read_text(errors="replace").strip().splitlines()[-1:]
        raise LlamaCppBuildError(f"`{cmd[0]} {cmd[1]}` failed (rc {r.returncode}), see {logfile}: {tail}")


def build(jobs: int = 2, force: bool = False, native: bool = True) -> Path:
    """Build :data:`TOOLS` into ``build_dir()/bin`` (atomic, locked); return that folder.

    ``native`` builds for this machine's CPU (fast, and the same kernels as a from-source
    llama-cpp-python); ``native=False`` for a portable AVX2 build.
    """
    version = llama_cpp_version()
    root = build_dir(version)
    final = root / "bin"
    with _lock(root.parent / f"llama.cpp-{version}.lock"):
        if final.is_dir() and all((final / _exe(t)).is_file() for t in TOOLS) and not force:
            return final
        _check_toolchain()
        t0 = time.perf_counter()
        tarball = _sdist(version, root)
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix="build.tmp-", dir=root))
        logfile = tmp / "build.log"
        log.info("building %s for llama-cpp-python %s in %s (log: %s)", ", ".join(TOOLS), version, tmp, logfile)
        with tarfile.open(tarball) as tf:
            tf.extractall(tmp / "src", filter="data")
        src = next((tmp / "src").iterdir()) / "vendor" / "llama.cpp"
        # GGML_NATIVE=ON: the same CPU kernels as llama-cpp-python built from source on this machine,
        # so the tools' logits match the bindings' (AVX2 vs AVX-512 kernels differ by KL ~0.01 on
        # small models); the cache is therefore per machine.
        cmake_args = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", f"-DGGML_NATIVE={'ON' if native else 'OFF'}",
                      "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                      "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_TOOLS=ON",
                      "-DLLAMA_BUILD_APP=OFF"]
        _run(["cmake", "-S", str(src), "-B", str(tmp / "build"), *cmake_args], tmp, logfile)
        _run(["cmake", "--build", str(tmp / "build"), "--config", "Release", "--target", *TOOLS,
              f"-j{jobs}"], tmp, logfile)
        staged = tmp / "bin"
        staged.mkdir()
        for t in TOOLS:
            exe = next((tmp / "build").rglob(_exe(t)), None)
            if exe is None or not exe.is_file():
                raise LlamaCppBuildError(f"{t} not produced by the build, see {logfile}")
            shutil.copy2(exe, staged / _exe(t))
        shutil.copy2(logfile, staged / "build.log")
        if final.exists():
            shutil.rmtree(final)
        os.replace(staged, final)  # atomic: bin/ exists only once complete
        shutil.rmtree(tmp, ignore_errors=True)
        log.info("built llama.cpp tools in %.0f s -> %s", time.perf_counter() - t0, final)
        return final


# ----------------------------------------------------------------------- llama-perplexity KL printout

_NUM = r"([-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|inf|nan))"
_PM = _NUM + r"\s*±\s*" + _NUM

# (key, regex) for each line of llama-perplexity's "====== Perplexity statistics ======" and
# "====== KL divergence statistics ======" and "====== Token probability statistics ======" blocks.
_KL_LINES: tuple[tuple[str, str], ...] = (
    ("ppl_q", r"Mean PPL\(Q\)\s*:\s*" + _PM),
    ("ppl_base", r"Mean PPL\(base\)\s*:\s*" + _PM),
    ("cor_ln_ppl", r"Cor\(ln\(PPL\(Q\)\), ln\(PPL\(base\)\)\)\s*:\s*" + _NUM + r"\s*%"),
    ("ln_ppl_ratio", r"Mean ln\(PPL\(Q\)/PPL\(base\)\)\s*:\s*" + _PM),
    ("ppl_ratio", r"Mean PPL\(Q\)/PPL\(base\)\s*:\s*" + _PM),
    ("ppl_diff", r"Mean PPL\(Q\)-PPL\(base\)\s*:\s*" + _PM),
    ("kld_mean", r"Mean\s+KLD\s*:\s*" + _PM),
    ("kld_max", r"Maximum KLD\s*:\s*" + _NUM),
    ("kld_p99_9", r"99\.9%\s+KLD\s*:\s*" + _NUM),
    ("kld_p99", r"99\.0%\s+KLD\s*:\s*" + _NUM),
    ("kld_p95", r"95\.0%\s+KLD\s*:\s*" + _NUM),
    ("kld_p90", r"90\.0%\s+KLD\s*:\s*" + _NUM),
    ("kld_median", r"Median\s+KLD\s*:\s*" + _NUM),
    ("kld_p10", r"10\.0%\s+KLD\s*:\s*" + _NUM),
    ("kld_p5", r" 5\.0%\s+KLD\s*:\s*" + _NUM),
    ("kld_p1", r" 1\.0%\s+KLD\s*:\s*" + _NUM),
    ("kld_p0_1", r" 0\.1%\s+KLD\s*:\s*" + _NUM),
    ("kld_min", r"Minimum KLD\s*:\s*" + _NUM),
    ("dp_mean", r"Mean\s+Δp\s*:\s*" + _PM + r"\s*%"),
    ("dp_max", r"Maximum Δp\s*:\s*" + _NUM + r"%"),
    ("dp_p99_9", r"99\.9%\s+Δp\s*:\s*" + _NUM + r"%"),
    ("dp_p99", r"99\.0%\s+Δp\s*:\s*" + _NUM + r"%"),
    ("dp_p95", r"95\.0%\s+Δp\s*:\s*" + _NUM + r"%"),
    ("dp_p90", r"90\.0%\s+Δp\s*:\s*" + _NUM + r"%"),
    ("dp_p75", r"75\.0%\s+Δp\s*:\s*" + _NUM + r"%"),
    ("dp_median", r"Median\s+Δp\s*:\s*" + _NUM + r"%"),
    ("dp_p25", r"25\.0%\s+Δp\s*:\s*" + _NUM + r"%"),
    ("dp_p10", r"10\.0%\s+Δp\s*:\s*" + _NUM + r"%"),
    ("dp_p5", r" 5\.0%\s+Δp\s*:\s*" + _NUM + r"%"),
    ("dp_p1", r" 1\.0%\s+Δp\s*:\s*" + _NUM + r"%"),
    ("dp_p0_1", r" 0\.1%\s+Δp\s*:\s*" + _NUM + r"%"),
    ("dp_min", r"Minimum Δp\s*:\s*" + _NUM + r"%"),
    ("dp_rms", r"RMS Δp\s*:\s*" + _PM + r"\s*%"),
    ("same_top_p", r"Same top p\s*:\s*" + _PM + r"\s*%"),
)


def parse_kl_printout(text: str) -> dict[str, float]:
    """Parse the statistics ``llama-perplexity --kl-divergence`` prints at the end.

    Returns a flat dict with the keys of :meth:`dynsearch.objectives.kl.KLStats.to_dict`:
    ``kld_mean`` and ``kld_mean_err``, ``kld_median``, ``kld_p90``..., ``ppl_ratio`` (+ ``_err``),
    ``same_top_p``, ``dp_rms``, ``cor_ln_ppl`` and so on; a ``±`` value gives ``key`` and ``key_err``.
    What llama.cpp prints in percent is returned as a fraction (``same_top_p = 0.93``). Lines missing
    from the output (older llama.cpp) are absent; no "Mean KLD" line at all raises ValueError.
    """
    out: dict[str, float] = {}
    for key, pattern in _KL_LINES:
        m = re.search(r"^\s*" + pattern, text, flags=re.MULTILINE)
        if m is None:
            continue
        scale = 0.01 if pattern.rstrip().endswith("%") else 1.0  # percent -> fraction
        out[key] = float(m.group(1)) * scale
        if m.lastindex and m.lastindex >= 2:
            out[key + "_err"] = float(m.group(2)) * scale
    if "kld_mean" not in out:
        raise ValueError("no 'KL divergence statistics' found in llama-perplexity output")
    return out


# ------------------------------------------------------------------- llama-perplexity's KLD base file


@dataclass(frozen=True)
class KLDBaseFile:
    """A ``llama-perplexity --kl-divergence-base FILE`` file, memory-mapped.

    Layout (perplexity.cpp, ``perplexity()`` with ``logits_file``): ``"_logits_"``, int32 n_ctx,
    int32 n_vocab, int32 n_chunk, int32 tokens[n_chunk * n_ctx] (the original tokens, position 0 not
    yet replaced by BOS), then per chunk and scored position (``n_ctx - 1 - n_ctx/2`` per chunk) a
    row of ``nv = 2*((n_vocab+1)/2) + 4`` uint16: float32 scale and float32 min_log_prob in the
    first 4, then ``log p = scale * q + min_log_prob``, with q = 0 for everything at or below
    16 nats under the top logit.
    """

    path: Path
    n_ctx: int
    n_vocab: int
    tokens: np.ndarray  # (n_chunk, n_ctx) int32
    rows: np.ndarray  # (n_chunk, n_scored, nv) uint16, memory-mapped

    @property
    def n_chunk(self) -> int:
        return self.tokens.shape[0]

    def logprobs(self, chunk: int) -> np.ndarray:
        """``(n_scored, n_vocab)`` float32 base log-probs of one chunk; entries below the 16-nat floor
        (stored as 0: value unknown) are ``-inf``."""
        r = np.asarray(self.rows[chunk])
        head = r[:, :4].copy().view(np.float32)  # (n, 2): scale, min_log_prob
        q = r[:, 4: 4 + self.n_vocab]
        lp = q.astype(np.float32) * head[:, :1] + head[:, 1:2]
        lp[q == 0] = -np.inf
        return lp


def read_kld_base(path: str | Path) -> KLDBaseFile:
    """Open a llama-perplexity KL-divergence base file (see :class:`KLDBaseFile`)."""
    path = Path(path)
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    if raw[:8].tobytes() != b"_logits_":
        raise ValueError(f"{path} is not a llama-perplexity log-probability file")
    n_ctx, n_vocab, n_chunk = (int(x) for x in np.frombuffer(raw[8:20].tobytes(), dtype=np.int32))
    off = 20 + 4 * n_ctx * n_chunk
    tokens = np.frombuffer(raw[20:off].tobytes(), dtype=np.int32).reshape(n_chunk, n_ctx)
    nv, n_scored = 2 * ((n_vocab + 1) // 2) + 4, n_ctx - 1 - n_ctx // 2
    expect = off + 2 * n_chunk * n_scored * nv
    if raw.size != expect:
        raise ValueError(f"{path}: {raw.size} bytes, expected {expect} for n_ctx={n_ctx} n_chunk={n_chunk}")
    rows = np.memmap(path, dtype=np.uint16, mode="r", offset=off, shape=(n_chunk, n_scored, nv))
    return KLDBaseFile(path, n_ctx, n_vocab, tokens, rows)


# ------------------------------------------------------------------------------------------------ CLI


def add_arguments(ap: argparse.ArgumentParser) -> None:
    sub = ap.add_subparsers(dest="action", required=True)
    b = sub.add_parser("build", help="build the tools into the cache (no-op when present; -v shows the steps)")
    b.add_argument("-j", "--jobs", type=int, default=2)
    b.add_argument("--force", action="store_true", help="rebuild even when present")
    b.add_argument("--portable", action="store_true", help="GGML_NATIVE=OFF (AVX2) instead of this CPU")
    sub.add_parser("where", help="print the tools' paths (no build)")


def main(args: argparse.Namespace) -> int:
    if args.action == "build":
        print(build(jobs=args.jobs, force=args.force, native=not args.portable))
    else:
        for t in TOOLS:
            print(f"{t}: {find_tool(t) or 'not built'}")
    return 0
