"""Fast products of a chain of factors: the composition behind ``to_sparse``.

The order of the products decides the cost: in a downsampling autoencoder the
product taken from the input side through the upsampling is hundreds of times
dearer than the same product split at the bottleneck. ``compose_chain``:

1. splits the chain at its narrowest point (nearest upsamplings were already
   fused into the convolution after them by the chain walk);
2. composes each side of a translation-structured chain (convolutions,
   nearest upsamplings) as one kernel, kept as row templates
   (``compose_kernels``); if that is too costly, multiplies representative
   rows or columns and stamps the others as shifted copies
   (``structured_product``); otherwise multiplies generically (``compose``);
3. multiplies only the representative rows of the whole operator, by BLAS
   when that is cheaper than the sparse product, and stamps the rest.

The generic path folds one-entry-per-row factors into the next
factor, estimates the row counts of partial products from sampled rows and
picks the product order by a matrix-chain dynamic programme. Products run in
Numba kernels parallel over rows: sparse into exactly allocated CSR (two
passes), sparse into a dense array when the result fills in (estimated
density above ``DENSE_FILL``), or BLAS when both sides are dense enough.
"""

from __future__ import annotations

import logging

import numba
import numpy as np
import scipy.sparse as sp

from opextract import _conv, _kernels
from opextract._validate import check_bytes, csr_bytes, index_dtype

logger = logging.getLogger(__name__)

#: Estimated density above which a product is written into a dense array.
DENSE_FILL = 0.25
#: How many times faster a BLAS multiply-add runs than a sparse one here.
BLAS_SPEEDUP = 40.0
_N_SAMPLES = 12


def _n_chunks(m: int) -> int:
    return max(1, min(m, 4 * numba.get_num_threads()))


def spgemm(a: sp.csr_array, b: sp.csr_array, *, dense: bool = False):
    """``a @ b`` for CSR operands: CSR (sorted, exact allocation) or dense."""
    m, n = a.shape[0], b.shape[1]
    dtype = np.result_type(a.dtype, b.dtype)
    if dense:
        out = np.zeros((m, n), dtype=dtype)
        _kernels.spgemm_dense(
            a.indptr, a.indices, a.data, b.indptr, b.indices, b.data, out
        )
        return out
    counts = np.empty(m, dtype=np.int64)
    chunks = _n_chunks(m)
    _kernels.spgemm_count(a.indptr, a.indices, b.indptr, b.indices, n, chunks, counts)
    nnz = int(counts.sum())
    size, idx = csr_bytes(nnz, m, n, dtype)
    check_bytes(size, f"a product of factors ({m} x {n})")
    indptr = np.zeros(m + 1, dtype=idx)
    np.cumsum(counts, out=indptr[1:])
    indices = np.empty(nnz, dtype=idx)
    data = np.empty(nnz, dtype=dtype)
    _kernels.spgemm_fill(
        a.indptr,
        a.indices,
        a.data,
        b.indptr,
        b.indices,
        b.data,
        n,
        chunks,
        indptr,
        indices,
        data,
    )
    out = sp.csr_array((data, indices, indptr), shape=(m, n))
    out.has_sorted_indices = True
    return out


def dense_to_csr(x: np.ndarray) -> sp.csr_array:
    """CSR array of the nonzeros of a dense 2-D array, sorted, exact size."""
    x = np.ascontiguousarray(x)
    counts = np.empty(x.shape[0], dtype=np.int64)
    _kernels.dense_to_csr_count(x, counts)
    nnz = int(counts.sum())
    idx = index_dtype(max(nnz, x.shape[1]))
    indptr = np.zeros(x.shape[0] + 1, dtype=idx)
    np.cumsum(counts, out=indptr[1:])
    indices = np.empty(nnz, dtype=idx)
    data = np.empty(nnz, dtype=x.dtype)
    _kernels.dense_to_csr_fill(x, indptr, indices, data)
    out = sp.csr_array((data, indices, indptr), shape=x.shape)
    out.has_sorted_indices = True
    return out


