"""Walk a chain of layers in forward order and build each layer's matrix.

A *chain* is an ``nn.Sequential`` (nested ones included, as long as none
overrides ``forward``) or a single module that has a handler. Anything else
with submodules is a graph and goes to the tracer of ``opextract._graph``.
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
    """One layer of a chain: its module path, module and built matrix."""

    path: str
    module: nn.Module
    in_shape: tuple[int, ...]
    built: LayerMatrix


def display_path(path: str) -> str:
    return repr(path) if path else "'' (the model itself)"


def _is_plain_sequential(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.Sequential)
        and type(module).forward is nn.Sequential.forward
    )


def chain_layers(model: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """The leaf layers of ``model`` in forward order, or None for a graph."""
    if not _is_plain_sequential(model):
        if lookup(model) is not None or not any(True for _ in model.children()):
            return [("", model)]
        return None
    layers: list[tuple[str, nn.Module]] = []

    def walk(module: nn.Sequential, prefix: str) -> bool:
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            if _is_plain_sequential(child):
                if not walk(child, path + "."):
                    return False
            elif lookup(child) is not None or not any(True for _ in child.children()):
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


def build_chain(
    layers: list[tuple[str, nn.Module]],
    input_shape: tuple[int, ...],
    *,
    dtype: np.dtype,
    at: torch.Tensor | None,
) -> list[ChainLayer]:
    """Build the matrices of ``layers``, forwarding ``at`` through them.

    ``at`` (float64, shape ``(1, *input_shape)``, on the CPU) is each layer's
    input at the linearization point; it is forwarded through a float64 copy
    of every layer so that piecewise-linear handlers see their own input.
    """
    built: list[ChainLayer] = []
    shape = tuple(input_shape)
    x = at
    for path, module in layers:
        handler = lookup(module)
        if handler is None:
            raise unsupported(path, module)
        ctx = BuildContext(dtype=dtype, path=path, at=x)
        result = handler(module, shape, ctx)
        n_in = int(np.prod(shape))
        if result.matrix.shape != (int(np.prod(result.out_shape)), n_in):
            raise RuntimeError(
                f"handler of {type(module).__name__} at {display_path(path)} "
                f"returned a matrix of shape {result.matrix.shape} for input "
                f"{shape} and output {result.out_shape}"
            )
        built.append(ChainLayer(path, module, shape, result))
        if x is not None:
            with torch.no_grad():
                x = _double_copy(module)(x)
            if tuple(x.shape[1:]) != tuple(result.out_shape):
                raise RuntimeError(
                    f"{type(module).__name__} at {display_path(path)} produced "
                    f"shape {tuple(x.shape[1:])} but its handler says "
                    f"{result.out_shape}"
                )
        shape = tuple(result.out_shape)
    return built


def layer_offset(module: nn.Module, in_shape: tuple[int, ...]) -> np.ndarray:
    """``f(0)`` of one layer in float64, flattened (its bias contribution)."""
    with torch.no_grad():
        zero = torch.zeros((1, *in_shape), dtype=torch.float64)
        return _double_copy(module)(zero).reshape(-1).numpy()
