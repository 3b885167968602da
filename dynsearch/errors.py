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


class OutputError(DynsearchError, ValueError):
    """An output cannot be written where asked: it is one of the command's own inputs, a folder, a
    device, under a file, read-only, or its name is too long (checked before the work starts)."""


class BudgetError(DynsearchError, ValueError):
    """A size budget is malformed or cannot be reached."""


class BenchError(DynsearchError, RuntimeError):
    """A benchmark step failed: a llama.cpp tool exited with an error, or its output is unusable."""


class StorageError(DynsearchError, ValueError):
    """An Optuna storage URL is malformed or unreachable, or a study in it cannot be used."""


class ClusterError(DynsearchError, RuntimeError):
    """Work cannot be sent to a cluster: the Dask scheduler is unreachable or has no workers,
    the ``distributed`` package is missing, or a worker cannot read the model or the cache."""


class MMLUError(DynsearchError, ValueError):
    """MMLU data that cannot be used (missing folder, unknown subject, malformed CSV row)."""


class CalibrationError(DynsearchError, ValueError):
    """A calibration / evaluation source that cannot be used; the message is one line naming the file."""


class ImatrixFormatError(DynsearchError, ValueError):
    """A file is not a readable imatrix (message says why)."""


class PlotError(DynsearchError, ValueError):
    """A study or recipe cannot be plotted: missing, empty, or not what was asked for."""


class LlamaCppBuildError(BenchError):
    """The tools could not be located or built (message is one line saying why)."""
