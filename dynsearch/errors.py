"""The error types users see. Each carries a one-line message naming the problem; the CLI prints
it without a traceback."""


class DynsearchError(Exception):
    """Base of every error dynsearch reports to a user."""


class ModelError(DynsearchError, ValueError):
    """A model (GGUF or Hugging Face folder) cannot be used: missing, unknown architecture, ..."""


class GGUFError(ModelError):
    """A GGUF file is missing, malformed or unsupported (a model error: code that opens a model
    catches both with ``ModelError``)."""


class RecipeError(DynsearchError, ValueError):
    """A recipe file is malformed or does not fit the model."""


class BudgetError(DynsearchError, ValueError):
    """A size budget is malformed or cannot be reached."""


class BenchError(DynsearchError, RuntimeError):
    """A benchmark step failed: a llama.cpp tool exited with an error, or its output is unusable."""


class StorageError(DynsearchError, ValueError):
    """An Optuna storage URL is malformed or unreachable, or a study in it cannot be used."""


class ClusterError(DynsearchError, RuntimeError):
    """Work cannot be sent to a cluster: the Dask scheduler is unreachable or has no workers,
    the ``distributed`` package is missing, or a worker cannot read the model or the cache."""
