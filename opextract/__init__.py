"""Exact sparse linear operators of PyTorch convolutional networks.

The public surface is small: :func:`to_sparse` gives the matrix of a network,
:func:`factors` the matrices of its layers, :func:`as_linear_operator` a
``scipy.sparse.linalg.LinearOperator`` backed by either of them or by the
module itself, and the ``*_matrix`` builders make one layer's matrix from a
weight tensor and shapes.
"""

from opextract._errors import (
    NonConvergenceWarning,
    OperatorTooLargeError,
    OpextractWarning,
    UnsupportedLayerError,
)
from opextract._version import __version__

__all__ = [
    "NonConvergenceWarning",
    "OperatorTooLargeError",
    "OpextractWarning",
    "UnsupportedLayerError",
    "__version__",
]
