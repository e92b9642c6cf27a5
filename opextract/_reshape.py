"""Layers that only move entries: reshapes, pixel shuffles, identity, dropout.

In the compact layout a reshape keeps the flattened order, so Flatten,
Unflatten and Identity are the identity matrix with a new output shape, and so
is Dropout in eval mode. PixelShuffle, PixelUnshuffle and ChannelShuffle
permute entries; their matrix is the permutation, computed by applying the
same index arithmetic to the flat positions 0..n-1.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from opextract._errors import UnsupportedLayerError
from opextract._registry import BuildContext, LayerMatrix, register
from opextract._separable import identity, selection

_DROPOUT = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)


def _same(in_shape, out_shape, ctx) -> LayerMatrix:
    return LayerMatrix(identity(math.prod(in_shape), ctx.dtype), tuple(out_shape))


def _meta_shape(module: nn.Module, in_shape, ctx: BuildContext) -> tuple[int, ...]:
    """The module's output shape for one sample, from a forward on meta tensors."""
    try:
        out = module(torch.empty((1, *in_shape), device="meta"))
    except (RuntimeError, ValueError, IndexError) as exc:
        raise ValueError(
            f"input_shape {tuple(in_shape)} does not fit layer {ctx.path!r} "
            f"({type(module).__name__}): {exc}"
        ) from exc
    if out.dim() < 1 or out.shape[0] != 1:
        raise UnsupportedLayerError(
            f"layer {ctx.path!r} ({type(module).__name__}) mixes the batch axis "
            f"into the sample; got output shape {tuple(out.shape)} for input "
            f"shape {(1, *in_shape)}"
        )
    return tuple(out.shape[1:])


@register(nn.Identity)
def _identity(module: nn.Identity, in_shape, ctx: BuildContext) -> LayerMatrix:
    return _same(in_shape, in_shape, ctx)


@register(*_DROPOUT)
def _dropout(module: nn.Module, in_shape, ctx: BuildContext) -> LayerMatrix:
    if module.training and module.p > 0:
        raise UnsupportedLayerError(
            f"layer {ctx.path!r} ({type(module).__name__}) is in training mode, "
            f"where it drops entries at random; call model.eval() first"
        )
    return _same(in_shape, in_shape, ctx)


@register(nn.Flatten)
def _flatten(module: nn.Flatten, in_shape, ctx: BuildContext) -> LayerMatrix:
    start = module.start_dim % (len(in_shape) + 1)
    if start == 0:
        raise UnsupportedLayerError(
            f"layer {ctx.path!r} (Flatten) must keep the batch axis, so start_dim "
            f"must not be 0; got start_dim={module.start_dim}"
        )
    return _same(in_shape, _meta_shape(module, in_shape, ctx), ctx)


@register(nn.Unflatten)
def _unflatten(module: nn.Unflatten, in_shape, ctx: BuildContext) -> LayerMatrix:
    if isinstance(module.dim, int) and module.dim % (len(in_shape) + 1) == 0:
        raise UnsupportedLayerError(
            f"layer {ctx.path!r} (Unflatten) must keep the batch axis, so dim must "
            f"not be 0; got dim={module.dim}"
        )
    return _same(in_shape, _meta_shape(module, in_shape, ctx), ctx)


def _permutation(sources: np.ndarray, out_shape, ctx) -> LayerMatrix:
    return LayerMatrix(selection(sources, sources.size, ctx.dtype), tuple(out_shape))


def _check_3d(module, in_shape, ctx, rule: str, ok: bool):
    if len(in_shape) != 3 or not ok:
        raise ValueError(
            f"input_shape of layer {ctx.path!r} ({type(module).__name__}) must be "
            f"(C, H, W) with {rule}; got {tuple(in_shape)}"
        )


@register(nn.PixelShuffle)
def _pixel_shuffle(module: nn.PixelShuffle, in_shape, ctx: BuildContext):
    r = int(module.upscale_factor)
    _check_3d(module, in_shape, ctx, f"C divisible by {r * r}", in_shape[0] % r**2 == 0)
    c, h, w = in_shape
    # out[k, y*r + i, x*r + j] = in[k*r*r + i*r + j, y, x]
    pos = np.arange(c * h * w).reshape(c // r**2, r, r, h, w)
    sources = pos.transpose(0, 3, 1, 4, 2).ravel()
    return _permutation(sources, (c // r**2, h * r, w * r), ctx)


@register(nn.PixelUnshuffle)
def _pixel_unshuffle(module: nn.PixelUnshuffle, in_shape, ctx: BuildContext):
    r = int(module.downscale_factor)
    ok = len(in_shape) == 3 and in_shape[1] % r == 0 and in_shape[2] % r == 0
    _check_3d(module, in_shape, ctx, f"H and W divisible by {r}", ok)
    c, h, w = in_shape
    # out[k*r*r + i*r + j, y, x] = in[k, y*r + i, x*r + j]
    pos = np.arange(c * h * w).reshape(c, h // r, r, w // r, r)
    sources = pos.transpose(0, 2, 4, 1, 3).ravel()
    return _permutation(sources, (c * r * r, h // r, w // r), ctx)


@register(nn.ChannelShuffle)
def _channel_shuffle(module: nn.ChannelShuffle, in_shape, ctx: BuildContext):
    g = int(module.groups)
    if len(in_shape) < 1 or in_shape[0] % g != 0:
        raise ValueError(
            f"input_shape of layer {ctx.path!r} (ChannelShuffle) must have a "
            f"channel count divisible by groups={g}; got {tuple(in_shape)}"
        )
    c = in_shape[0]
    rest = math.prod(in_shape[1:])
    pos = np.arange(c * rest).reshape(g, c // g, rest)
    return _permutation(pos.transpose(1, 0, 2).ravel(), in_shape, ctx)
