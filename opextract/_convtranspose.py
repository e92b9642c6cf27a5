"""Transposed convolutions: ``nn.ConvTranspose1d``, ``2d`` and ``3d``.

Input entry ``(ci, i)`` adds ``w[ci, co, k] * x`` to output position
``o = i * stride - padding + k * dilation``. Per spatial axis, a small table
lists for every output position the ``(i, k)`` pairs that reach it, in
increasing ``i``; a row's nonzeros are then the product of the per-axis
counts (times the input channels of its group), so the CSR arrays are
counted and allocated exactly, and a Numba kernel fills them in parallel
over (output channel, output depth) with sorted column indices. The result
equals the transpose of :func:`opextract.conv_matrix` on the output shape,
which the tests check.

``output_padding`` only lengthens the output; the extra positions receive
no input entry when no tap reaches them.
"""

from __future__ import annotations

import math
import operator

import numba
import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from opextract._registry import BuildContext, LayerMatrix, register
from opextract._separable import csr
from opextract._validate import check_bytes, check_dtype, csr_bytes, int_tuple

__all__ = ["conv_transpose_matrix"]


def conv_transpose_matrix(
    weight: np.ndarray | torch.Tensor,
    in_shape: tuple[int, ...],
    *,
    stride=1,
    padding=0,
    output_padding=0,
    dilation=1,
    groups: int = 1,
    dtype=np.float64,
    _where: str = "conv_transpose_matrix",
) -> tuple[sp.csr_array, tuple[int, ...]]:
    """Matrix of a 1-, 2- or 3-D transposed convolution, as in torch.

    Parameters
    ----------
    weight : ndarray or torch.Tensor of shape (C_in, C_out / groups, k_1, ..., k_d)
        Transposed-convolution weight (PyTorch's layout); the number of kernel
        axes (1, 2 or 3) selects the dimension.
    in_shape : tuple of int
        Shape of one input sample, ``(C_in, *spatial)``.
    stride, padding, output_padding, dilation : int or tuple of int
        As in ``torch.nn.ConvTranspose2d``; ``output_padding`` must be smaller
        than the stride or the dilation on each axis.
    groups : int
        Number of channel groups.
    dtype : {numpy.float64, numpy.float32}
        Value dtype of the matrix.

    Returns
    -------
    matrix : scipy.sparse.csr_array of shape (prod(out_shape), prod(in_shape))
        ``matrix @ x.ravel()`` equals ``conv_transpose(x[None]).ravel()``.
    out_shape : tuple of int
        ``(C_out, *spatial_out)`` with ``spatial_out = (n - 1) * stride -
        2 * padding + dilation * (kernel_size - 1) + output_padding + 1``.

    Examples
    --------
    >>> import numpy as np
    >>> w = np.ones((1, 1, 2))
    >>> A, out_shape = conv_transpose_matrix(w, (1, 3), stride=2)
    >>> out_shape
    (1, 6)
    >>> A.toarray()
    array([[1., 0., 0.],
           [1., 0., 0.],
           [0., 1., 0.],
           [0., 1., 0.],
           [0., 0., 1.],
           [0., 0., 1.]])
    """
    dtype = check_dtype(dtype)
    w = weight.detach().cpu().numpy() if isinstance(weight, torch.Tensor) else weight
    w = np.asarray(w)
    if w.ndim not in (3, 4, 5):
        raise ValueError(
            "weight must have shape (C_in, C_out / groups, *kernel_size) with 1, 2 "
            f"or 3 kernel axes; got shape {w.shape}"
        )
    nd = w.ndim - 2
    kernel = w.shape[2:]
    stride = int_tuple(stride, nd, "stride")
    padding = int_tuple(padding, nd, "padding")
    output_padding = int_tuple(output_padding, nd, "output_padding")
    dilation = int_tuple(dilation, nd, "dilation")
    groups = operator.index(groups)
    if any(s <= 0 for s in stride) or any(d <= 0 for d in dilation):
        raise ValueError(
            f"stride and dilation must be positive; got stride={stride}, "
            f"dilation={dilation}"
        )
    if any(p < 0 for p in padding):
        raise ValueError(f"padding must be non-negative; got {padding}")
    if any(
        not 0 <= op < max(s, d) for op, s, d in zip(output_padding, stride, dilation)
    ):
        raise ValueError(
            "output_padding must be non-negative and smaller than either stride or "
            f"dilation; got output_padding={output_padding}, stride={stride}, "
            f"dilation={dilation}"
        )
    c_in = int(w.shape[0])
    if groups <= 0 or c_in % groups:
        raise ValueError(
            f"groups must be a positive divisor of C_in={c_in}; got {groups}"
        )
    names = {1: "(C, L)", 2: "(C, H, W)", 3: "(C, D, H, W)"}[nd]
    try:
        shape = tuple(operator.index(s) for s in in_shape)
    except TypeError:
        shape = ()
    if len(shape) != nd + 1 or any(s <= 0 for s in shape) or shape[0] != c_in:
        raise ValueError(
            f"input_shape of {_where} must be {names} with positive sizes and "
            f"C={c_in} (the weight's first axis); got {tuple(in_shape)!r}"
        )
    spatial = shape[1:]
    out_spatial = tuple(
        (n - 1) * s - 2 * p + d * (k - 1) + op + 1
        for n, s, p, d, k, op in zip(
            spatial, stride, padding, dilation, kernel, output_padding
        )
    )
    if any(n < 1 for n in out_spatial):
        raise ValueError(
            f"input_shape {shape} is too small for {_where} (kernel_size={kernel}, "
            f"stride={stride}, padding={padding}): the output would have spatial "
            f"size {out_spatial}"
        )
    out_shape = (int(w.shape[1]) * groups, *out_spatial)

    w5 = w.reshape(w.shape[:2] + (1,) * (3 - nd) + tuple(kernel)).astype(dtype)
    pad3 = lambda v, fill: (fill,) * (3 - nd) + tuple(v)  # noqa: E731
    taps = [
        _axis_taps(n, k, s, p, d, m)
        for n, k, s, p, d, m in zip(
            pad3(spatial, 1), w5.shape[2:], pad3(stride, 1), pad3(padding, 0),
            pad3(dilation, 1), pad3(out_spatial, 1),
        )
    ]  # fmt: skip
    matrix = _build(w5, groups, pad3(spatial, 1), pad3(out_spatial, 1), taps, dtype)
    return matrix, out_shape


