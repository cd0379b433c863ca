"""User-facing failures. Each class carries the exit code that `kiln` returns for it."""

from __future__ import annotations


class KilnError(Exception):
    """A failure the user can act on: printed as one message, never as a traceback."""

    exit_code = 1
    label = "error"

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class RecipeError(KilnError):
    """The recipe is malformed or asks for something that cannot run on this model."""

    exit_code = 3
    label = "invalid recipe"


class InputError(KilnError):
    """A model or data input is missing, unreadable or empty."""

    exit_code = 4
    label = "missing input"


class CompressionError(KilnError):
    """A compression stage could not produce a valid result (NaN weights, singular Hessian...)."""

    exit_code = 5
    label = "compression failed"


class EvaluationError(KilnError):
    """Evaluation could not produce a finite metric."""

    exit_code = 6
    label = "evaluation failed"


class ArtifactError(KilnError):
    """An artifact is incomplete, tampered with or unreadable."""

    exit_code = 7
    label = "artifact invalid"


class CompileError(KilnError):
    """A graph could not be built, is structurally invalid, or disagrees with the PyTorch model."""

    exit_code = 8
    label = "compile failed"


class GateError(KilnError):
    """The artifact was built but failed a release gate: it is marked rejected and must not ship."""

    exit_code = 9
    label = "gate failed"


class PublishError(KilnError):
    """A registry refused, could not be reached, or the artifact may not be published."""

    exit_code = 10
    label = "publish failed"


EXIT_CODES = {cls.label: cls.exit_code for cls in (RecipeError, InputError, CompressionError, EvaluationError, ArtifactError,
                                                    CompileError, GateError, PublishError)}
