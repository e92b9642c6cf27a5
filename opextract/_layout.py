"""The two layouts of an operator: *compact* and *padded*.

*compact* is PyTorch's flatten order ``(C, *spatial)``. *padded* is the
literature's zero-padded vectorization: every channel's image gets one ring of
zeros (one extra position at both ends of every spatial axis). The embedding
``E`` maps a compact vector to its padded one; a padded operator is
``E_out @ A @ E_in.T``, so the rows and columns of padding positions are zero.
Shapes without spatial axes (``(C,)``) are the same in both layouts.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from numpy.typing import DTypeLike

from opextract._validate import check_layout, check_shape, index_dtype


def padded_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """``(C, n_1 + 2, ..., n_d + 2)`` for ``shape = (C, n_1, ..., n_d)``."""
    return (shape[0], *(n + 2 for n in shape[1:]))


def layout_size(shape: tuple[int, ...], layout: str) -> int:
    """Length of the vector of one sample of ``shape`` in ``layout``."""
    if layout == "padded":
        return int(np.prod(padded_shape(shape)))
    return int(np.prod(shape))


def _padded_positions(shape: tuple[int, ...]) -> np.ndarray:
    """Index in the padded vector of every compact position, in compact order."""
    padded = padded_shape(shape)
    grids = np.indices(shape, sparse=True)
    index = grids[0] * 0
    for axis, grid in enumerate(grids):
        offset = 0 if axis == 0 else 1
        index = index * padded[axis] + (grid + offset)
    return np.broadcast_to(index, shape).reshape(-1)


def padding_embedding(
    shape: tuple[int, ...], *, dtype: DTypeLike = np.float64
) -> sp.csr_array:
    """The zero-padding embedding ``E`` from the compact to the padded layout.

    Parameters
    ----------
    shape : tuple of int
        ``(C, *spatial)`` of one sample.
    dtype : numpy dtype
        Value dtype of ``E``.

    Returns
    -------
    E : scipy.sparse.csr_array of shape (C * prod(n_i + 2), C * prod(n_i))
        ``E @ x.ravel()`` is ``x`` with a ring of zeros around every channel,
        raveled; ``E.T @ E`` is the identity, ``E.T`` crops the ring.

    Examples
    --------
    >>> E = padding_embedding((1, 1, 1))
    >>> E.shape
    (9, 1)
    >>> E.toarray().ravel()
    array([0., 0., 0., 0., 1., 0., 0., 0., 0.])
    """
    shape = check_shape(shape, name="shape")
    n_padded = layout_size(shape, "padded")
    n = int(np.prod(shape))
    rows = _padded_positions(shape)
    idx = index_dtype(n_padded)
    # Rows of padding positions are empty: indptr steps by one at each
    # compact position only.
    counts = np.zeros(n_padded, dtype=idx)
    counts[rows] = 1
    indptr = np.zeros(n_padded + 1, dtype=idx)
    np.cumsum(counts, out=indptr[1:])
    return sp.csr_array(
        (np.ones(n, dtype=dtype), np.arange(n, dtype=idx), indptr),
        shape=(n_padded, n),
    )


def to_layout(
    matrix: sp.csr_array,
    out_shape: tuple[int, ...],
    in_shape: tuple[int, ...],
    layout: str,
) -> sp.csr_array:
    """Return a compact ``matrix`` in ``layout`` (``E_out @ A @ E_in.T``)."""
    layout = check_layout(layout)
    if layout == "compact":
        return matrix
    matrix = sp.csr_array(matrix)
    rows = _padded_positions(out_shape)
    cols = _padded_positions(in_shape)
    n_out = layout_size(out_shape, "padded")
    n_in = layout_size(in_shape, "padded")
    idx = index_dtype(max(matrix.nnz, n_out, n_in))
    counts = np.zeros(n_out, dtype=np.int64)
    counts[rows] = np.diff(matrix.indptr)
    indptr = np.zeros(n_out + 1, dtype=idx)
    np.cumsum(counts, out=indptr[1:])
    # The padded positions keep compact order, so sorted columns stay sorted.
    indices = cols[matrix.indices].astype(idx)
    out = sp.csr_array((matrix.data, indices, indptr), shape=(n_out, n_in))
    out.has_sorted_indices = matrix.has_sorted_indices
    return out


def compact_to_padded(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Padded vectors from compact ones: ``x`` of shape (..., prod(shape))."""
    x = np.asarray(x)
    out = np.zeros(x.shape[:-1] + (layout_size(shape, "padded"),), dtype=x.dtype)
    out[..., _padded_positions(shape)] = x
    return out


def padded_to_compact(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Compact vectors from padded ones (the ring is dropped)."""
    return np.asarray(x)[..., _padded_positions(shape)]
