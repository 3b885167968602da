"""The recipe: a frozen, versioned description of one per-tensor type assignment.

A recipe is data. It is read with a safe YAML loader (libyaml's parser where PyYAML has it, Python
constructors) that rejects aliases, duplicate keys, deep nesting, more than MAX_NODES values and
files over MAX_BYTES before building anything, and validated strictly: unknown keys, wrong types and
unknown quant types are errors naming the offending entry's path (``tensors.blk.0.attn_q.weight``).
Tensors are written in model (layer) order so that diffs read well.
"""

from __future__ import annotations

import datetime as _dt
import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Protocol

import yaml

from dynsearch import __version__
from dynsearch.atomic import atomic_write_text
from dynsearch.errors import RecipeError
from dynsearch.kernels.types import effective_type, parse_qtype, type_info

FORMAT_VERSION = 1
MAX_BYTES = 4 * 1024 * 1024  # a recipe of a 1000-layer MoE model is well under 1 MB
MAX_NODES = 100_000  # YAML values and collections; such a recipe has about 40,000 (~1 s to load)
MAX_DEPTH = 8

_NAME_RE = re.compile(r"[A-Za-z0-9_.\-]+")  # a file name: also no name of dots alone
# the C parser where PyYAML was built with libyaml (10x faster), with the same Python constructors
_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass(frozen=True)
class ModelInfo:
    name: str  # e.g. "SmolLM2-135M-Instruct"
    architecture: str  # GGUF general.architecture, e.g. "llama"
    source_sha256: str = ""  # hash of the source file(s) the recipe was searched on
    n_params: int = 0  # number of weights of all tensors


@dataclass(frozen=True)
class Recipe:
    """One type per tensor, plus how it was found and what it measured."""

    name: str
    model: ModelInfo
    tensors: dict[str, str]  # GGUF tensor name -> type name, in model order
    budget: dict[str, Any] = field(default_factory=dict)  # {"spec": "100MB", "bytes": ...}
    achieved: dict[str, Any] = field(default_factory=dict)  # {"bytes": ..., "bpw": ...}
    calibration: dict[str, Any] = field(default_factory=dict)  # description, sha256, n_tokens
    kl: dict[str, float] = field(default_factory=dict)  # measured on held-out tokens
    search: dict[str, Any] = field(default_factory=dict)  # sampler, trials, seed, types, ...
    created: str = ""
    dynsearch_version: str = ""
    format: int = FORMAT_VERSION

    def types_histogram(self) -> dict[str, int]:
        hist: dict[str, int] = {}
        for t in self.tensors.values():
            hist[t] = hist.get(t, 0) + 1
        return dict(sorted(hist.items(), key=lambda kv: -kv[1]))

    def check_model(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Every recipe tensor exists in the model, every model tensor is covered, every type
        fits its tensor's rows (``shapes`` in numpy order: the last axis is the row)."""
        unknown = [n for n in self.tensors if n not in shapes]
        if unknown:
            raise RecipeError(f"tensors.{unknown[0]}: not a tensor of the model "
                              f"({len(unknown)} unknown tensor(s))")
        missing = [n for n in shapes if n not in self.tensors]
        if missing:
            raise RecipeError(f"tensors: no type for model tensor {missing[0]} "
                              f"({len(missing)} tensor(s) missing)")
        for name, tname in self.tensors.items():
            n_per_row = int(shapes[name][-1])
            if effective_type(tname, n_per_row) != parse_qtype(tname):
                raise RecipeError(f"tensors.{name}: {tname} does not fit rows of {n_per_row} "
                                  f"(block size {type_info(tname).block_size})")

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "name": self.name,
            "model": {"name": self.model.name, "architecture": self.model.architecture,
                      "source_sha256": self.model.source_sha256, "n_params": self.model.n_params},
            "budget": dict(self.budget),
            "achieved": dict(self.achieved),
            "calibration": dict(self.calibration),
            "kl": dict(self.kl),
            "search": dict(self.search),
            "created": self.created,
            "dynsearch_version": self.dynsearch_version,
            "tensors": dict(self.tensors),
        }

    def dumps(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=100)


