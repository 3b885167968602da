"""Profiling: for every tensor and candidate type, the exact size and the proxy error.

The error of writing weight ``W`` (out x in) as type ``q`` is the expected KL divergence it adds,
to second order (a diagonal Fisher on the tensor's outputs, the input second moment on its inputs):

    e(W, q) = 1/2 * sum_o f_o * (dW_o  H  dW_o^T),    dW = dequant(quant(W, q)) - W

with ``H = X^T X / N`` the mean second moment of the tensor's inputs over the calibration tokens
and ``f_o`` the mean squared gradient of the sampled log-likelihood w.r.t. output ``o``
(:mod:`dynsearch.objectives.stats.fisher`). An embedding table is also a lookup: its rows are weighted
by token frequency and its columns by the Fisher of the residual stream it feeds.
Quantization uses the importance vector as ``llama-quantize --imatrix`` does, so the error is the
one of the file that will be written.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from joblib import Parallel, delayed

from dynsearch import system
from dynsearch.atomic import atomic_open
from dynsearch.errors import ClusterError
from dynsearch.kernels import dequantize, effective_type, padded, quantize_tensor, tensor_nbytes
from dynsearch.kernels.torch_quant import dequantize_rows, quantize_rows, torch_quantizable
from dynsearch.objectives.forward import to_device
from dynsearch.objectives.io.resolve import open_model
from dynsearch.objectives.stats.moe import expert_error
from dynsearch.objectives.stats.store import StatsFile, TensorStats
from dynsearch.search.cluster import ProfileBackend, describe_error, joblib_backend

log = logging.getLogger(__name__)

PROFILE_VERSION = 1  # bump when the error definition changes: old cache entries are ignored


ERROR_CHUNK_BYTES = 16 << 20  # rows of dW processed at once by quant_error (bounds its temporaries)


def _host(a: np.ndarray | torch.Tensor) -> np.ndarray:
    return a.cpu().numpy() if isinstance(a, torch.Tensor) else a


def quant_error(w: np.ndarray | torch.Tensor, dq: np.ndarray | torch.Tensor, stats: TensorStats,
                device: str = "cpu") -> float:
    """The second-order KL estimate of replacing ``w`` by ``dq`` (see module docstring), taken
    over chunks of rows so that its float64 temporaries stay small whatever the tensor.

    The result is the same bits whatever the thread count (the space's fingerprint hashes it, and
    processes on a cluster profile with different counts): each row's term comes from a float64
    matrix product (MKL's float32 one rounds some small shapes differently with 4 threads than
    with 1) and numpy's single-threaded row sums, and the terms are added with :func:`math.fsum`
    (exactly rounded, so neither their order nor the chunking matters); torch's whole-tensor
    reductions split differently with 1, 2 or 4 threads. The product ``dW_o H`` runs on
    ``device`` (the run's: a GPU's float64 rate), the row sums on the host.

    ``w`` and ``dq`` may be torch tensors (the profile's torch quantizers leave ``dq`` on the run's
    device): ``dW = dq - w`` is then taken there, in their dtype as numpy takes it (an exact IEEE
    difference either way), and the rest is the same computation on the same values, so the
    result is the same bits as with numpy arrays of the same values."""
    on_torch = isinstance(w, torch.Tensor) or isinstance(dq, torch.Tensor)
    if on_torch:
        where = dq.device if isinstance(dq, torch.Tensor) else w.device
        w, dq = to_device(w, where), to_device(dq, where)  # dtypes kept: numpy's promotion
    w2, dq2 = w.reshape(-1, w.shape[-1]), dq.reshape(-1, dq.shape[-1])
    n_rows, n_cols = w2.shape
    step = max(1, ERROR_CHUNK_BYTES // (8 * n_cols))
    h = to_device(stats.xtx, device, torch.float64) if stats.xtx is not None else None
    f = None if stats.fisher_out is None else np.asarray(stats.fisher_out, dtype=np.float64)
    col = (None if stats.row_weight is None else np.ones(n_cols) if stats.fisher_col is None
           else np.asarray(stats.fisher_col, dtype=np.float64))
    terms: list[np.ndarray] = []  # float64 per-row terms, summed once at the end
    for r0 in range(0, n_rows, step):
        r1 = min(n_rows, r0 + step)
        if on_torch:
            dt = (dq2[r0:r1] - w2[r0:r1]).to(torch.float64)  # (rows, cols), on dq's device
            d = dt.cpu().numpy()
        else:
            dt, d = None, (dq2[r0:r1] - w2[r0:r1]).astype(np.float64)  # (rows, cols)
        if h is not None:
            dd = dt if dt is not None and dt.device == h.device else to_device(d, device)
            dh = (dd @ h).cpu().numpy()  # (rows, cols) dW_o H
            per_row = np.einsum("ij,ij->i", dh, d)  # dW_o H dW_o^T
            terms.append(0.5 * (per_row if f is None else f[r0:r1] * per_row))
        if col is not None:
            rw = np.asarray(stats.row_weight[r0:r1], dtype=np.float64)
            terms.append(0.5 * rw * np.einsum("ij,ij,j->i", d, d, col))
        if h is None and col is None:
            terms.append(np.einsum("ij,ij->i", d, d))
    total = math.fsum(np.concatenate(terms)) if terms else 0.0
    if h is None and col is None:  # nothing measured: plain weight MSE
        total /= max(1, n_rows * n_cols)
    return total


def tensor_error(w: np.ndarray | torch.Tensor, dq: np.ndarray | torch.Tensor, stats: TensorStats,
                 device: str = "cpu") -> float:
    """:func:`quant_error`, or for an MoE expert stack its per-expert error (objectives/stats/moe.py,
    on the host)."""
    if stats.xdiag is not None:
        return expert_error(_host(w), _host(dq), stats.xdiag, stats.fisher_out)
    return quant_error(w, dq, stats, device)


QUANTIZER_CHOICES = ("auto", "torch", "numba")


def _importance_per_matrix(importance, n_rows: int, n_per_row: int) -> np.ndarray | None:
    """The importance vector of each matrix the rows split into evenly, (n_mat, n_per_row) (as
    :func:`dynsearch.kernels.quantize_tensor` reads it), or None."""
    if importance is None:
        return None
    n_mat = np.size(importance) // n_per_row
    if n_mat == 0 or n_mat * n_per_row != np.size(importance) or n_rows % n_mat:
        raise ValueError(f"importance of {np.size(importance)} values does not fit {n_rows} rows "
                         f"of {n_per_row}")
    return np.asarray(importance, dtype=np.float32).reshape(n_mat, n_per_row)


def _torch_dequantized(w: torch.Tensor, qtype: str, importance: torch.Tensor | None) -> torch.Tensor:
    """``dequant(quant(w))`` with the torch quantizers, on ``w``'s device; ``importance``: None or
    (n_mat, n_per_row), one vector per matrix (an MoE expert stack has one per expert)."""
    n_per_row = w.shape[1]
    if importance is None:
        return dequantize_rows(quantize_rows(w, qtype), qtype, n_per_row)
    mats = w.reshape(importance.shape[0], -1, n_per_row)
    return torch.cat([dequantize_rows(quantize_rows(m, qtype, imp), qtype, n_per_row)
                      for m, imp in zip(mats, importance)])


def profile_tensor(w: np.ndarray, types: list[str], stats: TensorStats, device: str = "cpu",
                   quantizer: str = "auto") -> tuple[list[str], np.ndarray, np.ndarray]:
    """(written types, padded sizes, errors) of ``w`` (rows, n_per_row) for each candidate type.

    llama.cpp's fallback is applied: a type whose block does not fit the rows is written as its
    fallback, with that type's size and error. ``device``: where the error term's matrix product runs.

    ``quantizer``: who quantizes a candidate. ``"numba"``: the numba kernels, on the host.
    ``"torch"``: the torch quantizers (:mod:`dynsearch.kernels.torch_quant`) on ``device`` for
    the types they have (the others as with numba); the weight rows and the importance vector go
    to ``device`` once per tensor and the dequantized candidate stays there for the error term.
    ``"auto"``: torch where ``device`` is not the CPU, else numba. Both give the same blocks, so
    the same sizes and the same errors, bit for bit (tests/search/test_profile_torch.py).
    """
    if quantizer not in QUANTIZER_CHOICES:
        raise ValueError(f"quantizer must be one of {', '.join(QUANTIZER_CHOICES)}, got {quantizer!r}")
    use_torch = quantizer == "torch" or (quantizer == "auto" and torch.device(device).type != "cpu")
    w2 = np.ascontiguousarray(w.reshape(-1, w.shape[-1]), dtype=np.float32)
    n_per_row = w2.shape[1]
    imp = stats.importance
    on_device: tuple[torch.Tensor, torch.Tensor | None] | None = None  # (w, importance) on device
    written, sizes, errors = [], [], []
    done: dict[str, tuple[int, float]] = {}
    for t in types:
        eff = effective_type(t, n_per_row).name
        if eff not in done:
            if use_torch and eff in torch_quantizable():
                if on_device is None:
                    per_mat = _importance_per_matrix(imp, w2.shape[0], n_per_row)
                    on_device = (to_device(w2, device),
                                 None if per_mat is None else to_device(per_mat, device))
                dq = _torch_dequantized(on_device[0], eff, on_device[1])
                err = tensor_error(on_device[0], dq, stats, device)
            else:
                dq = dequantize(quantize_tensor(w2, eff, imp), eff, n_per_row)
                err = tensor_error(w2, dq, stats, device)
            done[eff] = (padded(tensor_nbytes(w2.shape, eff)), err)
        written.append(eff)
        sizes.append(done[eff][0])
        errors.append(done[eff][1])
    return written, np.array(sizes, dtype=np.int64), np.array(errors, dtype=np.float64)


# ---------------------------------------------------------------------------------------------
# The cache: one small .npz per (model, calibration, tensor, type list), written atomically and
# checked on read; a corrupt or foreign entry is recomputed, never trusted.


class ProfileCache:
    def __init__(self, folder: str | Path, model_key: str, stats_key: str):
        self.folder = Path(folder)
        self.prefix = f"v{PROFILE_VERSION}|{model_key}|{stats_key}"

    def _key(self, name: str, types: list[str]) -> str:
        return hashlib.sha256(f"{self.prefix}|{name}|{','.join(types)}".encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.npz"

    def get(self, name: str, types: list[str]):
        key = self._key(name, types)
        path = self._path(key)
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                if str(z["key"]) != key:
                    raise ValueError("key mismatch")
                written = [str(s) for s in z["written"]]
                sizes, errors = z["sizes"].astype(np.int64), z["errors"].astype(np.float64)
            if len(written) != len(types) or sizes.shape != (len(types),) or errors.shape != (len(types),):
                raise ValueError("shape mismatch")
            if not np.isfinite(errors).all() or (errors < 0).any() or (sizes <= 0).any():
                raise ValueError("invalid values")
            return written, sizes, errors
        except Exception as e:  # noqa: BLE001 - any damage means: recompute
            log.warning("profile cache entry for %s is corrupt (%s); recomputing", name, e)
            path.unlink(missing_ok=True)
            return None

    def put(self, name: str, types: list[str], written, sizes, errors) -> None:
        key = self._key(name, types)
        origin = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()})
        with atomic_open(self._path(key), "wb") as f:
            np.savez(f, key=np.array(key), written=np.array(written), sizes=sizes, errors=errors,
                     origin=np.array(origin))

    def origin(self, name: str, types: list[str]) -> dict | None:
        """Which process wrote an entry (host, pid, time); None when absent or unrecorded."""
        path = self._path(self._key(name, types))
        try:
            with np.load(path, allow_pickle=False) as z:
                return json.loads(str(z["origin"])) if "origin" in z.files else None
        except (OSError, ValueError, KeyError):
            return None


def _sha256_file(path: Path, limit: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        done = 0
        while chunk := f.read(1 << 20):
            h.update(chunk)
            done += len(chunk)
            if limit is not None and done >= limit:
                break
    return h.hexdigest()


def model_fingerprint(path: Path) -> str:
    """Identity of the model's bytes (size + hash of the first 64 MB and the file names): the key
    of its statistics and profiles, and the recipe's ``source_sha256``."""
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(str(f.stat().st_size).encode())
        h.update(_sha256_file(f, 64 << 20).encode())
    return h.hexdigest()


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# ---------------------------------------------------------------------------------------------
# Profiling many tensors: in threads of this process (statistics in memory), or as small jobs in
# other processes -- loky here, or Dask workers anywhere -- that read everything from paths.