class VirtualMatrix:
    """A matrix given by row templates: row ``r`` is template ``row_rep[r]``
    with its columns shifted by ``row_shift[r]``. Products read its rows
    without the matrix ever being allocated."""

    def __init__(self, templates, row_rep, row_shift, n_cols):
        self.templates = sp.csr_array(templates)
        self.templates.sort_indices()
        self.row_rep = np.ascontiguousarray(row_rep, dtype=np.int64)
        self.row_shift = np.ascontiguousarray(row_shift, dtype=np.int64)
        self.shape = (len(self.row_rep), int(n_cols))
        self.dtype = self.templates.dtype

    def rows(self, index) -> sp.csr_array:
        return _stamp(
            self.templates, self.row_rep[index], self.row_shift[index], self.shape[1]
        )

    def tocsr(self) -> sp.csr_array:
        return self.rows(np.arange(self.shape[0]))


def as_csr(m) -> sp.csr_array:
    """A CSR array of ``m`` (a CSR array, another sparse format or virtual)."""
    if isinstance(m, VirtualMatrix):
        return m.tocsr()
    m = sp.csr_array(m)
    m.sort_indices()
    return m


def multiply(x, y, *, dense: bool = False, blas: bool = False):
    """``x @ y`` for CSR arrays or dense ndarrays, by the cheapest kernel."""
    if isinstance(x, VirtualMatrix):
        x = x.tocsr()
    if _is_diagonal(y):
        # A diagonal (an activation at a point) scales columns, sparse or not.
        d = np.zeros(y.shape[1], dtype=y.dtype)
        d[y.indices] = y.data
        if sp.issparse(x):
            x = sp.csr_array(x)
            out = sp.csr_array((x.data * d[x.indices], x.indices, x.indptr), x.shape)
            out.has_sorted_indices = x.has_sorted_indices
            return out.toarray() if dense else out
        return x * d[None, :]
    if isinstance(y, VirtualMatrix):
        if not dense and sp.issparse(x):
            return spgemm(x, y.tocsr())
        t = y.templates
        out = np.zeros((x.shape[0], y.shape[1]), dtype=np.result_type(x.dtype, y.dtype))
        args = (t.indptr, t.indices, t.data, y.row_rep, y.row_shift, out)
        if sp.issparse(x):
            x = sp.csr_array(x)
            _kernels.virtual_spmm_dense(x.indptr, x.indices, x.data, *args)
        else:
            _kernels.dense_virtual_spmm(np.ascontiguousarray(x), *args)
        return out
    x_sparse, y_sparse = sp.issparse(x), sp.issparse(y)
    if blas:
        xd = x.toarray() if x_sparse else x
        yd = y.toarray() if y_sparse else y
        return xd @ yd
    if x_sparse and y_sparse:
        return spgemm(x, y, dense=dense)
    out = np.zeros((x.shape[0], y.shape[1]), dtype=np.result_type(x.dtype, y.dtype))
    if not x_sparse and y_sparse:
        _kernels.dense_spmm(np.ascontiguousarray(x), y.indptr, y.indices, y.data, out)
    elif x_sparse:
        _kernels.spmm_dense(x.indptr, x.indices, x.data, np.ascontiguousarray(y), out)
    else:
        out = x @ y
    return out


def _is_diagonal(m) -> bool:
    if not sp.issparse(m) or m.shape[0] != m.shape[1]:
        return False
    m = sp.csr_array(m)
    n = m.shape[0]
    return (
        m.nnz == n
        and bool(np.array_equal(m.indptr, np.arange(n + 1)))
        and bool(np.array_equal(m.indices, np.arange(n)))
    )


def _is_replication(m: sp.csr_array) -> bool:
    # One entry per row: an upsampling, a selection (max pooling at a point)
    # or a diagonal (an activation at a point). Multiplying it into the next
    # factor only scales and gathers that factor's columns.
    return bool(np.all(np.diff(m.indptr) == 1))


def fold_replications(matrices: list[sp.csr_array]) -> list[sp.csr_array]:
    """Fold every one-entry-per-row factor into its successor."""
    out: list[sp.csr_array] = []
    pending = None
    for m in matrices:
        if pending is not None:
            m = spgemm(sp.csr_array(m), pending)
            pending = None
        if _is_replication(m):
            pending = m
        else:
            out.append(m)
    if pending is not None:
        if out:
            out[-1] = spgemm(pending, out[-1])
        else:
            out.append(pending)
    return out


