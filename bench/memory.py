"""Peak memory of a full ``dynsearch run``, and a model three times larger than the memory cap.

    python -m dynsearch.bench memory                 # both parts
    python -m dynsearch.bench memory --no-demo --cap 1.4GB --ratio 3 --ff 2048

(a) the demo model: ``dynsearch run smollm2-135m`` in a child process; prints the peak resident
memory of the child and all of its descendants (sampled every 0.1 s, plus the kernel's
``ru_maxrss``), and the wall time.

(b) a random-weight llama model (:mod:`dynsearch.bench.synthetic`, F32, the demo's
tokenizer) whose file is ``--ratio`` times the cap, run through the whole pipeline --
statistics, profiling, the search with a few trials, the held-out measurement, the GGUF written
and read back -- in a child process held to ``--cap``. The cap is, in order of preference:

* a **cgroup** memory limit (v2 ``memory.max``, or v1 ``memory.limit_in_bytes``), where a new
  cgroup can be made (root, or a delegated subtree): it charges everything the process uses,
  anonymous memory and page cache alike (the kernel reclaims clean file pages under it), and
  exceeding it gets the process killed -- the real condition of a small machine or container;
* else ``RLIMIT_DATA`` (``ulimit -d``): anonymous memory only (mapped files do not count), a
  failed allocation is a MemoryError. ``RLIMIT_AS`` (``ulimit -v``) is not used: it counts
  address space, and torch, numba/LLVM and OpenMP reserve gigabytes of it they never touch, so it
  fails a run that uses a fraction of the limit.

Prints which mechanism held the cap, the model's size, the peak RSS (and the cgroup's own peak,
which includes page cache) and whether the run completed. Needs psutil (the ``bench`` extra).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import gguf

from dynsearch.bench.synthetic import Shape, write_synthetic_model
from dynsearch.errors import BenchError
from dynsearch.objectives.io.gguf_source import GGUFSource
from dynsearch.objectives.io.resolve import DEMO_ALIAS, resolve_model
from dynsearch.search.budget import parse_budget


def _psutil():
    try:
        import psutil
    except ImportError:
        raise BenchError("the memory benchmark needs psutil: pip install 'dynsearch[bench]'") from None
    return psutil


def tree_rss(pid: int | None = None) -> int:
    """Resident bytes of process ``pid`` (default: this one) plus all of its descendants."""
    psutil = _psutil()
    try:
        p = psutil.Process(pid or os.getpid())
        procs = [p, *p.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for q in procs:
        try:
            total += q.memory_info().rss
        except psutil.Error:
            pass
    return total


class PeakRSS:
    """Peak of :func:`tree_rss` sampled every ``interval`` seconds in a thread; a context manager.

    Sampling misses spikes shorter than the interval; ``ru_maxrss`` of the process itself (and
    of each waited-for child) is folded in at the end, so the peak is never below what the
    kernel recorded for any single process.
    """

    def __init__(self, pid: int | None = None, interval: float = 0.1):
        self.pid, self.interval = pid, interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="peak-rss")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss(self.pid))
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        _psutil()  # a missing psutil fails here, not in the sampling thread
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if self.pid is None:
            self.peak = max(self.peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        self.peak = max(self.peak, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)

GB = 1e9


@dataclass(frozen=True)
class RunMeasure:
    cmd: list[str]
    returncode: int
    wall_s: float
    peak_rss: int  # bytes, the child process tree
    cap: int | None = None  # bytes
    mechanism: str = "none"
    cgroup_peak: int | None = None  # the cgroup's own high-water mark (page cache included)
    tail: str = ""  # last lines of the child's output
    estimate: str = ""  # the run's cost estimate and its measured phase times, as it printed them

    @property
    def ok(self) -> bool:
        return self.returncode == 0


# ---------------------------------------------------------------------------------------------
# The cap


class _Cgroup:
    """A new memory cgroup (v2 or v1) with a limit; the child joins it before exec."""

    def __init__(self, cap: int):
        self.cap = cap
        self.path: Path | None = None
        self.version = 0
        name = f"dynsearch-bench-{os.getpid()}-{time.monotonic_ns()}"
        v2 = Path("/sys/fs/cgroup")
        if "memory" in _read(v2 / "cgroup.controllers").split():
            self._make(v2 / _own_v2_cgroup() / name, "memory.max", 2)
        if self.path is None and (v2 / "memory").is_dir():
            self._make(v2 / "memory" / name, "memory.limit_in_bytes", 1)

    def _make(self, path: Path, limit_file: str, version: int) -> None:
        try:
            path.mkdir()
        except OSError:
            return
        try:
            (path / limit_file).write_text(str(self.cap))
            got = int(_read(path / limit_file) or 0)
            if not 0 < got <= self.cap + 4096:
                raise OSError(f"limit reads back as {got}")
            if version == 2:
                with contextlib.suppress(OSError):
                    (path / "memory.swap.max").write_text("0")
            self.path, self.version = path, version
        except OSError:
            with contextlib.suppress(OSError):
                path.rmdir()

    @property
    def mechanism(self) -> str:
        what = "memory.max" if self.version == 2 else "memory.limit_in_bytes"
        return f"cgroup v{self.version} {what}"

    def join(self) -> None:  # in the child, before exec
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def peak(self) -> int | None:
        for f in ("memory.peak", "memory.max_usage_in_bytes"):
            text = _read(self.path / f)
            if text:
                return int(text)
        return None

    def remove(self) -> None:
        if self.version == 1:  # uncharge the page cache left behind, or rmdir can keep failing
            with contextlib.suppress(OSError):
                (self.path / "memory.force_empty").write_text("0")
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _own_v2_cgroup() -> str:
    for line in _read(Path("/proc/self/cgroup")).splitlines():
        if line.startswith("0::"):
            return line[3:].lstrip("/")
    return ""


def run_measured(cmd: list[str], cap: int | None = None, env: dict | None = None,
                 mechanism: str = "auto") -> RunMeasure:
    """Run ``cmd`` in a child process (held to ``cap`` bytes when given) and measure it.

    ``mechanism``: "auto" (a cgroup where one can be made, else RLIMIT_DATA), "cgroup",
    "rlimit-data" or "rlimit-as"."""
    cg = None
    if cap is not None and mechanism in ("auto", "cgroup"):
        cg = _Cgroup(cap)
        if cg.path is None:
            if mechanism == "cgroup":
                raise RuntimeError("no memory cgroup can be created here")
            cg = None
    if cap is None:
        how, pre = "none", None
    elif cg is not None:
        how, pre = cg.mechanism, cg.join
    else:
        which = resource.RLIMIT_AS if mechanism == "rlimit-as" else resource.RLIMIT_DATA
        how = "RLIMIT_AS (ulimit -v)" if mechanism == "rlimit-as" else "RLIMIT_DATA (ulimit -d)"

        def pre():
            resource.setrlimit(which, (cap, cap))
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, preexec_fn=pre,
                                env={**os.environ, **(env or {})})
        with PeakRSS(proc.pid, interval=0.1) as peak:
            rc = proc.wait()
        log.seek(0)
        lines = log.read().splitlines()
        tail = "\n".join(lines[-15:])
        est = "\n".join(x for x in lines if x.startswith(("estimate (", "  statistics ", "  peak memory ", "time: ")))
    wall = time.perf_counter() - t0
    cg_peak = None
    if cg is not None:
        cg_peak = cg.peak()
        cg.remove()
    return RunMeasure(cmd, rc, wall, peak.peak, cap, how, cg_peak, tail, est)


# ---------------------------------------------------------------------------------------------
# The models


def demo_path() -> Path:
    return resolve_model(DEMO_ALIAS)


def synthetic_shape(target_bytes: int, n_embd: int, n_ff: int, n_vocab: int):
    """A llama :class:`Shape` of width ``n_embd`` whose F32 file is about ``target_bytes``."""
    head_dim = 64
    one = Shape(1, n_embd, n_ff, n_embd // head_dim, max(1, n_embd // head_dim // 4), n_vocab)
    two = Shape(2, one.n_embd, one.n_ff, one.n_head, one.n_head_kv, n_vocab)
    per_layer = 4 * (two.n_params() - one.n_params())  # F32 bytes of one layer
    fixed = 4 * one.n_params() - per_layer  # embeddings, output norm
    n_layer = max(1, round((target_bytes - fixed) / per_layer))
    return Shape(n_layer, one.n_embd, one.n_ff, one.n_head, one.n_head_kv, n_vocab)


def run_command(model: Path, out: Path, budget: str, types: str, trials: int, tokens: int,
                extra: list[str] = ()) -> list[str]:
    return [sys.executable, "-m", "dynsearch", "run", str(model), "--budget", budget,
            "--types", types, "--trials", str(trials), "--calib-tokens", str(tokens),
            "--fisher-tokens", str(tokens), "--search-tokens", str(tokens), "--eval-tokens",
            str(tokens), "--out", str(out), "--quiet", *extra]


def check_gguf(run_dir: Path) -> tuple[Path, int]:
    """The GGUF the run wrote, read back with gguf-py: (path, tensor count)."""
    files = [p for p in run_dir.rglob("*.gguf") if p.name != "imatrix.gguf"]
    if len(files) != 1:
        raise RuntimeError(f"expected one GGUF under {run_dir}, found {[p.name for p in files]}")
    return files[0], len(gguf.GGUFReader(files[0]).tensors)


def capped_run(cap: int, ratio: float, workdir: Path, n_embd: int = 768, n_ff: int = 3072,
               types: str = "Q4_0,Q8_0", budget: str = "6bpw", trials: int = 2, tokens: int = 512,
               mechanism: str = "auto", log=print) -> tuple[RunMeasure, int, int, tuple[Path, int] | None]:
    """Write a synthetic model ``ratio`` x ``cap`` bytes and run the pipeline on it under ``cap``.
    Returns (measure, model bytes, layers, (GGUF, tensor count) or None)."""
    demo = demo_path()
    shape = synthetic_shape(int(ratio * cap), n_embd, n_ff, GGUFSource(demo).config.n_vocab)
    model = workdir / f"synthetic-{shape.n_layer}x{n_embd}.gguf"
    if not model.exists():
        log(f"writing {model.name}: {shape.n_layer} layers x {n_embd} (ff {n_ff}), "
            f"{shape.n_params() / 1e6:.0f}M parameters ...")
        write_synthetic_model(model, shape, tokenizer_from=demo)
    size = model.stat().st_size
    out = workdir / "runs"
    m = run_measured(run_command(model, out, budget, types, trials, tokens), cap,
                     mechanism=mechanism)
    found = check_gguf(out / model.stem) if m.ok else None
    return m, size, shape.n_layer, found


def _gb(x: int | None) -> str:
    return "-" if x is None else f"{x / GB:.2f} GB"


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--no-demo", action="store_true", help="skip (a), the demo model")
    ap.add_argument("--no-capped", action="store_true", help="skip (b), the model larger than the cap")
    ap.add_argument("--demo-args", default="--budget 100MB --trials 2 --types Q4_0,Q5_0,Q8_0",
                    help="arguments of the demo's `dynsearch run` (default: %(default)s, with the "
                         "default token counts, which set the memory; use '--budget 100MB' for the "
                         "full default run)")
    ap.add_argument("--cap", default="1.4GB", help="memory cap of (b) (default: %(default)s)")
    ap.add_argument("--ratio", type=float, default=3.0, help="model file size / cap (default: %(default)s)")
    ap.add_argument("--embd", type=int, default=768, help="width of the synthetic model")
    ap.add_argument("--ff", type=int, default=3072, help="feed-forward width of the synthetic model")
    ap.add_argument("--trials", type=int, default=2, help="search trials of (b)")
    ap.add_argument("--tokens", type=int, default=512, help="calibration/search/held-out tokens of (b)")
    ap.add_argument("--mechanism", default="auto", choices=["auto", "cgroup", "rlimit-data", "rlimit-as"])
    ap.add_argument("--workdir", type=Path, help="keep the model and runs here (default: a temporary folder)")


def main(a: argparse.Namespace) -> int:
    _psutil()  # before the synthetic model is written
    cap = int(parse_budget(a.cap).file_bytes)
    rc = 0
    with contextlib.ExitStack() as stack:
        work = a.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dynsearch-mem-")))
        work.mkdir(parents=True, exist_ok=True)
        if not a.no_demo:
            cmd = [sys.executable, "-m", "dynsearch", "run", "smollm2-135m", *a.demo_args.split(),
                   "--out", str(work / "demo-runs"), "--quiet"]
            m = run_measured(cmd)
            print(f"(a) demo model smollm2-135m ({demo_path().stat().st_size / 1e6:.0f} MB): "
                  f"`dynsearch run smollm2-135m {a.demo_args}`")
            print(f"    peak RSS {_gb(m.peak_rss)} (process tree), {m.wall_s:.0f} s, "
                  f"{'completed' if m.ok else f'FAILED (exit {m.returncode})'}")
            if m.estimate:
                print("    " + m.estimate.replace("\n", "\n    "))
            if not m.ok:
                print(m.tail)
                rc = 1
        if not a.no_capped:
            m, size, n_layer, found = capped_run(cap, a.ratio, work, a.embd, a.ff, trials=a.trials,
                                                 tokens=a.tokens, mechanism=a.mechanism)
            print(f"(b) synthetic llama, {n_layer} layers x {a.embd}: model {_gb(size)} = "
                  f"{size / cap:.1f}x the cap of {_gb(cap)} ({m.mechanism})")
            print(f"    peak RSS {_gb(m.peak_rss)} (process tree); cgroup peak {_gb(m.cgroup_peak)} "
                  f"(page cache included); {m.wall_s:.0f} s")
            if m.estimate:
                print("    " + m.estimate.replace("\n", "\n    "))
            if m.ok and found:
                print(f"    completed: profile, search ({a.trials} trials), held-out KL, "
                      f"{found[0].name} written ({_gb(found[0].stat().st_size)}, {found[1]} tensors, "
                      "read back by gguf-py)")
            else:
                print(f"    FAILED (exit {m.returncode})\n{m.tail}")
                rc = 1
    return rc

