"""Sparse matrices of separable and structural layers.

Pooling and interpolation act on each channel alike and on each spatial axis
separately: their matrix is ``I_C (x) A_0 (x) A_1 (x) A_2`` (Kronecker
products), with ``A_d`` a small 1-D matrix per axis. :func:`kron_csr` writes
that product straight into CSR arrays with a two-pass Numba kernel (count,
allocate exactly, fill), without scipy's COO intermediate. The other helpers
build diagonal and selection matrices, the matrices of activations, dropout,
reshapes and pixel shuffles.
"""

from __future__ import annotations

import numba
import numpy as np
import scipy.sparse as sp

from opextract._validate import check_bytes, csr_bytes

_INT32_MAX = np.iinfo(np.int32).max


def index_dtype(*sizes: int) -> type:
    """int32 when every index and the nonzero count fit, else int64."""
    return np.int32 if max(sizes, default=0) <= _INT32_MAX else np.int64


def csr(data, indices, indptr, shape) -> sp.csr_array:
    """A csr_array from trusted, sorted arrays, without scipy's checks and copies."""
    matrix = sp.csr_array((data, indices, indptr), shape=shape, copy=False)
    matrix.has_sorted_indices = True
    return matrix


def diagonal(values: np.ndarray, dtype, *, drop_zeros: bool = True) -> sp.csr_array:
    """The diagonal matrix with ``values``; zero entries are left out of the pattern."""
    values = np.asarray(values, dtype=dtype).ravel()
    n = values.size
    idx = index_dtype(n)
    if drop_zeros:
        rows = np.flatnonzero(values).astype(idx)
        indptr = np.zeros(n + 1, dtype=idx)
        np.cumsum(values != 0, out=indptr[1:])
        return csr(values[rows], rows, indptr, (n, n))
    return csr(values, np.arange(n, dtype=idx), np.arange(n + 1, dtype=idx), (n, n))


def identity(n: int, dtype) -> sp.csr_array:
    """The n x n identity."""
    return diagonal(np.ones(n), dtype, drop_zeros=False)


def selection(sources: np.ndarray, n_in: int, dtype, weights=None) -> sp.csr_array:
    """Row i holds ``weights[i]`` (default 1) in column ``sources[i]`` (none if -1).

    The matrix of any layer that only moves, copies or drops entries.
    """
    sources = np.asarray(sources).ravel()
    n_out = sources.size
    idx = index_dtype(n_out, n_in)
    keep = sources >= 0
    indptr = np.zeros(n_out + 1, dtype=idx)
    np.cumsum(keep, out=indptr[1:])
    if weights is None:
        data = np.ones(int(indptr[-1]), dtype=dtype)
    else:
        data = np.asarray(weights, dtype=dtype).ravel()[keep]
    return csr(data, sources[keep].astype(idx), indptr, (n_out, n_in))


@numba.njit(cache=True, parallel=True)
def _kron_fill(
    n_channels, p0, i0, v0, p1, i1, v1, p2, i2, v2, n_cols, indptr, out_i, out_v
):
    r0, r1, r2 = p0.size - 1, p1.size - 1, p2.size - 1
    c1, c2 = n_cols[1], n_cols[2]
    n_in = n_cols[0] * c1 * c2
    # Rows (channel, a) are independent: each writes its own slice of out_i/out_v.
    for task in numba.prange(n_channels * r0):
        ch = task // r0
        a = task - ch * r0
        base = ch * n_in
        row = task * r1 * r2
        for b in range(r1):
            for c in range(r2):
                pos = indptr[row]
                for ka in range(p0[a], p0[a + 1]):
                    col_a = base + i0[ka] * c1 * c2
                    for kb in range(p1[b], p1[b + 1]):
                        col_ab = col_a + i1[kb] * c2
                        val_ab = v0[ka] * v1[kb]
                        for kc in range(p2[c], p2[c + 1]):
                            out_i[pos] = col_ab + i2[kc]
                            out_v[pos] = val_ab * v2[kc]
                            pos += 1
                row += 1


def kron_csr(n_channels: int, axes: list[sp.csr_array], dtype) -> sp.csr_array:
    """``I_{n_channels} (x) axes[0] (x) ... (x) axes[-1]`` as a csr_array.

    Parameters
    ----------
    n_channels : int
        Number of channels, each mapped by the same spatial matrix.
    axes : list of csr_array
        One to three 1-D matrices, outermost spatial axis first, each of shape
        (out_size, in_size) with sorted column indices.
    dtype : numpy dtype
        Value dtype of the result.
    """
    axes = [sp.csr_array(a) for a in axes]
    for a in axes:
        a.sort_indices()
    while len(axes) < 3:
        axes.append(sp.csr_array(np.ones((1, 1))))
    n_rows = n_channels * int(np.prod([a.shape[0] for a in axes]))
    n_cols_each = np.array([a.shape[1] for a in axes], dtype=np.int64)
    n_cols = n_channels * int(np.prod(n_cols_each))

    # First pass: nonzeros per output row are products of the per-axis counts.
    counts = [np.diff(a.indptr).astype(np.int64) for a in axes]
    row_nnz = np.multiply.outer(np.multiply.outer(counts[0], counts[1]), counts[2])
    per_channel = int(row_nnz.sum())
    nnz = n_channels * per_channel
    size, _ = csr_bytes(nnz, n_rows, n_cols, dtype)
    check_bytes(size, f"a pooling or interpolation matrix ({n_rows} x {n_cols})")
    idx = index_dtype(nnz, n_rows, n_cols)
    indptr = np.zeros(n_rows + 1, dtype=idx)
    np.cumsum(np.tile(row_nnz.ravel(), n_channels), out=indptr[1:])

    indices = np.empty(nnz, dtype=idx)
    data = np.empty(nnz, dtype=dtype)
    parts = []
    for a in axes:
        parts += [
            a.indptr.astype(np.int64),
            a.indices.astype(idx),
            a.data.astype(dtype),
        ]
    _kron_fill(n_channels, *parts, n_cols_each.astype(idx), indptr, indices, data)
    return csr(data, indices, indptr, (n_rows, n_cols))