def _row_estimates(matrices, rng) -> np.ndarray:
    """``r[i, j]``: estimated mean nonzeros per row of ``M_j @ ... @ M_i``."""
    n = len(matrices)
    r = np.zeros((n, n))
    for j in range(n):
        mj = matrices[j]
        r[j, j] = mj.nnz / max(mj.shape[0], 1)
        rows = rng.choice(mj.shape[0], size=min(_N_SAMPLES, mj.shape[0]), replace=False)
        s = mj[np.sort(rows)]
        filled = False
        for i in range(j - 1, -1, -1):
            n_cols = matrices[i].shape[1]
            if filled:
                r[i, j] = n_cols
                continue
            s = spgemm(sp.csr_array(s), matrices[i])
            r[i, j] = s.nnz / s.shape[0]
            # Once sampled rows are half full, later products stay full.
            filled = r[i, j] >= 0.5 * n_cols
    return r


def _plan(matrices, r):
    """Matrix-chain order of least estimated cost; returns split and method."""
    n = len(matrices)
    rows = [m.shape[0] for m in matrices]
    cols = [m.shape[1] for m in matrices]
    cost = np.zeros((n, n))
    split = np.zeros((n, n), dtype=np.int64)
    method: dict[tuple[int, int], tuple[bool, bool]] = {}
    for length in range(1, n):
        for i in range(n - length):
            j = i + length
            best = np.inf
            for k in range(i, j):
                m_rows, inner, n_cols = rows[j], cols[k + 1], cols[i]
                sparse_flops = m_rows * r[k + 1, j] * r[i, k]
                blas_flops = m_rows * inner * n_cols / BLAS_SPEEDUP
                use_blas = blas_flops < sparse_flops
                c = cost[i, k] + cost[k + 1, j] + min(sparse_flops, blas_flops)
                if c < best:
                    best = c
                    split[i, j] = k
                    density = r[i, j] / max(n_cols, 1)
                    method[i, j] = (use_blas or density > DENSE_FILL, use_blas)
            cost[i, j] = best
    return split, method, cost


def compose(matrices: list[sp.csr_array], *, seed: int = 0) -> sp.csr_array:
    """Product ``M_n @ ... @ M_1`` of factors given in forward order.

    Parameters
    ----------
    matrices : list of scipy.sparse.csr_array
        Factors in forward order (the first is applied first).
    seed : int
        Seed of the row sampling that estimates the cost of each order; the
        result does not depend on it, only the order of the products.

    Returns
    -------
    scipy.sparse.csr_array
        The product, sorted indices, without explicitly stored zeros.
    """
    if not matrices:
        raise ValueError("matrices must hold at least one factor; got none")
    mats = [sp.csr_array(m) for m in matrices]
    for m in mats:
        m.sort_indices()
    mats = fold_replications(mats)
    if len(mats) == 1:
        out = mats[0].copy()
        out.eliminate_zeros()
        return out

    r = _row_estimates(mats, np.random.default_rng(seed))
    n_rows, n_cols = mats[-1].shape[0], mats[0].shape[1]
    est_nnz = int(min(r[0, -1], n_cols) * n_rows)
    dtype = mats[0].dtype
    size, _ = csr_bytes(est_nnz, n_rows, n_cols, dtype)
    check_bytes(size, f"the operator ({n_rows} x {n_cols}, about {est_nnz} nonzeros)")
    split, method, cost = _plan(mats, r)
    logger.debug("composition plan: estimated cost %.3g multiply-adds", cost[0, -1])

    def evaluate(i: int, j: int):
        if i == j:
            return mats[i]
        k = split[i, j]
        left = evaluate(k + 1, j)
        right = evaluate(i, k)
        dense, blas = method[i, j]
        if dense:
            check_bytes(
                left.shape[0] * right.shape[1] * dtype.itemsize,
                f"a dense product of factors ({left.shape[0]} x {right.shape[1]})",
            )
        logger.debug(
            "multiply [%d..%d] x [%d..%d] dense=%s blas=%s", k + 1, j, i, k, dense, blas
        )
        return multiply(left, right, dense=dense, blas=blas)

    result = evaluate(0, len(mats) - 1)
    if sp.issparse(result):
        result.eliminate_zeros()
        return sp.csr_array(result)
    return dense_to_csr(result)