ProfileRow = tuple[list[str], np.ndarray, np.ndarray]  # (written types, sizes, errors) of a tensor


@dataclass(frozen=True)
class ProfileJob:
    """What any process needs to profile a tensor of a run: paths and keys, no arrays, so that a
    task shipped to a loky process or a Dask worker is a few hundred bytes. The paths must be
    readable there (on a cluster: a shared disk, mounted at the same path everywhere)."""

    model_path: str  # absolute path of the .gguf file or Hugging Face folder
    model_key: str  # its fingerprint (checked on the worker: a different file is an error)
    stats_path: str  # the run's statistics .npz (objectives/stats/store.py's layout)
    cache_folder: str  # the profile cache every process shares
    stats_key: str
    types: tuple[str, ...]

    def cache(self) -> ProfileCache:
        return ProfileCache(self.cache_folder, self.model_key, self.stats_key)

    def __call__(self, name: str) -> ProfileRow:
        """Profile ``name`` (or read it from the cache), write the cache entry, return the row."""
        cache, types = self.cache(), list(self.types)
        hit = cache.get(name, types)
        if hit is not None:  # another process got there first
            return hit
        source = _open_source(self.model_path, self.model_key)
        row = profile_tensor(source.load(name), types, read_tensor_stats(self.stats_path, name))
        cache.put(name, types, *row)
        system.trim()
        return row


