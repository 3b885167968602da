"""``dynsearch apply``: a recipe + a source model -> a quantized GGUF that llama.cpp loads.

Metadata of the source is kept (tokenizer, chat template, architecture keys); ``general.file_type``
and ``general.quantization_version`` are set as llama.cpp sets them and the recipe is embedded as
``dynsearch.recipe``. Tensors are written in the source's order, streamed one at a time, into a
temporary file in the destination folder that is fsynced and renamed only when complete.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping

import gguf
import numpy as np
from tqdm.auto import tqdm

from ..atomic import atomic_path
from ..errors import RecipeError
from ..kernels import QT, parse_qtype, quantize, tensor_nbytes
from .schema import Recipe

# llama_ftype named after a file's dominant type (what llama-quantize records for its mixes).
_FTYPE = {
    QT.F32: gguf.LlamaFileType.ALL_F32, QT.F16: gguf.LlamaFileType.MOSTLY_F16,
    QT.BF16: gguf.LlamaFileType.MOSTLY_BF16, QT.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
    QT.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1, QT.Q5_0: gguf.LlamaFileType.MOSTLY_Q5_0,
    QT.Q5_1: gguf.LlamaFileType.MOSTLY_Q5_1, QT.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
    QT.Q2_K: gguf.LlamaFileType.MOSTLY_Q2_K, QT.Q3_K: gguf.LlamaFileType.MOSTLY_Q3_K_M,
    QT.Q4_K: gguf.LlamaFileType.MOSTLY_Q4_K_M, QT.Q5_K: gguf.LlamaFileType.MOSTLY_Q5_K_M,
    QT.Q6_K: gguf.LlamaFileType.MOSTLY_Q6_K, QT.IQ4_NL: gguf.LlamaFileType.MOSTLY_IQ4_NL,
    QT.IQ4_XS: gguf.LlamaFileType.MOSTLY_IQ4_XS, QT.IQ3_S: gguf.LlamaFileType.MOSTLY_IQ3_S,
    QT.IQ3_XXS: gguf.LlamaFileType.MOSTLY_IQ3_XXS, QT.IQ2_S: gguf.LlamaFileType.MOSTLY_IQ2_S,
    QT.IQ2_XS: gguf.LlamaFileType.MOSTLY_IQ2_XS, QT.IQ2_XXS: gguf.LlamaFileType.MOSTLY_IQ2_XXS,
    QT.IQ1_S: gguf.LlamaFileType.MOSTLY_IQ1_S, QT.IQ1_M: gguf.LlamaFileType.MOSTLY_IQ1_M,
}
RECIPE_KEY = "dynsearch.recipe"


def dominant_type(recipe: Recipe, shapes: Mapping[str, tuple[int, ...]]) -> QT:
    """The type holding the most weights among the 2-D tensors."""
    weight: dict[QT, int] = {}
    for name, t in recipe.tensors.items():
        if len(shapes[name]) >= 2:
            qt = parse_qtype(t)
            weight[qt] = weight.get(qt, 0) + int(np.prod(shapes[name]))
    return max(weight, key=weight.get) if weight else QT.F32


def apply_recipe(recipe: Recipe, model_path: str | Path, out_path: str | Path,
                 importance: Mapping[str, np.ndarray | None] | Callable | None = None,
                 progress: bool = True) -> Path:
    """Write ``out_path`` (atomically) from ``model_path`` with the recipe's types."""
    from ..objectives.gguf_source import GGUFSource

    src = GGUFSource(model_path)
    names = src.names()
    shapes = {n: src.shape(n) for n in names}
    recipe.check_model(shapes)
    imp = importance.get if isinstance(importance, Mapping) else (importance or (lambda n: None))

    out = Path(out_path)
    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(tmp, src.config.arch)
        align = src.metadata("general.alignment")
        if align:
            writer.data_alignment = int(align)
            writer.add_uint32("general.alignment", int(align))
        skip = ("general.file_type", "general.quantization_version", RECIPE_KEY)
        for key, field in src.header.fields.items():
            if key.startswith(("GGUF.", "general.architecture", "general.alignment")) or key in skip:
                continue
            writer.add_key_value(key, field.value, field.vtype, sub_type=field.sub_type)
        writer.add_file_type(int(_FTYPE.get(dominant_type(recipe, shapes), gguf.LlamaFileType.GUESSED)))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_string(RECIPE_KEY, recipe.dumps())
        for n in names:
            qt = parse_qtype(recipe.tensors[n])
            writer.add_tensor_info(n, shapes[n], np.dtype(np.float32), tensor_nbytes(shapes[n], qt), raw_dtype=qt)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for n in tqdm(names, desc=f"write {out.name}", disable=not progress, unit="tensor"):
            qt = parse_qtype(recipe.tensors[n])
            w = src.load(n)
            rows = w.reshape(-1, w.shape[-1])
            data = rows.astype(np.float32) if qt == QT.F32 else quantize(rows, qt, imp(n))
            writer.write_tensor_data(data)
        writer.close()
    return out


def check_recipe_file(recipe: Recipe, model_path: str | Path) -> None:
    from ..objectives.gguf_source import GGUFSource

    src = GGUFSource(model_path)
    try:
        recipe.check_model({n: src.shape(n) for n in src.names()})
    except RecipeError as e:
        raise RecipeError(f"recipe {recipe.name} does not fit {Path(model_path).name}: {e}") from None
