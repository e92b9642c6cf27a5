"""Models that are not chains: traced with ``torch.fx`` into a factor graph.

:func:`graph_factors` traces the model, then walks the graph once in
topological order with real float64 values (the linearization point ``at``,
or zeros), so that every node knows its shape and every piecewise-linear
layer its activation pattern. Each node that depends on the input becomes a
:class:`GraphNode`:

* ``"input"``: the network's input;
* ``"layer"``: a factor applied to one input node (a registered module, an
  activation or interpolation called as a function, or a reshape, permute,
  slice or zero padding, whose matrix selects entries);
* ``"sum"``: a weighted sum of input nodes (``+``, ``-``, ``torch.add``,
  multiplication or division by a number);
* ``"cat"``: a concatenation of input nodes along one axis of the sample.

Nodes that do not depend on the input (sizes, constants, parameters) are
evaluated and folded in. A constant added to the signal makes the network
affine and is handled like a bias. Anything else (a product of two signals,
an unsupported module or function, an in-place operation whose input is used
again) raises an error that names the graph node, its target and the reason.
Before the graph is returned it is checked against the model itself: for
random ``u`` and ``v``, ``u . (A v)`` from the graph must equal
``(A^T u) . v`` from PyTorch's autograd, so a trace that does not reproduce
the model (Python state, hooks, in-place tricks) is refused rather than
exported as a wrong matrix.
"""

from __future__ import annotations

import copy
import inspect
import math
import numbers
import operator
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from opextract._errors import UnsupportedLayerError
from opextract._interpolate import interpolate_layer
from opextract._registry import BuildContext, LayerMatrix, lookup, supported_types
from opextract._separable import diagonal, identity, selection

__all__ = ["FactorGraph", "GraphNode", "graph_factors"]


@dataclass
class GraphNode:
    """One node of a :class:`FactorGraph`.

    Attributes
    ----------
    name : str
        The ``torch.fx`` node name (``"conv1"``, ``"cat_1"``, ``"add"``).
    op : {'input', 'layer', 'sum', 'cat'}
        How the node's value follows from its inputs: the network input; a
        factor applied to one input; ``sum(weights[i] * inputs[i])``; the
        concatenation of the inputs along ``axis``.
    target : str
        Module path (``"encoder.conv1"``) or function or method name
        (``"cat"``, ``"interpolate"``, ``"view"``).
    inputs : tuple of int
        Indices of the input nodes in :attr:`FactorGraph.nodes`.
    factor : Factor or None
        The layer's matrix (compact layout) for ``op == "layer"``.
    shape : tuple of int
        Shape of the node's value for one sample.
    weights : tuple of float
        Coefficients of a ``"sum"`` node.
    axis : int or None
        Sample axis (0 = channels) of a ``"cat"`` node.
    offset : ndarray or None
        With ``bias="offset"``: the constant this node adds (its bias, or a
        constant added to the signal), flattened; None when it adds none.
    module : torch.nn.Module or None
        The module of a ``"layer"`` node built by a module handler (also one
        made for a function call such as ``F.conv2d``), else None.
    """

    name: str
    op: str
    target: str
    inputs: tuple[int, ...]
    factor: object | None
    shape: tuple[int, ...]
    weights: tuple[float, ...] = ()
    axis: int | None = None
    offset: np.ndarray | None = field(default=None, repr=False)
    module: nn.Module | None = field(default=None, repr=False, compare=False)