class BudgetSpec(Protocol):
    """A parsed budget (``search.budget.Budget``): what the user asked for."""

    spec: str
    file_bytes: int | None
    bpw: float | None


def from_assignment(name: str, model: ModelInfo, tensors: Mapping[str, str], tensor_bytes: int,
                    budget: BudgetSpec, calibration: Mapping[str, Any], search: Mapping[str, Any],
                    kl: Mapping[str, float] | None = None, overhead_bytes: int | None = None) -> Recipe:
    """The recipe of an assignment ``tensors`` (every tensor of ``model``, in model order) whose
    tensor data takes ``tensor_bytes`` (padding included), found under ``budget``; with
    ``overhead_bytes`` (the file's header and metadata) the file size it will have is recorded
    too. Dated today, stamped with this dynsearch version."""
    achieved: dict[str, Any] = {"tensor_bytes": tensor_bytes}
    if overhead_bytes is not None:
        achieved["bytes_estimate"] = tensor_bytes + overhead_bytes
    achieved["bpw"] = round(8.0 * tensor_bytes / model.n_params, 4)
    return Recipe(name=name, model=model, tensors=dict(tensors),
                  budget={"spec": budget.spec, "bytes": budget.file_bytes, "bpw": budget.bpw},
                  achieved=achieved, calibration=dict(calibration), kl=dict(kl or {}), search=dict(search),
                  created=_dt.date.today().isoformat(), dynsearch_version=__version__)


# ---------------------------------------------------------------------------------------------
# Loading: safe YAML, then the schema


