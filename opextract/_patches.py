"""Operators of convolution chains and graphs by windowed reverse-mode products.

At a point, a chain of convolutions, nearest upsamplings and elementwise
activations has a Jacobian whose row for one output entry lives, at every
layer, in a window of that layer: one position at the output, and going back
through a convolution of stride ``s``, dilation ``d`` and ``k`` taps a window
of ``w`` positions becomes one of ``(w - 1) s + d (k - 1) + 1``. The windows
of all rows have the same size at each layer, only their starts differ, so
all rows go back through a layer together as dense *patches* of shape
``(*window, rows, channels)``:

* a convolution is one BLAS product of the patches with the kernel per tap,
  ``(window * rows, C_out) @ (C_out, C_in)``, added into the wider window at
  the tap's offset (one product for all taps when ``C_in`` is small);
* a nearest upsampling first sums the patch over the fine positions that
  read one coarse entry through one tap; fused with the convolution after it,
  the kernel product then runs on the coarse grid: ``(coarse window * rows,
  C_out * taps) @ (C_out * taps, C_in)``;
* an activation at the point multiplies the patch by its slopes, read in
  each row's window (zero outside the feature map).

Entries of a window that fall outside the feature map stand for zero
padding: they are kept at zero and never become columns, and a window wider
than its feature map is cropped to it. Every entry of the result is a sum of
products of the layers' own values, accumulated by BLAS; nothing is read off
approximately. The cost is the size of the windows times the channels,
whatever the activation pattern, so this also suits downsampling networks
whose bottleneck reaches the whole output, where coloring the inputs
(``_compose.compression_plan``) saves little.

An axis of a structured layer is the index map ``pos = (num * o + dil * tap -
pad) // den``: ``den = 1`` for a convolution (``num`` its stride), ``den``
the factor of a nearest upsampling by an integer factor (alone, or fused
with the convolution after it). In a chain the map is read from the module
and checked against the layer's own tap pairs (``ChainLayer.paths``); in a
graph (:func:`graph_plan`) each step is checked against the node's matrix on
sampled rows. A layer that does not match exactly (circular padding, a
fractional upsampling, ...) makes the model fall back to the other paths.

Graphs go back node by node in reverse topological order: a sum passes the
patches to each input times its weight, a channel concatenation splits them,
and where patches from two consumers of one node meet, each row's two
windows are merged into one that covers both.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from opextract import _conv, _kernels
from opextract._compose import _diagonal_values, diagonal_of
from opextract._validate import check_bytes, csr_bytes

logger = logging.getLogger(__name__)

#: Bytes of the largest patch array of one block of rows.
BLOCK_BYTES = 128 * 2**20


@dataclass(frozen=True)
class _Axis:
    """``pos = (num * o + dil * tap - pad) // den`` along one spatial axis.

    With ``exact`` (a transposed convolution of stride ``den``) only the
    pairs where the division leaves no remainder connect.
    """

    num: int
    den: int
    dil: int
    pad: int
    k: int
    n_in: int
    n_out: int
    exact: bool = False

    def width(self, w: int) -> int:
        """Window width on the input side of a window of ``w`` outputs."""
        reach = self.den - 1 + self.num * (w - 1) + self.dil * (self.k - 1)
        return reach // self.den + 1

    def matches(self, paths) -> bool:
        k, o, tap, pos = paths
        if k != self.k:
            return False
        oo, tt = np.meshgrid(np.arange(self.n_out), np.arange(self.k), indexing="ij")
        fine = self.num * oo + self.dil * tt - self.pad
        p = np.floor_divide(fine, self.den)
        valid = (fine >= 0) & (p < self.n_in)
        ours = np.stack([oo[valid], tt[valid], p[valid]])
        theirs = np.stack([o, tap, pos])
        if ours.shape != theirs.shape:
            return False
        order = np.lexsort(ours[::-1])
        other = np.lexsort(theirs[::-1])
        return bool(np.array_equal(ours[:, order], theirs[:, other]))


@dataclass
class _Map:
    """A structured layer: its per-axis maps and kernel ``(C_out, C_in, *k)``."""

    axes: list
    weight: np.ndarray
    #: The kernel is one identity tap (a nearest upsampling alone).
    copies: bool = field(init=False)

    def __post_init__(self):
        w = self.weight
        self.copies = bool(
            w.shape[0] == w.shape[1]
            and math.prod(w.shape[2:]) == 1
            and np.array_equal(w.reshape(w.shape[:2]), np.eye(w.shape[0]))
        )


@dataclass
class _Diag:
    """An elementwise layer at the point: its slopes ``(C, *n)``."""

    values: np.ndarray


def _conv_params(module, nd: int):
    """(stride, dilation, left padding) of a zero-padded torch convolution."""
    from opextract._chain import _is_conv
    from opextract._conv import _resolve_padding

    if not _is_conv(module) or module.padding_mode != "zeros":
        return None
    dilation, stride = tuple(module.dilation), tuple(module.stride)
    left, _ = _resolve_padding(module.padding, module.kernel_size, dilation, stride, nd)
    return stride, dilation, left


def _axes_of(layer):
    """The per-axis maps of a structured chain layer, or None."""
    from opextract._chain import _is_conv

    nd = len(layer.paths)
    in_shape, out_shape = layer.in_shape[1:], layer.built.out_shape[1:]
    if _is_conv(layer.module):
        params = _conv_params(layer.module, nd)
        if params is None:
            return None
    else:
        params = ((1,) * nd, (1,) * nd, (0,) * nd)
    axes = []
    for axis in range(nd):
        k = int(layer.paths[axis][0])
        num, dil, pad = (int(p[axis]) for p in params)
        n_in, n_out = int(in_shape[axis]), int(out_shape[axis])
        fine = num * (n_out - 1) + dil * (k - 1) - pad + 1
        # The upsampling factor is the one whose map reproduces the taps.
        found = None
        for den in range(1, max(1, fine) + 1):
            candidate = _Axis(num, den, dil, pad, k, n_in, n_out)
            if candidate.matches(layer.paths[axis]):
                found = candidate
                break
        if found is None:
            return None
        axes.append(found)
    return axes


def plan(layers):
    """The chain as patch steps (forward order), or None when a layer is not a
    zero-padded convolution, a nearest upsampling by integer factors (fused
    with a convolution or alone) or an elementwise diagonal.

    Transposed convolutions are left to the composed factors here: in the
    chains measured, their windows soon covered whole feature maps, and the
    composition was faster (graphs, whose composition is slower, take them).
    """
    steps = []
    nd = len(layers[0].in_shape) - 1
    if nd < 1:
        return None
    for layer in layers:
        d = _diagonal_values(layer)
        if d is not None:
            steps.append(_Diag(d.reshape(layer.in_shape)))
            continue
        if layer.paths is None or len(layer.paths) != nd or layer.weight is None:
            return None
        axes = _axes_of(layer)
        if axes is None:
            logger.debug("layer %s: no windowed map", layer.path)
            return None
        weight = np.asarray(layer.weight, dtype=np.float64)
        weight = weight.reshape(weight.shape[:2] + weight.shape[2 + 3 - nd :])
        steps.append(_Map(axes, weight))
    return steps


def _widths(steps, nd):
    """Per step (backward order): the window widths after it, the bytes per
    row of the arrays it makes and its multiply-adds per row (logged)."""
    w = (1,) * nd
    out = []
    for step in reversed(steps):
        if isinstance(step, _Diag):
            c = step.values.shape[0]
            out.append((w, 16 * c * math.prod(w), c * math.prod(w)))
            continue
        c_out, c_in = step.weight.shape[:2]
        taps = math.prod(a.k for a in step.axes)
        new = tuple(a.width(wi) for a, wi in zip(step.axes, w))
        if all(a.den == 1 for a in step.axes):
            # One product per tap at the output window (see _back_map).
            macs = math.prod(w) * c_out * taps * c_in
            inner = math.prod(w) * taps * c_in
        else:
            macs = math.prod(new) * taps * c_out * c_in
            widest = math.prod(max(a, b) for a, b in zip(w, new))
            inner = 2 * widest * taps * c_out
        # Made at the full width, then cropped to the feature map (_crop).
        w = tuple(min(n, a.n_in) for n, a in zip(new, step.axes))
        out.append((w, 8 * (math.prod(new) * c_in + inner), macs))
    return out


def _scale(g: np.ndarray, values: np.ndarray, start: np.ndarray) -> None:
    """Multiply every row's patch by ``values[c, start + u]`` (zero outside the
    feature map), in place; ``g`` is ``(*window, rows, C)``."""
    nd = values.ndim - 1
    w = g.shape[:nd]
    lo = [max(0, -int(start[a].min())) for a in range(nd)]
    hi = [max(0, int(start[a].max()) + w[a] - values.shape[1 + a]) for a in range(nd)]
    # Channels last, so that each window offset reads one (rows, C) block.
    padded = np.pad(np.moveaxis(values, 0, -1), list(zip(lo, hi)) + [(0, 0)])
    base = [start[a] + lo[a] for a in range(nd)]
    for u in itertools.product(*(range(n) for n in w)):
        g[u] *= padded[tuple(b + ui for b, ui in zip(base, u))]


def _mask(g: np.ndarray, start: np.ndarray, sizes) -> None:
    """Zero the entries of the patches outside the feature map, in place."""
    nd = len(sizes)
    for a in range(nd):
        u = np.arange(g.shape[a])[:, None] + start[a][None, :]
        keep = (u >= 0) & (u < sizes[a])
        if keep.all():
            continue
        shape = [1] * g.ndim
        shape[a], shape[nd] = keep.shape
        g *= keep.reshape(shape)


def _crop(g: np.ndarray, start: np.ndarray, sizes) -> tuple[np.ndarray, np.ndarray]:
    """Windows wider than the feature map become the whole map (start 0).

    Past that width a window holds only zeros beyond the map; the rows then
    share one window, each shifted there by its own start.
    """
    nd = len(sizes)
    for a in range(nd):
        w = g.shape[a]
        if w <= sizes[a]:
            continue
        v = np.arange(sizes[a])[:, None] - start[a][None, :]  # offset in the window
        shape = [1] * g.ndim
        shape[a], shape[nd] = v.shape
        g = np.take_along_axis(g, np.clip(v, 0, w - 1).reshape(shape), axis=a)
        g *= ((v >= 0) & (v < w)).reshape(shape)
        start = start.copy()
        start[a] = 0
    return g, start


def _tap_sums(h, axis: int, rows_axis: int, rho, a: _Axis, w_new: int) -> np.ndarray:
    """Sum ``h`` along ``axis`` onto the input window, with a new first axis
    of taps: output offset ``u`` of a row with residue ``rho`` reaches input
    offset ``(rho + num * u + dil * t) // den`` through tap ``t``.

    The rows are sorted by ``rho``, so that for each ``(t, u)`` the rows
    reaching one input offset are a contiguous run (at most two runs).
    """
    shape = list(h.shape)
    shape[axis] = w_new
    out = np.zeros((a.k, *shape))
    src = [slice(None)] * h.ndim
    dst = [0] + src
    for t in range(a.k):
        dst[0] = t
        for u in range(h.shape[axis]):
            fine = rho + a.num * u + a.dil * t
            rel = fine // a.den
            if a.exact:
                # One residue divides: one run of the sorted rows.
                mine = np.flatnonzero(fine % a.den == 0)
                starts, stops = mine[:1], mine[-1:] + 1
            else:
                starts = np.flatnonzero(np.diff(rel, prepend=rel[0] - 1))
                stops = np.append(starts[1:], len(rel))
            src[axis] = u
            for lo, hi in zip(starts, stops):
                src[rows_axis] = dst[1 + rows_axis] = slice(lo, hi)
                dst[1 + axis] = rel[lo]
                out[tuple(dst)] += h[tuple(src)]
    return out


def _back_map(g, start, step: _Map):
    """The patches of one structured layer's input from those of its output."""
    nd = len(step.axes)
    w = g.shape[:nd]
    rows, c_out = g.shape[nd], g.shape[nd + 1]
    c_in = step.weight.shape[1]
    ks = tuple(a.k for a in step.axes)
    taps = math.prod(ks)
    new = tuple(a.width(wi) for a, wi in zip(step.axes, w))
    shifted = np.stack([a.num * start[i] - a.pad for i, a in enumerate(step.axes)])
    dens = np.array([a.den for a in step.axes])[:, None]
    new_start = np.floor_divide(shifted, dens)
    rho = shifted - new_start * dens
    weight = step.weight  # (C_out, C_in, *k)

    if all(a.den == 1 for a in step.axes):
        # Kernel products at the output window, added in place at each tap's
        # offset: every output offset reads one input offset per tap. Few
        # input channels make one product for all taps cheaper than one per tap.
        out = np.zeros(new + (rows, c_in))
        flat = g.reshape(-1, c_out)
        per_tap = c_in >= 16
        if per_tap:
            buffer = np.empty((flat.shape[0], c_in))
        else:
            wmat = np.moveaxis(weight, 1, -1).reshape(c_out, taps * c_in)
            p = (flat @ wmat).reshape(w + (rows,) + ks + (c_in,))
        for t in itertools.product(*(range(k) for k in ks)):
            if per_tap:
                np.matmul(flat, weight[(slice(None), slice(None)) + t], out=buffer)
                part = buffer.reshape(w + (rows, c_in))
            else:
                part = p[(Ellipsis,) + t + (slice(None),)]
            index = tuple(
                slice(a.dil * ti, a.dil * ti + a.num * (wi - 1) + 1, a.num)
                for a, ti, wi in zip(step.axes, t, w)
            )
            out[index] += part
        return out, new_start

    # Through an upsampling several output offsets read one coarse entry by
    # the same tap: sum them first (per tap, on the coarse window), then one
    # kernel product on the coarse grid.
    h = g  # (*taps so far, *window, rows, C_out)
    order = np.arange(rows)
    for i, a in enumerate(step.axes):
        if a.den > 1:
            # Rows sorted by this axis's residue (see _tap_sums).
            sort = np.argsort(rho[i, order], kind="stable")
            h, order = np.take(h, sort, axis=i + nd), order[sort]
        h = _tap_sums(h, i + i, i + nd, rho[i, order], a, new[i])
    h = np.take(h, np.argsort(order), axis=2 * nd)
    # The taps came in front, last axis first; put them after the channels
    # they multiply, in axis order: (*window, rows, C_out, *taps).
    h = np.moveaxis(h, tuple(range(nd)), tuple(range(-1, -nd - 1, -1)))
    if step.copies:
        return np.ascontiguousarray(h).reshape(new + (rows, c_in)), new_start
    h = np.ascontiguousarray(h).reshape(-1, c_out * taps)
    wmat = np.moveaxis(weight, 1, -1).reshape(c_out * taps, c_in)
    out = (h @ wmat).reshape(new + (rows, c_in))
    return out, new_start