class FactorGraph:
    """The factors of a traced network and how they connect.

    Attributes
    ----------
    nodes : list of GraphNode
        In topological order; ``nodes[0]`` is the input.
    output : int
        Index of the node whose value is the network's output.
    in_shape, out_shape : tuple of int
        Shapes of one input and one output sample.
    dtype : numpy.dtype
        Value dtype of the factors.

    Notes
    -----
    Evaluating the nodes in order on a flattened input (:meth:`evaluate`)
    gives the network's linear part (its local linear part when built with
    ``at``); :meth:`to_sparse` equals it. It builds the rows from the output
    side as windowed patches when every node is a convolution, a nearest
    upsampling, an elementwise layer, a sum or a channel concatenation
    (``opextract._patches``), and multiplies the factors out otherwise.

    Examples
    --------
    >>> import numpy as np, torch
    >>> from torch import nn
    >>> import opextract
    >>> class Residual(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.conv = nn.Conv2d(2, 2, 3, padding=1, bias=False)
    ...     def forward(self, x):
    ...         return x + self.conv(x)
    >>> graph = opextract.factors(Residual(), (2, 3, 3))
    >>> [(node.op, node.target, node.inputs) for node in graph.nodes]
    [('input', 'x', ()), ('layer', 'conv', (0,)), ('sum', 'add', (0, 1))]
    >>> x = np.random.default_rng(0).standard_normal(18)
    >>> bool(np.allclose(graph.evaluate(x), graph.to_sparse() @ x))
    True
    """

    def __init__(
        self,
        nodes: list[GraphNode],
        output: int,
        in_shape: tuple[int, ...],
        out_shape: tuple[int, ...],
        dtype,
    ) -> None:
        self.nodes: list[GraphNode] = nodes
        self.output: int = output
        self.in_shape = tuple(in_shape)
        self.out_shape = tuple(out_shape)
        self.dtype = np.dtype(dtype)

    def __repr__(self) -> str:
        lines = [
            f"FactorGraph({self.in_shape} -> {self.out_shape}, {len(self.nodes)} nodes)"
        ]
        for i, node in enumerate(self.nodes):
            mark = " <- output" if i == self.output else ""
            lines.append(
                f"  [{i}] {node.op:<5} {node.target:<20} inputs={list(node.inputs)} "
                f"shape={node.shape}{mark}"
            )
        return "\n".join(lines)

    def _needed(self) -> list[bool]:
        needed = [False] * len(self.nodes)
        needed[self.output] = True
        for i in range(len(self.nodes) - 1, -1, -1):
            if needed[i]:
                for j in self.nodes[i].inputs:
                    needed[j] = True
        return needed

    def evaluate(self, x: np.ndarray, *, affine: bool = False) -> np.ndarray:
        """Apply the graph to flattened inputs, node by node.

        Parameters
        ----------
        x : ndarray of shape (prod(in_shape),) or (prod(in_shape), k)
            Input vectors in the compact layout (one per column).
        affine : bool
            Add the nodes' offsets (built with ``bias="offset"``), so that the
            result equals the model's forward rather than its linear part.

        Returns
        -------
        ndarray of shape (prod(out_shape),) or (prod(out_shape), k)
        """
        x = np.asarray(x)
        vector = x.ndim == 1
        values: list = [None] * len(self.nodes)
        needed = self._needed()
        for i, node in enumerate(self.nodes):
            if not needed[i]:
                continue
            if node.op == "input":
                v = x.reshape(x.shape[0], -1)
            elif node.op == "layer":
                v = node.factor.matrix @ values[node.inputs[0]]
            elif node.op == "sum":
                v = sum(w * values[j] for w, j in zip(node.weights, node.inputs))
            else:
                v = _cat_dense([values[j] for j in node.inputs], self, node)
            if affine and node.offset is not None:
                v = v + node.offset[:, None]
            values[i] = v
        out = values[self.output]
        return out.ravel() if vector else out

    def to_sparse(
        self, layout: str = "compact", max_bytes: int | None = None
    ) -> sp.csr_array:
        """The operator of the graph: one ``csr_array`` of shape (n_out, n_in).

        Parameters
        ----------
        layout : {'compact', 'padded'}
            Vectorization of the input and output.
        max_bytes : int, optional
            Memory budget of every product and of the result.

        Returns
        -------
        scipy.sparse.csr_array
            Equals the node-by-node evaluation: ``A @ x == evaluate(x)``.
        """
        from opextract import _patches
        from opextract._layout import to_layout
        from opextract._validate import budget

        with budget(max_bytes):
            steps = _patches.graph_plan(self)
            if steps is not None:
                matrix = _patches.graph_rows(self, steps)
            else:
                matrix = _materialize(self)
        return to_layout(matrix, self.out_shape, self.in_shape, layout)


# ---------------------------------------------------------------------------
# Composition


def _cat_rows(node: GraphNode, graph: FactorGraph) -> np.ndarray | None:
    """Row order of a concatenation: for each output entry, its stacked row."""
    if node.axis == 0:
        return None  # channel concatenation is a plain vertical stack
    blocks, start = [], 0
    for j in node.inputs:
        shape = graph.nodes[j].shape
        n = math.prod(shape)
        blocks.append(np.arange(start, start + n).reshape(shape))
        start += n
    return np.concatenate(blocks, axis=node.axis).ravel()


def _cat_dense(values, graph, node):
    stacked = np.concatenate(values, axis=0)
    rows = _cat_rows(node, graph)
    return stacked if rows is None else stacked[rows]


def _materialize(graph: FactorGraph) -> sp.csr_array:
    """Multiply the factors out, keeping chains of layers as lists until needed.

    A node's operator (from the input to it) is held as a base node and the
    factors applied since; it is multiplied out, in the order ``compose``
    plans, only at a sum, a concatenation, a node used more than once, or
    the output.
    """
    from opextract._compose import compose
    from opextract._validate import check_bytes, csr_bytes

    needed = graph._needed()
    users = [0] * len(graph.nodes)
    for i, node in enumerate(graph.nodes):
        if needed[i]:
            for j in node.inputs:
                users[j] += 1
    n_in = math.prod(graph.in_shape)
    dtype = graph.dtype
    ops: dict[int, sp.csr_array] = {}
    pending: dict[int, tuple[int | None, list]] = {}

    def matrix_of(i: int) -> sp.csr_array:
        if i in ops:
            return ops[i]
        base, chain = pending[i]
        mats = ([ops[base]] if base is not None else []) + chain
        m = compose(mats) if mats else identity(n_in, dtype)
        ops[i] = m
        return m

    for i, node in enumerate(graph.nodes):
        if not needed[i]:
            continue
        if node.op == "input":
            pending[i] = (None, [])
        elif node.op == "layer":
            j = node.inputs[0]
            if users[j] == 1 and j not in ops:
                base, chain = pending.pop(j)
            else:
                base, chain = j, []
                matrix_of(j)
            pending[i] = (base, chain + [node.factor.matrix])
        else:
            parts = [matrix_of(j) for j in node.inputs]
            if node.op == "sum":
                m = node.weights[0] * parts[0]
                for w, p in zip(node.weights[1:], parts[1:]):
                    m = m + w * p
            else:
                nnz = sum(p.nnz for p in parts)
                size, _ = csr_bytes(nnz, sum(p.shape[0] for p in parts), n_in, dtype)
                check_bytes(size, f"the concatenation at graph node {node.name!r}")
                m = sp.vstack(parts, format="csr")
                rows = _cat_rows(node, graph)
                if rows is not None:
                    m = m[rows]
            m = sp.csr_array(m)
            m.sum_duplicates()
            m.eliminate_zeros()
            ops[i] = m
            pending[i] = (i, [])
    result = sp.csr_array(matrix_of(graph.output))
    result.sort_indices()
    result.eliminate_zeros()
    return result.astype(dtype, copy=False)


# ---------------------------------------------------------------------------
# Tracing


