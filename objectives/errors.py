"""Errors raised when a model cannot be read or run."""

from __future__ import annotations


class ModelError(Exception):
    """A model file or folder that cannot be used: missing file, unknown architecture, missing tensor.

    The message is one line that names the file or tensor, fit to print as a command's error.
    """
