"""Public entry points: :func:`to_sparse`, :func:`factors`, :func:`as_linear_operator`.

Each validates its arguments in one place, then walks the model (a chain
here, a graph in ``opextract._graph``), builds the layers' matrices and, for
:func:`to_sparse`, multiplies them in the order that ``_compose`` plans.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch
from numpy.typing import DTypeLike
from torch import nn

from opextract import _chain, _compose, _patches
from opextract._errors import UnsupportedLayerError
from opextract._layout import (
    compact_to_padded,
    layout_size,
    padded_to_compact,
    to_layout,
)
from opextract._validate import budget, check_dtype, check_layout

if TYPE_CHECKING:
    from opextract._graph import FactorGraph

ArrayOrTensor = np.ndarray | torch.Tensor

BIAS_OPTIONS = ("error", "offset", "ignore")
BACKENDS = ("auto", "factors", "sparse", "torch")


@dataclass
class Factor:
    """One layer's matrix inside a network.

    Attributes
    ----------
    path : str
        Dotted path of the module in the model (``"3"``, ``"decoder.conv1"``;
        ``""`` when the model is a single layer).
    module_type : str
        Class name of the module (``"Conv2d"``).
    matrix : scipy.sparse.csr_array of shape (n(out_shape), n(in_shape))
        The layer's matrix in ``layout``; n is the product of the shape in the
        compact layout and ``C * prod(n_i + 2)`` in the padded one.
    in_shape, out_shape : tuple of int
        Shapes of one input and output sample, ``(C, *spatial)``.
    layout : str
        ``"compact"`` or ``"padded"``.
    offset : ndarray of shape (n(out_shape),) or None
        The layer's value at 0 (its bias) when built with ``bias="offset"``.
    """

    path: str
    module_type: str
    matrix: sp.csr_array
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    layout: str = "compact"
    offset: np.ndarray | None = field(default=None, repr=False)


# ---------------------------------------------------------------------------
# Validation


def _check_model(model) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    return model


def _check_input_shape(input_shape) -> tuple[int, ...]:
    try:
        shape = tuple(operator.index(s) for s in input_shape)
    except TypeError:
        shape = None
    if not shape or any(s <= 0 for s in shape):
        raise ValueError(
            "input_shape must be a tuple of positive integers such as (C, H, W); "
            f"got {input_shape!r}"
        )
    return shape


def _check_bias(bias) -> str:
    if bias not in BIAS_OPTIONS:
        raise ValueError(f"bias must be 'error', 'offset' or 'ignore'; got {bias!r}")
    return bias


def _check_at(at, input_shape) -> torch.Tensor | None:
    if at is None:
        return None
    if isinstance(at, torch.Tensor):
        x = at.detach().to(device="cpu", dtype=torch.float64)
    else:
        x = torch.as_tensor(np.asarray(at, dtype=np.float64))
    if tuple(x.shape) == tuple(input_shape):
        x = x[None]
    if tuple(x.shape) != (1, *input_shape):
        raise ValueError(
            f"at must have shape input_shape={tuple(input_shape)} or "
            f"(1, *input_shape); got {tuple(x.shape)}"
        )
    return x.contiguous()


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def _forward64(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    """``model(x)`` in float64 on the model's device, flattened, as numpy."""
    device = _model_device(model)
    clone = copy.deepcopy(model).to(dtype=torch.float64)
    with torch.no_grad():
        y = clone(x.to(device=device, dtype=torch.float64))
    return y.reshape(-1).cpu().numpy()


# ---------------------------------------------------------------------------
# Building


