"""Interpolation: ``nn.Upsample`` and ``F.interpolate`` in every linear mode.

Interpolation acts on each channel alike and on each spatial axis separately,
so its matrix is ``I_C (x) M_0 (x) ... (x) M_{d-1}`` with one small 1-D matrix
per axis; :func:`opextract._separable.kron_csr` writes the product into CSR
directly. The 1-D matrices repeat PyTorch's CPU arithmetic:

* the output length is ``size``, or ``floor(in * scale_factor)``;
* the coordinate scale is ``(in - 1) / (out - 1)`` with ``align_corners``,
  else ``1 / scale_factor`` when a scale factor is passed on (not
  recomputed), else ``in / out``;
* 'nearest' takes ``floor(o * scale)`` and 'nearest-exact'
  ``floor((o + 0.5) * scale)``, both in float32 as PyTorch does, clamped to
  ``in - 1``; on 2-D inputs 'nearest' maps ``out == in`` to the identity and
  ``out == 2 * in`` to ``o // 2`` whatever the scale factor, as PyTorch's 2-D
  kernel does;
* 'linear', 'bilinear' and 'trilinear' interpolate between ``floor(src)`` and
  the next entry, with ``src = scale * o`` (``align_corners``) or
  ``max(scale * (o + 0.5) - 0.5, 0)``, and copy an axis whose size does not
  change whatever the scale factor, as PyTorch does;
* 'bicubic' uses Keys' cubic convolution with ``A = -0.75`` on the four
  entries around ``src``, clamping indices at the border;
* 'area' is adaptive average pooling to the output size.
"""

from __future__ import annotations

import math
import operator

import numpy as np
import scipy.sparse as sp
from torch import nn

from opextract._errors import UnsupportedLayerError
from opextract._pool import adaptive_avg_pool_1d
from opextract._registry import BuildContext, LayerMatrix
from opextract._separable import kron_csr

__all__ = ["interpolate_matrix"]

MODES = (
    "nearest",
    "nearest-exact",
    "linear",
    "bilinear",
    "trilinear",
    "bicubic",
    "area",
)
_MODE_DIMS = {"linear": 1, "bilinear": 2, "trilinear": 3, "bicubic": 2}
_CUBIC_A = -0.75


def _per_axis(value, nd: int, name: str) -> list:
    if isinstance(value, (tuple, list)):
        if len(value) != nd:
            raise ValueError(
                f"{name} must have one entry per spatial axis ({nd}); got {value!r}"
            )
        return list(value)
    return [value] * nd


