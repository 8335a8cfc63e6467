"""Errors the trainer raises for the command line to report (kept apart so the CLI imports no torch code)."""


class NonFiniteError(RuntimeError):
    """The loss or the gradient went NaN/inf; the message names the step and the modalities."""


class TrainingStopped(RuntimeError):
    """A signal stopped training between steps; the run was checkpointed (`result` holds where)."""

    def __init__(self, message: str, result=None):
        super().__init__(message)
        self.result = result
