"""Walk a chain of layers in forward order and build each layer's matrix.

A *chain* is an ``nn.Sequential`` (nested ones included, as long as none
overrides ``forward``) or a single module that has a handler. Anything else
with submodules, and a user module without any (a forward written with
``torch.nn.functional``), is a graph and goes to the tracer of
``opextract._graph``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from opextract._errors import UnsupportedLayerError
from opextract._registry import BuildContext, LayerMatrix, lookup, supported_types


@dataclass
class ChainLayer:
    """One layer of a chain: its module path, module and built matrix.

    ``paths`` describes a translation-structured layer (a convolution, a
    nearest upsampling, or the two fused) per spatial axis as ``(k, o, tap,
    pos)``: output position ``o`` reads input position ``pos`` through kernel
    offset ``tap`` of ``k``. It is None for other layers. ``virtual`` (a
    ``_compose.VirtualMatrix``) stands in for a convolution's matrix that was
    not allocated; ``built.matrix`` is then None. ``weight`` is the
    structured layer's kernel with dense channels, ``(C_out, C_in, kd, kh,
    kw)`` (unit axes below three dimensions), indexed by the taps of
    ``paths``.
    """

    path: str
    module: nn.Module
    in_shape: tuple[int, ...]
    built: LayerMatrix
    paths: list | None = None
    virtual: object | None = None
    weight: np.ndarray | None = None


def display_path(path: str) -> str:
    return repr(path) if path else "'' (the model itself)"


def _is_plain_sequential(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.Sequential)
        and type(module).forward is nn.Sequential.forward
    )


def _is_layer(module: nn.Module) -> bool:
    """Whether ``module`` is walked as one layer of a chain.

    A module with a handler is; so is a built-in ``torch.nn`` module without
    children, so that an unsupported one is refused by name. A user module
    without children (a forward written with ``torch.nn.functional``) is not:
    its forward is a graph for the tracer.
    """
    if lookup(module) is not None:
        return True
    if any(True for _ in module.children()):
        return False
    return type(module).__module__.startswith("torch.nn.")


def chain_layers(model: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """The leaf layers of ``model`` in forward order, or None for a graph."""
    if not _is_plain_sequential(model):
        return [("", model)] if _is_layer(model) else None
    layers: list[tuple[str, nn.Module]] = []

    def walk(module: nn.Sequential, prefix: str) -> bool:
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            if _is_plain_sequential(child):
                if not walk(child, path + "."):
                    return False
            elif _is_layer(child):
                layers.append((path, child))
            else:
                return False
        return True

    return layers if walk(model, "") else None


def unsupported(
    path: str, module: nn.Module, reason: str = ""
) -> UnsupportedLayerError:
    why = reason or "it is not linear or has no exact matrix here"
    return UnsupportedLayerError(
        f"module {display_path(path)} of type {type(module).__name__} is not "
        f"supported: {why}; supported types: {', '.join(supported_types())}"
    )


def _double_copy(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module).to(device="cpu", dtype=torch.float64)


def _is_conv(module: nn.Module) -> bool:
    return type(module) in (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _upsample_paths(sources) -> list:
    return [
        (1, np.arange(len(src)), np.zeros(len(src), dtype=np.int64), src)
        for src in sources
    ]


def build_chain(
    layers: list[tuple[str, nn.Module]],
    input_shape: tuple[int, ...],
    *,
    dtype: np.dtype,
    at: torch.Tensor | None,
    fuse: bool = False,
    lazy: bool = False,
) -> list[ChainLayer]:
    """Build the matrices of ``layers``, forwarding ``at`` through them.

    ``at`` (float64, shape ``(1, *input_shape)``, on the CPU) is each layer's
    input at the linearization point; it is forwarded through a float64 copy
    of every layer so that piecewise-linear handlers see their own input.
    With ``fuse``, a nearest upsampling followed by a convolution becomes one
    matrix (path ``"up+conv"``), which skips the convolution's wide matrix.
    With ``lazy``, convolutions are kept as row templates (``virtual``) when
    those are small, and their matrices are not allocated.
    """
    from opextract import _compose, _conv, _upsample

    def virtual_of(plan):
        rows = _conv.virtual_rows(plan) if lazy else None
        return None if rows is None else _compose.VirtualMatrix(*rows, plan.n_cols)

    built: list[ChainLayer] = []
    shape = tuple(input_shape)
    x = at
    i = 0
    while i < len(layers):
        path, module = layers[i]
        handler = lookup(module)
        if handler is None:
            raise unsupported(path, module)
        ctx = BuildContext(dtype=dtype, path=path, at=x)
        virtual = None
        if lazy and _is_conv(module) and handler is _conv._conv_handler:
            plan = _conv.module_plan(module, shape, ctx)
            virtual = virtual_of(plan)
        try:
            if virtual is not None:
                result = LayerMatrix(None, plan.out_shape, module.bias is not None)
            else:
                result = handler(module, shape, ctx)
        except UnsupportedLayerError as error:
            # Every refusal of a layer lists what is supported, wherever raised.
            if "supported types" in str(error):
                raise
            raise UnsupportedLayerError(
                f"{error}; supported types: {', '.join(supported_types())}"
            ) from error
        n_in = int(np.prod(shape))
        matrix_shape = (virtual or result.matrix).shape
        if matrix_shape != (int(np.prod(result.out_shape)), n_in):
            raise RuntimeError(
                f"handler of {type(module).__name__} at {display_path(path)} "
                f"returned a matrix of shape {matrix_shape} for input "
                f"{shape} and output {result.out_shape}"
            )
        sources = _upsample.nearest_sources(module, shape, result.out_shape)
        modules = [module]
        paths = weight = None
        if sources is not None:
            paths = _upsample_paths(sources)
            eye = np.eye(shape[0], dtype=dtype)
            weight = eye.reshape(shape[0], shape[0], 1, 1, 1)
        elif _is_conv(module):
            conv_plan = _conv.module_plan(module, shape, ctx)
            paths = conv_plan.axis_paths()
            weight = _conv.dense_weight(conv_plan)
        if (
            fuse
            and sources is not None
            and i + 1 < len(layers)
            and _is_conv(layers[i + 1][1])
        ):
            conv_path, conv = layers[i + 1]
            conv_ctx = BuildContext(dtype=dtype, path=conv_path, at=None)
            plan = _conv.module_plan(
                conv,
                tuple(result.out_shape),
                conv_ctx,
                sources=sources,
                coarse=shape[1:],
            )
            virtual = virtual_of(plan)
            matrix = None if virtual is not None else _conv._build(plan)[0]
            result = LayerMatrix(matrix, plan.out_shape, conv.bias is not None)
            paths = plan.axis_paths()
            weight = _conv.dense_weight(plan)
            path = f"{path}+{conv_path}"
            modules.append(conv)
            i += 1
        built.append(
            ChainLayer(path, modules[-1], shape, result, paths, virtual, weight)
        )
        if x is not None:
            with torch.no_grad():
                for m in modules:
                    x = _double_copy(m)(x)
            if tuple(x.shape[1:]) != tuple(result.out_shape):
                raise RuntimeError(
                    f"{type(modules[-1]).__name__} at {display_path(path)} "
                    f"produced shape {tuple(x.shape[1:])} but its handler says "
                    f"{result.out_shape}"
                )
        shape = tuple(result.out_shape)
        i += 1
    return built


def layer_offset(module: nn.Module, in_shape: tuple[int, ...]) -> np.ndarray:
    """``f(0)`` of one layer in float64, flattened (its bias contribution)."""
    with torch.no_grad():
        zero = torch.zeros((1, *in_shape), dtype=torch.float64)
        return _double_copy(module)(zero).reshape(-1).numpy()
