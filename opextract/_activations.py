"""Piecewise-linear activations: their local operator at a given input.

ReLU, LeakyReLU, PReLU, ReLU6, Hardtanh and Threshold are linear on each piece
of their domain. At an input ``x`` (``ctx.at``) each becomes the diagonal
matrix of its slopes at ``x``: the exact Jacobian of the layer there. Without
``at`` they have no matrix, and the handler says so.

At a kink the slope taken is the one PyTorch's autograd uses, so that the
local operator equals ``torch.func.jacrev`` everywhere:

=====================  ==========================================
layer                  slope at the kink
=====================  ==========================================
ReLU                   0 at ``x == 0``
LeakyReLU, PReLU       the negative slope at ``x == 0``
Hardtanh, ReLU6        0 at ``x == min_val`` and at ``x == max_val``
Threshold              0 at ``x == threshold``
=====================  ==========================================
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from opextract._errors import UnsupportedLayerError
from opextract._registry import BuildContext, LayerMatrix, register
from opextract._separable import diagonal


def not_linear_error(module: nn.Module, ctx: BuildContext) -> UnsupportedLayerError:
    """The error for a piecewise-linear layer met without a linearization point."""
    name = type(module).__name__
    return UnsupportedLayerError(
        f"layer {ctx.path or '<root>'!r} ({name}) is not linear, so the network has "
        f"no single matrix; pass at=x (an input of the network's input_shape) to "
        f"get the local operator, the exact Jacobian of the network at x"
    )


def _at(module: nn.Module, in_shape: tuple[int, ...], ctx: BuildContext):
    if ctx.at is None:
        raise not_linear_error(module, ctx)
    at = ctx.at.detach().to("cpu", torch.float64)
    if tuple(at.shape) != (1, *in_shape):
        raise ValueError(
            f"at for layer {ctx.path!r} must have shape {(1, *in_shape)}; "
            f"got {tuple(at.shape)}"
        )
    return at[0].numpy()


def _local(in_shape, ctx, slopes: np.ndarray, offset=None) -> LayerMatrix:
    # The layer is affine on the piece that holds x: f(y) = D y + offset there,
    # and the offset is nonzero only on a flat piece with a nonzero value.
    return LayerMatrix(
        matrix=diagonal(slopes, ctx.dtype),
        out_shape=tuple(in_shape),
        has_offset=offset is not None and bool(np.any(offset != 0)),
    )


@register(nn.ReLU)
def _relu(module: nn.ReLU, in_shape, ctx: BuildContext) -> LayerMatrix:
    x = _at(module, in_shape, ctx)
    return _local(in_shape, ctx, (x > 0).astype(np.float64))


@register(nn.LeakyReLU)
def _leaky_relu(module: nn.LeakyReLU, in_shape, ctx: BuildContext) -> LayerMatrix:
    x = _at(module, in_shape, ctx)
    slopes = np.where(x > 0, 1.0, float(module.negative_slope))
    return _local(in_shape, ctx, slopes)


@register(nn.PReLU)
def _prelu(module: nn.PReLU, in_shape, ctx: BuildContext) -> LayerMatrix:
    x = _at(module, in_shape, ctx)
    weight = module.weight.detach().to("cpu", torch.float64).numpy()
    if weight.size > 1:
        if len(in_shape) < 1 or in_shape[0] != weight.size:
            raise ValueError(
                f"input_shape of layer {ctx.path!r} (PReLU with {weight.size} "
                f"parameters) must have {weight.size} channels; got {in_shape}"
            )
        weight = weight.reshape((-1,) + (1,) * (len(in_shape) - 1))
    slopes = np.where(x > 0, 1.0, weight)
    return _local(in_shape, ctx, slopes)


@register(nn.Hardtanh, nn.ReLU6)
def _hardtanh(module: nn.Hardtanh, in_shape, ctx: BuildContext) -> LayerMatrix:
    x = _at(module, in_shape, ctx)
    low, high = x <= module.min_val, x >= module.max_val
    offset = np.where(low, module.min_val, 0.0) + np.where(high, module.max_val, 0.0)
    return _local(in_shape, ctx, (~low & ~high).astype(np.float64), offset)


@register(nn.Threshold)
def _threshold(module: nn.Threshold, in_shape, ctx: BuildContext) -> LayerMatrix:
    x = _at(module, in_shape, ctx)
    flat = x <= module.threshold
    offset = np.where(flat, float(module.value), 0.0)
    return _local(in_shape, ctx, (~flat).astype(np.float64), offset)
