"""Typed errors. Each message says what went wrong and what to do; the CLI prints it as one line."""


class ExpertHubError(Exception):
    """Base class for every error expert-hub raises on purpose."""


class UnsupportedModelError(ExpertHubError):
    """The model is not a Mixture-of-Experts family expert-hub knows."""


class InvalidInputError(ExpertHubError):
    """A file, option or value the user gave cannot be used as it is."""


class AdapterMismatchError(ExpertHubError):
    """An expert adapter does not fit the base model it is applied to."""


class InternalError(RuntimeError):
    """Something expert-hub itself got wrong (a bug, or a failing device), never bad input: reported as a bug."""
