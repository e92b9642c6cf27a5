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
        if _is_diagonal(m) and not sp.issparse(t) and t.dtype == m.dtype:
            # The dense block is this loop's own: scale its columns in place
            # rather than allocating another block.
            d = np.zeros(m.shape[1], dtype=m.dtype)
            d[m.indices] = m.data
            t *= d[None, :]
        elif _is_diagonal(m):
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


# ---------------------------------------------------------------------------
# Local operators by compressed forward-mode products.
#
# At a point, a chain of convolutions, nearest upsamplings and elementwise
# activations has a Jacobian whose pattern is contained in that of the linear
# chain: along each spatial axis, output position o can depend on input
# position i only if some sequence of taps connects them, and every channel
# may mix with every other. Two inputs whose sets of reachable outputs are
# disjoint can share one Jacobian-vector product: the sum of their basis
# vectors gives the sum of their columns, and each output entry belongs to at
# most one of them (the other terms are exact zeros, so nothing is rounded).
# Coloring the inputs axis by axis (two positions conflict when their
# reachable sets on that axis meet) and keeping channels apart gives few
# products when the network reaches only a window of the output from each
# input, as a downsampling network does.

#: Compressed products are used when they number at most the inputs over this.
COMPRESSION_GAIN = 16
_JVP_CHUNK_BYTES = 256 * 2**20


def _axis_reach(layers, nd):
    """Per spatial axis, the boolean (n_out, n_in) reach of the whole chain.

    None when a layer is neither translation structured nor an elementwise
    diagonal (its pattern along the axes is then not known here).
    """
    reach = None
    for layer in layers:
        if layer.paths is not None and len(layer.paths) == nd:
            step = []
            for axis, (_k, o, _tap, pos) in enumerate(layer.paths):
                n_out = int(layer.built.out_shape[1 + axis])
                n_in = int(layer.in_shape[1 + axis])
                r = np.zeros((n_out, n_in), dtype=bool)
                r[o, pos] = True
                step.append(r)
        elif _diagonal_values(layer) is not None:
            continue
        else:
            return None
        if reach is None:
            reach = step
        else:
            reach = [
                (s.astype(np.int64) @ r.astype(np.int64)) > 0
                for s, r in zip(step, reach)
            ]
    return reach


def _greedy_colors(reach: np.ndarray) -> np.ndarray:
    """Color the columns of ``reach`` so that columns of one color are disjoint."""
    conflict = (reach.T.astype(np.int64) @ reach.astype(np.int64)) > 0
    n = reach.shape[1]
    colors = np.zeros(n, dtype=np.int64)
    for i in range(n):
        used = set(colors[:i][conflict[i, :i]].tolist())
        c = 0
        while c in used:
            c += 1
        colors[i] = c
    return colors


def compression_plan(layers):
    """Colors of the inputs of a chain for compressed products, or None.

    Returns ``(colors, n_colors, reach)``: the color of every flattened input,
    their number and the per-axis reach. None when the chain's pattern is
    not known here or compression would not save enough products.
    """
    in_shape = tuple(layers[0].in_shape)
    nd = len(in_shape) - 1
    if nd < 1:
        return None
    reach = _axis_reach(layers, nd)
    if reach is None:
        return None
    axis_colors = [_greedy_colors(r) for r in reach]
    n_axis = [int(c.max(initial=-1)) + 1 for c in axis_colors]
    n_colors = in_shape[0] * int(np.prod(n_axis))
    n_in = int(np.prod(in_shape))
    if n_colors * COMPRESSION_GAIN > n_in:
        return None
    colors = _ravel([np.arange(in_shape[0])] + axis_colors, [in_shape[0], *n_axis])
    return colors, n_colors, reach


