"""The table that maps a module type to the function that builds its matrix.

Every layer handler has the signature ``handler(module, in_shape, ctx) ->
LayerMatrix``: it receives the module, the shape of one input sample
(without the batch axis) and the build context, and returns the layer's
matrix in the compact layout together with the shape of one output sample.
Handlers trust their input shape only as far as the module's own rules go;
they raise ``ValueError`` naming ``input_shape`` when it does not fit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn


@dataclass(frozen=True)
class BuildContext:
    """What a layer handler may need beyond the module and its input shape.

    Attributes
    ----------
    dtype : numpy.dtype
        Value dtype of the matrix to build (float32 or float64).
    path : str
        Dotted path of the module inside the model, for error messages.
    at : torch.Tensor or None
        The layer's input at the linearization point, of shape
        ``(1, *in_shape)``, or None when the network is linear. Piecewise-linear
        layers (ReLU, max pooling, ...) need it to fix their activation pattern.
    """

    dtype: np.dtype
    path: str = ""
    at: torch.Tensor | None = None


@dataclass
class LayerMatrix:
    """A layer's matrix and the shape it maps to.

    Attributes
    ----------
    matrix : scipy.sparse.csr_array of shape (prod(out_shape), prod(in_shape))
        The layer's matrix in the compact layout.
    out_shape : tuple of int
        Shape of one output sample.
    has_offset : bool
        True when the layer is affine rather than linear (it has a bias or a
        shift); the matrix then holds only its linear part.
    """

    matrix: sp.csr_array
    out_shape: tuple[int, ...]
    has_offset: bool = False


Handler = Callable[[nn.Module, tuple[int, ...], BuildContext], LayerMatrix]

_HANDLERS: dict[type, Handler] = {}


def register(*module_types: type) -> Callable[[Handler], Handler]:
    """Register ``handler`` as the matrix builder of ``module_types``."""

    def decorator(handler: Handler) -> Handler:
        for module_type in module_types:
            _HANDLERS[module_type] = handler
        return handler

    return decorator


def lookup(module: nn.Module) -> Handler | None:
    """Return the handler for ``module``'s type (or its nearest base), or None."""
    for cls in type(module).__mro__:
        handler = _HANDLERS.get(cls)
        if handler is not None:
            return handler
    return None


def supported_types() -> list[str]:
    """Names of the module types that have a handler, sorted."""
    return sorted(cls.__name__ for cls in _HANDLERS)
