"""Private plumbing shared by the spectral and rank functions.

An *operator* may arrive as a dense array, a scipy sparse matrix or array, a
torch tensor or a ``scipy.sparse.linalg.LinearOperator``. :func:`as_operator`
checks it once and wraps it in :class:`Operator`, which offers ``matmat`` and
``rmatmat`` on 2-D blocks and, when the entries are held in memory,
``dense()``. The code below the public functions trusts an :class:`Operator`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

# A sparse operator this dense (stored entries / all entries) is converted to a
# dense array before it is used in products: beyond roughly a quarter filled,
# BLAS on the dense array is faster per product than the CSR kernels, and far
# faster on blocks of vectors.
DENSIFY_DENSITY = 0.25
# ... but only when the dense copy stays below this many bytes.
DENSIFY_MAX_BYTES = 2 * 1024**3


@dataclass
class Operator:
    """A checked operator: ``kind`` is ``"array"``, ``"sparse"`` or ``"linop"``."""

    kind: str
    obj: Any
    shape: tuple[int, int]
    dtype: np.dtype

    def matmat(self, x: np.ndarray) -> np.ndarray:
        if self.kind == "linop":
            return np.asarray(self.obj.matmat(x))
        return np.asarray(self.obj @ x)

    def rmatmat(self, x: np.ndarray) -> np.ndarray:
        if self.kind == "linop":
            return np.asarray(self.obj.rmatmat(x))
        return np.asarray(self.obj.conj().T @ x)

    def matvec(self, x: np.ndarray) -> np.ndarray:
        if self.kind == "linop":
            return np.asarray(self.obj.matvec(x)).ravel()
        return np.asarray(self.obj @ x).ravel()

    def dense(self) -> np.ndarray:
        """The operator as a dense array (a LinearOperator is applied to I)."""
        if self.kind == "array":
            return self.obj
        if self.kind == "sparse":
            return self.obj.toarray()
        eye = np.eye(self.shape[1], dtype=self.dtype)
        return np.asarray(self.obj.matmat(eye))

    def linear_operator(self) -> spla.LinearOperator:
        if self.kind == "linop":
            return self.obj
        return spla.aslinearoperator(self.obj)


def as_operator(
    operator: Any, *, name: str = "operator", square: bool = False
) -> Operator:
    """Check ``operator`` and wrap it; dense-enough sparse input is densified."""
    if hasattr(operator, "detach") and hasattr(operator, "cpu"):
        operator = operator.detach().cpu().numpy()

    if isinstance(operator, spla.LinearOperator):
        kind, obj = "linop", operator
        dtype = np.dtype(operator.dtype) if operator.dtype is not None else None
        if dtype is None or dtype.kind not in "fc":
            dtype = np.dtype(np.float64)
    elif sp.issparse(operator):
        kind, obj = "sparse", sp.csr_array(operator)
        if obj.dtype.kind not in "fc":
            obj = obj.astype(np.float64)
        dtype = obj.dtype
    else:
        obj = np.asarray(operator) if not isinstance(operator, (str, bytes)) else None
        if obj is None or obj.dtype.kind not in "fciub":
            raise TypeError(
                f"{name} must be an ndarray, a scipy sparse matrix, a torch "
                f"tensor or a LinearOperator; got {type(operator).__name__}"
            )
        kind = "array"
        if obj.dtype.kind not in "fc":
            obj = obj.astype(np.float64)
        dtype = obj.dtype

    shape = tuple(int(s) for s in obj.shape)
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"{name} must be 2-D with positive sizes; got shape {shape}")
    if square and shape[0] != shape[1]:
        raise ValueError(f"{name} must be square; got shape {shape}")

    if kind == "array" and not np.isfinite(obj).all():
        raise ValueError(
            f"{name} must have finite entries; got {int((~np.isfinite(obj)).sum())} "
            "NaN or infinite entries"
        )
    if kind == "sparse":
        if not np.isfinite(obj.data).all():
            raise ValueError(
                f"{name} must have finite entries; got "
                f"{int((~np.isfinite(obj.data)).sum())} NaN or infinite entries"
            )
        n_entries = shape[0] * shape[1]
        dense_bytes = n_entries * obj.dtype.itemsize
        if obj.nnz >= DENSIFY_DENSITY * n_entries and dense_bytes <= DENSIFY_MAX_BYTES:
            kind, obj = "array", obj.toarray()

    return Operator(kind=kind, obj=obj, shape=shape, dtype=np.dtype(dtype))


def check_k(k: Any, limit: int, rule: str, name: str = "k") -> int:
    """Return ``int(k)`` after checking ``1 <= k <= limit``."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"{name} must be an integer; got {k!r}")
    k = int(k)
    if k < 1 or k > limit:
        raise ValueError(f"{name} must satisfy {rule}; got {name}={k}")
    return k


def make_rng(rng: Any) -> np.random.Generator:
    """A Generator from None (seed 0, so results repeat), an int or a Generator."""
    if rng is None:
        return np.random.default_rng(0)
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


def block_speedup(op: Operator, block: int, rng: np.random.Generator) -> float:
    """Measured cost of one product with a single vector over the cost per vector
    of one product with a block of ``block`` vectors (larger: blocks pay off).
    """
    n = op.shape[1]
    x = rng.standard_normal((n, 1)).astype(op.dtype, copy=False)
    xb = rng.standard_normal((n, block)).astype(op.dtype, copy=False)
    single = np.inf
    for _ in range(2):
        t0 = time.perf_counter()
        op.matmat(x)
        single = min(single, time.perf_counter() - t0)
    # The better of two runs each: the first may pay for allocation or a
    # busy machine.
    best = np.inf
    for _ in range(2):
        t0 = time.perf_counter()
        op.matmat(xb)
        best = min(best, time.perf_counter() - t0)
    return single / max(best / block, 1e-12)


def orth_against(c: np.ndarray, basis: np.ndarray, max_cols: int, floor: float):
    """Orthonormal basis of the part of ``span(c)`` orthogonal to ``basis``.

    Classical Gram-Schmidt applied twice (enough for orthogonality to working
    precision), then a truncated SVD that keeps at most ``max_cols`` directions
    with singular value above ``floor``.
    """
    for _ in range(2):
        if basis.shape[1]:
            c = c - basis @ (basis.conj().T @ c)
    if c.shape[1] == 0:
        return c
    u, s, _ = np.linalg.svd(c, full_matrices=False)
    keep = int(min(max_cols, np.count_nonzero(s > floor)))
    u = u[:, :keep]
    if basis.shape[1] and keep:
        # One more pass: the SVD mixes in rounding errors along ``basis``.
        u = u - basis @ (basis.conj().T @ u)
        u, _ = np.linalg.qr(u)
    return u