def compressed_local(layers, jvp, plan, dtype) -> sp.csr_array:
    """The Jacobian of a chain from compressed Jacobian-vector products.

    ``jvp(tangents)`` maps a float64 tensor of shape ``(k, *in_shape)`` to the
    products ``(k, n_out)`` as a NumPy array; ``plan`` is
    :func:`compression_plan`'s result.
    """
    import torch

    colors, n_colors, reach = plan
    in_shape = tuple(layers[0].in_shape)
    out_shape = tuple(layers[-1].built.out_shape)
    n_in, n_out = int(np.prod(in_shape)), int(np.prod(out_shape))
    check_bytes(n_colors * n_out * 8, f"{n_colors} Jacobian-vector products")

    widest = max(int(np.prod(la.built.out_shape)) for la in layers)
    chunk = max(1, min(n_colors, _JVP_CHUNK_BYTES // (16 * widest)))
    products = np.empty((n_colors, n_out))
    for start in range(0, n_colors, chunk):
        stop = min(start + chunk, n_colors)
        tangents = np.zeros((stop - start, n_in))
        mine = (colors >= start) & (colors < stop)
        tangents[colors[mine] - start, np.flatnonzero(mine)] = 1.0
        t = torch.from_numpy(tangents).reshape(stop - start, *in_shape)
        products[start:stop] = jvp(t)

    # Every (output, input) pair of the pattern: channels times axis pairs.
    pairs = [np.nonzero(r) for r in reach]
    grids = np.meshgrid(
        np.arange(out_shape[0]),
        np.arange(in_shape[0]),
        *[np.arange(len(p[0])) for p in pairs],
        indexing="ij",
        sparse=True,
    )
    rows, cols = grids[0], grids[1]
    for axis, (o, i) in enumerate(pairs):
        rows = rows * out_shape[1 + axis] + o[grids[2 + axis]]
        cols = cols * in_shape[1 + axis] + i[grids[2 + axis]]
    rows, cols = np.broadcast_arrays(rows, cols)
    rows, cols = rows.reshape(-1), cols.reshape(-1)
    values = products[colors[cols], rows]
    keep = values != 0
    out = sp.csr_array(
        (values[keep].astype(dtype), (rows[keep], cols[keep])), shape=(n_out, n_in)
    )
    out.sum_duplicates()
    out.sort_indices()
    return out


def _diagonal_values(layer):
    """The diagonal of a layer whose matrix is diagonal (an activation at a
    point, zeros of a flat piece possibly not stored), else None."""
    m = layer.built.matrix
    if (
        layer.virtual is not None
        or m is None
        or tuple(layer.built.out_shape) != tuple(layer.in_shape)
    ):
        return None
    return diagonal_of(m)


def diagonal_of(matrix):
    """The diagonal of a square matrix that is diagonal (zeros possibly not
    stored), as a float64 vector, else None."""
    m = sp.csr_array(matrix)
    if m.shape[0] != m.shape[1]:
        return None
    counts = np.diff(m.indptr)
    if counts.max(initial=0) > 1:
        return None
    rows = np.flatnonzero(counts)
    if not np.array_equal(m.indices, rows):
        return None
    d = np.zeros(m.shape[0], dtype=np.float64)
    d[rows] = m.data
    return d


def _upconv_step(layer, conv, device):
    """Nearest upsampling by s then a stride-1 convolution, as one transposed
    convolution of stride s on the coarse grid: each coarse entry reaches a
    window of s + k - 1 fine outputs per axis, which costs about s / k times
    less per axis than convolving the upsampled input."""
    import torch
    import torch.nn.functional as F

    transposed = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
    if (
        type(conv) not in (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
        or conv.groups != 1
        or conv.padding_mode != "zeros"
        or any(v != 1 for v in conv.stride)
        or any(v != 1 for v in conv.dilation)
        or isinstance(conv.padding, str)
    ):
        return None
    k, p = tuple(conv.kernel_size), tuple(conv.padding)
    coarse, out = layer.in_shape[1:], layer.built.out_shape[1:]
    fine = [o + kk - 1 - 2 * pp for o, kk, pp in zip(out, k, p)]
    if any(f % c or pp > kk - 1 for f, c, kk, pp in zip(fine, coarse, k, p)):
        return None
    scale = tuple(f // c for f, c in zip(fine, coarse))
    kernel = conv.weight.detach().to(device="cpu", dtype=torch.float64).numpy()
    for axis, (s, kk, pp) in enumerate(zip(scale, k, p)):
        # Offset a of the transposed kernel receives tap t when fine output
        # s*i + a - (kk - 1 - pp) reads coarse entry i through tap t.
        a = np.arange(s + kk - 1)[:, None] - (kk - 1 - pp)
        t = np.arange(kk)[None, :]
        select = ((a >= pp - t) & (a <= pp - t + s - 1)).astype(np.float64)
        kernel = np.moveaxis(
            np.tensordot(kernel, select, axes=([2 + axis], [1])), -1, 2 + axis
        )
    kernel = torch.from_numpy(np.ascontiguousarray(kernel.swapaxes(0, 1)))
    kernel = kernel.to(device)
    padding = tuple(kk - 1 - pp for kk, pp in zip(k, p))
    function = transposed[len(k)]

    def step(t):
        return function(t, kernel, stride=scale, padding=padding)

    return step


def linearized_forward(layers, device):
    """``t -> J t`` for a batch of tangents, through the chain's own layers.

    Each convolution runs as the torch layer without its bias, each diagonal
    (an activation at the point) scales, and a fused upsampling and
    convolution runs as one transposed convolution. Every step is checked on
    a random vector against the layer's matrix. None when a layer is not one
    of these (the caller then differentiates the model itself).
    """
    import copy

    import torch

    steps = []
    rng = np.random.default_rng(0)
    for layer in layers:
        d = _diagonal_values(layer)
        module = layer.module
        step = None
        if d is not None:
            scale = torch.from_numpy(d.reshape(layer.in_shape)).to(device)

            def step(t, scale=scale):
                return t * scale

        elif "+" in layer.path:
            step = _upconv_step(layer, module, device)
        elif isinstance(module, torch.nn.modules.conv._ConvNd) and not isinstance(
            module, torch.nn.modules.conv._ConvTransposeNd
        ):
            conv = copy.deepcopy(module).to(device=device, dtype=torch.float64)
            weight = conv.weight.detach()

            def step(t, conv=conv, weight=weight):
                return conv._conv_forward(t, weight, None)

        if step is None:
            return None
        # Sampled rows of the layer's matrix against the step on one vector.
        v = rng.standard_normal(int(np.prod(layer.in_shape)))
        n_out = int(np.prod(layer.built.out_shape))
        rows = np.sort(rng.choice(n_out, size=min(n_out, 256), replace=False))
        if layer.virtual is not None:
            expected = layer.virtual.rows(rows) @ v
        else:
            expected = sp.csr_array(layer.built.matrix)[rows] @ v
        with torch.no_grad():
            t = torch.from_numpy(v.reshape(1, *layer.in_shape)).to(device)
            got = step(t).reshape(-1).cpu().numpy()
        if got.shape != (n_out,):
            return None
        got = got[rows]
        if not np.allclose(
            got, expected, rtol=1e-10, atol=1e-12 * max(np.abs(expected).max(), 1)
        ):
            logger.debug("layer %s: linearized step does not match", layer.path)
            return None
        steps.append(step)

    def forward(tangents):
        with torch.no_grad():
            t = tangents.to(device)
            for step in steps:
                t = step(t)
        return t.reshape(t.shape[0], -1).cpu().numpy()

    return forward