def _one_hot(flat: np.ndarray, out_shape):
    """Patches of the output rows ``flat``: window 1, a one at their channel."""
    nd = len(out_shape) - 1
    channel, *position = np.unravel_index(flat, out_shape)
    g = np.zeros((1,) * nd + (len(flat), out_shape[0]))
    g[(0,) * nd + (np.arange(len(flat)), channel)] = 1.0
    return g, np.stack(position).astype(np.int64).reshape(nd, len(flat))


def _rows_of(g, start, in_shape):
    """``(counts, indices, data)`` of the rows whose input patches are ``g``."""
    nd = len(in_shape) - 1
    rows = g.shape[nd]
    w = g.shape[:nd]
    window = g.reshape(math.prod(w), rows, in_shape[0])
    offsets = np.stack([u.reshape(-1) for u in np.indices(w)]).astype(np.int64)
    sizes = np.array(in_shape[1:], dtype=np.int64)
    strides = np.array([math.prod(in_shape[2 + a :]) for a in range(nd)])
    count = np.empty(rows, dtype=np.int64)
    _kernels.patch_count(window, start, offsets, sizes, strides, count)
    indptr = np.concatenate([[0], np.cumsum(count)])
    indices = np.empty(indptr[-1], dtype=np.int64)
    data = np.empty(indptr[-1], dtype=np.float64)
    n_spatial = math.prod(in_shape[1:])
    _kernels.patch_fill(
        window, start, offsets, sizes, strides, n_spatial, indptr, indices, data
    )
    return count, indices, data