@functools.lru_cache(maxsize=4)
def _open_source(path: str, model_key: str):
    """The model at ``path``, opened once per process and checked to be the run's model."""
    where = f"{socket.gethostname()} (pid {os.getpid()})"
    if not Path(path).exists():
        raise ClusterError(f"profiling worker on {where} cannot see the model {path}: put it on a "
                           "disk every worker mounts at the same path")
    if model_fingerprint(Path(path)) != model_key:
        raise ClusterError(f"profiling worker on {where}: the model at {path} is not the run's "
                           "(different bytes); every machine must see the same file")
    return open_model(path)


def read_tensor_stats(path: str | Path, name: str) -> TensorStats:
    """One tensor's statistics from the run's statistics file, read through
    :class:`~dynsearch.objectives.stats.store.StatsFile` (only that tensor's members); empty for a tensor it lacks.
    An unreadable or damaged file is one :class:`ClusterError` line naming it."""
    try:
        stats = StatsFile(path)
    except OSError as e:
        raise ClusterError(f"profiling worker on {socket.gethostname()} cannot read the statistics "
                           f"file {path} ({e.strerror or type(e).__name__}): --cache must be on a "
                           "disk every worker mounts at the same path") from None
    except ValueError as e:
        raise ClusterError(f"statistics file {path} is damaged ({e}); delete it to recompute") from None
    try:
        return stats[name] if name in stats else TensorStats()
    except ValueError as e:  # a member that is not finite
        raise ClusterError(f"statistics file {path}: {e}; delete it to recompute") from None
    finally:
        stats.close()


