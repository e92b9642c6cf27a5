"""Fully connected layers and batch normalization in eval mode.

``Linear`` acts on the last axis of its input, so its matrix is
``I (x) W`` over the leading axes. ``BatchNorm1d/2d/3d`` in eval mode is the
affine map ``y = s * x + t`` per channel with ``s = gamma / sqrt(var + eps)``
and ``t = beta - mean * s``: a diagonal matrix (its linear part) plus an
offset, reported like a bias. In training mode, or without running
statistics, batch normalization depends on the batch and has no matrix.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from opextract._errors import UnsupportedLayerError
from opextract._registry import BuildContext, LayerMatrix, register
from opextract._separable import diagonal, index_dtype
from opextract._validate import check_bytes, csr_bytes


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy()


@register(nn.Linear)
def _linear(module: nn.Linear, in_shape, ctx: BuildContext) -> LayerMatrix:
    if isinstance(module.weight, nn.parameter.UninitializedParameter):
        raise UnsupportedLayerError(
            f"layer {ctx.path!r} ({type(module).__name__}) is not initialized yet; "
            f"run one forward pass before exporting it"
        )
    n_out, n_in = module.weight.shape
    if len(in_shape) < 1 or in_shape[-1] != n_in:
        raise ValueError(
            f"input_shape of layer {ctx.path!r} (Linear with in_features={n_in}) "
            f"must end in {n_in}; got {tuple(in_shape)}"
        )
    lead = math.prod(in_shape[:-1])
    weight = _numpy(module.weight).astype(ctx.dtype)

    # Block-diagonal I_lead (x) W, written straight into CSR: row (b, o) holds
    # W[o, :] in columns b*n_in ... b*n_in + n_in - 1.
    nnz = lead * n_out * n_in
    size, _ = csr_bytes(nnz, lead * n_out, lead * n_in, ctx.dtype)
    check_bytes(size, f"the matrix of Linear at {ctx.path!r}")
    idx = index_dtype(nnz, lead * n_in)
    indptr = np.arange(0, nnz + 1, n_in, dtype=idx)
    cols = (
        np.arange(n_in, dtype=idx)[None, None, :]
        + (np.arange(lead, dtype=idx) * n_in)[:, None, None]
    )
    indices = np.broadcast_to(cols, (lead, n_out, n_in)).reshape(-1).copy()
    data = np.tile(weight.reshape(-1), lead)
    matrix = sp.csr_array((data, indices, indptr), shape=(lead * n_out, lead * n_in))
    return LayerMatrix(
        matrix=matrix,
        out_shape=(*in_shape[:-1], n_out),
        has_offset=module.bias is not None,
    )


@register(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
def _batch_norm(module: nn.modules.batchnorm._BatchNorm, in_shape, ctx: BuildContext):
    name = type(module).__name__
    if module.training:
        raise UnsupportedLayerError(
            f"layer {ctx.path!r} ({name}) is in training mode, where it normalizes "
            f"with the statistics of each batch; call model.eval() first"
        )
    if module.running_mean is None or module.running_var is None:
        raise UnsupportedLayerError(
            f"layer {ctx.path!r} ({name}) has track_running_stats=False, so it "
            f"normalizes with the statistics of each batch even in eval mode"
        )
    c = module.num_features
    ranks = {"BatchNorm1d": (1, 2), "BatchNorm2d": (3,), "BatchNorm3d": (4,)}
    allowed = ranks.get(name, (len(in_shape),))
    if len(in_shape) not in allowed or in_shape[0] != c:
        raise ValueError(
            f"input_shape of layer {ctx.path!r} ({name} with num_features={c}) must "
            f"have {' or '.join(map(str, allowed))} axes and {c} channels first; "
            f"got {tuple(in_shape)}"
        )

    scale = 1.0 / np.sqrt(_numpy(module.running_var) + module.eps)
    shift = -_numpy(module.running_mean) * scale
    if module.affine:
        scale = scale * _numpy(module.weight)
        shift = shift * _numpy(module.weight) + _numpy(module.bias)
    per_channel = math.prod(in_shape[1:])
    return LayerMatrix(
        matrix=diagonal(np.repeat(scale, per_channel), ctx.dtype),
        out_shape=tuple(in_shape),
        has_offset=bool(np.any(shift != 0)),
    )
