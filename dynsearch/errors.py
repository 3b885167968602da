"""The error types users see. Each carries a one-line message naming the problem; the CLI prints
it without a traceback."""


class DynsearchError(Exception):
    """Base of every error dynsearch reports to a user."""


class GGUFError(DynsearchError, ValueError):
    """A GGUF file is missing, malformed or unsupported."""


class ModelError(DynsearchError, ValueError):
    """A model (GGUF or Hugging Face folder) cannot be used: missing, unknown architecture, ..."""


class RecipeError(DynsearchError, ValueError):
    """A recipe file is malformed or does not fit the model."""


class BudgetError(DynsearchError, ValueError):
    """A size budget is malformed or cannot be reached."""
