"""Nearest-neighbour upsampling (``nn.Upsample``, ``nn.UpsamplingNearest2d``).

Each output position copies exactly one input position, so the matrix has a
single one per row; it is written directly as CSR arrays with ``indptr =
arange``. The source index reproduces PyTorch's CPU and CUDA rule, including
its single-precision arithmetic: ``min(floor(o * scale), n_in - 1)`` with
``scale = float32(1 / scale_factor)`` when a scale factor is given, else
``float32(n_in) / n_out``, and the 2-D kernel's shortcuts for equal and
doubled sizes.
"""

from __future__ import annotations

import math
import numbers
import operator

import numpy as np
import scipy.sparse as sp
from numpy.typing import DTypeLike
from torch import nn

from opextract._errors import UnsupportedLayerError
from opextract._registry import BuildContext, LayerMatrix, register
from opextract._validate import check_bytes, check_dtype, csr_bytes


def _per_axis(value, nd: int, name: str, kind):
    if isinstance(value, (tuple, list)):
        values = tuple(value)
    else:
        values = (value,) * nd
    if len(values) != nd or not all(isinstance(v, kind) for v in values):
        raise ValueError(
            f"{name} must be a positive number or a tuple of {nd}; got {value!r}"
        )
    if any(v <= 0 for v in values):
        raise ValueError(f"{name} must be positive; got {value!r}")
    return values


def _source_index(n_in: int, n_out: int, scale, nd: int) -> np.ndarray:
    o = np.arange(n_out)
    # Torch's 2-D kernel short-cuts equal and doubled sizes whatever the
    # scale factor; its 1-D and 3-D kernels do not.
    if nd == 2 and n_out == n_in:
        return o
    if nd == 2 and n_out == 2 * n_in:
        return o >> 1
    if scale is not None and scale > 0:
        s = np.float32(1.0 / scale)
    else:
        s = np.float32(n_in) / np.float32(n_out)
    src = np.floor(o.astype(np.float32) * s).astype(np.int64)
    return np.minimum(src, n_in - 1)


