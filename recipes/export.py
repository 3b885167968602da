"""``dynsearch export --to llama-quantize``: a recipe as llama-quantize's ``--tensor-type-file`` and
the command line that writes, with llama.cpp alone, the file ``dynsearch apply`` writes.

How llama-quantize reads the file (vendor llama.cpp, tools/quantize/quantize.cpp and
src/llama-quant.cpp):

* whitespace-separated ``PATTERN=TYPE`` entries; the pattern is everything before the first ``=``,
  lower-cased (``std::tolower``), then compiled as an ECMAScript ``std::regex``; the type is a ggml
  type name, case-insensitive;
* for each tensor the first pattern found anywhere in its name (``std::regex_search``) wins, so
  each tensor gets one anchored pattern ``^...$``; a name's upper-case letters, ``=`` and
  whitespace would not survive that reading, so they are written as ``\\xHH`` escapes (hex digits
  are lower-case already), and ``.`` as ``\\.``;
* the patterns are consulted only when the base type on the command line is a quantized type (they
  are ignored for F16/BF16/F32), and only for the tensors llama-quantize converts at all (norms and
  the like are copied as stored); they take precedence over its own mixture heuristics, and the
  recipe's types already are what its fallback for rows that do not fit a 256-wide block would
  pick, so neither interferes. ``--pure``, ``--output-tensor-type`` and
  ``--token-embedding-type`` are therefore not needed.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from dynsearch.atomic import check_not_input
from dynsearch.errors import RecipeError
from dynsearch.kernels import parse_qtype
from dynsearch.recipes import llama_quant
from dynsearch.recipes.apply import ImatrixFile, open_source, plan_tensors
from dynsearch.recipes.schema import Recipe

_PLAIN = re.compile(r"[a-z0-9_]")


def tensor_pattern(name: str) -> str:
    """An anchored regex matching exactly ``name`` that survives llama-quantize's lower-casing."""
    if not name.isascii():
        raise RecipeError(f"tensors.{name}: names outside ASCII cannot be exported")
    out = []
    for ch in name:
        if _PLAIN.fullmatch(ch):
            out.append(ch)
        elif ch == ".":
            out.append(r"\.")
        else:
            out.append(f"\\x{ord(ch):02x}")
    return "^" + "".join(out) + "$"


def tensor_type_file(recipe: Recipe) -> str:
    """The ``--tensor-type-file`` text: one ``pattern=type`` line per tensor of the recipe."""
    return "".join(f"{tensor_pattern(n)}={parse_qtype(t).name.lower()}\n" for n, t in recipe.tensors.items())


@dataclass(frozen=True)
class LlamaQuantizeExport:
    """What reproduces a recipe's GGUF with llama.cpp: the tensor-type file and the command."""

    tensor_types: str  # contents of the --tensor-type-file
    command: list[str]  # argv of llama-quantize
    base: llama_quant.FileType  # the base type argument (recorded as general.file_type)

    def command_line(self) -> str:
        return shlex.join(self.command)


def export_llama_quantize(recipe: Recipe, tensor_type_path: str | Path, model: str | Path | None = None,
                          output: str | Path | None = None, imatrix: str | Path | None = None,
                          exe: str = "llama-quantize") -> LlamaQuantizeExport:
    """The tensor-type file for ``recipe`` and the llama-quantize command that reads it from
    ``tensor_type_path``.

    With ``model`` the recipe is checked against it (every tensor covered; tensors llama-quantize
    copies as stored keep their type) and ``--allow-requantize`` is added only where the model is
    quantized; without it the placeholders ``MODEL.gguf`` and the flag are used. An ``output``
    that is the model or the imatrix (llama-quantize would write over it) is an OutputError.
    """
    if output is not None:
        check_not_input(output, (model, imatrix))
    base = llama_quant.file_type(recipe.tensors)
    requantize = _check_model(recipe, model, base, imatrix) if model is not None else True
    cmd = [exe]
    if requantize:
        cmd.append("--allow-requantize")
    if imatrix is not None:
        cmd += ["--imatrix", str(imatrix)]
    cmd += ["--tensor-type-file", str(tensor_type_path), str(model or "MODEL.gguf"),
            str(output or f"{recipe.name}.gguf"), base.arg]
    return LlamaQuantizeExport(tensor_type_file(recipe), cmd, base)


def _check_model(recipe: Recipe, model: str | Path, base: llama_quant.FileType,
                 imatrix: str | Path | None) -> bool:
    """Check the recipe against the model as llama-quantize will treat it; True where some tensor it
    converts is stored quantized (so ``--allow-requantize`` is needed)."""
    src = open_source(model)
    # fits the model, tensors copied as stored keep their type, importance vectors where needed
    plan_tensors(recipe, src, ImatrixFile.read(imatrix) if imatrix is not None else None)
    arch, requantize = src.config.arch, False
    for name in src.names():
        if not llama_quant.llama_quantizes(name, src.shape(name), arch):
            continue
        want = parse_qtype(recipe.tensors[name])
        if base.base in llama_quant.FLOAT_TYPES and want != base.base:
            raise RecipeError(f"tensors.{name}: {want.name} cannot be reproduced by llama-quantize with "
                              f"base type {base.arg} (it ignores overrides for float base types)")
        have = src.qtype(name)
        requantize |= want != have and have not in llama_quant.FLOAT_TYPES
    return requantize
