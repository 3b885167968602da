"""dynsearch: search-based dynamic GGUF quantization."""

__version__ = "0.1.0"