def _batched_jvp(model: nn.Module, at: torch.Tensor, device: torch.device):
    """``tangents (k, *input_shape) -> (k, n_out)``: Jacobian-vector products
    of ``model`` at ``at`` in float64 on ``device``."""
    model64 = copy.deepcopy(model).to(device=device, dtype=torch.float64)
    point = at.to(device=device, dtype=torch.float64)

    def one(v):
        return torch.func.jvp(model64, (point,), (v[None],))[1].reshape(-1)

    def products(tangents: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            out = torch.func.vmap(one)(tangents.to(device))
        return out.cpu().numpy()

    return products


def _graph_factors(model, input_shape, *, dtype, at, bias):
    try:
        from opextract import _graph
    except ImportError:
        _graph = None
    if _graph is None or not hasattr(_graph, "graph_factors"):
        raise UnsupportedLayerError(
            f"model of type {type(model).__name__} is not a chain of layers "
            "(an nn.Sequential, nested nn.Sequentials or a single layer) and "
            "graphs are not supported in this installation"
        )
    return _graph.graph_factors(model, input_shape, dtype=dtype, at=at, bias=bias)


def _affine_error(layer: _chain.ChainLayer) -> ValueError:
    return ValueError(
        f"module {_chain.display_path(layer.path)} "
        f"({type(layer.module).__name__}) has a bias, so the network is affine "
        "(x -> A x + b) rather than linear; pass bias='offset' to get (A, b) "
        "with b = f(0), or bias='ignore' to keep only A"
    )


def _build(model, input_shape, *, dtype, at, bias, fuse=False):
    """Return ``("chain", layers)`` or ``("graph", FactorGraph)``.

    ``fuse`` (for :func:`to_sparse`) fuses nearest upsampling into the next
    convolution and keeps convolutions as unallocated row templates.
    """
    layers = _chain.chain_layers(model)
    if layers is None:
        return "graph", _graph_factors(
            model, input_shape, dtype=dtype, at=at, bias=bias
        )
    built = _chain.build_chain(
        layers, input_shape, dtype=dtype, at=at, fuse=fuse, lazy=fuse
    )
    if at is None and bias == "error":
        for layer in built:
            if layer.built.has_offset:
                raise _affine_error(layer)
    return "chain", built


def factors(
    model: nn.Module,
    input_shape: tuple[int, ...],
    *,
    layout: str = "compact",
    dtype: DTypeLike = np.float64,
    at: ArrayOrTensor | None = None,
    bias: str = "error",
    max_bytes: int | None = None,
) -> list[Factor] | FactorGraph:
    """The layers' matrices of a network, in forward order.

    Parameters
    ----------
    model : torch.nn.Module
        An ``nn.Sequential`` (nested ones included) or a single layer; other
        models are traced as graphs (see Notes).
    input_shape : tuple of int
        Shape of one input sample without the batch axis, ``(C, H, W)``.
    layout : {'compact', 'padded'}
        Vectorization of every factor's input and output.
    dtype : {numpy.float64, numpy.float32}
        Value dtype of the matrices.
    at : array_like of shape input_shape, optional
        Linearization point: the factors are those of the Jacobian at ``at``
        (needed for piecewise-linear layers; biases are then allowed).
    bias : {'error', 'offset', 'ignore'}
        What to do with a layer that has a bias when ``at`` is None: raise
        (the map is affine), or keep the linear part, with each layer's value
        at 0 in :attr:`Factor.offset` for ``'offset'``.
    max_bytes : int, optional
        Memory budget of one factor (default 4 GiB).

    Returns
    -------
    list of Factor
        ``factors[-1].matrix @ ... @ factors[0].matrix`` equals
        :func:`to_sparse` in the same layout. For a model that is not a chain,
        an ``opextract.FactorGraph`` (nodes in topological order).

    Raises
    ------
    UnsupportedLayerError
        A layer is not linear or has no handler; the message names its path.
    ValueError
        ``input_shape`` does not fit a layer, a layer has a bias, or an
        argument is out of range.
    OperatorTooLargeError
        A factor's estimated size exceeds ``max_bytes``.

    Notes
    -----
    Graphs (skip connections, concatenations) are delegated to
    ``opextract._graph.graph_factors``.

    Examples
    --------
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Conv2d(1, 2, 3, stride=2, padding=1, bias=False),
    ...                       nn.Upsample(scale_factor=2))
    >>> [(f.path, f.module_type, f.matrix.shape) for f in factors(model, (1, 4, 4))]
    [('0', 'Conv2d', (8, 16)), ('1', 'Upsample', (32, 8))]
    """
    model = _check_model(model)
    input_shape = _check_input_shape(input_shape)
    layout = check_layout(layout)
    dtype = check_dtype(dtype)
    bias = _check_bias(bias)
    at = _check_at(at, input_shape)

    with budget(max_bytes):
        kind, built = _build(model, input_shape, dtype=dtype, at=at, bias=bias)
    if kind == "graph":
        return built
    out = []
    for layer in built:
        b = layer.built
        offset = None
        if bias == "offset" and at is None and b.has_offset:
            offset = _chain.layer_offset(layer.module, layer.in_shape)
            if layout == "padded":
                offset = compact_to_padded(offset, b.out_shape)
        out.append(
            Factor(
                path=layer.path,
                module_type=type(layer.module).__name__,
                matrix=to_layout(b.matrix, b.out_shape, layer.in_shape, layout),
                in_shape=layer.in_shape,
                out_shape=tuple(b.out_shape),
                layout=layout,
                offset=offset,
            )
        )
    return out


def to_sparse(
    model: nn.Module,
    input_shape: tuple[int, ...],
    *,
    layout: str = "compact",
    dtype: DTypeLike = np.float64,
    at: ArrayOrTensor | None = None,
    bias: str = "error",
    max_bytes: int | None = None,
) -> sp.csr_array | tuple[sp.csr_array, np.ndarray]:
    """The exact matrix of a linear (or locally linear) network.

    Parameters
    ----------
    model : torch.nn.Module
        The network; see :func:`factors` for what is accepted.
    input_shape : tuple of int
        Shape of one input sample without the batch axis, ``(C, H, W)``.
    layout : {'compact', 'padded'}
        ``compact``: ``A @ x.ravel() == model(x[None]).ravel()``. ``padded``:
        ``E_out @ A @ E_in.T`` with ``E`` = :func:`padding_embedding`.
    dtype : {numpy.float64, numpy.float32}
        Value dtype of the factors and of the products.
    at : array_like of shape input_shape, optional
        Linearization point: return the Jacobian of the network at ``at``.
    bias : {'error', 'offset', 'ignore'}
        For a network with biases (and ``at`` None): raise, return
        ``(A, offset)``, or return the linear part ``A`` only. With ``at``,
        ``'offset'`` returns ``f(at) - A @ at``.
    max_bytes : int, optional
        Memory budget (default 4 GiB) of the operator and of every factor
        and intermediate product; estimates above it are refused before the
        allocation.

    Returns
    -------
    A : scipy.sparse.csr_array of shape (n_out, n_in)
        Sorted indices, int32 when they fit, no explicitly stored zeros.
    offset : ndarray of shape (n_out,)
        Only with ``bias='offset'``: the network's value at 0 (or the affine
        term of the linearization at ``at``), in ``layout``.

    Raises
    ------
    UnsupportedLayerError, ValueError, OperatorTooLargeError
        As in :func:`factors`; ``OperatorTooLargeError`` also when the
        composed operator is estimated larger than ``max_bytes``.

    Notes
    -----
    Nearest upsamplings are fused into the convolution after them, the chain
    is split at its narrowest point, each side of a chain of convolutions is
    composed as one kernel, and only one row per class of translation-equal
    rows is multiplied out (see the performance page of the documentation).
    Other chains are multiplied in an order planned from sampled row counts.
    The factors of :func:`factors` are not fused; their product is the same
    matrix. With ``at``, a chain of zero-padded convolutions, nearest
    upsamplings by integer factors and elementwise activations is instead
    built row by row from the output: every row is pushed back through the
    layers as a dense patch of the window it reaches, all rows together by
    BLAS products with the kernels (see the local operator page). Other
    chains in which each input reaches only a window of the output are run
    forward on sums of basis vectors whose columns do not overlap
    (compressed Jacobian-vector products, on the GPU when there is one);
    each entry is then read off without rounding.

    Examples
    --------
    >>> import numpy as np, torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1, bias=False),
    ...                       nn.Upsample(scale_factor=2)).double()
    >>> A = to_sparse(model, (1, 3, 3))
    >>> A.shape
    (36, 9)
    >>> x = np.random.default_rng(0).standard_normal((1, 3, 3))
    >>> bool(np.allclose(A @ x.ravel(), model(torch.tensor(x[None])).ravel().detach()))
    True
    """
    model = _check_model(model)
    input_shape = _check_input_shape(input_shape)
    layout = check_layout(layout)
    dtype = check_dtype(dtype)
    bias = _check_bias(bias)
    at_t = _check_at(at, input_shape)

    with budget(max_bytes):
        kind, built = _build(
            model, input_shape, dtype=dtype, at=at_t, bias=bias, fuse=True
        )
        if kind == "graph":
            matrix = built.to_sparse("compact", max_bytes)
            out_shape = _graph_out_shape(built, model, input_shape)
        else:
            steps = _patches.plan(built) if at_t is not None else None
            plan = None
            if steps is None and at_t is not None:
                plan = _compose.compression_plan(built)
            if steps is not None:
                matrix = _patches.local_rows(
                    steps, input_shape, tuple(built[-1].built.out_shape), dtype
                )
            elif plan is not None:
                device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
                products = _compose.linearized_forward(built, device)
                if products is None:
                    products = _batched_jvp(model, at_t, device)
                matrix = _compose.compressed_local(built, products, plan, dtype)
            else:
                matrix = _compose.compose_chain(built)
            out_shape = tuple(built[-1].built.out_shape)
    result = to_layout(matrix, out_shape, input_shape, layout)
    if bias != "offset":
        return result

    point = at_t if at_t is not None else torch.zeros((1, *input_shape))
    offset = _forward64(model, point) - matrix @ point.reshape(-1).numpy()
    if layout == "padded":
        offset = compact_to_padded(offset, out_shape)
    return result, offset


def _graph_out_shape(graph, model, input_shape) -> tuple[int, ...]:
    shape = getattr(graph, "out_shape", None)
    if shape is not None:
        return tuple(shape)
    with torch.no_grad():
        probe = torch.zeros((1, *input_shape), dtype=torch.float64)
        out = copy.deepcopy(model).to(device="cpu", dtype=torch.float64)(probe)
    return tuple(out.shape[1:])


# ---------------------------------------------------------------------------
# Linear operators


class _FactorsOperator(spla.LinearOperator):
    """Applies the factors one after the other; the adjoint in reverse."""

    def __init__(self, matrices, dtype):
        self._mats = matrices
        self._mats_t = [sp.csr_array(m.T) for m in matrices]
        super().__init__(
            dtype=dtype, shape=(matrices[-1].shape[0], matrices[0].shape[1])
        )

    def _matmat(self, x):
        for m in self._mats:
            x = m @ x
        return x

    def _rmatmat(self, x):
        for m in reversed(self._mats_t):
            x = m @ x
        return x

    def _matvec(self, x):
        return self._matmat(x.reshape(-1, 1)).reshape(-1)

    def _rmatvec(self, x):
        return self._rmatmat(x.reshape(-1, 1)).reshape(-1)

    def _adjoint(self):
        return _FactorsOperator([m.T.tocsr() for m in reversed(self._mats)], self.dtype)


class _TorchOperator(spla.LinearOperator):
    """The module itself: forward for ``A x``, autograd's vjp for ``A^T y``."""

    def __init__(self, model, input_shape, out_shape, dtype, at, layout):
        self._device = _model_device(model)
        self._tdtype = torch.float64 if dtype == np.float64 else torch.float32
        self._model = copy.deepcopy(model).to(dtype=self._tdtype)
        self._in = tuple(input_shape)
        self._out = tuple(out_shape)
        self._layout = layout
        point = at if at is not None else torch.zeros((1, *input_shape))
        self._point = point.to(device=self._device, dtype=self._tdtype)
        with torch.no_grad():
            self._base = self._model(self._point)
        self._affine = at is not None or bool(self._base.abs().max() > 0)
        self._n_out = int(np.prod(out_shape))
        self._n_in = int(np.prod(input_shape))
        self._chunk = 256
        n_out = layout_size(out_shape, layout)
        n_in = layout_size(input_shape, layout)
        super().__init__(dtype=np.dtype(dtype), shape=(n_out, n_in))

    def _to_compact_in(self, x, shape):
        return padded_to_compact(x.T, shape).T if self._layout == "padded" else x

    def _from_compact_out(self, y, shape):
        return compact_to_padded(y.T, shape).T if self._layout == "padded" else y

    def _batches(self, x, shape):
        """Columns of ``x`` as tensors of shape ``(k, *shape)`` on the device."""
        for start in range(0, x.shape[1], self._chunk):
            cols = np.ascontiguousarray(x[:, start : start + self._chunk].T)
            batch = torch.as_tensor(cols, dtype=self._tdtype, device=self._device)
            yield batch.reshape((cols.shape[0], *shape))

    def _points(self, k):
        return self._point.expand((k, *self._in)).contiguous()

    def _matmat(self, x):
        x = self._to_compact_in(np.asarray(x), self._in)
        out = []
        for v in self._batches(x, self._in):
            if self._affine:
                # Jacobian-vector products at the linearization point; exact
                # for affine and piecewise-linear networks.
                _, y = torch.func.jvp(self._model, (self._points(len(v)),), (v,))
            else:
                with torch.no_grad():
                    y = self._model(v)
            out.append(y.detach().reshape(len(v), -1).cpu().numpy())
        y = np.concatenate(out).T if out else np.zeros((self._n_out, 0))
        return self._from_compact_out(y.astype(self.dtype, copy=False), self._out)

    def _rmatmat(self, x):
        x = self._to_compact_in(np.asarray(x), self._out)
        out = []
        for cot in self._batches(x, self._out):
            # Each sample's output depends on its own input only, so one
            # backward pass gives the vector-Jacobian product of every column.
            point = self._points(len(cot)).requires_grad_(True)
            with torch.enable_grad():
                y = self._model(point)
            (g,) = torch.autograd.grad(y, point, cot)
            out.append(g.detach().reshape(len(cot), -1).cpu().numpy())
        g = np.concatenate(out).T if out else np.zeros((self._n_in, 0))
        return self._from_compact_out(g.astype(self.dtype, copy=False), self._in)

    def _matvec(self, x):
        return self._matmat(np.asarray(x).reshape(-1, 1)).reshape(-1)

    def _rmatvec(self, x):
        return self._rmatmat(np.asarray(x).reshape(-1, 1)).reshape(-1)


def as_linear_operator(
    model: nn.Module,
    input_shape: tuple[int, ...],
    *,
    backend: str = "auto",
    layout: str = "compact",
    dtype: DTypeLike = np.float64,
    at: ArrayOrTensor | None = None,
    max_bytes: int | None = None,
) -> spla.LinearOperator:
    """The network as a ``scipy.sparse.linalg.LinearOperator``.

    Parameters
    ----------
    model : torch.nn.Module
    input_shape : tuple of int
        Shape of one input sample, ``(C, H, W)``.
    backend : {'auto', 'factors', 'sparse', 'torch'}
        ``'factors'``: the layers' sparse matrices applied in turn (adjoint:
        their transposes in reverse). ``'sparse'``: the composed matrix of
        :func:`to_sparse`. ``'torch'``: the module itself on its device
        (CUDA when the model is there); ``A x`` by the forward pass (or a
        Jacobian-vector product when the network is affine or ``at`` is
        given), ``A^T y`` by autograd. ``'auto'`` (see Notes).
    layout : {'compact', 'padded'}
    dtype : {numpy.float64, numpy.float32}
    at : array_like of shape input_shape, optional
        Linearization point, as in :func:`to_sparse`.
    max_bytes : int, optional
        Memory budget of the sparse backends (default 4 GiB).

    Returns
    -------
    scipy.sparse.linalg.LinearOperator of shape (n_out, n_in)
        With ``matvec``, ``matmat``, ``rmatvec`` and ``rmatmat``. Biases are
        never applied: the operator is the linear part.

    Notes
    -----
    ``'auto'`` picks ``'factors'`` when the model is a chain whose factors
    fit ``max_bytes``, and ``'torch'`` when it is a graph or a factor is too
    large; an unsupported layer raises, as with ``'factors'``. Prefer
    ``'sparse'`` when many products are needed and :func:`to_sparse` is
    affordable: one sparse product is then usually the cheapest.

    Examples
    --------
    >>> import numpy as np
    >>> from torch import nn
    >>> model = nn.Conv2d(1, 1, 3, padding=1, bias=False)
    >>> op = as_linear_operator(model, (1, 4, 4), backend="factors")
    >>> op.shape
    (16, 16)
    >>> x = np.ones(16)
    >>> bool(np.allclose(op.rmatvec(op.matvec(x)), op.T @ (op @ x)))
    True
    """
    model = _check_model(model)
    input_shape = _check_input_shape(input_shape)
    layout = check_layout(layout)
    dtype = check_dtype(dtype)
    at_t = _check_at(at, input_shape)
    if backend not in BACKENDS:
        raise ValueError(
            f"backend must be 'auto', 'factors', 'sparse' or 'torch'; got {backend!r}"
        )

    if backend == "auto":
        try:
            fs = factors(
                model,
                input_shape,
                layout=layout,
                dtype=dtype,
                at=at_t,
                bias="ignore",
                max_bytes=max_bytes,
            )
        except MemoryError:
            fs = None
        if isinstance(fs, list):
            return _FactorsOperator([f.matrix for f in fs], dtype)
        backend = "torch"
    if backend == "factors":
        fs = factors(
            model,
            input_shape,
            layout=layout,
            dtype=dtype,
            at=at_t,
            bias="ignore",
            max_bytes=max_bytes,
        )
        if not isinstance(fs, list):
            raise UnsupportedLayerError(
                "backend='factors' needs a chain of layers; this model is a "
                "graph: use backend='sparse' or backend='torch'"
            )
        return _FactorsOperator([f.matrix for f in fs], dtype)
    if backend == "sparse":
        A = to_sparse(
            model,
            input_shape,
            layout=layout,
            dtype=dtype,
            at=at_t,
            bias="ignore",
            max_bytes=max_bytes,
        )
        return spla.aslinearoperator(A)

    with torch.no_grad():
        probe = torch.zeros((1, *input_shape), dtype=torch.float64)
        clone = copy.deepcopy(model).to(dtype=torch.float64)
        out_shape = tuple(clone(probe.to(_model_device(model))).shape[1:])
    return _TorchOperator(model, input_shape, out_shape, dtype, at_t, layout)