def profile_tensors(names: list[str], types: list[str], cache: ProfileCache,
                    local: Callable[[str], ProfileRow], job: ProfileJob | None,
                    backend: ProfileBackend = ProfileBackend(),
                    progress: Callable[[Iterable, int], Iterable] = lambda it, n: it) -> list[ProfileRow]:
    """Rows of every tensor in ``names`` order. Cache hits are read here; the misses go to
    ``backend``: ``local(name)`` in threads of this process, or ``job(name)`` in loky processes
    or on the Dask cluster (which write the cache entries themselves)."""
    rows: dict[str, ProfileRow] = {}
    for n in names:
        hit = cache.get(n, types)
        if hit is not None:
            rows[n] = hit
    todo = [n for n in names if n not in rows]
    log.info("profile: %d of %d tensors from the cache, %d to compute (%s)", len(rows), len(names),
             len(todo), backend.name)
    if todo:
        fn = job if backend.remote else local
        if fn is None:
            raise ValueError(f"the {backend.name} backend needs a ProfileJob")
        try:
            with joblib_backend(backend) as kwargs:
                out = Parallel(return_as="generator", **kwargs)(delayed(fn)(n) for n in todo)
                for n, row in zip(todo, progress(out, len(todo))):
                    rows[n] = row
        except ClusterError:
            raise
        except Exception as e:
            err = describe_error(backend, e)
            if err is None:
                raise
            raise err from None
    return [rows[n] for n in names]