# ---------------------------------------------------------------------------
# Translation-structured chains: convolutions and nearest upsamplings.
#
# Along each spatial axis such a layer is a table of taps: output position o
# reads input position pos through kernel offset tap. A chain of them is a sum
# over paths of taps, and an entry of the product depends only on which paths
# connect its row and column. Two output positions whose paths (the taps they
# take, the input positions they reach relative to the first one) coincide
# have rows that are shifts of each other. So only one row per class of
# positions (per output channel) is multiplied out; the others are copies
# with shifted columns. The same holds for columns, taken from the input side.

_MAX_PATHS = 4_000_000


def _expand(axis_paths, n_out):
    """Every path along one axis, from the chain's output to its input.

    ``axis_paths``: per layer in forward order, ``(k, o, tap, pos)``. Returns
    ``(o, code, pos)`` per path (``code`` numbers the tap sequence), or None
    when there are more than ``_MAX_PATHS`` paths.
    """
    o = np.arange(n_out, dtype=np.int64)
    code = np.zeros(n_out, dtype=np.int64)
    pos = o.copy()
    for k, po, ptap, ppos in reversed(axis_paths):
        n_q = int(max(pos.max(initial=-1), po.max(initial=-1))) + 1
        order = np.argsort(po, kind="stable")
        counts = np.bincount(po, minlength=n_q)
        starts = np.concatenate(([0], np.cumsum(counts)))
        rep = counts[pos]
        total = int(rep.sum())
        if total > _MAX_PATHS:
            return None
        entry = np.repeat(np.arange(len(pos)), rep)
        within = np.arange(total) - np.repeat(np.cumsum(rep) - rep, rep)
        pair = order[starts[pos][entry] + within]
        o = o[entry]
        code = code[entry] * k + ptap[pair]
        pos = ppos[pair]
    return o, code, pos


def _classes(group, code, other, n):
    """Classes of positions ``0..n-1`` of ``group`` with identical paths.

    Returns ``(cls, rep, shift)``: the class of each position, one
    representative per class, and each position's shift of ``other``
    relative to its representative.
    """
    order = np.lexsort((other, code, group))
    g, c, t = group[order], code[order], other[order]
    bounds = np.searchsorted(g, np.arange(n + 1))
    base = np.zeros(n, dtype=np.int64)
    cls = np.empty(n, dtype=np.int64)
    keys: dict[tuple[bytes, bytes], int] = {}
    reps: list[int] = []
    for i in range(n):
        a, b = bounds[i], bounds[i + 1]
        if b > a:
            base[i] = t[a:b].min()
        key = (c[a:b].tobytes(), (t[a:b] - base[i]).tobytes())
        cls[i] = keys.setdefault(key, len(keys))
        if cls[i] == len(reps):
            reps.append(i)
    rep = np.array(reps, dtype=np.int64)
    return cls, rep, base - base[rep[cls]]


def _stamp(templates: sp.csr_array, row_rep, row_shift, n_cols) -> sp.csr_array:
    counts = np.diff(templates.indptr)[row_rep]
    nnz = int(counts.sum())
    n_rows = len(row_rep)
    size, idx = csr_bytes(nnz, n_rows, n_cols, templates.dtype)
    check_bytes(size, f"a product of factors ({n_rows} x {n_cols})")
    indptr = np.zeros(n_rows + 1, dtype=idx)
    np.cumsum(counts, out=indptr[1:])
    indices = np.empty(nnz, dtype=idx)
    data = np.empty(nnz, dtype=templates.dtype)
    _kernels.stamp_rows(
        templates.indptr,
        templates.indices,
        templates.data,
        row_rep,
        row_shift.astype(idx),
        indptr,
        indices,
        data,
    )
    out = sp.csr_array((data, indices, indptr), shape=(n_rows, n_cols))
    out.has_sorted_indices = templates.has_sorted_indices
    return out


def _ravel(per_axis, sizes):
    """Flat index over the grid ``sizes`` of per-axis arrays (broadcast)."""
    flat = np.zeros((1,) * len(sizes), dtype=np.int64)
    for axis, values in enumerate(per_axis):
        shape = [1] * len(sizes)
        shape[axis] = len(values)
        flat = flat * sizes[axis] + values.reshape(shape)
    return flat.reshape(-1)