def _csr(parts, n_rows: int, n_in: int, dtype) -> sp.csr_array:
    counts, indices, data = (np.concatenate(p) for p in zip(*parts))
    idx = csr_bytes(len(indices), n_rows, n_in, dtype)[1]
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(idx)
    out = sp.csr_array(
        (data.astype(dtype, copy=False), indices.astype(idx), indptr),
        shape=(n_rows, n_in),
    )
    out.has_sorted_indices = True
    return out


def local_rows(steps, in_shape, out_shape, dtype, rows=None) -> sp.csr_array:
    """The operator of ``steps`` (forward order) as CSR, by windowed patches.

    ``rows`` (flat output indices, default all) selects the rows returned.
    """
    nd = len(in_shape) - 1
    n_in = math.prod(in_shape)
    rows = np.arange(math.prod(out_shape)) if rows is None else np.asarray(rows)
    widths = _widths(steps, nd)
    per_row = max(b for _w, b, _m in widths)
    final = math.prod(widths[-1][0]) * in_shape[0]
    size = csr_bytes(len(rows) * final, len(rows), n_in, dtype)[0]
    check_bytes(size, "the local operator")
    block = max(1, min(len(rows), BLOCK_BYTES // per_row))
    logger.debug(
        "%d rows by patches, blocks of %d: %.2e multiply-adds",
        len(rows),
        block,
        len(rows) * sum(m for _w, _b, m in widths),
    )
    parts = []
    for lo in range(0, len(rows), block):
        g, start = _one_hot(rows[lo : lo + block], out_shape)
        for i, step in enumerate(reversed(steps)):
            if isinstance(step, _Diag):
                _scale(g, step.values, start)
                continue
            sizes = [a.n_in for a in step.axes]
            g, start = _crop(*_back_map(g, start, step), sizes)
            following = steps[len(steps) - 2 - i] if i + 1 < len(steps) else None
            if not isinstance(following, _Diag):
                _mask(g, start, sizes)
        parts.append(_rows_of(g, start, in_shape))
    return _csr(parts, len(rows), n_in, dtype)


# ---------------------------------------------------------------------------
# Graphs: the same patches, pushed back through sums and concatenations.


def _module_step(module, in_shape, out_shape):
    """The patch step of a convolution, transposed convolution or nearest
    upsampling module, or None."""
    import torch

    nd = len(in_shape) - 1
    if len(out_shape) != nd + 1:
        return None
    if isinstance(module, torch.nn.Upsample):
        return _upsample_step(in_shape, out_shape) if module.mode == "nearest" else None
    if _is_transposed(module):
        return _transposed_step(module, in_shape, out_shape)
    params = _conv_params(module, nd)
    if params is None:
        return None
    num, dil, pad = params
    weight = _conv.dense_channels(_weight64(module), module.groups)
    axes = [
        _Axis(int(num[a]), 1, int(dil[a]), int(pad[a]), int(module.kernel_size[a]),
              int(in_shape[1 + a]), int(out_shape[1 + a]))
        for a in range(nd)
    ]  # fmt: skip
    return _Map(axes, weight)


def _weight64(module) -> np.ndarray:
    import torch

    return module.weight.detach().to(device="cpu", dtype=torch.float64).numpy()


def _upsample_step(in_shape, out_shape):
    """A nearest upsampling by the integer ratio of the sizes, or None."""
    nd = len(in_shape) - 1
    if in_shape[0] != out_shape[0] or any(
        o % i for o, i in zip(out_shape[1:], in_shape[1:])
    ):
        return None
    axes = [
        _Axis(1, out_shape[1 + a] // in_shape[1 + a], 1, 0, 1, in_shape[1 + a],
              out_shape[1 + a])
        for a in range(nd)
    ]  # fmt: skip
    return _Map(axes, np.eye(in_shape[0]).reshape((in_shape[0],) * 2 + (1,) * nd))


def _is_transposed(module) -> bool:
    import torch

    kinds = (
        torch.nn.ConvTranspose1d,
        torch.nn.ConvTranspose2d,
        torch.nn.ConvTranspose3d,
    )
    return type(module) in kinds


def _transposed_step(module, in_shape, out_shape):
    """A transposed convolution: input ``i`` reaches output ``s i + d t - p``,
    so output ``o`` reads input ``(o + p - d t) / s`` where that divides. With
    the taps flipped (``t' = k - 1 - t``) this is the ``exact`` map of
    numerator ``o + d t' - (d (k - 1) - p)`` over ``s``."""
    nd = len(in_shape) - 1
    if module.padding_mode != "zeros":
        return None
    w = _weight64(module)  # (C_in, C_out / groups, *k)
    groups = module.groups
    c_in_g = w.shape[0] // groups
    # Each group's block transposed: the layout of a grouped convolution.
    grouped = np.concatenate(
        [np.swapaxes(w[g * c_in_g : (g + 1) * c_in_g], 0, 1) for g in range(groups)]
    )
    weight = np.flip(
        _conv.dense_channels(grouped, groups), axis=tuple(range(2, 2 + nd))
    )
    axes = []
    for a in range(nd):
        k, s = int(module.kernel_size[a]), int(module.stride[a])
        d, p = int(module.dilation[a]), int(module.padding[a])
        axes.append(
            _Axis(1, s, d, d * (k - 1) - p, k, int(in_shape[1 + a]),
                  int(out_shape[1 + a]), exact=s > 1)
        )  # fmt: skip
    return _Map(axes, np.ascontiguousarray(weight))


def _agrees(step, matrix, in_shape, out_shape, rng) -> bool:
    """Whether ``step`` gives the layer's own ``matrix`` on sampled rows."""
    n_out = matrix.shape[0]
    rows = np.sort(rng.choice(n_out, size=min(n_out, 64), replace=False))
    got = local_rows([step], in_shape, out_shape, np.float64, rows)
    expected = sp.csr_array(matrix)[rows]
    scale = max(abs(expected).max(), 1e-300)
    return abs(got - expected).max() <= 1e-12 * scale


def graph_plan(graph):
    """Per node of a :class:`~opextract.FactorGraph` its patch step (None for
    the input, sums and concatenations); None when a node is not covered."""
    nodes = graph.nodes
    nd = len(graph.in_shape) - 1
    if nd < 1 or len(graph.out_shape) != nd + 1:
        return None
    rng = np.random.default_rng(0)
    needed = graph._needed()
    steps = [None] * len(nodes)
    for i, node in enumerate(nodes):
        if not needed[i] or node.op in ("input", "sum"):
            continue
        if len(node.shape) != nd + 1:
            return None
        if node.op == "cat":
            if node.axis != 0:
                return None
            continue
        in_shape = tuple(node.factor.in_shape)
        d = diagonal_of(node.factor.matrix) if in_shape == node.shape else None
        if d is not None:
            steps[i] = _Diag(d.reshape(node.shape))
            continue
        step = None
        if node.module is not None:
            step = _module_step(node.module, in_shape, node.shape)
        elif node.target == "interpolate":
            # F.interpolate has no module: try a nearest upsampling by the
            # sizes' ratio, which the sampled rows then confirm or refuse.
            step = _upsample_step(in_shape, node.shape)
        if step is None or not _agrees(
            step, node.factor.matrix, node.factor.in_shape, node.shape, rng
        ):
            logger.debug("graph node %s: no windowed step", node.name)
            return None
        steps[i] = step
    return steps


def _place(out: np.ndarray, g: np.ndarray, offset: np.ndarray, weight=1.0) -> None:
    """Add ``weight * g`` into ``out`` at each row's ``offset`` per axis."""
    nd = offset.shape[0]
    rows, channels = g.shape[nd], g.shape[nd + 1]
    strides = [math.prod(out.shape[a + 1 : nd]) for a in range(nd)]
    base = sum(offset[a] * strides[a] for a in range(nd)).astype(np.int64)
    target = sum(
        u.reshape(-1) * strides[a] for a, u in enumerate(np.indices(g.shape[:nd]))
    ).astype(np.int64)
    _kernels.patch_place(
        out.reshape(-1, rows, channels),
        np.ascontiguousarray(g).reshape(-1, rows, channels),
        target,
        base,
        float(weight),
    )


def _accumulate(adjoints, j, g, start, sizes, weight=1.0, owned=True) -> None:
    """Add ``weight * g`` (starts ``start``) to the patches held for node ``j``;
    ``g`` is kept as it is when ``owned`` (nothing else holds it)."""
    nd = start.shape[0]
    if j not in adjoints:
        if weight != 1.0:
            g = g * weight
        elif not owned:
            g = g.copy()
        adjoints[j] = (g, start)
        return
    h, s = adjoints[j]
    lo = np.minimum(s, start)
    hi = np.maximum(
        s + np.array(h.shape[:nd])[:, None], start + np.array(g.shape[:nd])[:, None]
    )
    width = tuple(int(v) for v in (hi - lo).max(axis=1))
    if width == h.shape[:nd] and np.array_equal(lo, s):
        _place(h, g, start - lo, weight)
        return
    out = np.zeros(width + h.shape[nd:])
    _place(out, h, s - lo)
    _place(out, g, start - lo, weight)
    adjoints[j] = _crop(out, lo, sizes)


def graph_rows(graph, steps) -> sp.csr_array:
    """The operator of a graph planned by :func:`graph_plan`, by patches."""
    nodes = graph.nodes
    in_shape, out_shape = graph.in_shape, graph.out_shape
    nd = len(in_shape) - 1
    n_in, n_out = math.prod(in_shape), math.prod(out_shape)
    block, parts, done, nnz = min(n_out, 256), [], 0, 0
    while done < n_out:
        flat = np.arange(done, min(done + block, n_out))
        adjoints = {graph.output: _one_hot(flat, out_shape)}
        peak = 0
        for i in range(len(nodes) - 1, 0, -1):
            if i not in adjoints:
                continue
            g, start = adjoints.pop(i)
            peak = max(peak, g.nbytes + sum(h.nbytes for h, _ in adjoints.values()))
            node, step = nodes[i], steps[i]
            sizes = nodes[node.inputs[0]].shape[1:] if node.inputs else None
            if node.op == "sum":
                last = len(node.inputs) - 1
                for k, (w, j) in enumerate(zip(node.weights, node.inputs)):
                    _accumulate(
                        adjoints, j, g, start, nodes[j].shape[1:], w, owned=k == last
                    )
            elif node.op == "cat":
                c0 = 0
                for j in node.inputs:
                    c = nodes[j].shape[0]
                    part = np.ascontiguousarray(g[..., c0 : c0 + c])
                    _accumulate(adjoints, j, part, start, nodes[j].shape[1:])
                    c0 += c
            elif isinstance(step, _Diag):
                _scale(g, step.values, start)
                _accumulate(adjoints, node.inputs[0], g, start, sizes)
            else:
                g, start = _back_map(g, start, step)
                g, start = _crop(g, start, sizes)
                _mask(g, start, sizes)
                _accumulate(adjoints, node.inputs[0], g, start, sizes)
        if 0 in adjoints:
            g, start = adjoints[0]
        else:  # the output does not depend on the input
            g, start = (
                np.zeros((1,) * nd + (len(flat), in_shape[0])),
                np.zeros((nd, len(flat)), dtype=np.int64),
            )
        parts.append(_rows_of(g, start, in_shape))
        nnz += len(parts[-1][1])
        done += len(flat)
        estimate = csr_bytes(int(nnz * n_out / done), n_out, n_in, graph.dtype)[0]
        check_bytes(estimate, "the operator of the graph")
        block = max(1, min(4 * block, int(block * BLOCK_BYTES / max(peak, 1))))
    return _csr(parts, n_out, n_in, graph.dtype)
