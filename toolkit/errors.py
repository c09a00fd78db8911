"""Error hierarchy for the toolkit.

Every error a user can cause carries a one-paragraph message that says what went
wrong (naming the node, tensor, file or model) and what to do about it. The CLI
prints ``str(err)`` without a traceback and exits with ``err.exit_code``.
"""

from __future__ import annotations


class ToolkitError(Exception):
    """Base class: an error with an actionable message for the user."""

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message}\n  fix: {hint}")


class ModelNotFoundError(ToolkitError):
    """An unknown model name or a path that does not hold a model."""


class ExportError(ToolkitError):
    """torch.onnx export failed; the message names the module or op."""


class InvalidModelError(ToolkitError):
    """An ONNX file that is corrupt, truncated or structurally invalid."""


class OpLibraryError(ToolkitError):
    """The custom-op library is missing, or incompatible with this ONNX Runtime."""


class PassError(ToolkitError):
    """A graph pass failed or produced an invalid graph; names the node."""


class OutputExistsError(ToolkitError):
    """The output directory exists and --overwrite was not given."""


class ParityFailure(ToolkitError):
    """A parity threshold failed (exit code 1, like a failing test)."""

    exit_code = 1


class ParityFailedWarning(UserWarning):
    """A bundle whose own manifest says it failed its parity check (written with
    ``--keep-failed``) is being loaded; ``warnings.simplefilter("error",
    ParityFailedWarning)`` turns it into an error for a server that must not serve one."""