def _structure(paths, in_shape, out_shape, by):
    """Representatives and copy instructions of a structured chain.

    Returns ``(rep_index, row_rep, row_shift)`` for the rows (``by="rows"``)
    or the columns (``"cols"``) of the chain's product: the indices of the
    representative rows/columns, and for every row/column the representative
    it copies and the shift of its other index. None when the chain is not
    structured or has too many paths.
    """
    nd = len(out_shape) - 1
    if any(p is None or len(p) != nd for p in paths) or len(in_shape) != nd + 1:
        return None
    in_sp, out_sp = tuple(in_shape[1:]), tuple(out_shape[1:])
    expanded = []
    for axis in range(nd):
        e = _expand([p[axis] for p in paths], out_sp[axis])
        if e is None:
            return None
        expanded.append(e)

    if by == "rows":
        side_sp, other_sp, channels = out_sp, in_sp, out_shape[0]
        groups = [_classes(o, c, p, n) for (o, c, p), n in zip(expanded, out_sp)]
    else:
        side_sp, other_sp, channels = in_sp, out_sp, in_shape[0]
        groups = [_classes(p, c, o, n) for (o, c, p), n in zip(expanded, in_sp)]
    n_classes = [len(g[1]) for g in groups]
    n_combos = int(np.prod(n_classes))
    rep_pos = _ravel([g[1] for g in groups], side_sp)
    # Representatives of class combination (c_1, ..., c_nd), channel-major.
    side_n = int(np.prod(side_sp))
    rep_index = (np.arange(channels)[:, None] * side_n + rep_pos[None, :]).reshape(-1)

    combo = _ravel([g[0] for g in groups], n_classes)
    # Shift of the other index of each position: sum over axes of shift * stride.
    shift = np.zeros(1, dtype=np.int64)
    for axis, g in enumerate(groups):
        stride = int(np.prod(other_sp[axis + 1 :]))
        shift = (shift[..., None] + g[2][None, :] * stride).reshape(-1)
    row_rep = (np.arange(channels)[:, None] * n_combos + combo[None, :]).reshape(-1)
    return rep_index, row_rep, np.tile(shift, channels)


# Few representative rows are multiplied into dense arrays up to this size.
_DENSE_ROWS_BYTES = 512 * 2**20


def _rows_through(t: sp.csr_array, matrices) -> sp.csr_array:
    """``t @ matrices[0] @ matrices[1] @ ...`` for a few rows ``t``."""
    for m in matrices:
        if _is_diagonal(m):
            t = multiply(t, m)
        elif t.shape[0] * m.shape[1] * 8 <= _DENSE_ROWS_BYTES:
            t = multiply(t, m, dense=True)
        else:
            t = spgemm(t if sp.issparse(t) else dense_to_csr(t), as_csr(m))
    return dense_to_csr(t) if not sp.issparse(t) else t


def structured_product(matrices, paths, in_shape, out_shape, *, by="rows"):
    """Product of a translation-structured chain by representative rows/columns.

    ``matrices`` and ``paths`` in forward order; returns None when the chain
    has too many paths to analyse (the caller multiplies it generically).
    """
    plan = _structure(paths, in_shape, out_shape, by)
    if plan is None:
        return None
    rep_index, row_rep, row_shift = plan
    if by == "rows":
        last = matrices[-1]
        if isinstance(last, VirtualMatrix):
            t = last.rows(rep_index)
        else:
            t = sp.csr_array(last)[rep_index]
        t = _rows_through(t, matrices[-2::-1])
        n_other = int(np.prod(in_shape))
    else:
        t = sp.csr_array(as_csr(matrices[0]).T)[rep_index]
        t = _rows_through(t, [sp.csr_array(as_csr(m).T) for m in matrices[1:]])
        n_other = int(np.prod(out_shape))
    t.sort_indices()
    stamped = _stamp(t, row_rep, row_shift, n_other)
    if by == "rows":
        return stamped
    return sp.csr_array(stamped.T.tocsr())


# Composing kernels: a chain of convolutions (and nearest upsamplings) is a
# single "convolution" whose taps along each axis are the sequences of the
# layers' taps, with the kernel contracted over the intermediate channels.
# Taps that meet the same (output, input) position pairs everywhere are merged
# (their kernel entries summed), which keeps the composite kernel small.

_MAX_CONTRACTION = 300_000_000


