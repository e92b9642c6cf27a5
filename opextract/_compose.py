"""Fast products of a chain of sparse factors.

The order of the products decides the cost: in a downsampling autoencoder
the product taken from the input side through the upsampling is hundreds of
times dearer than the same product split at the bottleneck. So:

1. A factor with exactly one entry per row and more rows than columns (a
   nearest upsampling, a replication) is folded into the factor after it,
   which costs one pass over that factor and removes the wide intermediate.
2. The average row count of every partial product is estimated by pushing a
   few sampled rows through the chain; a matrix-chain dynamic programme then
   picks the order of least estimated work.
3. Each product runs in a Numba kernel, parallel over rows: sparse into CSR,
   sparse into a dense array when the result fills in (estimated density
   above ``DENSE_FILL``), or one BLAS product when both sides are dense
   enough that BLAS's speed outweighs the skipped zeros.
"""

from __future__ import annotations

import logging

import numba
import numpy as np
import scipy.sparse as sp

from opextract import _kernels
from opextract._validate import check_bytes, csr_bytes, index_dtype

logger = logging.getLogger(__name__)

#: Estimated density above which a product is written into a dense array.
DENSE_FILL = 0.25
#: How many times faster a BLAS multiply-add runs than a sparse one here.
BLAS_SPEEDUP = 24.0
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


def multiply(x, y, *, dense: bool = False, blas: bool = False):
    """``x @ y`` for CSR arrays or dense ndarrays, by the cheapest kernel."""
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


def _is_replication(m: sp.csr_array) -> bool:
    return m.shape[0] > m.shape[1] and bool(np.all(np.diff(m.indptr) == 1))


def fold_replications(matrices: list[sp.csr_array]) -> list[sp.csr_array]:
    """Fold every one-entry-per-row expanding factor into its successor."""
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


def _plan(matrices, r, itemsize):
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
    split, method, cost = _plan(mats, r, dtype.itemsize)
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