def _resolve(in_shape, size, scale_factor, mode, align_corners, recompute):
    """Validated (spatial_in, spatial_out, scales, align_corners)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    try:
        shape = tuple(operator.index(s) for s in in_shape)
    except TypeError:
        shape = ()
    if not 2 <= len(shape) <= 4 or any(s <= 0 for s in shape):
        raise ValueError(
            "input_shape must be (C, L), (C, H, W) or (C, D, H, W) with positive "
            f"sizes; got {tuple(in_shape)!r}"
        )
    nd = len(shape) - 1
    if mode in _MODE_DIMS and _MODE_DIMS[mode] != nd:
        raise ValueError(
            f"mode={mode!r} needs {_MODE_DIMS[mode]} spatial axes; got input_shape "
            f"{shape} with {nd}"
        )
    interpolating = mode in _MODE_DIMS
    if align_corners is not None and not interpolating:
        raise ValueError(
            "align_corners can only be set with mode 'linear', 'bilinear', "
            f"'trilinear' or 'bicubic'; got align_corners={align_corners!r} with "
            f"mode={mode!r}"
        )
    if (size is None) == (scale_factor is None):
        raise ValueError(
            "exactly one of size and scale_factor must be given; got "
            f"size={size!r}, scale_factor={scale_factor!r}"
        )

    spatial = shape[1:]
    if size is not None:
        out = [int(s) for s in _per_axis(size, nd, "size")]
        scales = [None] * nd
    else:
        scales = [float(s) for s in _per_axis(scale_factor, nd, "scale_factor")]
        if any(not s > 0 for s in scales):
            raise ValueError(f"scale_factor must be positive; got {scale_factor!r}")
        out = [math.floor(n * s) for n, s in zip(spatial, scales)]
        if recompute or mode == "area":
            scales = [None] * nd
    if any(n < 1 for n in out):
        raise ValueError(
            f"the output size must be positive on every axis; got {tuple(out)} from "
            f"input_shape {shape}, size={size!r}, scale_factor={scale_factor!r}"
        )
    return spatial, out, scales, bool(align_corners)


def _coordinate_scale(n_in: int, n_out: int, align_corners: bool, scale) -> float:
    if align_corners:
        return (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    return 1.0 / scale if scale is not None and scale > 0 else n_in / n_out


def _nearest_1d(n_in: int, n_out: int, scale, exact: bool, nd: int) -> np.ndarray:
    # PyTorch's 2-D 'nearest' kernel short-cuts out == in (identity) and
    # out == 2 * in (halving) whatever the scale factor; its 1-D and 3-D
    # kernels and 'nearest-exact' do not.
    if nd == 2 and not exact and n_out in (n_in, 2 * n_in):
        return np.arange(n_out) // (n_out // n_in)
    # PyTorch computes nearest indices in float32; so do we, to pick the
    # same neighbour where a coordinate falls on a rounding boundary.
    if scale is not None and scale > 0:
        s = np.float32(1.0 / scale)
    else:
        s = np.float32(n_in) / np.float32(n_out)
    o = np.arange(n_out, dtype=np.float32)
    if exact:
        o = o + np.float32(0.5)
    src = np.floor(o * s).astype(np.int64)
    return np.minimum(src, n_in - 1)


def _from_entries(rows, cols, vals, shape) -> sp.csr_array:
    # Clamped indices can repeat within a row; their weights add up.
    matrix = sp.coo_array((vals, (rows, cols)), shape=shape).tocsr()
    matrix.sum_duplicates()
    return matrix


def interpolation_1d(n_in, n_out, mode, align_corners=False, scale=None, nd=1):
    """The (n_out, n_in) matrix of interpolation along one of ``nd`` axes."""
    if mode in ("nearest", "nearest-exact"):
        src = _nearest_1d(n_in, n_out, scale, mode == "nearest-exact", nd)
        return _from_entries(np.arange(n_out), src, np.ones(n_out), (n_out, n_in))
    if mode == "area":
        return adaptive_avg_pool_1d(n_in, n_out)

    if mode != "bicubic" and n_out == n_in:
        # PyTorch's linear kernels copy an axis whose size does not change,
        # whatever the scale factor; its bicubic kernel does not.
        return _from_entries(
            np.arange(n_in), np.arange(n_in), np.ones(n_in), (n_in,) * 2
        )
    s = _coordinate_scale(n_in, n_out, align_corners, scale)
    o = np.arange(n_out, dtype=np.float64)
    src = s * o if align_corners else s * (o + 0.5) - 0.5
    rows = np.arange(n_out)
    if mode == "bicubic":
        base = np.floor(src)
        t = np.clip(src - base, 0.0, 1.0)
        a = _CUBIC_A

        def near(x):  # |x| <= 1
            return ((a + 2) * x - (a + 3)) * x * x + 1

        def far(x):  # 1 < |x| < 2
            return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

        weights = [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)]
        cols = [np.clip(base.astype(np.int64) + k, 0, n_in - 1) for k in (-1, 0, 1, 2)]
        return _from_entries(
            np.tile(rows, 4), np.concatenate(cols), np.concatenate(weights),
            (n_out, n_in),
        )  # fmt: skip

    if not align_corners:
        src = np.maximum(src, 0.0)
    i0 = src.astype(np.int64)
    lam = np.clip(src - i0, 0.0, 1.0)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return _from_entries(
        np.tile(rows, 2),
        np.concatenate([i0, i1]),
        np.concatenate([1.0 - lam, lam]),
        (n_out, n_in),
    )


def interpolate_matrix(
    in_shape: tuple[int, ...],
    *,
    size: int | tuple[int, ...] | None = None,
    scale_factor: float | tuple[float, ...] | None = None,
    mode: str = "bilinear",
    align_corners: bool | None = None,
    recompute_scale_factor: bool | None = None,
    dtype=np.float64,
) -> tuple[sp.csr_array, tuple[int, ...]]:
    """Matrix of ``F.interpolate`` on one sample of shape ``in_shape``.

    Parameters
    ----------
    in_shape : tuple of int
        ``(C, L)``, ``(C, H, W)`` or ``(C, D, H, W)``.
    size : int or tuple of int, optional
        Output spatial size (one int for all axes, or one per axis).
    scale_factor : float or tuple of float, optional
        Multiplier of the spatial size, per axis or for all; exactly one of
        ``size`` and ``scale_factor`` is given, as in ``F.interpolate``.
    mode : {'nearest', 'nearest-exact', 'linear', 'bilinear', 'trilinear', \
'bicubic', 'area'}
        Interpolation mode; 'linear', 'bilinear'/'bicubic' and 'trilinear'
        need 1, 2 and 3 spatial axes.
    align_corners : bool, optional
        As in ``F.interpolate``; only with the interpolating modes.
    recompute_scale_factor : bool, optional
        As in ``F.interpolate``: compute the coordinate scale from the sizes
        instead of using ``scale_factor``.
    dtype : {numpy.float64, numpy.float32}
        Value dtype of the matrix.

    Returns
    -------
    matrix : scipy.sparse.csr_array of shape (prod(out_shape), prod(in_shape))
        ``matrix @ x.ravel()`` equals ``F.interpolate(x[None], ...).ravel()``.
    out_shape : tuple of int
        ``(C, *spatial_out)``.

    Notes
    -----
    ``antialias=True`` is not supported. Weights are computed in float64; for
    float32 inputs PyTorch computes the 'linear' family's coordinates in
    float32, which differs from the float64 weights by rounding only.

    Examples
    --------
    >>> A, out_shape = interpolate_matrix((1, 2), scale_factor=2, mode="linear")
    >>> out_shape
    (1, 4)
    >>> A.toarray()
    array([[1.  , 0.  ],
           [0.75, 0.25],
           [0.25, 0.75],
           [0.  , 1.  ]])
    """
    spatial, out, scales, align = _resolve(
        in_shape, size, scale_factor, mode, align_corners, recompute_scale_factor
    )
    axes = [
        interpolation_1d(n_in, n_out, mode, align, scale, len(spatial))
        for n_in, n_out, scale in zip(spatial, out, scales)
    ]
    return kron_csr(int(in_shape[0]), axes, dtype), (int(in_shape[0]), *out)


def interpolate_layer(
    in_shape, ctx: BuildContext, *, size=None, scale_factor=None, mode="nearest",
    align_corners=None, recompute_scale_factor=None, antialias=False,
) -> LayerMatrix:  # fmt: skip
    """LayerMatrix of one ``F.interpolate`` call, with errors naming ``ctx.path``."""
    if antialias:
        raise UnsupportedLayerError(
            f"interpolation at {ctx.path!r} uses antialias=True, which is not "
            f"supported; only antialias=False has a matrix here"
        )
    try:
        matrix, out_shape = interpolate_matrix(
            in_shape,
            size=size,
            scale_factor=scale_factor,
            mode=mode,
            align_corners=align_corners,
            recompute_scale_factor=recompute_scale_factor,
            dtype=ctx.dtype,
        )
    except ValueError as exc:
        raise ValueError(f"interpolation at {ctx.path!r}: {exc}") from exc
    return LayerMatrix(matrix, out_shape)


def upsample_matrix(module: nn.Upsample, in_shape, ctx: BuildContext) -> LayerMatrix:
    """LayerMatrix of an ``nn.Upsample`` module in any mode."""
    return interpolate_layer(
        in_shape,
        ctx,
        size=module.size,
        scale_factor=module.scale_factor,
        mode=module.mode,
        align_corners=module.align_corners,
        recompute_scale_factor=getattr(module, "recompute_scale_factor", None),
    )