def _join(outer, inner):
    """Compose one axis's tap pairs: ``outer`` after ``inner``."""
    ko, oo, to, po = outer
    ki, oi, ti, pi = inner
    n_q = int(max(po.max(initial=-1), oi.max(initial=-1))) + 1
    order = np.argsort(oi, kind="stable")
    counts = np.bincount(oi, minlength=n_q)
    starts = np.concatenate(([0], np.cumsum(counts)))
    rep = counts[po]
    total = int(rep.sum())
    entry = np.repeat(np.arange(len(po)), rep)
    within = np.arange(total) - np.repeat(np.cumsum(rep) - rep, rep)
    pair = order[starts[po][entry] + within]
    return ko * ki, oo[entry], to[entry] * ki + ti[pair], pi[pair]


def _merge_taps(axis_paths):
    """Merge taps with identical (output, input) pairs; return paths, groups."""
    k, o, tap, pos = axis_paths
    order = np.lexsort((pos, o, tap))
    o, tap, pos = o[order], tap[order], pos[order]
    bounds = np.searchsorted(tap, np.arange(k + 1))
    keys: dict[tuple[bytes, bytes], int] = {}
    group = np.full(k, -1, dtype=np.int64)
    for t in range(k):
        a, b = bounds[t], bounds[t + 1]
        if b > a:
            group[t] = keys.setdefault(
                (o[a:b].tobytes(), pos[a:b].tobytes()), len(keys)
            )
    first = np.zeros(len(keys), dtype=bool)
    keep = np.zeros(len(tap), dtype=bool)
    for t in range(k):
        if group[t] >= 0 and not first[group[t]]:
            first[group[t]] = True
            keep[bounds[t] : bounds[t + 1]] = True
    merged = (len(keys), o[keep], group[tap[keep]], pos[keep])
    return merged, group


def _sum_taps(weight, axis, group, n_groups):
    """Sum the kernel's entries along tap ``axis`` (2..4) into their groups."""
    shape = list(weight.shape)
    shape[axis] = n_groups
    out = np.zeros(shape, dtype=weight.dtype)
    valid = np.flatnonzero(group >= 0)
    src = np.moveaxis(weight, axis, 0)[valid]
    np.add.at(np.moveaxis(out, axis, 0), group[valid], src)
    return out


def compose_kernels(layers, in_shape, out_shape):
    """One plan for a structured chain segment, or None if too costly."""
    nd = len(out_shape) - 1
    if any(la.weight is None or la.paths is None for la in layers):
        return None
    if any(len(la.paths) != nd for la in layers):
        return None
    weight = layers[-1].weight
    paths = list(layers[-1].paths)
    for layer in reversed(layers[:-1]):
        w_in = layer.weight
        cost = weight.shape[0] * weight.shape[1] * w_in.shape[1]
        cost *= int(np.prod(weight.shape[2:])) * int(np.prod(w_in.shape[2:]))
        if cost > _MAX_CONTRACTION:
            return None
        a, b = weight.shape[:2]
        c = w_in.shape[1]
        ko, ki = weight.shape[2:], w_in.shape[2:]
        # Contract the channels by BLAS, then interleave outer and inner taps.
        product = np.tensordot(weight, w_in, axes=([1], [0]))
        weight = product.transpose(0, 4, 1, 5, 2, 6, 3, 7).reshape(
            a, c, ko[0] * ki[0], ko[1] * ki[1], ko[2] * ki[2]
        )
        offset = 3 - nd
        for axis in range(nd):
            joined = _join(paths[axis], layer.paths[axis])
            paths[axis], group = _merge_taps(joined)
            weight = _sum_taps(weight, 2 + offset + axis, group, paths[axis][0])
    return _conv.plan_from_paths(
        weight, paths, tuple(in_shape[1:]), tuple(out_shape[1:]), "a product"
    )