class _StrictLoader(_SafeLoader):
    """SafeLoader that rejects duplicate keys."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (list, dict, set)):
                raise RecipeError(f"a key must be a plain value, not a {type(key).__name__} "
                                  f"(line {key_node.start_mark.line + 1})")
            if key in seen:
                raise RecipeError(f"duplicate key {key!r} (line {key_node.start_mark.line + 1})")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _check_events(text: str) -> None:
    """Reject aliases (exponential expansion), nesting beyond MAX_DEPTH and more than MAX_NODES
    values before building (each built value costs far more than its parse event)."""
    depth = nodes = 0
    for ev in yaml.parse(io.StringIO(text), Loader=_SafeLoader):
        if isinstance(ev, yaml.NodeEvent):
            nodes += 1
            if nodes > MAX_NODES:
                raise RecipeError(f"more than {MAX_NODES:,} values (line {ev.start_mark.line + 1})")
        if isinstance(ev, yaml.AliasEvent):
            raise RecipeError(f"YAML aliases are not allowed in a recipe (line {ev.start_mark.line + 1})")
        if isinstance(ev, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                raise RecipeError(f"nesting deeper than {MAX_DEPTH} levels (line {ev.start_mark.line + 1})")
        elif isinstance(ev, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1


_TOP_KEYS = {"format", "name", "model", "budget", "achieved", "calibration", "kl", "search",
             "created", "dynsearch_version", "tensors"}
_REQUIRED = {"format", "name", "model", "tensors"}
_MODEL_KEYS = {"name": str, "architecture": str, "source_sha256": str, "n_params": int}


def _expect(value, typ, path: str):
    if typ is int and isinstance(value, bool) or not isinstance(value, typ):
        want = typ.__name__ if isinstance(typ, type) else " or ".join(t.__name__ for t in typ)
        raise RecipeError(f"{path}: expected {want}, got {type(value).__name__}")
    return value


def _scalar_map(value, path: str) -> dict[str, Any]:
    _expect(value, dict, path)
    for k, v in value.items():
        _expect(k, str, f"{path}")
        if isinstance(v, (dict, list)):
            if isinstance(v, list) and all(isinstance(e, (str, int, float, bool)) for e in v):
                continue
            if isinstance(v, dict):
                _scalar_map(v, f"{path}.{k}")
                continue
            raise RecipeError(f"{path}.{k}: lists may hold only scalars")
        if v is not None and not isinstance(v, (str, int, float, bool)):
            raise RecipeError(f"{path}.{k}: unsupported value of type {type(v).__name__}")
    return dict(value)


def from_dict(d: Any) -> Recipe:
    _expect(d, dict, "recipe")
    unknown = sorted(set(d) - _TOP_KEYS, key=str)
    if unknown:
        raise RecipeError(f"{unknown[0]}: unknown key (known: {', '.join(sorted(_TOP_KEYS))})")
    missing = sorted(_REQUIRED - set(d))
    if missing:
        raise RecipeError(f"{missing[0]}: required key is missing")
    if _expect(d["format"], int, "format") != FORMAT_VERSION:
        raise RecipeError(f"format: version {d['format']} is not supported (this dynsearch reads {FORMAT_VERSION})")
    name = _expect(d["name"], str, "name")
    if not _NAME_RE.fullmatch(name) or not name.strip("."):
        raise RecipeError(f"name: {name!r} may hold only letters, digits, '_', '.' and '-', "
                          "and not dots alone")
    m = _expect(d["model"], dict, "model")
    for k in m:
        if k not in _MODEL_KEYS:
            raise RecipeError(f"model.{k}: unknown key (known: {', '.join(_MODEL_KEYS)})")
    for k in ("name", "architecture"):
        if k not in m:
            raise RecipeError(f"model.{k}: required key is missing")
    model = ModelInfo(**{k: _expect(v, _MODEL_KEYS[k], f"model.{k}") for k, v in m.items()})
    tensors = _expect(d["tensors"], dict, "tensors")
    if not tensors:
        raise RecipeError("tensors: empty")
    out: dict[str, str] = {}
    for tname, qtype in tensors.items():
        _expect(tname, str, "tensors")
        _expect(qtype, str, f"tensors.{tname}")
        try:
            out[tname] = parse_qtype(qtype).name
        except ValueError:
            raise RecipeError(f"tensors.{tname}: unknown quant type {qtype!r}") from None
    kl = _scalar_map(d.get("kl") or {}, "kl")
    for k, v in kl.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise RecipeError(f"kl.{k}: expected a number, got {type(v).__name__}")
    return Recipe(
        name=name, model=model, tensors=out,
        budget=_scalar_map(d.get("budget") or {}, "budget"),
        achieved=_scalar_map(d.get("achieved") or {}, "achieved"),
        calibration=_scalar_map(d.get("calibration") or {}, "calibration"),
        kl={k: float(v) for k, v in kl.items()},
        search=_scalar_map(d.get("search") or {}, "search"),
        created=str(_expect(d.get("created", ""), (str,), "created")),
        dynsearch_version=str(_expect(d.get("dynsearch_version", ""), (str,), "dynsearch_version")),
    )


def loads(text: str) -> Recipe:
    if len(text.encode("utf-8", "surrogatepass")) > MAX_BYTES:
        raise RecipeError(f"recipe is larger than {MAX_BYTES // (1024 * 1024)} MB")
    try:
        _check_events(text)
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except RecipeError:
        raise
    except yaml.YAMLError as e:
        raise RecipeError(f"not valid YAML: {str(e).splitlines()[0]}") from None
    except (ValueError, TypeError, AttributeError, OverflowError) as e:  # PyYAML's constructors
        # on malformed values (a date like 2026-13-45, a broken !!timestamp): one line, no traceback
        raise RecipeError(f"not valid YAML: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    return from_dict(data)


def load(path: str | Path) -> Recipe:
    """Read a recipe file: at most MAX_BYTES are read, whatever the file (a device, a pipe)."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            data = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise RecipeError(f"{p}: recipe file not found") from None
    except IsADirectoryError:
        raise RecipeError(f"{p}: is a folder, not a recipe file") from None
    except OSError as e:
        raise RecipeError(f"{p}: cannot read: {e.strerror}") from None
    if len(data) > MAX_BYTES:
        raise RecipeError(f"{p}: recipe is larger than {MAX_BYTES // (1024 * 1024)} MB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise RecipeError(f"{p}: not UTF-8 text") from None
    try:
        return loads(text)
    except RecipeError as e:
        raise RecipeError(f"{p}: {e}") from None


def save(recipe: Recipe, path: str | Path) -> Path:
    """Write atomically (temp file, fsync, rename): a reader sees the old file or the new one."""
    return atomic_write_text(path, recipe.dumps())
