"""Transposed convolutions: ``nn.ConvTranspose1d``, ``2d`` and ``3d``.

A transposed convolution is, by definition, the adjoint of the convolution
with the same weight, stride, padding, dilation and groups, taken on the
transposed convolution's output shape. Its matrix is therefore the transpose
of :func:`opextract.conv_matrix` on that shape: the convolution's matrix is
built by its Numba kernel and transposed into CSR in one linear pass.

``output_padding`` only lengthens the output. When it is at least the stride
(PyTorch allows that when the dilation is larger), the convolution on the
longer output yields more positions than the transposed convolution's input;
those rows are dropped before transposing.
"""

from __future__ import annotations

import operator

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from opextract._conv import conv_matrix
from opextract._registry import BuildContext, LayerMatrix, register
from opextract._separable import index_dtype, kron_csr
from opextract._validate import check_dtype

__all__ = ["conv_transpose_matrix"]


def _tuple(value, nd: int, name: str) -> tuple[int, ...]:
    try:
        if isinstance(value, (tuple, list)):
            values = tuple(operator.index(v) for v in value)
        else:
            values = (operator.index(value),) * nd
    except TypeError:
        values = None
    if values is None or len(values) != nd:
        raise ValueError(
            f"{name} must be an int or a tuple of {nd} ints; got {value!r}"
        )
    return values


def conv_transpose_matrix(
    weight,
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
    weight : ndarray or torch.Tensor of shape (C_in, C_out / groups, *kernel_size)
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
    stride = _tuple(stride, nd, "stride")
    padding = _tuple(padding, nd, "padding")
    output_padding = _tuple(output_padding, nd, "output_padding")
    dilation = _tuple(dilation, nd, "dilation")
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

    conv, conv_out = conv_matrix(
        w,
        out_shape,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        dtype=dtype,
    )
    if tuple(conv_out[1:]) != spatial:
        # output_padding >= stride: keep the convolution's first rows per axis.
        keep = _leading_block(conv_out, shape)
        conv = conv[keep]
    matrix = conv.T.tocsr()
    matrix.sort_indices()
    return matrix, out_shape


def _leading_block(big: tuple[int, ...], small: tuple[int, ...]) -> np.ndarray:
    """Flat indices, in ``big``'s compact order, of its leading ``small`` block."""
    axes = [
        sp.csr_array(np.eye(b, dtype=np.float64)[:s])
        for b, s in zip(big[1:], small[1:])
    ]
    block = kron_csr(small[0], axes, np.float64)
    idx = index_dtype(int(np.prod(big)))
    return block.indices.astype(idx)


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