def upsample_nearest_matrix(
    in_shape: tuple[int, ...],
    *,
    scale_factor: float | tuple[float, ...] | None = None,
    size: int | tuple[int, ...] | None = None,
    dtype: DTypeLike = np.float64,
    max_bytes: int | None = None,
) -> tuple[sp.csr_array, tuple[int, ...]]:
    """Matrix of nearest-neighbour upsampling (``mode='nearest'``).

    Parameters
    ----------
    in_shape : tuple of int
        ``(C, *spatial)`` with 1, 2 or 3 spatial axes.
    scale_factor : float or tuple of float, optional
        Per-axis or common scale; the output size is ``floor(n * scale)``.
    size : int or tuple of int, optional
        Output spatial size; exactly one of ``scale_factor`` and ``size``.
    dtype : {numpy.float64, numpy.float32}
        Value dtype of the matrix.
    max_bytes : int, optional
        Memory budget, as in :func:`conv_matrix`.

    Returns
    -------
    matrix : scipy.sparse.csr_array of shape (prod(out_shape), prod(in_shape))
        One entry 1 per row.
    out_shape : tuple of int

    Examples
    --------
    >>> A, out_shape = upsample_nearest_matrix((1, 2, 2), scale_factor=2)
    >>> out_shape
    (1, 4, 4)
    >>> A.indices.reshape(4, 4)
    array([[0, 0, 1, 1],
           [0, 0, 1, 1],
           [2, 2, 3, 3],
           [2, 2, 3, 3]]...)
    """
    dtype = check_dtype(dtype)
    try:
        shape = tuple(operator.index(s) for s in in_shape)
    except TypeError:
        shape = ()
    if len(shape) not in (2, 3, 4) or any(s <= 0 for s in shape):
        raise ValueError(
            "input_shape must be (C, *spatial) with 1 to 3 spatial axes and "
            f"positive sizes for nearest upsampling; got {in_shape!r}"
        )
    nd = len(shape) - 1
    if (scale_factor is None) == (size is None):
        raise ValueError(
            "exactly one of scale_factor and size must be given; got "
            f"scale_factor={scale_factor!r}, size={size!r}"
        )
    spatial = shape[1:]
    if size is not None:
        out_spatial = _per_axis(size, nd, "size", numbers.Integral)
        scales = (None,) * nd
    else:
        scales = _per_axis(scale_factor, nd, "scale_factor", numbers.Real)
        out_spatial = tuple(math.floor(float(n * s)) for n, s in zip(spatial, scales))
        if any(o <= 0 for o in out_spatial):
            raise ValueError(
                f"scale_factor={scale_factor!r} makes the output of input_shape "
                f"{shape} empty"
            )
    out_shape = (shape[0], *(int(o) for o in out_spatial))

    n_rows = int(np.prod(out_shape))
    n_cols = int(np.prod(shape))
    size_bytes, idx = csr_bytes(n_rows, n_rows, n_cols, dtype)
    check_bytes(size_bytes, f"nearest upsampling {shape} -> {out_shape}", max_bytes)

    # Column of output (c, o_1, ..., o_nd) = ravel of (c, src_1, ..., src_nd).
    cols = np.arange(shape[0], dtype=np.int64) * int(np.prod(spatial))
    for axis in range(nd):
        stride = int(np.prod(spatial[axis + 1 :]))
        src = _source_index(spatial[axis], out_shape[axis + 1], scales[axis], nd)
        cols = (cols[..., None] + (src * stride)[None, :]).reshape(-1)
    indices = cols.astype(idx)
    indptr = np.arange(n_rows + 1, dtype=idx)
    data = np.ones(n_rows, dtype=dtype)
    matrix = sp.csr_array((data, indices, indptr), shape=(n_rows, n_cols))
    matrix.has_sorted_indices = True
    return matrix, out_shape


@register(nn.Upsample)
def _upsample_handler(module: nn.Upsample, in_shape, ctx: BuildContext) -> LayerMatrix:
    if module.mode != "nearest":
        try:
            from opextract import _interpolate
        except ImportError:
            _interpolate = None
        if _interpolate is None or not hasattr(_interpolate, "upsample_matrix"):
            raise UnsupportedLayerError(
                f"module {ctx.path!r} ({type(module).__name__}) has mode="
                f"{module.mode!r}; only mode='nearest' is supported here"
            )
        return _interpolate.upsample_matrix(module, in_shape, ctx)
    if module.recompute_scale_factor:
        # Torch then derives the scale from the sizes, as with `size`.
        spatial = in_shape[1:]
        scales = _per_axis(
            module.scale_factor, len(spatial), "scale_factor", numbers.Real
        )
        size = tuple(math.floor(float(n * s)) for n, s in zip(spatial, scales))
        matrix, out_shape = upsample_nearest_matrix(
            in_shape, size=size, dtype=ctx.dtype
        )
    else:
        matrix, out_shape = upsample_nearest_matrix(
            in_shape,
            scale_factor=module.scale_factor,
            size=module.size,
            dtype=ctx.dtype,
        )
    return LayerMatrix(matrix, out_shape)


def nearest_sources(module: nn.Module, in_shape, out_shape) -> list[np.ndarray] | None:
    """Per spatial axis, the input position each output position copies.

    None when ``module`` is not a nearest upsampling handled here.
    """
    if not isinstance(module, nn.Upsample) or module.mode != "nearest":
        return None
    spatial, out_spatial = tuple(in_shape[1:]), tuple(out_shape[1:])
    nd = len(spatial)
    if module.size is not None or module.recompute_scale_factor:
        scales = (None,) * nd
    else:
        scales = _per_axis(module.scale_factor, nd, "scale_factor", numbers.Real)
    return [_source_index(n, o, s, nd) for n, o, s in zip(spatial, out_spatial, scales)]