def _axis_taps(n_in, k, stride, pad, dilation, n_out):
    """For each output position o of one axis: the (input, kernel offset) pairs
    with ``i * stride - pad + kk * dilation == o``, by increasing input ``i``.

    Returned as ``(ptr, inputs, offsets)``, CSR-like over output positions.
    """
    i, kk = np.meshgrid(np.arange(n_in), np.arange(k), indexing="ij")
    o = (i * stride - pad + kk * dilation).ravel()
    i, kk = i.ravel(), kk.ravel()
    keep = (o >= 0) & (o < n_out)
    o, i, kk = o[keep], i[keep], kk[keep]
    order = np.lexsort((i, o))
    ptr = np.zeros(n_out + 1, dtype=np.int64)
    np.cumsum(np.bincount(o, minlength=n_out), out=ptr[1:])
    return ptr, i[order].astype(np.int64), kk[order].astype(np.int64)


def _build(w5, groups, spatial, out_spatial, taps, dtype) -> sp.csr_array:
    c_in, c_out_g = w5.shape[:2]
    c_out, c_in_g = c_out_g * groups, c_in // groups
    n_rows = c_out * math.prod(out_spatial)
    n_cols = c_in * math.prod(spatial)

    # First pass: the nonzeros of a row are c_in_g times the product of the
    # per-axis tap counts of its output position.
    counts = [np.diff(ptr) for ptr, _, _ in taps]
    per_position = np.multiply.outer(np.multiply.outer(counts[0], counts[1]), counts[2])
    nnz = c_in_g * c_out * int(per_position.sum())
    size, idx = csr_bytes(nnz, n_rows, n_cols, dtype)
    check_bytes(size, f"a transposed-convolution matrix ({n_rows} x {n_cols})")
    indptr = np.zeros(n_rows + 1, dtype=idx)
    np.cumsum(np.tile(per_position.ravel() * c_in_g, c_out), out=indptr[1:])

    indices = np.empty(nnz, dtype=idx)
    data = np.empty(nnz, dtype=dtype)
    flat = [a for axis in taps for a in axis]
    _fill(w5, c_in_g, c_out_g, *flat, np.array(spatial, dtype=np.int64), indptr,
          indices, data)  # fmt: skip
    return csr(data, indices, indptr, (n_rows, n_cols))


@numba.njit(cache=True, parallel=True)
def _fill(w, c_in_g, c_out_g, pd, id_, kd, ph, ih, kh, pw, iw, kw, spatial, indptr,
          indices, data):  # fmt: skip
    depth, height, width = spatial[0], spatial[1], spatial[2]
    n_d, n_h, n_w = pd.size - 1, ph.size - 1, pw.size - 1
    c_out = w.shape[1] * (w.shape[0] // c_in_g)
    # Rows of one (output channel, output depth) pair are independent of all
    # others: each task writes its own slice of indices/data.
    for task in numba.prange(c_out * n_d):
        co = task // n_d
        od = task - co * n_d
        g = co // c_out_g
        cog = co - g * c_out_g
        row = task * n_h * n_w
        for oh in range(n_h):
            for ow in range(n_w):
                pos = indptr[row]
                for ci in range(g * c_in_g, (g + 1) * c_in_g):
                    for a in range(pd[od], pd[od + 1]):
                        base_d = (ci * depth + id_[a]) * height
                        for b in range(ph[oh], ph[oh + 1]):
                            base = (base_d + ih[b]) * width
                            for c in range(pw[ow], pw[ow + 1]):
                                indices[pos] = base + iw[c]
                                data[pos] = w[ci, cog, kd[a], kh[b], kw[c]]
                                pos += 1
                row += 1


_TRANSPOSED = {nn.ConvTranspose1d: 1, nn.ConvTranspose2d: 2, nn.ConvTranspose3d: 3}


@register(*_TRANSPOSED)
def _conv_transpose(module: nn.Module, in_shape, ctx: BuildContext) -> LayerMatrix:
    if module.padding_mode != "zeros":
        raise ValueError(
            f"padding_mode of {type(module).__name__} at {ctx.path!r} must be "
            f"'zeros'; got {module.padding_mode!r}"
        )
    matrix, out_shape = conv_transpose_matrix(
        module.weight,
        in_shape,
        stride=module.stride,
        padding=module.padding,
        output_padding=module.output_padding,
        dilation=module.dilation,
        groups=module.groups,
        dtype=ctx.dtype,
        _where=f"{type(module).__name__} at {ctx.path!r}",
    )
    return LayerMatrix(matrix, out_shape, has_offset=module.bias is not None)
