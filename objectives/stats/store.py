"""The run's per-tensor statistics (:class:`TensorStats`), on disk: written as they are produced
and read one tensor at a time.

The second moments ``X^T X`` are the bulk of the statistics (one ``(in, in)`` matrix per tensor:
about 17 MB per SmolLM2 layer, 1.4 GB per layer of an 8B model), so holding them all is
what made memory grow with the number of layers. :class:`StatsWriter` appends each array to the
``.npz`` (an uncompressed zip, ``name|field`` members, the layout ``np.savez`` writes) as soon as
it is final, and :class:`StatsFile` reads back only the members of the tensor asked for, so the
profiler holds one tensor's statistics per worker.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from dynsearch.atomic import atomic_path

log = logging.getLogger(__name__)


@dataclass
class TensorStats:
    """How one tensor is used on the calibration tokens (all optional: None = not measured)."""

    xtx: torch.Tensor | None = None  # (in, in) mean input second moment X^T X / N
    fisher_out: np.ndarray | None = None  # (out,) mean squared output gradient
    importance: np.ndarray | None = None  # (in,) imatrix vector given to the quantizer
    row_weight: np.ndarray | None = None  # (rows,) lookup frequency of each row (embeddings)
    fisher_col: np.ndarray | None = None  # (in,) Fisher of what a looked-up row feeds
    # MoE expert stacks (objectives/stats/moe.py): per expert, the diagonal input second moment
    # over the tokens routed to it / all tokens (n_expert, in); fisher_out is then per expert
    # (n_expert, out)
    xdiag: np.ndarray | None = None
    expert_counts: np.ndarray | None = None  # (n_expert,) tokens routed to each expert (report)


STATS_FIELDS = tuple(f.name for f in fields(TensorStats))  # a statistics file's member fields


def _array(v) -> np.ndarray:
    return v.cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)


class StatsWriter:
    """Appends ``name|field`` arrays to a new ``.npz``; :meth:`commit` moves it into place (until
    then, and on any error, ``path`` is untouched). Use as a context manager."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._atomic = atomic_path(self.path)
        self._zip: zipfile.ZipFile | None = None
        self._written: set[str] = set()

    def __enter__(self) -> StatsWriter:
        tmp = self._atomic.__enter__()
        self._zip = zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True)
        return self

    def add(self, name: str, field: str, value) -> None:
        """One array (numpy or torch); written now, not kept."""
        if self._zip is None:
            raise RuntimeError("StatsWriter.add outside its with-block")
        if field not in STATS_FIELDS or "|" in name:
            raise ValueError(f"bad statistics member {name!r}|{field!r}")
        key = f"{name}|{field}"
        if key in self._written:
            raise ValueError(f"statistics member {key} written twice")
        self._written.add(key)
        with self._zip.open(key + ".npy", "w", force_zip64=True) as f:
            np.lib.format.write_array(f, np.ascontiguousarray(_array(value)), allow_pickle=False)

    def add_stats(self, name: str, st: TensorStats) -> None:
        for field in STATS_FIELDS:
            v = getattr(st, field)
            if v is not None:
                self.add(name, field, v)

    def __exit__(self, exc_type, exc, tb) -> None:
        zf, self._zip = self._zip, None
        if zf is not None:
            zf.close()
        self._atomic.__exit__(exc_type, exc, tb)


class StatsFile(Mapping):
    """``name -> TensorStats`` read lazily from a statistics ``.npz`` (thread-safe). Every member
    is checked finite when read; :meth:`verify` reads them all once (one at a time)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._z = np.load(self.path, allow_pickle=False)
        self._lock = threading.Lock()
        self._fields: dict[str, list[str]] = {}
        for key in self._z.files:
            name, sep, field = key.rpartition("|")
            if not sep or field not in STATS_FIELDS:
                raise ValueError(f"unexpected member {key!r}")
            self._fields.setdefault(name, []).append(field)

    def _read(self, name: str, field: str) -> np.ndarray:
        with self._lock:
            v = self._z[f"{name}|{field}"]
        if not np.isfinite(v).all():
            raise ValueError(f"{name}|{field} is not finite")
        return v

    def field(self, name: str, field: str) -> np.ndarray | None:
        """One member (e.g. the importance vector) without reading the others."""
        return self._read(name, field) if field in self._fields.get(name, ()) else None

    def __getitem__(self, name: str) -> TensorStats:
        if name not in self._fields:
            raise KeyError(name)
        found = {f: self._read(name, f) for f in self._fields[name]}
        if "xtx" in found:
            found["xtx"] = torch.from_numpy(found["xtx"])
        return TensorStats(**found)

    def __iter__(self) -> Iterator[str]:
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)

    def verify(self) -> None:
        """Read every member once (ValueError/OSError on damage); memory: one member at a time."""
        for name, members in self._fields.items():
            for f in members:
                self._read(name, f)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._z.close()


def load_stats(path: Path) -> Mapping[str, TensorStats] | None:
    """The statistics file, opened lazily (each tensor's members read when asked for); its list
    of members and its small vectors are checked now, the X^T X matrices when read. None when
    the file is absent; a damaged file is deleted (to be recomputed) and None returned."""
    if not path.exists():
        return None
    try:
        st = StatsFile(path)
        for name in st:
            for f in ("fisher_out", "importance", "row_weight", "fisher_col"):
                st.field(name, f)
        return st
    except Exception as e:  # noqa: BLE001 - a damaged cache is recomputed
        log.warning("statistics cache %s is corrupt (%s); recomputing", path, e)
        path.unlink(missing_ok=True)
        return None


def importance_of(stats: Mapping[str, TensorStats]) -> dict[str, np.ndarray | None]:
    """tensor -> imatrix vector, without reading the X^T X matrices of a :class:`StatsFile`."""
    if isinstance(stats, StatsFile):
        return {n: stats.field(n, "importance") for n in stats}
    return {n: st.importance for n, st in stats.items()}