class _Tracer(fx.Tracer):
    """Keeps every module that has a matrix handler as one graph node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if lookup(m) is not None:
            return True
        return super().is_leaf_module(m, module_qualified_name)


class _Build:
    """State of one walk over the traced graph."""

    def __init__(self, model, input_shape, dtype, at, bias):
        self.model = model
        self.model64 = copy.deepcopy(model).to(device="cpu", dtype=torch.float64)
        self.in_shape = tuple(input_shape)
        self.dtype = np.dtype(dtype)
        self.local = at is not None
        self.bias = bias
        self.point = (
            at.detach().to("cpu", torch.float64)
            if at is not None
            else torch.zeros((1, *input_shape), dtype=torch.float64)
        )
        self.nodes: list[GraphNode] = []
        self.values: dict[fx.Node, object] = {}
        self.linear: dict[fx.Node, object] = {}  # fx node -> GraphNode index(es)
        self.order: dict[fx.Node, int] = {}

    # -- errors ------------------------------------------------------------

    def error(self, node: fx.Node, why: str, cls=UnsupportedLayerError):
        return cls(f"graph node {node.name!r} ({node.op} {_target_name(node)}): {why}")

    # -- adding nodes ------------------------------------------------------

    def add(self, node: fx.Node, op, inputs, *, factor=None, weights=(), axis=None,
            offset=None, has_offset=False, module=None) -> int:  # fmt: skip
        value = self.values[node]
        shape = tuple(value.shape[1:])
        if has_offset and not self.local and self.bias == "error":
            raise self.error(
                node,
                "adds a constant (a bias or a constant term), so the network is "
                "affine (x -> A x + b) rather than linear; pass bias='offset' to get "
                "(A, b) with b = f(0), or bias='ignore' to keep only A",
                ValueError,
            )
        keep_offset = has_offset and not self.local and self.bias == "offset"
        self.nodes.append(
            GraphNode(
                name=node.name,
                op=op,
                target=_target_name(node),
                inputs=tuple(inputs),
                factor=factor,
                shape=shape,
                weights=tuple(float(w) for w in weights),
                axis=axis,
                offset=offset() if keep_offset and offset is not None else None,
                module=module,
            )
        )
        index = len(self.nodes) - 1
        self.linear[node] = index
        return index

    def add_layer(self, node, source: int, built: LayerMatrix, module_type: str,
                  path: str, offset=None, module=None) -> int:  # fmt: skip
        from opextract._api import Factor

        in_shape = self.nodes[source].shape
        out_shape = tuple(self.values[node].shape[1:])
        if tuple(built.out_shape) != out_shape or built.matrix.shape != (
            math.prod(out_shape),
            math.prod(in_shape),
        ):
            raise self.error(
                node,
                f"its matrix has shape {built.matrix.shape} for output shape "
                f"{tuple(built.out_shape)}, but the node's value has shape "
                f"{out_shape}",
                RuntimeError,
            )
        factor = Factor(
            path=path,
            module_type=module_type,
            matrix=sp.csr_array(built.matrix),
            in_shape=in_shape,
            out_shape=out_shape,
            layout="compact",
        )
        return self.add(
            node, "layer", (source,), factor=factor, offset=offset,
            has_offset=built.has_offset, module=module,
        )  # fmt: skip


def _target_name(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, str):
        return t
    return getattr(t, "__name__", repr(t))


def _is_tensor(v) -> bool:
    return isinstance(v, torch.Tensor)


def _named(args, kwargs, names) -> dict:
    """Positional arguments after the signal, and keywords, by parameter name."""
    bound = dict(zip(names, args[1:]))
    bound.update(kwargs)
    return bound


def _pool_module(cls, names):
    def make(args, kwargs):
        bound = _named(args, kwargs, names)
        if bound.pop("return_indices", False):
            raise ValueError("return_indices=True returns indices, not a signal")
        return cls(**bound)

    return make


def _weighted_module(kind, nd):
    names = {
        "conv": ("weight", "bias", "stride", "padding", "dilation", "groups"),
        "conv_transpose": (
            "weight", "bias", "stride", "padding", "output_padding", "groups",
            "dilation",
        ),
    }[kind]  # fmt: skip

    def make(args, kwargs):
        bound = _named(args, kwargs, names)
        weight, bias = bound.pop("weight"), bound.pop("bias", None)
        if kind == "conv":
            c_out, c_in_g, *k = weight.shape
            groups = bound.get("groups", 1)
            cls = getattr(nn, f"Conv{nd}d")
            module = cls(
                c_in_g * groups, c_out, tuple(k), bias=bias is not None, **bound
            )
        else:
            c_in, c_out_g, *k = weight.shape
            groups = bound.get("groups", 1)
            cls = getattr(nn, f"ConvTranspose{nd}d")
            module = cls(
                c_in, c_out_g * groups, tuple(k), bias=bias is not None, **bound
            )
        module = module.to(weight.dtype)
        with torch.no_grad():
            module.weight.copy_(weight)
            if bias is not None:
                module.bias.copy_(bias)
        return module

    return make


def _linear_module(args, kwargs):
    bound = _named(args, kwargs, ("weight", "bias"))
    weight, bias = bound["weight"], bound.get("bias")
    module = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    module = module.to(weight.dtype)
    with torch.no_grad():
        module.weight.copy_(weight)
        if bias is not None:
            module.bias.copy_(bias)
    return module


_AVG_NAMES = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
              "divisor_override")  # fmt: skip
_MAX_NAMES = ("kernel_size", "stride", "padding", "dilation", "ceil_mode",
              "return_indices")  # fmt: skip
# Functional layers, as the module whose handler builds their matrix.
_FUNCTIONAL_MODULES = {
    F.avg_pool1d: _pool_module(nn.AvgPool1d, _AVG_NAMES[:5]),
    F.avg_pool2d: _pool_module(nn.AvgPool2d, _AVG_NAMES),
    F.avg_pool3d: _pool_module(nn.AvgPool3d, _AVG_NAMES),
    F.max_pool1d: _pool_module(nn.MaxPool1d, _MAX_NAMES),
    F.max_pool2d: _pool_module(nn.MaxPool2d, _MAX_NAMES),
    F.max_pool3d: _pool_module(nn.MaxPool3d, _MAX_NAMES),
    F.adaptive_avg_pool1d: _pool_module(nn.AdaptiveAvgPool1d, ("output_size",)),
    F.adaptive_avg_pool2d: _pool_module(nn.AdaptiveAvgPool2d, ("output_size",)),
    F.adaptive_avg_pool3d: _pool_module(nn.AdaptiveAvgPool3d, ("output_size",)),
    F.adaptive_max_pool1d: _pool_module(
        nn.AdaptiveMaxPool1d, ("output_size", "return_indices")
    ),
    F.adaptive_max_pool2d: _pool_module(
        nn.AdaptiveMaxPool2d, ("output_size", "return_indices")
    ),
    F.pixel_shuffle: _pool_module(nn.PixelShuffle, ("upscale_factor",)),
    F.pixel_unshuffle: _pool_module(nn.PixelUnshuffle, ("downscale_factor",)),
    F.conv1d: _weighted_module("conv", 1),
    F.conv2d: _weighted_module("conv", 2),
    F.conv3d: _weighted_module("conv", 3),
    F.conv_transpose1d: _weighted_module("conv_transpose", 1),
    F.conv_transpose2d: _weighted_module("conv_transpose", 2),
    F.conv_transpose3d: _weighted_module("conv_transpose", 3),
    F.linear: _linear_module,
}


# Elementwise piecewise-linear functions, as the module that has the handler.
def _activation_module(fn, args, kwargs) -> nn.Module | None:
    if fn in (F.relu, torch.relu, torch.relu_, F.relu_):
        return nn.ReLU()
    if fn in (F.leaky_relu, F.leaky_relu_):
        bound = inspect.signature(F.leaky_relu).bind(*args, **kwargs).arguments
        return nn.LeakyReLU(bound.get("negative_slope", 0.01))
    if fn is F.relu6:
        return nn.ReLU6()
    if fn in (F.hardtanh, F.hardtanh_):
        bound = inspect.signature(F.hardtanh).bind(*args, **kwargs).arguments
        return nn.Hardtanh(bound.get("min_val", -1.0), bound.get("max_val", 1.0))
    if fn in (F.threshold, F.threshold_):
        bound = inspect.signature(F.threshold).bind(*args, **kwargs).arguments
        return nn.Threshold(bound["threshold"], bound["value"])
    return None


_ACTIVATION_METHODS = {"relu": nn.ReLU, "relu_": nn.ReLU}

# Ops that only move entries. Their matrix comes from applying the op to the
# flat positions 1..n (0 marks an entry that is not copied from the input).
_STRUCTURAL_FUNCTIONS = {
    torch.flatten,
    torch.reshape,
    torch.permute,
    torch.transpose,
    torch.swapaxes,
    torch.movedim,
    torch.squeeze,
    torch.unsqueeze,
    torch.narrow,
    torch.flip,
    torch.roll,
    operator.getitem,
    F.pad,
    torch.chunk,
    torch.split,
    torch.unbind,
}
_STRUCTURAL_METHODS = {
    "view",
    "reshape",
    "flatten",
    "unflatten",
    "permute",
    "transpose",
    "swapaxes",
    "movedim",
    "contiguous",
    "squeeze",
    "unsqueeze",
    "narrow",
    "flip",
    "roll",
    "expand",
    "repeat",
    "chunk",
    "split",
    "unbind",
    "clone",
}
_CONSTANT_ATTRIBUTES = {"shape", "ndim", "dtype", "device", "is_cuda", "layout"}
_CAST_METHODS = {"to", "float", "double", "type_as", "cpu", "cuda"}
_SUM_FUNCTIONS = {operator.add, operator.iadd, torch.add, operator.sub, operator.isub,
                  torch.sub, torch.subtract}  # fmt: skip
_SCALE_FUNCTIONS = {operator.mul, operator.imul, torch.mul, torch.multiply,
                    operator.truediv, operator.itruediv, torch.div, torch.true_divide,
                    operator.neg, torch.neg, operator.pos}  # fmt: skip
_CAT_FUNCTIONS = {torch.cat, torch.concat, torch.concatenate}
_INTERPOLATE = {F.interpolate, F.upsample}
_SIZE_METHODS = {"size", "dim", "numel", "ndimension", "nelement"}
_INPLACE_FUNCTIONS = {operator.iadd, operator.isub, operator.imul, operator.itruediv,
                      torch.relu_, F.relu_, F.leaky_relu_, F.hardtanh_,
                      F.threshold_}  # fmt: skip


def _mutates(node: fx.Node, build: _Build) -> bool:
    if node.op == "call_function":
        return node.target in _INPLACE_FUNCTIONS or bool(node.kwargs.get("inplace"))
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("__")
    if node.op == "call_module":
        return bool(getattr(build.model.get_submodule(node.target), "inplace", False))
    return False


def _check_inplace(node: fx.Node, build: _Build) -> None:
    """An in-place op is exact only if its input is not read again afterwards."""
    if (
        not node.args
        or not isinstance(node.args[0], fx.Node)
        or not _mutates(node, build)
    ):
        return
    source = node.args[0]
    later = [u for u in source.users if build.order[u] > build.order[node]]
    if later:
        raise build.error(
            node,
            f"works in place on {source.name!r}, which node {later[0].name!r} reads "
            "again afterwards, so the traced graph would not match the model; use "
            "the out-of-place form",
        )


def _index_source(value: torch.Tensor) -> torch.Tensor:
    n = value[0].numel()
    return torch.arange(1, n + 1, dtype=torch.int64).reshape(value.shape)


# Where the axis argument of an op sits among the arguments after the tensor,
# its keyword name and its default; None as default means "all axes".
_AXIS_ARGUMENT = {
    "flip": (0, "dims", None),
    "narrow": (0, "dim", 0),
    "unflatten": (0, "dim", 0),
    "squeeze": (0, "dim", None),
    "unsqueeze": (0, "dim", 0),
    "flatten": (0, "start_dim", 0),
    "roll": (1, "dims", None),
    "chunk": (1, "dim", 0),
    "split": (1, "dim", 0),
    "unbind": (0, "dim", 0),
}


def _batch_moved(fn, args, kwargs, ndim: int) -> bool:
    """True when an op that moves entries would touch the batch axis (dim 0)."""
    name = fn if isinstance(fn, str) else getattr(fn, "__name__", "")
    rest = args[1:]

    def touches(dims, n=ndim) -> bool:
        dims = dims if isinstance(dims, (tuple, list)) else [dims]
        return any(int(d) % n == 0 for d in dims)

    if name == "permute":
        dims = (
            rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
        )
        dims = kwargs.get("dims", dims)
        return int(dims[0]) % ndim != 0
    if name in ("transpose", "swapaxes", "movedim"):
        a = rest[0] if rest else kwargs.get("dim0", kwargs.get("source"))
        b = rest[1] if len(rest) > 1 else kwargs.get("dim1", kwargs.get("destination"))
        return touches(a) or touches(b)
    if name == "getitem":
        key = rest[0]
        first = key[0] if isinstance(key, tuple) and key else key
        keeps = first is Ellipsis or (isinstance(first, slice) and first == slice(None))
        return not keeps
    if name in _AXIS_ARGUMENT:
        position, keyword, default = _AXIS_ARGUMENT[name]
        dims = rest[position] if len(rest) > position else kwargs.get(keyword, default)
        if dims is None:
            return True  # every axis, the batch axis included
        return touches(dims, ndim + 1 if name == "unsqueeze" else ndim)
    return False


def _walk(build: _Build, graph: fx.Graph) -> int:
    input_seen = False
    output = None
    for i, node in enumerate(graph.nodes):
        build.order[node] = i
    for node in graph.nodes:
        if node.op == "placeholder":
            if input_seen:
                if node.args:  # an argument with a default value
                    build.values[node] = node.args[0]
                    continue
                raise build.error(
                    node,
                    "the model takes more than one input; only forward(x) with one "
                    "tensor has an operator",
                )
            input_seen = True
            build.values[node] = build.point
            build.add(node, "input", ())
            continue
        if node.op == "get_attr":
            obj = build.model64
            for part in node.target.split("."):
                obj = getattr(obj, part)
            build.values[node] = obj.detach() if _is_tensor(obj) else obj
            continue
        if node.op == "output":
            out = node.args[0]
            if not isinstance(out, fx.Node) or out not in build.linear:
                raise build.error(
                    node,
                    "the model must return one tensor computed from its input; got "
                    f"{type(build.values.get(out, out)).__name__}",
                )
            if not isinstance(build.linear[out], int):
                raise build.error(node, "the model returns several tensors")
            output = build.linear[out]
            continue

        args = fx.node.map_arg(node.args, lambda n: build.values[n])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: build.values[n])
        deps = [n for n in node.all_input_nodes if n in build.linear]
        if not deps:
            build.values[node] = _run(build, node, args, kwargs)
            continue
        _check_inplace(node, build)
        _linear_node(build, node, args, kwargs, deps)
    if output is None:
        raise UnsupportedLayerError("the traced graph has no output node")
    return output


def _run(build: _Build, node: fx.Node, args, kwargs):
    """The concrete value of ``node`` (float64 model copy, CPU)."""
    try:
        return _call(build, node, args, kwargs)
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        shape = tuple(build.point.shape[1:])
        raise build.error(
            node, f"fails on the input of shape {shape}: {exc}", ValueError
        ) from exc


def _call(build: _Build, node: fx.Node, args, kwargs):
    with torch.no_grad():
        if node.op == "call_module":
            return build.model64.get_submodule(node.target)(*args, **kwargs)
        if node.op == "call_method":
            self_obj, *rest = args
            return getattr(self_obj, node.target)(*rest, **kwargs)
        return node.target(*args, **kwargs)


def _linear_node(build: _Build, node: fx.Node, args, kwargs, deps) -> None:
    target = node.target
    if node.op == "call_module":
        # The handler runs before the forward: its message about a shape that
        # does not fit is clearer than the one the module would raise.
        _module_node(build, node, args, kwargs, deps)
        return
    value = _run(build, node, args, kwargs)
    build.values[node] = value

    # Shape queries of the signal are constants.
    if node.op == "call_method" and target in _SIZE_METHODS:
        return
    if (
        node.op == "call_function"
        and target is getattr
        and args[1] in _CONSTANT_ATTRIBUTES
    ):
        return
    if node.op == "call_function" and target is operator.getitem:
        container = node.args[0]
        if isinstance(container, fx.Node) and isinstance(
            build.linear.get(container), tuple
        ):
            build.linear[node] = build.linear[container][args[1]]
            return
        if not _is_tensor(build.values[container]):
            return  # an entry of a size tuple

    if len(node.args) == 0 or not isinstance(value, (torch.Tensor, tuple, list)):
        raise build.error(node, f"returns {type(value).__name__}, not a tensor")

    if node.op == "call_function":
        act = _activation_module(target, args, kwargs)
        if act is not None:
            _single(build, node, deps)
            _handler_layer(build, node, act, deps[0], args[0], _target_name(node))
            return
        if target in _FUNCTIONAL_MODULES:
            _single(build, node, deps)
            if node.args[0] is not deps[0]:
                raise build.error(node, "the signal must be the first argument")
            try:
                module = _FUNCTIONAL_MODULES[target](args, kwargs)
            except (TypeError, ValueError) as exc:
                raise build.error(node, f"has arguments with no matrix: {exc}") from exc
            _handler_layer(
                build, node, module, deps[0], args[0], _target_name(node),
            )  # fmt: skip
            return
        if target in _INTERPOLATE:
            _interpolate_node(build, node, args, kwargs, deps)
            return
        if target is F.dropout or target is F.dropout2d or target is F.dropout1d:
            bound = inspect.signature(target).bind(*args, **kwargs).arguments
            if bound.get("training", True) and bound.get("p", 0.5) > 0:
                raise build.error(
                    node, "dropout in training mode drops entries at random; call "
                    "model.eval() first",
                )  # fmt: skip
            _select(build, node, deps[0], lambda x: x)
            return
        if target in _SUM_FUNCTIONS:
            _sum_node(build, node, args, kwargs)
            return
        if target in _SCALE_FUNCTIONS:
            _scale_node(build, node, args, kwargs)
            return
        if target in _CAT_FUNCTIONS:
            _cat_node(build, node, args, kwargs)
            return
        if target in _STRUCTURAL_FUNCTIONS:
            _structural(build, node, args, kwargs, deps)
            return
    if node.op == "call_method":
        if target in _ACTIVATION_METHODS:
            _single(build, node, deps)
            module = _ACTIVATION_METHODS[target]()
            _handler_layer(build, node, module, deps[0], args[0], target)
            return
        if target in ("add", "add_", "sub", "sub_", "__add__", "__sub__"):
            _sum_node(build, node, args, kwargs)
            return
        if target in ("mul", "mul_", "div", "div_", "neg", "__mul__", "__truediv__"):
            _scale_node(build, node, args, kwargs)
            return
        if target in _STRUCTURAL_METHODS:
            _structural(build, node, args, kwargs, deps)
            return
        if target in _CAST_METHODS and node.args[0] is deps[0] and len(deps) == 1:
            if not value.is_floating_point():
                raise build.error(node, f"casts the signal to {value.dtype}")
            # A cast to another floating dtype or device keeps the values (the
            # operator is computed in float64 anyway): the identity.
            _select(build, node, deps[0], lambda x: x)
            return
    raise build.error(
        node,
        "this function or method has no exact linear matrix here; supported: "
        "registered modules, +, -, torch.add/sub, multiplication and division by "
        "constants, torch.cat, F.relu/leaky_relu/relu6/hardtanh/threshold, "
        "F.interpolate, F.dropout (eval), the functional forms of the supported "
        "convolutions, poolings, pixel shuffles and F.linear, and reshapes, "
        "permutes, slices and zero padding",
    )


def _single(build: _Build, node: fx.Node, deps) -> None:
    if len(deps) != 1:
        names = ", ".join(repr(d.name) for d in deps)
        raise build.error(node, f"takes several input-dependent tensors ({names})")


def _source(build: _Build, node: fx.Node, dep: fx.Node) -> int:
    src = build.linear[dep]
    if not isinstance(src, int):
        raise build.error(node, f"reads the tuple {dep.name!r} as a whole")
    return src


def _module_node(build: _Build, node: fx.Node, args, kwargs, deps) -> None:
    module = build.model.get_submodule(node.target)
    _single(build, node, deps)
    if not (args and node.args[0] is deps[0]) or len(args) > 1 or kwargs:
        raise build.error(
            node, "a layer module must be called with the signal as its only argument"
        )
    _handler_layer(build, node, module, deps[0], args[0], node.target)


def _handler_layer(build, node, module, dep, x_value, path) -> None:
    handler = lookup(module)
    if handler is None:
        raise build.error(
            node,
            f"module type {type(module).__name__} is not linear or has no exact "
            f"matrix here; supported types: {', '.join(supported_types())}",
        )
    source = _source(build, node, dep)
    in_shape = build.nodes[source].shape
    ctx = BuildContext(
        dtype=build.dtype, path=path, at=x_value.detach() if build.local else None
    )
    try:
        built = handler(module, in_shape, ctx)
    except (UnsupportedLayerError, ValueError) as exc:
        raise type(exc)(f"graph node {node.name!r} ({node.op} {path}): {exc}") from exc
    if node not in build.values:
        build.values[node] = _run(build, node, (x_value,), {})

    def offset():
        # The layer's value at 0: its bias, in float64.
        with torch.no_grad():
            zero = torch.zeros((1, *in_shape), dtype=torch.float64)
            if node.op == "call_module":
                value = build.model64.get_submodule(node.target)(zero)
            elif node.op == "call_function":
                args = fx.node.map_arg(node.args, lambda n: build.values[n])
                kwargs = fx.node.map_arg(node.kwargs, lambda n: build.values[n])
                value = node.target(zero, *args[1:], **kwargs)
            else:
                value = copy.deepcopy(module).to(torch.float64)(zero)
            return value.reshape(-1).numpy().copy()

    build.add_layer(
        node, source, built, type(module).__name__, path, offset=offset, module=module
    )


def _interpolate_node(build, node, args, kwargs, deps) -> None:
    _single(build, node, deps)
    bound = inspect.signature(F.interpolate).bind(*args, **kwargs).arguments
    source = _source(build, node, deps[0])
    ctx = BuildContext(dtype=build.dtype, path=node.name)
    options = {
        k: bound[k]
        for k in ("size", "scale_factor", "mode", "align_corners",
                  "recompute_scale_factor", "antialias")
        if k in bound
    }  # fmt: skip
    try:
        built = interpolate_layer(build.nodes[source].shape, ctx, **options)
    except (UnsupportedLayerError, ValueError) as exc:
        raise type(exc)(f"graph node {node.name!r} ({node.op} {_target_name(node)}): "
                        f"{exc}") from exc  # fmt: skip
    build.add_layer(node, source, built, "interpolate", node.name)


def _constant_offset(value, shape) -> np.ndarray:
    const = torch.as_tensor(value, dtype=torch.float64)
    return torch.broadcast_to(const, (1, *shape)).reshape(-1).numpy().copy()


def _sum_node(build, node, args, kwargs) -> None:
    name = _target_name(node)
    a, b = (
        node.args[0],
        node.args[1] if len(node.args) > 1 else node.kwargs.get("other"),
    )
    alpha = kwargs.get("alpha", 1)
    sign = -1.0 if name in ("sub", "isub", "subtract", "sub_", "__sub__") else 1.0
    terms = [(a, 1.0), (b, sign * float(alpha))]
    inputs, weights, const = [], [], 0.0
    shape = tuple(build.values[node].shape[1:])
    for operand, w in terms:
        if isinstance(operand, fx.Node) and operand in build.linear:
            src = _source(build, node, operand)
            if build.nodes[src].shape != shape:
                raise build.error(
                    node,
                    f"broadcasts the signal {operand.name!r} of shape "
                    f"{build.nodes[src].shape} to {shape}; only same-shape sums of "
                    "signals are supported",
                )
            inputs.append(src)
            weights.append(w)
        else:
            v = build.values[operand] if isinstance(operand, fx.Node) else operand
            const = const + w * torch.as_tensor(v, dtype=torch.float64)
    has_const = bool(torch.any(torch.as_tensor(const) != 0))
    build.add(
        node, "sum", inputs, weights=weights, has_offset=has_const,
        offset=lambda: _constant_offset(const, shape),
    )  # fmt: skip


def _scale_node(build, node, args, kwargs) -> None:
    name = _target_name(node)
    shape = tuple(build.values[node].shape[1:])
    if name in ("neg", "pos"):
        src = _source(build, node, node.args[0])
        build.add(node, "sum", (src,), weights=(-1.0 if name == "neg" else 1.0,))
        return
    a = node.args[0]
    b = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
    dividing = name in ("truediv", "itruediv", "div", "true_divide", "div_",
                        "__truediv__")  # fmt: skip
    if dividing and kwargs.get("rounding_mode") is not None:
        raise build.error(node, "division with rounding is not linear")
    a_dep = isinstance(a, fx.Node) and a in build.linear
    b_dep = isinstance(b, fx.Node) and b in build.linear
    if a_dep and b_dep:
        raise build.error(node, "multiplies or divides two input-dependent tensors")
    if dividing and b_dep:
        raise build.error(node, "divides by an input-dependent tensor")
    signal, other = (a, b) if a_dep else (b, a)
    factor = build.values[other] if isinstance(other, fx.Node) else other
    src = _source(build, node, signal)
    if isinstance(factor, numbers.Number) or (
        _is_tensor(factor) and factor.numel() == 1
    ):
        w = float(factor)
        build.add(node, "sum", (src,), weights=(1.0 / w if dividing else w,))
        return
    if not _is_tensor(factor):
        raise build.error(node, f"multiplies the signal by {type(factor).__name__}")
    scale = torch.broadcast_to(factor.to(torch.float64), (1, *shape)).reshape(-1)
    if build.nodes[src].shape != shape:
        raise build.error(node, "broadcasts the signal to a larger shape")
    values = scale.numpy()
    built = LayerMatrix(
        diagonal(1.0 / values if dividing else values, build.dtype), shape
    )
    build.add_layer(node, src, built, name, node.name)


def _cat_node(build, node, args, kwargs) -> None:
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = args[1] if len(args) > 1 else kwargs.get("dim", kwargs.get("axis", 0))
    ndim = build.values[node].dim()
    dim = int(dim) % ndim
    if dim == 0:
        raise build.error(node, "concatenates along the batch axis (dim=0)")
    inputs = []
    for t in tensors:
        if not (isinstance(t, fx.Node) and t in build.linear):
            raise build.error(
                node, "concatenates a constant tensor with the signal; only tensors "
                "computed from the input can be concatenated",
            )  # fmt: skip
        inputs.append(_source(build, node, t))
    build.add(node, "cat", inputs, axis=dim - 1)


def _select(build, node, dep, fn) -> None:
    src = _source(build, node, dep)
    idx = _index_source(build.values[dep])
    out = fn(idx)
    n_in = math.prod(build.nodes[src].shape)
    built = LayerMatrix(selection(out.reshape(-1).numpy() - 1, n_in, build.dtype),
                        tuple(out.shape[1:]))  # fmt: skip
    build.add_layer(node, src, built, _target_name(node), node.name)


def _structural(build, node, args, kwargs, deps) -> None:
    _single(build, node, deps)
    dep = deps[0]
    if node.args[0] is not dep:
        raise build.error(node, "the signal must be the first argument")
    name = _target_name(node)
    if name == "pad" or node.target is F.pad:
        bound = inspect.signature(F.pad).bind(*args, **kwargs).arguments
        if (
            bound.get("mode", "constant") != "constant"
            or (bound.get("value") or 0) != 0
        ):
            raise build.error(
                node, "only zero padding (mode='constant', value=0) is linear; got "
                f"mode={bound.get('mode', 'constant')!r}, value={bound.get('value')!r}",
            )  # fmt: skip
        pad = bound["pad"]
        if len(pad) > 2 * (build.values[dep].dim() - 1):
            raise build.error(node, "pads the batch axis")
    elif _batch_moved(node.target, args, kwargs, build.values[dep].dim()):
        raise build.error(node, "moves, splits or drops the batch axis (dim 0)")

    def apply(idx):
        with torch.no_grad():
            if node.op == "call_method":
                return getattr(idx, node.target)(*args[1:], **kwargs)
            return node.target(idx, *args[1:], **kwargs)

    value = build.values[node]
    if isinstance(value, (tuple, list)):
        src = _source(build, node, dep)
        out = apply(_index_source(build.values[dep]))
        n_in = math.prod(build.nodes[src].shape)
        parts = []
        for k, piece in enumerate(out):
            if piece.dim() < 1 or piece.shape[0] != 1:
                raise build.error(node, "moves, splits or drops the batch axis (dim 0)")
            fake = _PieceNode(f"{node.name}[{k}]", node)
            build.values[fake] = value[k]
            built = LayerMatrix(
                selection(piece.reshape(-1).numpy() - 1, n_in, build.dtype),
                tuple(piece.shape[1:]),
            )
            parts.append(build.add_layer(fake, src, built, name, fake.name))
        build.linear[node] = tuple(parts)
        return
    if value.dim() < 1 or value.shape[0] != 1:
        raise build.error(node, "moves, splits or drops the batch axis (dim 0)")
    _select(build, node, dep, apply)


class _PieceNode:
    """Stands in for one entry of a tuple-valued fx node (chunk, split)."""

    def __init__(self, name: str, parent: fx.Node):
        self.name = name
        self.op = parent.op
        self.target = parent.target

    def __hash__(self) -> int:
        return id(self)


# ---------------------------------------------------------------------------
# Check and entry point


def _self_check(build: _Build, graph: FactorGraph) -> None:
    """``u . (A v)`` from the graph against ``(A^T u) . v`` from autograd."""
    rng = np.random.default_rng(0)
    n_in = math.prod(graph.in_shape)
    v = rng.standard_normal(n_in)
    u = rng.standard_normal(math.prod(graph.out_shape))
    av = graph.evaluate(v.astype(graph.dtype)).astype(np.float64)
    point = build.point.clone().requires_grad_(True)
    try:
        y = build.model64(point)
        (g,) = torch.autograd.grad(y, point, torch.as_tensor(u).reshape(y.shape))
    except RuntimeError:
        return  # no autograd through this model; the per-node checks stand
    atu = g.reshape(-1).numpy()
    lhs, rhs = float(u @ av), float(atu @ v)
    scale = np.linalg.norm(u) * np.linalg.norm(av) + np.linalg.norm(
        atu
    ) * np.linalg.norm(v)
    tol = 1e-9 if graph.dtype == np.float64 else 1e-4
    if abs(lhs - rhs) > tol * max(scale, 1e-300):
        raise UnsupportedLayerError(
            "the traced graph does not reproduce the model: for random u, v it "
            f"gives u.(A v) = {lhs:.6g} but autograd gives (A^T u).v = {rhs:.6g}; "
            "the model's forward may depend on Python state, hooks or in-place "
            "operations that torch.fx does not record"
        )


def graph_factors(
    model: nn.Module,
    input_shape: tuple[int, ...],
    *,
    dtype=np.float64,
    at: torch.Tensor | None = None,
    bias: str = "error",
) -> FactorGraph:
    """Trace ``model`` with ``torch.fx`` and build the factor of every node.

    Parameters
    ----------
    model : torch.nn.Module
        A network whose forward ``torch.fx`` can trace.
    input_shape : tuple of int
        Shape of one input sample, ``(C, H, W)``.
    dtype : {numpy.float64, numpy.float32}
        Value dtype of the factors.
    at : torch.Tensor of shape (1, *input_shape), optional
        Linearization point (float64): the graph is then the network's
        Jacobian at ``at``, and biases are allowed.
    bias : {'error', 'offset', 'ignore'}
        Without ``at``: refuse an affine network, record each node's offset,
        or keep only the linear part.

    Returns
    -------
    FactorGraph

    Raises
    ------
    UnsupportedLayerError
        The model cannot be traced, or a node is not linear or has no matrix;
        the message names the node, its target and why.
    ValueError
        A node adds a constant and ``bias='error'``, or a shape does not fit.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> class Skip(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.conv = nn.Conv2d(1, 1, 3, padding=1, bias=False)
    ...     def forward(self, x):
    ...         return torch.cat([x, self.conv(x)], dim=1) * 0.5
    >>> g = graph_factors(Skip(), (1, 4, 4))
    >>> [(n.op, n.target) for n in g.nodes]
    [('input', 'x'), ('layer', 'conv'), ('cat', 'cat'), ('sum', 'mul')]
    >>> g.to_sparse().shape
    (32, 16)
    """
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # torch.fx raises many types; all mean "not traceable"
        raise UnsupportedLayerError(
            f"model of type {type(model).__name__} is not a chain of layers and "
            f"torch.fx cannot trace it ({type(exc).__name__}: {exc}); write its "
            "forward without data-dependent Python control flow"
        ) from exc
    build = _Build(model, input_shape, dtype, at, bias)
    output = _walk(build, graph)
    out_shape = build.nodes[output].shape
    result = FactorGraph(build.nodes, output, input_shape, out_shape, dtype)
    _self_check(build, result)
    return result