def blocked_rows(matrices) -> sp.csr_array:
    """``M_n @ ... @ M_1`` from the output side, by blocks of dense rows.

    Each block of the last factor's rows is pushed through the chain with
    dense accumulators (no symbolic pass, no sorting); template matrices are
    read without being allocated. Suits the decoder side of a chain whose
    values vary by position (a local operator), where rows cannot be copied.
    """
    width = max(m.shape[1] for m in matrices)
    block = max(1, min(matrices[-1].shape[0], _DENSE_ROWS_BYTES // (8 * width)))
    last = matrices[-1]
    parts = []
    for start in range(0, last.shape[0], block):
        index = np.arange(start, min(start + block, last.shape[0]))
        if isinstance(last, VirtualMatrix):
            t = last.rows(index)
        else:
            t = sp.csr_array(last)[index]
        parts.append(_rows_through(t, matrices[-2::-1]))
    return sp.csr_array(sp.vstack(parts, format="csr"))


def _final_product(left, right, seed=0):
    """``left @ right`` by sparse kernels or one BLAS product, whichever is cheaper."""
    m, k, n = left.shape[0], left.shape[1], right.shape[1]
    flops = float(np.diff(right.indptr)[left.indices].sum())
    blas = m * k * n / BLAS_SPEEDUP < flops
    dtype = np.result_type(left.dtype, right.dtype)
    if blas:
        check_bytes(
            (m * k + k * n + m * n) * dtype.itemsize, f"a dense product ({m} x {n})"
        )
        return multiply(left, right, blas=True)
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(m, size=min(m, 32), replace=False))
    sample = spgemm(sp.csr_array(left[rows]), right)
    dense = sample.nnz / max(len(rows) * n, 1) > DENSE_FILL
    if dense:
        check_bytes(m * n * dtype.itemsize, f"a dense product ({m} x {n})")
    return multiply(left, right, dense=dense)


def compose_chain(layers) -> sp.csr_array:
    """Operator of a built chain (``_chain.ChainLayer`` list, forward order).

    Splits the chain at its narrowest point (an interior one when there is
    one), multiplies the output side by representative rows and the input
    side by representative columns when the layers are translation
    structured (generically otherwise), and finishes with one product.
    """
    mats = [
        layer.virtual if layer.virtual is not None else as_csr(layer.built.matrix)
        for layer in layers
    ]
    dims = [mats[0].shape[1]] + [m.shape[0] for m in mats]
    shapes = [tuple(layers[0].in_shape)] + [tuple(la.built.out_shape) for la in layers]
    smallest = min(dims)
    candidates = [i for i, d in enumerate(dims) if d == smallest]
    interior = [i for i in candidates if 0 < i < len(mats)]
    b = interior[len(interior) // 2] if interior else candidates[0]

    def side(lo, hi, by):
        seg = layers[lo:hi]
        if not seg:
            return None
        if len(seg) == 1:
            return mats[lo]
        plan = compose_kernels(seg, shapes[lo], shapes[hi])
        if plan is not None:
            rows = _conv.virtual_rows(plan)
            if rows is not None:
                return VirtualMatrix(*rows, plan.n_cols)
            return _conv._build(plan)[0]
        result = structured_product(
            mats[lo:hi], [la.paths for la in seg], shapes[lo], shapes[hi], by=by
        )
        if result is None and by == "rows":
            logger.debug("layers %d..%d: dense row blocks", lo, hi - 1)
            result = blocked_rows(mats[lo:hi])
        if result is None:
            logger.debug("layers %d..%d: generic products", lo, hi - 1)
            result = compose([as_csr(m) for m in mats[lo:hi]])
        return result

    if b == len(mats):
        # The output is narrowest: the whole chain from the input side.
        return _finish(as_csr(side(0, b, "cols")))
    left = side(b, len(mats), "rows")
    right = side(0, b, "cols")
    if right is None:
        return _finish(as_csr(left))
    right = as_csr(right)
    # The rows of the whole product repeat too: multiply representatives only.
    plan = _structure([la.paths for la in layers], shapes[0], shapes[-1], "rows")
    if plan is None:
        return _finish(_final_product(as_csr(left), right))
    rep_index, row_rep, row_shift = plan
    if isinstance(left, VirtualMatrix):
        left_reps = left.rows(rep_index)
    else:
        left_reps = sp.csr_array(left)[rep_index]
    reps = _finish(_final_product(left_reps, right))
    return _stamp(reps, row_rep, row_shift, dims[0])


def _finish(result) -> sp.csr_array:
    if sp.issparse(result):
        result = sp.csr_array(result)
        result.eliminate_zeros()
        result.sort_indices()
        return result
    return dense_to_csr(result)
