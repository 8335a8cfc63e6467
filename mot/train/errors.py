"""Errors the trainer raises for the command line to report (kept apart so the CLI imports no torch code)."""


class NonFiniteError(RuntimeError):
    """The loss or the gradient went NaN/inf; the message names the step and the modalities."""
