"""Convolution matrices: ``nn.Conv1d``, ``nn.Conv2d`` and ``nn.Conv3d``.

A convolution is separable in its index arithmetic: which input position an
output position reads through kernel offset ``k`` depends on one axis only.
The wrapper therefore computes, per spatial axis, a small table of the taps of
every output position (after padding and the padding mode), counts the
nonzeros of the matrix from these tables exactly, allocates the CSR arrays
once and lets a Numba kernel fill them in parallel over output rows.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
from numpy.typing import ArrayLike, DTypeLike
from torch import nn

from opextract import _kernels
from opextract._registry import BuildContext, LayerMatrix, register
from opextract._validate import (
    check_bytes,
    check_dtype,
    csr_bytes,
    index_dtype,
    int_tuple,
)

PADDING_MODES = ("zeros", "circular", "reflect", "replicate")

# Row templates are used while they hold at most this fraction of the matrix's
# entries (or _TEMPLATE_MIN entries, for small matrices); the tests lower both
# to reach the direct kernel.
_TEMPLATE_FRACTION = 0.25
_TEMPLATE_MIN = 1 << 16


def _as_array(weight) -> np.ndarray:
    if isinstance(weight, torch.Tensor):
        return weight.detach().cpu().numpy()
    return np.asarray(weight)


def _axis_taps(n_in, k, stride, pad_left, dilation, n_out, mode, source=None):
    """Per output position of one axis: distinct input positions and taps.

    Returns ``(ng, col, gs, tap)``: ``ng[o]`` distinct input positions
    ``col[o, :ng[o]]`` (increasing), the kernel offsets landing on
    ``col[o, j]`` being ``tap[o, gs[o, j]:gs[o, j + 1]]``. ``source`` maps
    the axis's positions to those of a coarser input that was upsampled by
    nearest neighbours before the convolution (the two are then one matrix).
    """
    o = np.arange(n_out)[:, None]
    pos = o * stride - pad_left + np.arange(k)[None, :] * dilation
    valid = np.ones(pos.shape, dtype=bool)
    if mode == "zeros":
        valid = (pos >= 0) & (pos < n_in)
    elif mode == "circular":
        pos = np.mod(pos, n_in)
    elif mode == "reflect":
        # Torch reflects without repeating the edge; padding < size is
        # checked by the caller, so one reflection suffices.
        pos = np.where(pos < 0, -pos, pos)
        pos = np.where(pos >= n_in, 2 * (n_in - 1) - pos, pos)
    else:
        pos = np.clip(pos, 0, n_in - 1)
    if source is not None:
        pos = np.where(valid, source[np.clip(pos, 0, n_in - 1)], 0)

    # Sort each output position's taps by input position (invalid ones last),
    # then mark the first tap of every run of equal positions.
    big = np.iinfo(np.int64).max
    keyed = np.where(valid, pos, big)
    order = np.argsort(keyed, axis=1, kind="stable")
    sorted_pos = np.take_along_axis(keyed, order, axis=1)
    n_valid = valid.sum(axis=1)
    starts = sorted_pos != big
    starts[:, 1:] &= sorted_pos[:, 1:] != sorted_pos[:, :-1]
    ng = starts.sum(axis=1).astype(np.int64)
    group = np.cumsum(starts, axis=1) - 1
    rows, cols = np.nonzero(starts)
    col = np.zeros((n_out, k), dtype=np.int64)
    col[rows, group[rows, cols]] = sorted_pos[rows, cols]
    gs = np.repeat(n_valid[:, None], k + 1, axis=1).astype(np.int64)
    gs[rows, group[rows, cols]] = cols
    # ``order`` holds the kernel offsets in position order; pad with zeros.
    tap = np.where(np.arange(k)[None, :] < n_valid[:, None], order, 0)
    tap = tap.astype(np.int64)
    return ng, col, gs, tap


def _axis_patterns(ng, col, gs, tap):
    """Group the output positions of one axis by their tap pattern.

    Returns ``(pid, base, (ngp, relp, gsp, tapp))``: the pattern id and the
    first input position of every output position, and per pattern the
    tables of :func:`_axis_taps` with input positions relative to the first.
    """
    n_out, k = tap.shape
    keys: dict[tuple, int] = {}
    pid = np.empty(n_out, dtype=np.int64)
    base = np.zeros(n_out, dtype=np.int64)
    for o in range(n_out):
        n = int(ng[o])
        if n:
            base[o] = col[o, 0]
        key = (
            n,
            tuple(col[o, :n] - base[o]),
            tuple(gs[o, : n + 1]),
            tuple(tap[o, : gs[o, n]]),
        )
        pid[o] = keys.setdefault(key, len(keys))
    n_pat = len(keys)
    ngp = np.zeros(n_pat, dtype=np.int64)
    relp = np.zeros((n_pat, k), dtype=np.int64)
    gsp = np.zeros((n_pat, k + 1), dtype=np.int64)
    tapp = np.zeros((n_pat, k), dtype=np.int64)
    for (n, rel, starts, taps), p in keys.items():
        ngp[p] = n
        relp[p, :n] = rel
        gsp[p, : n + 1] = starts
        tapp[p, : len(taps)] = taps
    return pid, base, (ngp, relp, gsp, tapp)


def _fill_from_templates(
    w5,
    cin_g,
    cout_g,
    in_dhw,
    out_dhw,
    patterns,
    row_len,
    n_combos,
    indptr,
    indices,
    data,
):
    tcols = np.zeros((n_combos, max(row_len, 1)), dtype=indices.dtype)
    tvals = np.zeros((w5.shape[0], n_combos, max(row_len, 1)), dtype=data.dtype)
    args = []
    for _pid, _base, tables in patterns:
        args += list(tables)
    _kernels.conv_templates(w5, cin_g, in_dhw, *args, tcols, tvals)
    (pid_d, base_d, _), (pid_h, base_h, ph), (pid_w, base_w, pw) = patterns
    _kernels.conv_fill_templates(
        cin_g,
        cout_g,
        in_dhw,
        out_dhw,
        pid_d,
        base_d,
        pid_h,
        base_h,
        pid_w,
        base_w,
        len(ph[0]),
        len(pw[0]),
        tcols,
        tvals,
        indptr,
        indices,
        data,
    )


def _resolve_padding(padding, kernel, dilation, stride, nd):
    """Left and right padding per axis from an int, a tuple or a string."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0,) * nd, (0,) * nd
        if padding == "same":
            if any(s != 1 for s in stride):
                raise ValueError(
                    f"padding='same' needs stride 1 on every axis; got stride={stride}"
                )
            total = [d * (k - 1) for k, d in zip(kernel, dilation)]
            left = tuple(t // 2 for t in total)
            return left, tuple(t - lo for t, lo in zip(total, left))
        raise ValueError(
            f"padding must be an int, a tuple of ints, 'same' or 'valid'; "
            f"got {padding!r}"
        )
    pads = int_tuple(padding, nd, "padding")
    if any(p < 0 for p in pads):
        raise ValueError(f"padding must be non-negative; got {padding!r}")
    return pads, pads


def conv_matrix(
    weight: ArrayLike | torch.Tensor,
    in_shape: tuple[int, ...],
    *,
    stride: int | tuple[int, ...] = 1,
    padding: int | tuple[int, ...] | str = 0,
    dilation: int | tuple[int, ...] = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
    dtype: DTypeLike = np.float64,
    max_bytes: int | None = None,
) -> tuple[sp.csr_array, tuple[int, ...]]:
    """Matrix of a 1-, 2- or 3-D convolution (cross-correlation, as in torch).

    Parameters
    ----------
    weight : ndarray or torch.Tensor of shape (C_out, C_in / groups, k_1, ..., k_d)
        Convolution weight; the number of kernel axes (1, 2 or 3) selects the
        dimension.
    in_shape : tuple of int
        Shape of one input sample, ``(C_in, *spatial)``.
    stride, dilation : int or tuple of int
        As in ``torch.nn.Conv2d``.
    padding : int, tuple of int, 'same' or 'valid'
        As in ``torch.nn.Conv2d``; 'same' puts the odd extra zero on the right.
    groups : int
        Number of channel groups.
    padding_mode : {'zeros', 'circular', 'reflect', 'replicate'}
        How the padding is filled, as in ``torch.nn.Conv2d``.
    dtype : {numpy.float64, numpy.float32}
        Value dtype of the matrix.
    max_bytes : int, optional
        Refuse (``OperatorTooLargeError``) a matrix estimated larger than this;
        default: the budget in force (``opextract`` default 4 GiB).

    Returns
    -------
    matrix : scipy.sparse.csr_array of shape (prod(out_shape), prod(in_shape))
        ``matrix @ x.ravel()`` equals ``conv(x[None]).ravel()``; column indices
        are sorted within each row; int32 indices when they fit.
    out_shape : tuple of int
        ``(C_out, *spatial_out)``.

    Examples
    --------
    >>> import numpy as np
    >>> w = np.arange(1.0, 10.0).reshape(1, 1, 3, 3)
    >>> A, out_shape = conv_matrix(w, (1, 4, 4), stride=2, padding=1)
    >>> A.shape, out_shape
    ((4, 16), (1, 2, 2))
    >>> A.toarray()[0, :6]
    array([5., 6., 0., 0., 8., 9.])
    """
    plan = _plan(
        weight,
        in_shape,
        stride,
        padding,
        dilation,
        groups,
        padding_mode,
        dtype,
        "conv_matrix",
    )
    return _build(plan, max_bytes)


@dataclass
class _Plan:
    """Everything the kernels need, after validation."""

    w5: np.ndarray
    tables: list
    in_dhw: np.ndarray
    out_dhw: np.ndarray
    out_shape: tuple[int, ...]
    cin_g: int
    groups: int
    n_rows: int
    n_cols: int
    nd: int
    where: str

    def axis_paths(self):
        """Per spatial axis ``(k, o, tap, pos)``: every valid tap as a pair."""
        out = []
        for ng, col, gs, tap in self.tables[3 - self.nd :]:
            o_list, t_list, p_list = [], [], []
            for o in range(len(ng)):
                for j in range(ng[o]):
                    for t in range(gs[o, j], gs[o, j + 1]):
                        o_list.append(o)
                        t_list.append(tap[o, t])
                        p_list.append(col[o, j])
            out.append(
                (
                    tap.shape[1],
                    np.array(o_list, dtype=np.int64),
                    np.array(t_list, dtype=np.int64),
                    np.array(p_list, dtype=np.int64),
                )
            )
        return out


def dense_channels(weight: np.ndarray, groups: int) -> np.ndarray:
    """A grouped kernel ``(C_out, C_in / groups, *k)`` as ``(C_out, C_in, *k)``
    with zeros between the groups."""
    if groups == 1:
        return weight
    cout, cin_g = weight.shape[:2]
    cout_g = cout // groups
    dense = np.zeros((cout, cin_g * groups) + weight.shape[2:], dtype=weight.dtype)
    for g in range(groups):
        rows = slice(g * cout_g, (g + 1) * cout_g)
        dense[rows, g * cin_g : (g + 1) * cin_g] = weight[rows]
    return dense


def dense_weight(plan: _Plan) -> np.ndarray:
    """The plan's weight with dense channels: zeros between the groups."""
    return dense_channels(plan.w5, plan.groups)


def plan_from_paths(weight, paths, in_spatial, out_spatial, where) -> _Plan:
    """A plan for a structured map given by per-axis tap pairs and a kernel.

    ``weight`` of shape (C_out, C_in, k_d, k_h, k_w) with dense channels;
    ``paths`` per axis ``(k, o, tap, pos)`` for the 1 to 3 spatial axes.
    """
    nd = len(paths)
    pad_axes = 3 - nd
    unit = (1, np.zeros(1, np.int64), np.zeros(1, np.int64), np.zeros(1, np.int64))
    tables = []
    for (_k, o, tap, pos), n_out in zip(
        [unit] * pad_axes + list(paths), (1,) * pad_axes + tuple(out_spatial)
    ):
        order = np.lexsort((tap, pos, o))
        o, tap, pos = o[order], tap[order], pos[order]
        bounds = np.searchsorted(o, np.arange(n_out + 1))
        ng = np.zeros(n_out, dtype=np.int64)
        width = max(int(np.diff(bounds).max(initial=0)), 1)
        col = np.zeros((n_out, width), dtype=np.int64)
        gs = np.zeros((n_out, width + 1), dtype=np.int64)
        taps = np.zeros((n_out, width), dtype=np.int64)
        for i in range(n_out):
            a, b = bounds[i], bounds[i + 1]
            p = pos[a:b]
            distinct, starts = np.unique(p, return_index=True)
            ng[i] = len(distinct)
            col[i, : len(distinct)] = distinct
            gs[i, : len(distinct)] = starts
            gs[i, len(distinct) :] = b - a
            taps[i, : b - a] = tap[a:b]
        tables.append((ng, col, gs, taps))
    cout, cin = weight.shape[:2]
    out_shape = (cout, *out_spatial)
    in_dhw = np.array((1,) * pad_axes + tuple(in_spatial), dtype=np.int64)
    out_dhw = np.array((1,) * pad_axes + tuple(out_spatial), dtype=np.int64)
    return _Plan(
        np.ascontiguousarray(weight), tables, in_dhw, out_dhw, out_shape, cin, 1,
        int(np.prod(out_shape)), cin * int(np.prod(in_spatial)), nd, where,
    )  # fmt: skip


def virtual_rows(plan: _Plan):
    """The matrix of ``plan`` as row templates and per-row shifts, unbuilt.

    Returns ``(templates, row_rep, row_shift)``: row ``r`` of the matrix is
    row ``row_rep[r]`` of the CSR array ``templates`` with every column index
    plus ``row_shift[r]``. None when the tap patterns are too many for
    templates to pay off. Lets products use a convolution's rows without
    allocating its matrix.
    """
    w5, tables = plan.w5, plan.tables
    cout, cin_g = w5.shape[0], plan.cin_g
    patterns = [_axis_patterns(*t) for t in tables]
    n_pat = [len(p[2][0]) for p in patterns]
    n_combos = int(np.prod(n_pat))
    row_len = cin_g * int(np.prod([t[0].max(initial=0) for t in tables]))
    if n_combos * row_len * cout > max(plan.n_rows * row_len * _TEMPLATE_FRACTION, 1):
        return None
    idx = index_dtype(max(plan.n_cols, n_combos * row_len * cout))
    tcols = np.zeros((n_combos, max(row_len, 1)), dtype=idx)
    tvals = np.zeros((cout, n_combos, max(row_len, 1)), dtype=w5.dtype)
    args = []
    for _pid, _base, ptables in patterns:
        args += list(ptables)
    _kernels.conv_templates(w5, cin_g, plan.in_dhw, *args, tcols, tvals)

    # Length of each combination's template: taps per axis times channels.
    lengths = cin_g * _outer_product([p[2][0] for p in patterns])
    keep = np.arange(tcols.shape[1])[None, :] < lengths[:, None]
    counts = np.tile(lengths, cout)
    indptr = np.zeros(len(counts) + 1, dtype=index_dtype(int(counts.sum())))
    np.cumsum(counts, out=indptr[1:])
    indices = np.broadcast_to(tcols, tvals.shape)[np.broadcast_to(keep, tvals.shape)]
    data = tvals[np.broadcast_to(keep, tvals.shape)]
    templates = sp.csr_array(
        (data, indices.astype(idx), indptr), shape=(cout * n_combos, plan.n_cols)
    )

    d_in, h_in, w_in = (int(v) for v in plan.in_dhw)
    cout_g = cout // plan.groups
    combo = _outer_sum([p[0] for p in patterns], n_pat)
    base = _outer_sum([p[1] for p in patterns], [d_in, h_in, w_in])
    channel = np.arange(cout)
    row_rep = (channel[:, None] * n_combos + combo[None, :]).reshape(-1)
    group_base = (channel // cout_g) * cin_g * d_in * h_in * w_in
    row_shift = (group_base[:, None] + base[None, :]).reshape(-1)
    return templates, row_rep, row_shift


def _outer_product(per_axis) -> np.ndarray:
    out = np.ones(1, dtype=np.int64)
    for values in per_axis:
        out = (out[:, None] * values[None, :]).reshape(-1)
    return out


def _outer_sum(per_axis, sizes) -> np.ndarray:
    """Flat index ``((a_0 * n_1 + a_1) * n_2 + a_2)`` over all combinations."""
    out = np.zeros(1, dtype=np.int64)
    for values, size in zip(per_axis, sizes):
        out = (out[:, None] * size + values[None, :]).reshape(-1)
    return out


def _plan(
    weight,
    in_shape,
    stride,
    padding,
    dilation,
    groups,
    padding_mode,
    dtype,
    _where,
    sources=None,
    coarse=None,
) -> _Plan:
    """Validate a convolution's arguments and compute its per-axis tables.

    ``sources``/``coarse``: per-axis maps from ``in_shape``'s positions to a
    coarse input of spatial shape ``coarse`` that nearest upsampling turned
    into ``in_shape`` (the matrix then maps the coarse input).
    """
    dtype = check_dtype(dtype)
    w = _as_array(weight)
    if w.ndim not in (3, 4, 5):
        raise ValueError(
            "weight must have shape (C_out, C_in / groups, *kernel_size) with 1, "
            f"2 or 3 kernel axes; got shape {w.shape}"
        )
    nd = w.ndim - 2
    kernel = tuple(int(k) for k in w.shape[2:])
    stride = int_tuple(stride, nd, "stride")
    dilation = int_tuple(dilation, nd, "dilation")
    if any(s <= 0 for s in stride):
        raise ValueError(f"stride must be positive; got {stride}")
    if any(d <= 0 for d in dilation):
        raise ValueError(f"dilation must be positive; got {dilation}")
    groups = operator.index(groups)
    cout, cin_g = int(w.shape[0]), int(w.shape[1])
    if groups <= 0 or cout % groups:
        raise ValueError(
            f"groups must be a positive divisor of C_out={cout}; got {groups}"
        )
    if padding_mode not in PADDING_MODES:
        raise ValueError(
            "padding_mode must be one of 'zeros', 'circular', 'reflect', "
            f"'replicate'; got {padding_mode!r}"
        )
    pad_left, pad_right = _resolve_padding(padding, kernel, dilation, stride, nd)

    names = {1: "(C, L)", 2: "(C, H, W)", 3: "(C, D, H, W)"}[nd]
    try:
        shape = tuple(operator.index(s) for s in in_shape)
    except TypeError:
        shape = ()
    if len(shape) != nd + 1 or any(s <= 0 for s in shape):
        raise ValueError(
            f"input_shape must be {names} with positive sizes for {_where}; "
            f"got {tuple(in_shape) if np.iterable(in_shape) else in_shape!r}"
        )
    if shape[0] != cin_g * groups:
        raise ValueError(
            f"input_shape {shape} has {shape[0]} channels but {_where} needs "
            f"in_channels={cin_g * groups}"
        )
    spatial = shape[1:]
    out_spatial = []
    for n, k, s, d, lo, hi in zip(
        spatial, kernel, stride, dilation, pad_left, pad_right
    ):
        extent = d * (k - 1) + 1
        if n + lo + hi < extent:
            raise ValueError(
                f"input_shape {shape} is too small for {_where}: spatial size {n} "
                f"plus padding ({lo}, {hi}) is below the dilated kernel extent "
                f"{extent}"
            )
        if padding_mode == "reflect" and max(lo, hi) >= n:
            raise ValueError(
                f"input_shape {shape} is too small for reflect padding "
                f"{max(lo, hi)} in {_where}: padding must be below the size {n}"
            )
        if padding_mode == "circular" and max(lo, hi) > n:
            raise ValueError(
                f"input_shape {shape} is too small for circular padding "
                f"{max(lo, hi)} in {_where}: padding must not exceed the size {n}"
            )
        out_spatial.append((n + lo + hi - extent) // s + 1)
    out_shape = (cout, *out_spatial)

    # Pad the dimension to 3 with unit axes so that one kernel serves all.
    pad_axes = 3 - nd
    w5 = np.ascontiguousarray(
        w.reshape((cout, cin_g) + (1,) * pad_axes + kernel), dtype=dtype
    )
    dims = [(1, 1, 1, 0, 1, 1)] * pad_axes + list(
        zip(spatial, kernel, stride, pad_left, dilation, out_spatial)
    )
    srcs = [None] * 3 if sources is None else [None] * pad_axes + list(sources)
    tables = [_axis_taps(*dim, padding_mode, src) for dim, src in zip(dims, srcs)]
    in_spatial = spatial if coarse is None else tuple(coarse)
    in_dhw = np.array((1,) * pad_axes + tuple(in_spatial), dtype=np.int64)
    out_dhw = np.array([dim[5] for dim in dims], dtype=np.int64)
    return _Plan(
        w5,
        tables,
        in_dhw,
        out_dhw,
        out_shape,
        cin_g,
        groups,
        int(np.prod(out_shape)),
        shape[0] * int(np.prod(in_spatial)),
        nd,
        _where,
    )


def _build(plan: _Plan, max_bytes=None) -> tuple[sp.csr_array, tuple[int, ...]]:
    """Count, allocate exactly and fill the CSR arrays of a planned convolution."""
    w5, tables, in_dhw, out_dhw = plan.w5, plan.tables, plan.in_dhw, plan.out_dhw
    cout, cin_g, groups = w5.shape[0], plan.cin_g, plan.groups
    n_rows, n_cols, dtype = plan.n_rows, plan.n_cols, w5.dtype
    nnz = cout * cin_g * int(np.prod([t[0].sum() for t in tables]))
    size, idx = csr_bytes(nnz, n_rows, n_cols, dtype)
    check_bytes(size, f"the matrix of {plan.where} ({n_rows} x {n_cols})", max_bytes)

    indptr = np.empty(n_rows + 1, dtype=idx)
    indices = np.empty(nnz, dtype=idx)
    data = np.empty(nnz, dtype=dtype)
    ng = [t[0] for t in tables]
    _kernels.conv_indptr(indptr, cout, *out_dhw, cin_g, *ng)
    cout_g = cout // groups
    patterns = [_axis_patterns(*t) for t in tables]
    n_combos = int(np.prod([len(p[2][0]) for p in patterns]))
    row_len = cin_g * int(np.prod([t[0].max(initial=0) for t in tables]))
    if n_combos * row_len * cout <= max(nnz * _TEMPLATE_FRACTION, _TEMPLATE_MIN):
        _fill_from_templates(
            w5,
            cin_g,
            cout_g,
            in_dhw,
            out_dhw,
            patterns,
            row_len,
            n_combos,
            indptr,
            indices,
            data,
        )
    else:
        # Too many distinct tap patterns (small inputs with circular padding,
        # for instance): templates would cost as much as the matrix itself.
        args = []
        for ngx, colx, gsx, tapx in tables:
            args += [ngx, colx, gsx, tapx]
        _kernels.conv_fill_general(
            w5, cin_g, cout_g, in_dhw, out_dhw, *args, indptr, indices, data
        )
    matrix = sp.csr_array((data, indices, indptr), shape=(n_rows, n_cols))
    matrix.has_sorted_indices = True
    return matrix, plan.out_shape


def conv2d_matrix(
    weight: ArrayLike | torch.Tensor,
    in_shape: tuple[int, int, int],
    *,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] | str = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
    dtype: DTypeLike = np.float64,
    max_bytes: int | None = None,
) -> tuple[sp.csr_array, tuple[int, int, int]]:
    """Matrix of a 2-D convolution; :func:`conv_matrix` restricted to 2-D.

    Parameters
    ----------
    weight : ndarray or torch.Tensor of shape (C_out, C_in / groups, kH, kW)
    in_shape : tuple of int
        ``(C_in, H, W)``.
    stride, padding, dilation, groups, padding_mode, dtype, max_bytes
        As in :func:`conv_matrix`.

    Returns
    -------
    matrix : scipy.sparse.csr_array of shape (C_out * H_out * W_out, C_in * H * W)
    out_shape : tuple of int
        ``(C_out, H_out, W_out)``.

    Examples
    --------
    >>> import numpy as np
    >>> A, out_shape = conv2d_matrix(np.ones((2, 1, 3, 3)), (1, 5, 5), padding=1)
    >>> A.shape, out_shape, A.nnz
    ((50, 25), (2, 5, 5), 338)
    """
    shape = np.shape(weight)
    if len(shape) != 4:
        raise ValueError(
            "weight must have shape (C_out, C_in / groups, kH, kW); "
            f"got shape {tuple(shape)}"
        )
    plan = _plan(
        weight,
        in_shape,
        stride,
        padding,
        dilation,
        groups,
        padding_mode,
        dtype,
        "conv2d_matrix",
    )
    return _build(plan, max_bytes)


def module_plan(
    module: nn.Module, in_shape, ctx: BuildContext, *, sources=None, coarse=None
) -> _Plan:
    """Plan of a torch convolution module (optionally after an upsampling)."""
    where = f"{type(module).__name__} at {ctx.path!r}"
    return _plan(
        module.weight,
        in_shape,
        module.stride,
        module.padding,
        module.dilation,
        module.groups,
        module.padding_mode,
        ctx.dtype,
        where,
        sources,
        coarse,
    )


@register(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def _conv_handler(module: nn.Module, in_shape, ctx: BuildContext) -> LayerMatrix:
    matrix, out_shape = _build(module_plan(module, in_shape, ctx))
    return LayerMatrix(matrix, out_shape, has_offset=module.bias is not None)
