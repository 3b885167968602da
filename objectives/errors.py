"""Errors raised when a model cannot be read or run (one hierarchy: :mod:`dynsearch.errors`)."""

from __future__ import annotations

from ..errors import ModelError

__all__ = ["ModelError"]
