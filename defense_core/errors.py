"""Exceptions raised by the engine.

Everything caused by the caller's input derives from :class:`InputError`, so the
service can tell "bad input" (a 4xx, a job failed with a clear reason) from an
internal fault.
"""

from __future__ import annotations


class DefenseCoreError(Exception):
    """Base class of every error the engine raises on purpose."""


class InputError(DefenseCoreError, ValueError):
    """The input (model, data, spec, parameters) is invalid. The message says what is wrong."""

    code: str = "invalid-input"


class UnknownArchitectureError(InputError):
    code = "unknown-architecture"


class UnsafeModelError(InputError):
    """The model file would need arbitrary unpickling (or is otherwise unsafe to load)."""

    code = "unsafe-model"


class ModelLoadError(InputError):
    """The model file is readable but does not match the declared architecture."""

    code = "model-mismatch"


class DatasetError(InputError):
    """The dataset is malformed: bad arrays, labels out of range, shape mismatch, ..."""

    code = "invalid-dataset"


class ArchiveError(DatasetError):
    """An image archive is unsafe (bomb, traversal, links) or malformed."""

    code = "unsafe-archive"


class TooLargeError(InputError):
    code = "too-large"


class TrainingDivergedError(InputError):
    """Training on the user's model went non-finite (extreme weights, too large a learning rate)."""

    code = "training-diverged"


class Cancelled(DefenseCoreError):
    """Raised between steps when the caller's cancellation hook answers True."""


class ForbiddenOperatorError(UnsafeModelError):
    """A model that carries code uses an operator the policy refuses
    (:mod:`defense_core.opcheck`); ``operator`` names it, e.g. ``"aten::from_file"``."""

    code = "forbidden-operator"

    def __init__(self, operator: str, reason: str = "", where: str = "") -> None:
        self.operator = operator
        self.reason = reason
        self.where = where
        place = f" (in {where})" if where else ""
        because = f": {reason}" if reason else ""
        super().__init__(f"the model uses the operator {operator}{place}, which is not allowed{because}")

    def __reduce__(self):  # type: ignore[override]
        return (type(self), (self.operator, self.reason, self.where))
