"""Average pooling (fixed maps) and max pooling (local operator at ``at``).

Average pooling is separable: every channel alike, and the window and its
divisor are products over the spatial axes. Its matrix is therefore
``I_C (x) P_0 (x) ... (x) P_{d-1}`` with one small 1-D matrix per axis, and
:func:`opextract._separable.kron_csr` writes it into CSR directly. The 1-D
matrices follow PyTorch's rules exactly: windows start at ``o * stride -
padding``; with ``count_include_pad`` the divisor counts padding up to
``size + padding`` (a ceil_mode window beyond that does not count it);
without it the divisor counts only real entries; ``divisor_override`` replaces
the divisor. Adaptive average pooling uses the windows
``[floor(o * L / out), ceil((o + 1) * L / out))``.

Max pooling is piecewise linear: at an input ``x`` each output copies one
entry of its window. Its local operator is the selection matrix of the
indices PyTorch's own forward returns, which are the entries its autograd
sends gradients to; among tied maxima that is the first in the window's
row-major order.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from opextract._activations import not_linear_error
from opextract._registry import BuildContext, LayerMatrix, register
from opextract._separable import csr, index_dtype, kron_csr, selection

_AVG = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}
_ADAPTIVE_AVG = {
    nn.AdaptiveAvgPool1d: 1,
    nn.AdaptiveAvgPool2d: 2,
    nn.AdaptiveAvgPool3d: 3,
}
_MAX = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3}
_ADAPTIVE_MAX = {
    nn.AdaptiveMaxPool1d: 1,
    nn.AdaptiveMaxPool2d: 2,
    nn.AdaptiveMaxPool3d: 3,
}


def _tuple(value, nd: int) -> tuple:
    if isinstance(value, (tuple, list)):
        return tuple(value)
    return (value,) * nd


def _check_rank(module, in_shape, nd: int, ctx: BuildContext) -> None:
    if len(in_shape) != nd + 1 or any(int(n) < 1 for n in in_shape):
        axes = ("C", "L") if nd == 1 else ("C", *"DHW"[3 - nd :])
        raise ValueError(
            f"input_shape of layer {ctx.path!r} ({type(module).__name__}) must be "
            f"({', '.join(axes)}) with positive sizes; got {tuple(in_shape)}"
        )


def _windows_1d(starts: np.ndarray, ends: np.ndarray, weights: np.ndarray, size: int):
    """1-D matrix with ``weights[o]`` on columns ``starts[o] .. ends[o] - 1``."""
    counts = np.maximum(ends - starts, 0)
    indptr = np.zeros(starts.size + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    rows = np.repeat(np.arange(starts.size), counts)
    indices = np.arange(indptr[-1]) - indptr[rows] + starts[rows]
    return csr(weights[rows].astype(np.float64), indices, indptr, (starts.size, size))


def pool_output_size(size, kernel, stride, padding, dilation, ceil_mode) -> int:
    """PyTorch's pooling output length along one axis."""
    span = size + 2 * padding - dilation * (kernel - 1) - 1
    out = (span + (stride - 1 if ceil_mode else 0)) // stride + 1
    # A last window that would start in the right padding is dropped.
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


def avg_pool_1d(size, kernel, stride, padding, ceil_mode, count_include_pad):
    """The (out, size) matrix of 1-D average pooling, and the window sizes."""
    out = pool_output_size(size, kernel, stride, padding, 1, ceil_mode)
    start = np.arange(out) * stride - padding
    end = np.minimum(start + kernel, size + padding)
    padded_count = end - start
    start, end = np.maximum(start, 0), np.minimum(end, size)
    counts = padded_count if count_include_pad else np.maximum(end - start, 1)
    return _windows_1d(start, end, 1.0 / counts, size), out


