"""Rank measures of operators, rank bounds from factors, span dimensions.

Every count here is decided from singular values at a stated tolerance, and
the result carries the singular values and the tolerance it used.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp

from analysis._linalg import as_operator

__all__ = [
    "RankBound",
    "RankMeasures",
    "SpanDimension",
    "rank_bound",
    "rank_measures",
    "span_dimension",
]

# rank_bound computes a factor's exact rank by dense SVD only when
# min(m, n)**2 * max(m, n) stays below this (about a second of LAPACK);
# beyond it the structural bound is reported.
EXACT_RANK_MAX_COST = 2e9


@dataclass
class RankMeasures:
    """Rank measures of one operator, from its singular values.

    Attributes
    ----------
    numerical_rank : int
        Number of singular values ``> rtol * s[0]``.
    numpy_rank : int
        Number of singular values ``> s[0] * max(m, n) * eps``, the default
        of ``numpy.linalg.matrix_rank``.
    effective_rank : float or None
        ``exp(H(p))``, ``p = s / sum(s)``, ``H`` the Shannon entropy (Roy and
        Vetterli's effective rank); None when not all singular values are
        known.
    energy_rank : int or None
        Smallest ``r`` with ``sum(s[:r]**2) >= energy * sum(s**2)``; None when
        not all singular values are known.
    rtol, energy : float
        The tolerances used.
    numpy_tol : float
        The absolute tolerance behind ``numpy_rank``.
    shape : tuple of int
        Shape of the operator.
    singular_values : ndarray of shape (p,)
        The singular values, decreasing (``p = min(m, n)`` when complete).
    complete : bool
        Whether ``singular_values`` holds all ``min(m, n)`` of them. When not,
        ``numerical_rank`` and ``numpy_rank`` equal to ``p`` are lower bounds.
    """

    numerical_rank: int
    numpy_rank: int
    effective_rank: float | None
    energy_rank: int | None
    rtol: float
    energy: float
    numpy_tol: float
    shape: tuple[int, int]
    singular_values: np.ndarray = field(repr=False)
    complete: bool = True

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "singular_values"}
        out["shape"] = list(self.shape)
        out["singular_values"] = self.singular_values.tolist()
        return out


def _check_rtol(rtol, name="rtol"):
    if rtol is None:
        return None
    rtol = float(rtol)
    if not np.isfinite(rtol) or not 0 <= rtol < 1:
        raise ValueError(f"{name} must be a number in [0, 1); got {rtol!r}")
    return rtol


def rank_measures(
    operator_or_singular_values: Any,
    *,
    rtol: float = 1e-6,
    energy: float = 0.99,
    shape: tuple[int, int] | None = None,
    k: int | None = None,
) -> RankMeasures:
    """Numerical, numpy-default, effective and energy ranks.

    Parameters
    ----------
    operator_or_singular_values : operator or ndarray of shape (p,)
        An operator (dense array, sparse matrix, torch tensor or
        LinearOperator) of shape ``(m, n)``, or its singular values.
    rtol : float
        Relative tolerance of ``numerical_rank``, in ``[0, 1)``.
    energy : float
        Energy fraction of ``energy_rank``, in ``(0, 1]``.
    shape : tuple of int, optional
        Shape of the operator when singular values are given (for
        ``numpy_rank``; default ``(p, p)``).
    k : int, optional
        Compute only the top ``k`` singular values of an operator with
        :func:`analysis.svds` instead of all of them densely; the result is
        then not ``complete``.

    Returns
    -------
    RankMeasures

    Notes
    -----
    Without ``k`` all singular values are computed by dense SVD (a
    LinearOperator is applied to the identity first), ``O(m n min(m, n))``.

    Examples
    --------
    >>> import numpy as np
    >>> r = rank_measures(np.diag([1.0, 1.0, 1e-9, 0.0]))
    >>> r.numerical_rank, r.numpy_rank, r.energy_rank
    (2, 3, 2)
    >>> round(r.effective_rank, 6)
    2.0
    """
    rtol = _check_rtol(rtol)
    energy = float(energy)
    if not 0 < energy <= 1:
        raise ValueError(f"energy must be a number in (0, 1]; got {energy!r}")

    values = operator_or_singular_values
    is_vector = (
        not sp.issparse(values)
        and not hasattr(values, "matvec")
        and np.ndim(values) == 1
    )
    if is_vector:
        s = np.asarray(values, dtype=np.float64)
        if s.size == 0 or not np.isfinite(s).all() or (s < 0).any():
            raise ValueError(
                "singular values must be a non-empty 1-D array of finite "
                f"non-negative numbers; got {s!r}"
            )
        s = np.sort(s)[::-1]
        shape = tuple(shape) if shape is not None else (s.size, s.size)
        complete = s.size == min(shape)
    else:
        op = as_operator(values)
        shape = op.shape
        if k is None:
            s = np.linalg.svd(op.dense(), compute_uv=False)
            complete = True
        else:
            from analysis.spectra import svds

            _, s, _ = svds(op.obj, k)
            complete = k == min(shape)
    return _measures(s, rtol, energy, tuple(int(x) for x in shape), complete)


def _measures(s, rtol, energy, shape, complete) -> RankMeasures:
    smax = float(s[0]) if s.size else 0.0
    numpy_tol = smax * max(shape) * np.finfo(np.float64).eps
    numerical = int(np.count_nonzero(s > rtol * smax)) if smax > 0 else 0
    numpy_rank = int(np.count_nonzero(s > numpy_tol)) if smax > 0 else 0
    effective = energy_rank = None
    if complete:
        if smax > 0:
            p = s[s > 0] / s.sum()
            effective = float(np.exp(-(p * np.log(p)).sum()))
            cum = np.cumsum(s**2) / np.sum(s**2)
            energy_rank = int(np.searchsorted(cum, energy * (1 - 1e-12)) + 1)
        else:
            effective, energy_rank = 0.0, 0
    return RankMeasures(
        numerical_rank=numerical,
        numpy_rank=numpy_rank,
        effective_rank=effective,
        energy_rank=energy_rank,
        rtol=rtol,
        energy=energy,
        numpy_tol=numpy_tol,
        shape=shape,
        singular_values=np.asarray(s, dtype=np.float64),
        complete=complete,
    )


# --------------------------------------------------------------------------
# rank bound from factors


@dataclass
class RankBound:
    """Upper bound ``r_min`` on an operator's rank from its factors.

    Attributes
    ----------
    r_min : int
        The smallest entry of ``ranks``; ``rank(A) <= r_min``.
    ranks : list of int
        Per factor, in forward order: its exact numerical rank, or an upper
        bound on it (see ``methods``).
    methods : list of str
        Per factor: ``"svd"`` (numpy's default tolerance, exact up to
        rounding) or ``"structural"`` (the number of nonzero rows or nonzero
        columns of the stored matrix, whichever is smaller: an upper bound).
    paths : list of str
        Module paths of the factors (``"0"``, ``"1"``, ... for plain matrices).
    shapes : list of tuple of int
        Matrix shape of each factor.
    argmin : int
        Index of the factor that attains ``r_min``.
    """

    r_min: int
    ranks: list[int]
    methods: list[str]
    paths: list[str]
    shapes: list[tuple[int, int]]
    argmin: int

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["shapes"] = [list(s) for s in self.shapes]
        return out


def rank_bound(
    factors: Sequence[Any], *, max_cost: float = EXACT_RANK_MAX_COST
) -> RankBound:
    """``r_min``: the smallest rank among the factors of an operator.

    Parameters
    ----------
    factors : sequence of opextract.Factor or of matrices
        The factors in forward order (their ``.matrix`` is used when present).
        Anything with a ``.nodes`` list (an ``opextract.FactorGraph``) is
        read node by node.
    max_cost : float
        A factor's exact rank is computed by dense SVD when
        ``min(m, n)**2 * max(m, n) <= max_cost``; otherwise its structural
        bound is used (default ``2e9``, about a second).

    Returns
    -------
    RankBound

    Notes
    -----
    The rank of a product is at most the smallest rank of its factors, so
    ``r_min`` bounds the operator's rank whichever way each factor's entry was
    obtained. For a branching graph the bound holds only along its chain
    parts; the factors of a graph are treated as one chain here.

    Examples
    --------
    >>> import numpy as np
    >>> b = rank_bound([np.ones((4, 2)), np.eye(4)[:, :3] @ np.ones((3, 4))])
    >>> b.r_min, b.ranks, b.methods
    (1, [1, 1], ['svd', 'svd'])
    """
    if hasattr(factors, "nodes"):
        factors = [
            getattr(node, "factor", None)
            for node in factors.nodes
            if getattr(node, "factor", None) is not None
        ]
    factors = list(factors)
    if not factors:
        raise ValueError("factors must hold at least one factor; got none")

    ranks, methods, paths, shapes = [], [], [], []
    for i, f in enumerate(factors):
        matrix = getattr(f, "matrix", f)
        paths.append(str(getattr(f, "path", i)))
        m = sp.csr_array(matrix) if sp.issparse(matrix) else np.asarray(matrix)
        if m.ndim != 2:
            raise ValueError(
                f"factors[{i}] must be a 2-D matrix; got shape {np.shape(m)}"
            )
        rows, cols = (int(x) for x in m.shape)
        shapes.append((rows, cols))
        cost = float(min(rows, cols)) ** 2 * max(rows, cols)
        if cost <= max_cost:
            dense = m.toarray() if sp.issparse(m) else m
            ranks.append(int(np.linalg.matrix_rank(dense)))
            methods.append("svd")
        else:
            if sp.issparse(m):
                nz_rows = int(np.count_nonzero(np.diff(m.indptr)))
                nz_cols = int(np.unique(m.indices[m.data != 0]).size)
            else:
                nz_rows = int(np.count_nonzero(np.any(m != 0, axis=1)))
                nz_cols = int(np.count_nonzero(np.any(m != 0, axis=0)))
            ranks.append(min(nz_rows, nz_cols))
            methods.append("structural")
    argmin = int(np.argmin(ranks))
    return RankBound(ranks[argmin], ranks, methods, paths, shapes, argmin)


# --------------------------------------------------------------------------
# span dimension


@dataclass
class SpanDimension:
    """Dimension of the span of a set of images.

    Attributes
    ----------
    dim : int
        Number of singular values of the ``(n_images, n_features)`` matrix of
        flattened images above ``tol``.
    singular_values : ndarray of shape (min(n_images, n_features),)
        Its singular values, decreasing.
    tol : float
        The absolute threshold used.
    rtol : float or None
        The relative tolerance given (``None``: numpy's default,
        ``s[0] * max(n_images, n_features) * eps``).
    n_images, n_features : int
        Size of the set.
    """

    dim: int
    singular_values: np.ndarray = field(repr=False)
    tol: float
    rtol: float | None
    n_images: int
    n_features: int

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["singular_values"] = self.singular_values.tolist()
        return out


def flatten_images(x: Any, name: str = "X") -> np.ndarray:
    """``x`` of shape ``(n, ...)`` as a float64 ``(n, prod(...))`` array, after
    checking it is finite and has at least one image."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.dtype.kind not in "fiub":
        raise TypeError(f"{name} must be a real numeric array; got dtype {x.dtype}")
    if x.ndim < 2 or x.shape[0] < 1 or x[0].size < 1:
        raise ValueError(
            f"{name} must have shape (n_images, ...) with n_images >= 1; got shape "
            f"{x.shape} (a single image needs a leading axis: X[None])"
        )
    flat = x.reshape(x.shape[0], -1).astype(np.float64)
    bad = ~np.isfinite(flat)
    if bad.any():
        image = int(np.argwhere(bad)[0, 0])
        raise ValueError(
            f"{name} must be finite; got {int(bad.sum())} NaN or infinite values "
            f"(first in image {image})"
        )
    return flat


def span_dimension(X: Any, *, rtol: float | None = None) -> SpanDimension:
    """Dimension of the linear span of a set of images.

    Parameters
    ----------
    X : array_like or torch.Tensor of shape (n_images, ...)
        The images, any shape per image (flattened internally).
    rtol : float, optional
        Count singular values above ``rtol * s[0]``; default numpy's rule,
        ``s[0] * max(n_images, n_features) * eps``.

    Returns
    -------
    SpanDimension

    Notes
    -----
    A set of all-zero images has span dimension 0.

    Examples
    --------
    >>> import numpy as np
    >>> e = np.eye(4).reshape(4, 1, 2, 2)
    >>> span_dimension(np.stack([e[0], e[1], e[2], e[0] + e[1]])).dim
    3
    """
    flat = flatten_images(X)
    rtol = _check_rtol(rtol)
    s = np.linalg.svd(flat, compute_uv=False)
    smax = float(s[0])
    if rtol is None:
        tol = smax * max(flat.shape) * np.finfo(np.float64).eps
    else:
        tol = rtol * smax
    dim = int(np.count_nonzero(s > tol)) if smax > 0 else 0
    return SpanDimension(dim, s, float(tol), rtol, flat.shape[0], flat.shape[1])


def span_basis(flat: np.ndarray, rtol: float | None = None):
    """Orthonormal basis ``(n_features, dim)`` of the span of the rows of
    ``flat``, decided as in :func:`span_dimension`, and that dimension."""
    _, s, vh = np.linalg.svd(flat, full_matrices=False)
    smax = float(s[0])
    tol = smax * max(flat.shape) * np.finfo(np.float64).eps
    if rtol is not None:
        tol = rtol * smax
    dim = int(np.count_nonzero(s > tol)) if smax > 0 else 0
    return vh[:dim].T, dim
