"""``dynsearch apply``: a recipe + a source GGUF -> the quantized GGUF, as llama-quantize writes it.

The file is the one ``llama-quantize --tensor-type-file`` writes from the same source, types and
importance matrix (``dynsearch export``), tensor for tensor byte-identical, plus the recipe itself
under ``dynsearch.recipe`` (see :mod:`.llama_quant` for the rules mirrored):

* metadata: the source's keys in the source's order, then ``general.quantization_version`` and
  ``general.file_type``, then ``quantize.imatrix.*`` when an imatrix file is given, then the recipe;
* tensors in llama.cpp's order and alignment; a tensor whose type does not change is copied byte
  for byte, every other one is dequantized (our kernels) and quantized with its importance vector;
* written tensor by tensor (peak memory about one tensor) into a temporary file in the destination
  folder that is fsynced and renamed only when complete.

Everything that can be wrong with the inputs (recipe vs model, types we cannot write, missing or
mis-sized importance vectors) or the output (one of the inputs, a folder, a read-only place: see
:func:`dynsearch.atomic.check_output`) is checked before the first byte is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import gguf
import numpy as np

from dynsearch.atomic import atomic_path, check_output
from dynsearch.errors import ModelError, RecipeError
from dynsearch.kernels import QT, kernel, parse_qtype, quantizable_types, quantize_tensor, type_info
from dynsearch.objectives.io.gguf_source import GGUFSource
from dynsearch.objectives.io.gguf_write import TensorOut, metadata_writer, write_tensors
from dynsearch.objectives.io.imatrix import ImatrixData, ImatrixFormatError, read_imatrix
from dynsearch.recipes import llama_quant
from dynsearch.recipes.schema import Recipe

RECIPE_KEY = "dynsearch.recipe"
# Keys llama-quantize sets itself (the split keys it removes); a source's values are not copied.
_SET_BY_QUANTIZE = ("general.quantization_version", "general.file_type", "split.no", "split.count",
                    "split.tensors.count")


@dataclass(frozen=True)
class ImatrixFile:
    """An importance matrix as ``llama-quantize --imatrix ARG`` reads it: the path as given (it is
    recorded in the file's metadata) and the data."""

    arg: str
    data: ImatrixData

    @classmethod
    def read(cls, path: str | Path) -> ImatrixFile:
        p = Path(path)
        if not p.exists():
            raise RecipeError(f"{p}: imatrix file not found")
        if not p.is_file():
            raise RecipeError(f"{p}: not a file, cannot be an imatrix")
        try:
            return cls(str(path), read_imatrix(p))
        except (ImatrixFormatError, ValueError, OSError) as e:
            raise RecipeError(f"{p}: not a readable imatrix: {e}") from None

    def get(self, name: str) -> np.ndarray | None:
        return self.data.importance(name) if name in self.data.entries else None


Importance = ImatrixFile | Mapping[str, np.ndarray | None] | Callable[[str], np.ndarray | None] | None


def _lookup(importance: Importance) -> Callable[[str], np.ndarray | None]:
    if importance is None:
        return lambda name: None
    if isinstance(importance, (ImatrixFile, Mapping)):
        return importance.get
    return importance


def open_source(model_path: str | Path):
    """The source model as a GGUFSource; a Hugging Face folder is refused (its GGUF metadata --
    tokenizer, chat template -- is made by llama.cpp's convert_hf_to_gguf.py)."""
    p = Path(model_path)
    if p.is_dir():
        raise ModelError(f"{p}: apply writes from a GGUF file; convert the Hugging Face folder with "
                         "llama.cpp's convert_hf_to_gguf.py (--outtype f32/f16/bf16) first")
    if not p.is_file():
        raise ModelError(f"{p}: no such model file")
    return GGUFSource(p)


def _check_fits(recipe: Recipe, src) -> None:
    arch = src.config.arch
    if recipe.model.architecture != arch:
        raise RecipeError(f"recipe {recipe.name} is for architecture {recipe.model.architecture}, "
                          f"{src.path.name} is {arch}")
    try:
        recipe.check_model({n: src.shape(n) for n in src.names()})
    except RecipeError as e:
        raise RecipeError(f"recipe {recipe.name} does not fit {src.path.name}: {e}") from None


def _importance_of(name: str, shape: tuple[int, ...], vec: np.ndarray | None) -> np.ndarray | None:
    """One importance vector per matrix (n_mat, n_per_row), or None, with llama-quantize's rule: the
    vector must hold n_per_row values per expert; a mis-sized one is an error, except for the token
    embeddings (which llama-imatrix never measures), where it is ignored."""
    if vec is None:
        return None
    vec = np.asarray(vec, dtype=np.float32).reshape(-1)
    n_mat = shape[0] if len(shape) == 3 else 1
    if vec.size == n_mat * shape[-1]:
        return vec.reshape(n_mat, shape[-1])
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return None
    raise RecipeError(f"imatrix entry {name} has {vec.size} values, the tensor needs "
                      f"{n_mat * shape[-1]} ({n_mat} x {shape[-1]})")


def plan_tensors(recipe: Recipe, src, importance: Importance = None) -> list[TensorOut]:
    """The tensors of the output file, in llama.cpp's order, each with the thunk that makes its data.
    Checks everything first; raises RecipeError / ModelError naming the tensor."""
    _check_fits(recipe, src)
    arch, lookup, writable = src.config.arch, _lookup(importance), set(quantizable_types())
    out = []
    for name in llama_quant.tensor_order(src.names()):
        shape, have, want = src.shape(name), src.qtype(name), parse_qtype(recipe.tensors[name])
        if want == have:
            out.append(TensorOut(name, shape, want, lambda n=name: src.raw(n)))
            continue
        if not llama_quant.llama_quantizes(name, shape, arch):
            raise RecipeError(f"tensors.{name}: llama.cpp stores this tensor as it is in the source "
                              f"({have.name}), the recipe says {want.name}")
        if want not in writable:
            raise RecipeError(f"tensors.{name}: dynsearch cannot write {want.name} yet")
        try:
            kernel(have)
        except NotImplementedError:
            raise ModelError(f"{src.path.name}: tensor {name} is {have.name}, which dynsearch "
                             "cannot read") from None
        imp = _importance_of(name, shape, lookup(name))
        if imp is None and (llama_quant.requires_imatrix(name, want) or type_info(want).requires_imatrix):
            raise RecipeError(f"tensors.{name}: {want.name} needs an importance matrix (--imatrix)")
        out.append(TensorOut(name, shape, want, lambda n=name, t=want, i=imp: _encode(src, n, t, i)))
    return out


def _encode(src, name: str, qtype: QT, importance: np.ndarray | None) -> np.ndarray:
    try:
        return quantize_tensor(src.load(name), qtype, importance)
    except ValueError as e:  # e.g. NaN weights
        raise ModelError(f"{src.path.name}: cannot quantize {name} to {qtype.name}: {e}") from None


def apply_recipe(recipe: Recipe, model_path: str | Path, out_path: str | Path,
                 importance: Importance = None, progress: bool = True) -> Path:
    """Write ``out_path`` (atomically) from the GGUF ``model_path`` with the recipe's types.

    ``importance``: an :class:`ImatrixFile` (its ``quantize.imatrix.*`` keys are recorded, as
    llama-quantize does), or importance vectors by tensor name (a mapping or a function).
    """
    imatrix_path = importance.arg if isinstance(importance, ImatrixFile) else None
    out = check_output(out_path, (model_path, imatrix_path))
    src = open_source(model_path)
    tensors = plan_tensors(recipe, src, importance)
    ftype = llama_quant.file_type(recipe.tensors)
    kv = llama_quant.imatrix_metadata(importance.arg, importance.data) if isinstance(importance, ImatrixFile) else []
    replaced = {*_SET_BY_QUANTIZE, RECIPE_KEY, *(k for k, _, _ in kv)}
    with atomic_path(out) as tmp:
        writer = metadata_writer(tmp, src.header, keep=lambda k: k not in replaced)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_file_type(int(ftype.ftype))
        for key, value, vtype in kv:
            writer.add_key_value(key, value, vtype)
        writer.add_string(RECIPE_KEY, recipe.dumps())
        write_tensors(writer, tensors, desc=f"write {out.name}", progress=progress)
    return out