@register(*_AVG)
def _avg_pool(module, in_shape, ctx: BuildContext) -> LayerMatrix:
    nd = _AVG[type(module)]
    _check_rank(module, in_shape, nd, ctx)
    kernel = _tuple(module.kernel_size, nd)
    stride = _tuple(module.stride if module.stride else module.kernel_size, nd)
    padding = _tuple(module.padding, nd)
    for axis in range(nd):
        if padding[axis] > kernel[axis] // 2:
            raise ValueError(
                f"padding of layer {ctx.path!r} ({type(module).__name__}) must be at "
                f"most half the kernel_size; got padding={module.padding}, "
                f"kernel_size={module.kernel_size}"
            )
    spatial = in_shape[1:]

    axes, out = [], []
    for axis in range(nd):
        matrix, n = avg_pool_1d(
            spatial[axis],
            kernel[axis],
            stride[axis],
            padding[axis],
            module.ceil_mode,
            module.count_include_pad,
        )
        if n < 1:
            raise ValueError(
                f"input_shape {tuple(in_shape)} is too small for layer {ctx.path!r} "
                f"({type(module).__name__} with kernel_size={module.kernel_size}, "
                f"padding={module.padding}): the output would be empty"
            )
        axes.append(matrix)
        out.append(n)

    divisor = getattr(module, "divisor_override", None)
    if divisor:
        # The window is still a product of intervals; only the divisor changes.
        for matrix in axes:
            matrix.data[:] = 1.0
        axes[0].data[:] = 1.0 / divisor
    return LayerMatrix(kron_csr(in_shape[0], axes, ctx.dtype), (in_shape[0], *out))


def adaptive_avg_pool_1d(size: int, out: int):
    """The (out, size) matrix of 1-D adaptive average pooling."""
    o = np.arange(out)
    start = (o * size) // out
    end = -((-(o + 1) * size) // out)
    return _windows_1d(start, end, 1.0 / (end - start), size)


def _adaptive_out(module, in_shape, nd: int) -> tuple[int, ...]:
    sizes = _tuple(module.output_size, nd)
    return tuple(in_shape[1 + a] if s is None else int(s) for a, s in enumerate(sizes))


@register(*_ADAPTIVE_AVG)
def _adaptive_avg_pool(module, in_shape, ctx: BuildContext) -> LayerMatrix:
    nd = _ADAPTIVE_AVG[type(module)]
    _check_rank(module, in_shape, nd, ctx)
    out = _adaptive_out(module, in_shape, nd)
    if any(n < 1 for n in out):
        raise ValueError(
            f"output_size of layer {ctx.path!r} ({type(module).__name__}) must be "
            f"positive; got {module.output_size}"
        )
    axes = [adaptive_avg_pool_1d(in_shape[1 + a], out[a]) for a in range(nd)]
    return LayerMatrix(kron_csr(in_shape[0], axes, ctx.dtype), (in_shape[0], *out))


def _max_indices(module, in_shape, ctx: BuildContext, nd: int) -> LayerMatrix:
    _check_rank(module, in_shape, nd, ctx)
    if ctx.at is None:
        raise not_linear_error(module, ctx)
    at = ctx.at.detach().to("cpu", torch.float64)
    if type(module) in _MAX:
        pool = getattr(F, f"max_pool{nd}d")
        args = (module.kernel_size, module.stride, module.padding, module.dilation)
        kwargs = {"ceil_mode": module.ceil_mode, "return_indices": True}
    else:
        pool = getattr(F, f"adaptive_max_pool{nd}d")
        args, kwargs = (_adaptive_out(module, in_shape, nd),), {"return_indices": True}
    try:
        _, indices = pool(at, *args, **kwargs)
    except RuntimeError as exc:
        raise ValueError(
            f"input_shape {tuple(in_shape)} does not fit layer {ctx.path!r} "
            f"({type(module).__name__}): {exc}"
        ) from exc

    # Indices are flat within each channel's plane; add the channel's offset.
    indices = indices[0].numpy()
    plane = math.prod(in_shape[1:])
    offsets = (np.arange(in_shape[0]) * plane).reshape((-1,) + (1,) * nd)
    sources = (indices + offsets).ravel()
    n = math.prod(in_shape)
    matrix = selection(sources.astype(index_dtype(n)), n, ctx.dtype)
    return LayerMatrix(matrix, tuple(indices.shape))


@register(*_MAX)
def _max_pool(module, in_shape, ctx: BuildContext) -> LayerMatrix:
    return _max_indices(module, in_shape, ctx, _MAX[type(module)])


@register(*_ADAPTIVE_MAX)
def _adaptive_max_pool(module, in_shape, ctx: BuildContext) -> LayerMatrix:
    return _max_indices(module, in_shape, ctx, _ADAPTIVE_MAX[type(module)])
