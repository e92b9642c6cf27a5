"""Exception and warning classes shared by the whole toolkit."""

from __future__ import annotations


class OpextractWarning(UserWarning):
    """Base class of every warning this toolkit emits.

    Filter it as a whole with ``warnings.simplefilter("ignore", OpextractWarning)``.
    """


class NonConvergenceWarning(OpextractWarning):
    """An iterative solver stopped before all requested values converged."""


class UnsupportedLayerError(NotImplementedError):
    """A module or graph node has no exact linear (or local linear) matrix here."""


class OperatorTooLargeError(MemoryError):
    """The estimated size of an operator exceeds the memory budget."""
