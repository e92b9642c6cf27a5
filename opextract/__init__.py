"""Exact sparse linear operators of PyTorch convolutional networks.

The public surface is small: :func:`to_sparse` gives the matrix of a network,
:func:`factors` the matrices of its layers, :func:`as_linear_operator` a
``scipy.sparse.linalg.LinearOperator`` backed by either of them or by the
module itself, and the ``*_matrix`` builders make one layer's matrix from a
weight tensor and shapes.
"""

from opextract import _handlers  # noqa: F401  (registers the layer handlers)
from opextract._api import Factor, as_linear_operator, factors, to_sparse
from opextract._conv import conv2d_matrix, conv_matrix
from opextract._convtranspose import conv_transpose_matrix
from opextract._errors import (
    NonConvergenceWarning,
    OperatorTooLargeError,
    OpextractWarning,
    UnsupportedLayerError,
)
from opextract._graph import FactorGraph, GraphNode
from opextract._interpolate import interpolate_matrix
from opextract._layout import padding_embedding
from opextract._upsample import upsample_nearest_matrix
from opextract._version import __version__

__all__ = [
    "Factor",
    "FactorGraph",
    "GraphNode",
    "as_linear_operator",
    "conv2d_matrix",
    "conv_matrix",
    "conv_transpose_matrix",
    "factors",
    "interpolate_matrix",
    "padding_embedding",
    "to_sparse",
    "upsample_nearest_matrix",
    "NonConvergenceWarning",
    "OperatorTooLargeError",
    "OpextractWarning",
    "UnsupportedLayerError",
    "__version__",
]
