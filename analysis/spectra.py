"""Eigenpairs and singular triplets of operators.

:func:`eigs` and :func:`svds` take an operator as a dense array, a scipy sparse
matrix, a torch tensor or a ``scipy.sparse.linalg.LinearOperator`` and choose
a method by its cost (``method="auto"``): dense LAPACK for small problems or
when ``k`` is a large fraction of the size, ARPACK when products are applied
one vector at a time, and a restarted block Krylov method when the operator
applies to a block of vectors at a much lower cost per vector than to a
single one (a dense array through BLAS, a batched torch forward).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import numpy as np
import scipy.linalg
import scipy.sparse.linalg as spla

from analysis._linalg import (
    Operator,
    as_operator,
    block_speedup,
    check_k,
    make_rng,
    orth_against,
)
from opextract import NonConvergenceWarning

__all__ = ["eigs", "svds", "choose_method"]

logger = logging.getLogger(__name__)

# Problems with n at most this size are solved densely: LAPACK on a 512 x 512
# matrix takes well under a second, less than the set-up of an iterative one.
DENSE_MAX_N = 512
# ... and so are those asking for at least this fraction of all pairs, where a
# Krylov basis would have to be nearly as large as the matrix.
DENSE_K_FRACTION = 0.25
# For a LinearOperator the block method is chosen when the measured cost per
# vector of a block product is at most 1 / BLOCK_SPEEDUP of a single-vector
# product: restarted block Krylov needs about three times the products of
# ARPACK for the same accuracy, and more work between products.
BLOCK_SPEEDUP = 4.0
# Default block size of the block method. Small blocks raise the degree of
# the Krylov polynomial built per restart cycle: on D_{64,192}'s operator,
# top-64 eigenpairs took about 2.2 times ARPACK's products with blocks of 8,
# and 7 times with blocks of 32.
DEFAULT_BLOCK = 8
# Residual tolerance of the block method when tol=0, relative to the operator's
# scale (ARPACK's tol=0 means machine precision; this is a few hundred ulps).
BLOCK_DEFAULT_TOL = 1e-12

_WHICH = ("LM", "SM", "LR", "SR", "LI", "SI")
_EIGS_METHODS = ("auto", "arpack", "dense", "block")
_SVDS_METHODS = ("auto", "arpack", "dense", "randomized", "block")


# --------------------------------------------------------------------------
# ordering and normalization


def _sort_eigenpairs(w: np.ndarray, v: np.ndarray):
    """Sort by decreasing modulus; equal moduli by decreasing imaginary part.

    A real matrix's conjugate pair has bit-identical moduli, so the pair ends
    up adjacent with the positive imaginary part first.
    """
    order = np.lexsort((-w.imag, -np.abs(w)))
    return w[order], v[:, order]


def _fix_phase(v: np.ndarray) -> np.ndarray:
    """Unit 2-norm columns whose largest-modulus entry is real and positive."""
    v = v.astype(np.complex128, copy=True)
    norms = np.linalg.norm(v, axis=0)
    norms[norms == 0] = 1.0
    v /= norms
    if v.shape[1] == 0:
        return v
    # Round moduli slightly so that entries equal up to rounding pick the same
    # (first) index in both members of a conjugate pair.
    mod = np.round(np.abs(v), 12)
    idx = np.argmax(mod, axis=0)
    pivot = v[idx, np.arange(v.shape[1])]
    phase = np.where(np.abs(pivot) > 0, np.abs(pivot) / pivot, 1.0)
    v *= phase
    v[idx, np.arange(v.shape[1])] = np.abs(v[idx, np.arange(v.shape[1])])
    return v


def _select(w: np.ndarray, which: str, k: int) -> np.ndarray:
    """Indices of the ``k`` eigenvalues ``which`` asks for."""
    key = {
        "LM": -np.abs(w),
        "SM": np.abs(w),
        "LR": -w.real,
        "SR": w.real,
        "LI": -np.abs(w.imag),
        "SI": np.abs(w.imag),
    }[which]
    return np.argsort(key, kind="stable")[:k]


# --------------------------------------------------------------------------
# method choice


def choose_method(
    operator: Any, k: int, *, kind: str = "eigs", block_size: int | None = None
) -> str:
    """The method ``method="auto"`` picks for ``operator`` and ``k``.

    Parameters
    ----------
    operator : ndarray, sparse matrix, torch.Tensor or LinearOperator
        The operator, of shape ``(m, n)`` (square for ``kind="eigs"``).
    k : int
        Number of eigenpairs or singular triplets wanted.
    kind : {"eigs", "svds"}
        Which decomposition.
    block_size : int, optional
        Block size of the block method (default ``min(k, 8)``).

    Returns
    -------
    str
        ``"dense"``, ``"arpack"`` or ``"block"``.

    Notes
    -----
    The rule, in order:

    1. ``"dense"`` when the smaller dimension ``p = min(m, n)`` is at most
       ``DENSE_MAX_N`` (512), or ``k >= DENSE_K_FRACTION * p`` (a quarter), or
       ``k`` is too large for ARPACK (``k >= n - 1`` for eigs,
       ``k >= p`` for svds).
    2. ``"arpack"`` for a dense array or a sparse matrix: their products are
       cheap next to the block method's own work between products
       (orthogonalization, the small eigenproblems), and ARPACK needs about
       a third of the products.
    3. For a LinearOperator, one product with a single vector and one with a
       block of ``block_size`` vectors are timed; ``"block"`` when the block
       costs at most ``1 / BLOCK_SPEEDUP`` (a quarter) as much per vector,
       else ``"arpack"``. A batched torch forward pass usually picks
       ``"block"``; a chain of sparse factors applied one vector at a time,
       or a LinearOperator with only ``matvec``, picks ``"arpack"``.

    Sparse operators with at least a quarter of their entries stored are
    converted to dense arrays first (when the copy is below 2 GiB).

    Examples
    --------
    >>> import numpy as np
    >>> choose_method(np.eye(10), 3)
    'dense'
    """
    op = operator if isinstance(operator, Operator) else as_operator(operator)
    return _choose(op, int(k), kind, block_size, make_rng(None))


def _choose(op: Operator, k: int, kind: str, block_size, rng) -> str:
    p = min(op.shape)
    arpack_limit = op.shape[0] - 1 if kind == "eigs" else p
    if p <= DENSE_MAX_N or k >= DENSE_K_FRACTION * p or k >= arpack_limit:
        return "dense"
    b = block_size or min(k, DEFAULT_BLOCK)
    if b < 2 or op.kind != "linop":
        return "arpack"
    ratio = block_speedup(op, b, rng)
    method = "block" if ratio >= BLOCK_SPEEDUP else "arpack"
    logger.info("block speedup %.2f per vector: method %s", ratio, method)
    return method


def _check_common(method, methods, tol, maxiter, ncv):
    if method not in methods:
        raise ValueError(f"method must be one of {methods}; got {method!r}")
    if not np.isfinite(tol) or tol < 0:
        raise ValueError(f"tol must be a finite number >= 0; got {tol!r}")
    if maxiter is not None and (int(maxiter) != maxiter or maxiter < 1):
        raise ValueError(f"maxiter must be a positive integer; got {maxiter!r}")
    if ncv is not None and (int(ncv) != ncv or ncv < 1):
        raise ValueError(f"ncv must be a positive integer; got {ncv!r}")


def _check_v0(v0, n):
    if v0 is None:
        return None
    v0 = np.asarray(v0)
    if v0.shape != (n,):
        raise ValueError(f"v0 must have shape ({n},); got {v0.shape}")
    if not np.isfinite(v0).all():
        bad = int((~np.isfinite(v0)).sum())
        raise ValueError(f"v0 must be finite; got {bad} NaN or infinite entries")
    if not np.any(v0):
        raise ValueError("v0 must not be all zero; got a zero vector")
    return v0


# --------------------------------------------------------------------------
# eigs


def eigs(
    operator: Any,
    k: int,
    *,
    which: str = "LM",
    method: str = "auto",
    tol: float = 0.0,
    ncv: int | None = None,
    maxiter: int | None = None,
    v0: np.ndarray | None = None,
    rng: Any = None,
    block_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` eigenpairs of a square operator.

    Parameters
    ----------
    operator : ndarray, sparse matrix, torch.Tensor or LinearOperator
        Square operator of shape ``(n, n)``.
    k : int
        Number of eigenpairs, ``1 <= k <= n`` (ARPACK needs ``k < n - 1``).
    which : {"LM", "SM", "LR", "SR", "LI", "SI"}
        Which eigenvalues, in scipy's meaning (largest magnitude, ...). The
        block method supports ``"LM"`` only.
    method : {"auto", "arpack", "dense", "block"}
        ``"dense"``: LAPACK ``geev`` on the whole matrix (a LinearOperator is
        applied to the identity first). ``"arpack"``: implicitly restarted
        Arnoldi, ``scipy.sparse.linalg.eigs``. ``"block"``: a block Krylov
        method restarted with its Ritz vectors, which applies the operator to
        ``block_size`` vectors at a time. ``"auto"``: see
        :func:`choose_method`.
    tol : float
        Relative residual tolerance; 0 means machine precision for ARPACK and
        ``1e-12`` times the operator's scale for the block method.
    ncv : int, optional
        Krylov basis size (ARPACK's meaning; for the block method the largest
        basis, default ``max(4 k, k + 4 b, 64)`` capped at ``n``).
    maxiter : int, optional
        ARPACK's maximum number of restarts, or the block method's number of
        restart cycles (default 100).
    v0 : ndarray of shape (n,), optional
        Starting vector (for the block method: the first column of the
        starting block).
    rng : None, int or numpy.random.Generator
        Source of the random starting vectors; ``None`` means seed 0, so that
        repeated calls return the same result.
    block_size : int, optional
        Block size ``b`` of the block method (default ``min(k, 8)``).

    Returns
    -------
    w : ndarray of shape (k,), complex
        Eigenvalues in decreasing modulus; a real operator's complex conjugate
        pairs are adjacent, positive imaginary part first.
    v : ndarray of shape (n, k), complex
        Eigenvectors, ``v[:, i]`` belongs to ``w[i]``.

    Warns
    -----
    opextract.NonConvergenceWarning
        When an iterative method stops before all ``k`` pairs converged; the
        converged pairs are returned (fewer than ``k``).

    Notes
    -----
    Each eigenvector has unit 2-norm and is multiplied by the phase that
    makes its largest-modulus entry real and positive (the first such entry
    on ties), so real eigenvectors come back real (zero imaginary part) with
    a fixed sign, and the two vectors of a conjugate pair are conjugates.
    When ``k`` cuts a conjugate pair, only its first member is returned.

    Examples
    --------
    >>> import numpy as np
    >>> a = np.diag([3.0, -2.0, 1.0]) + np.diag([0.5, 0.5], 1)
    >>> w, v = eigs(a, 2)
    >>> np.round(w.real, 6)
    array([ 3., -2.])
    >>> rot = np.array([[0.0, -1.0], [1.0, 0.0]])
    >>> eigs(rot, 2)[0]
    array([0.+1.j, 0.-1.j])
    """
    op = as_operator(operator, square=True)
    n = op.shape[0]
    _check_common(method, _EIGS_METHODS, tol, maxiter, ncv)
    if which not in _WHICH:
        raise ValueError(f"which must be one of {_WHICH}; got {which!r}")
    k = check_k(k, n, f"1 <= k <= n (n = {n})")
    v0 = _check_v0(v0, n)
    if block_size is not None:
        block_size = check_k(
            block_size, n, f"1 <= block_size <= n (n = {n})", "block_size"
        )
    if method == "arpack" and k >= n - 1:
        raise ValueError(
            f"k must satisfy k < n - 1 for method='arpack' (n = {n}); got k={k}; "
            "use method='dense'"
        )
    if method == "block" and which != "LM":
        raise ValueError(f"which must be 'LM' for method='block'; got {which!r}")
    rng = make_rng(rng)

    if method == "auto":
        method = "dense" if which != "LM" and n <= DENSE_MAX_N else method
        if method == "auto":
            method = _choose(op, k, "eigs", block_size, rng)
            if method == "block" and which != "LM":
                method = "arpack"
    logger.debug("eigs: n=%d k=%d method=%s", n, k, method)

    if method == "dense":
        w, v = scipy.linalg.eig(op.dense())
        idx = _select(w, which, k)
        w, v = w[idx], v[:, idx]
    elif method == "arpack":
        w, v = _eigs_arpack(op, k, which, tol, ncv, maxiter, v0, rng)
    else:
        w, v = _eigs_block(op, k, tol, ncv, maxiter, v0, rng, block_size)

    w, v = _sort_eigenpairs(np.asarray(w, dtype=np.complex128), v)
    return w, _fix_phase(v)


def _warn_partial(found: int, k: int, what: str, method: str) -> None:
    warnings.warn(
        f"{method} converged for {found} of k={k} {what}; returning those "
        "(raise maxiter or ncv, or use method='dense')",
        NonConvergenceWarning,
        stacklevel=4,
    )


def _eigs_arpack(op, k, which, tol, ncv, maxiter, v0, rng):
    n = op.shape[0]
    if v0 is None:
        v0 = rng.standard_normal(n)
    try:
        return spla.eigs(
            op.obj, k=k, which=which, tol=tol, ncv=ncv, maxiter=maxiter, v0=v0
        )
    except spla.ArpackNoConvergence as exc:
        w, v = exc.eigenvalues, exc.eigenvectors
        _warn_partial(len(w), k, "eigenpairs", "ARPACK")
        return w, v


def _real_basis(y: np.ndarray, real: bool) -> np.ndarray:
    """Orthonormal basis of the span of the columns of ``y``; for a real
    operator the real and imaginary parts are taken so the basis is real."""
    if real:
        y = np.hstack([y.real, y.imag])
    return scipy.linalg.orth(y, rcond=1e-10)


def _next_block(
    cand: np.ndarray, basis: np.ndarray, room: int, scale: float, rng
) -> np.ndarray:
    """Up to ``room`` orthonormal directions from ``cand``, orthogonal to
    ``basis``, topped up with random directions when ``cand`` falls short."""
    new = orth_against(cand, basis, room, 1e-13 * scale)
    if new.shape[1] < room:
        # An invariant subspace was found (or the block lost rank): continue
        # with fresh random directions.
        n = basis.shape[0]
        extra = rng.standard_normal((n, room - new.shape[1])).astype(basis.dtype)
        more = orth_against(extra, np.hstack([basis, new]), room, 1e-8)
        new = np.hstack([new, more])
    return new


def _eigs_block(op, k, tol, ncv, maxiter, v0, rng, block_size):
    n = op.shape[0]
    b = block_size or min(k, DEFAULT_BLOCK)
    m = min(n, ncv or max(4 * k, k + 4 * b, 64))
    m = max(m, min(n, k + b))
    cycles = maxiter or 100
    real = op.dtype.kind == "f"
    dtype = np.float64 if real else np.complex128

    start = rng.standard_normal((n, b))
    if v0 is not None:
        start[:, 0] = v0.real if real else v0
    basis = np.linalg.qr(start.astype(dtype))[0]
    image = op.matmat(basis).astype(dtype, copy=False)
    last = basis.shape[1]
    scale = 0.0
    conv = np.zeros(k, dtype=bool)

    for cycle in range(cycles):
        while basis.shape[1] < m:
            scale = max(scale, float(np.linalg.norm(image, axis=0).max()))
            room = min(b, m - basis.shape[1])
            new = _next_block(image[:, -last:], basis, room, scale, rng)
            if new.shape[1] == 0:
                break
            basis = np.hstack([basis, new])
            image = np.hstack([image, op.matmat(new).astype(dtype, copy=False)])
            last = new.shape[1]

        h = basis.conj().T @ image
        theta, y = scipy.linalg.eig(h)
        order = np.argsort(-np.abs(theta), kind="stable")
        theta, y = theta[order], y[:, order]
        kk = min(k, len(theta))
        x = basis @ y[:, :kk]
        ax = image @ y[:, :kk]
        res = np.linalg.norm(ax - x * theta[:kk], axis=0)
        res /= np.maximum(np.linalg.norm(x, axis=0), 1e-300)
        scale = max(scale, float(np.abs(theta[0])))
        threshold = (tol if tol > 0 else BLOCK_DEFAULT_TOL) * max(scale, 1e-300)
        conv = res <= threshold
        logger.debug(
            "block eigs cycle %d: basis %d, %d of %d converged, max residual %.2e",
            cycle,
            basis.shape[1],
            conv.sum(),
            k,
            res.max(),
        )
        if conv.all() or basis.shape[1] >= n:
            conv[:] = True
            return theta[:kk], x

        # Thick restart with the leading Ritz vectors: their images are known
        # without products, and the next block comes from the residuals.
        keep = min(m - b, k + (m - k) // 2)
        q = _real_basis(y[:, :keep], real)[:, : m - b]
        basis = basis @ q
        image = image @ q
        last = basis.shape[1]

    _warn_partial(int(conv.sum()), k, "eigenpairs", "the block method")
    return theta[:kk][conv], x[:, conv]


# --------------------------------------------------------------------------
# svds


def svds(
    operator: Any,
    k: int,
    *,
    method: str = "auto",
    tol: float = 0.0,
    ncv: int | None = None,
    maxiter: int | None = None,
    v0: np.ndarray | None = None,
    rng: Any = None,
    block_size: int | None = None,
    n_oversamples: int = 10,
    n_iter: int = 4,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-``k`` singular triplets of an operator, in scipy's ``u, s, vh``.

    Parameters
    ----------
    operator : ndarray, sparse matrix, torch.Tensor or LinearOperator
        Operator of shape ``(m, n)``; a LinearOperator needs ``rmatmat`` (or
        ``rmatvec``) unless ``method="dense"``.
    k : int
        Number of triplets, ``1 <= k <= min(m, n)`` (ARPACK needs
        ``k < min(m, n)``).
    method : {"auto", "arpack", "dense", "randomized", "block"}
        ``"dense"``: LAPACK ``gesdd`` on the whole matrix. ``"arpack"``:
        Lanczos on the normal operator (``scipy.sparse.linalg.eigsh``),
        followed by a Rayleigh-Ritz step on the converged subspace so small
        singular values keep their accuracy. ``"randomized"``: Halko,
        Martinsson and Tropp's randomized range finder with ``n_iter`` power
        iterations and ``n_oversamples`` extra vectors (approximate, never
        chosen by ``"auto"``). ``"block"``: block Krylov on the normal
        operator, restarted with the leading right singular vectors until the
        residuals meet ``tol``. ``"auto"``: see :func:`choose_method`.
    tol : float
        Relative residual tolerance (0: machine precision for ARPACK,
        ``1e-12`` for the block method).
    ncv, maxiter, v0, rng, block_size
        As in :func:`eigs` (``v0`` has shape ``(n,)``).
    n_oversamples, n_iter : int
        Parameters of the randomized method.

    Returns
    -------
    u : ndarray of shape (m, k)
        Left singular vectors.
    s : ndarray of shape (k,)
        Singular values, decreasing.
    vh : ndarray of shape (k, n)
        Right singular vectors as rows.

    Warns
    -----
    opextract.NonConvergenceWarning
        When ARPACK or the block method stops early; the converged triplets
        are returned.

    Notes
    -----
    Signs are fixed so that the largest-modulus entry of each right singular
    vector (row of ``vh``) is positive.

    Examples
    --------
    >>> import numpy as np
    >>> a = np.diag([5.0, 3.0, 1.0, 0.5])
    >>> u, s, vh = svds(a, 2)
    >>> s
    array([5., 3.])
    >>> np.allclose(u * s @ vh, np.diag([5.0, 3.0, 0.0, 0.0]))
    True
    """
    op = as_operator(operator)
    p = min(op.shape)
    _check_common(method, _SVDS_METHODS, tol, maxiter, ncv)
    k = check_k(k, p, f"1 <= k <= min(m, n) (shape {op.shape})")
    v0 = _check_v0(v0, op.shape[1])
    if block_size is not None:
        block_size = check_k(block_size, p, f"1 <= block_size <= {p}", "block_size")
    if method == "arpack" and k >= p:
        raise ValueError(
            f"k must satisfy k < min(m, n) for method='arpack' (shape {op.shape}); "
            f"got k={k}; use method='dense'"
        )
    if n_iter < 0 or n_oversamples < 0:
        raise ValueError(
            f"n_iter and n_oversamples must be >= 0; got {n_iter}, {n_oversamples}"
        )
    rng = make_rng(rng)
    if method == "auto":
        method = _choose(op, k, "svds", block_size, rng)
    logger.debug("svds: shape=%s k=%d method=%s", op.shape, k, method)

    if method == "dense":
        u, s, vh = scipy.linalg.svd(op.dense(), full_matrices=False)
        u, s, vh = u[:, :k], s[:k], vh[:k]
    elif method == "arpack":
        u, s, vh = _svds_arpack(op, k, tol, ncv, maxiter, v0, rng)
    elif method == "randomized":
        u, s, vh = _svds_randomized(op, k, n_oversamples, n_iter, v0, rng)
    else:
        u, s, vh = _svds_block(op, k, tol, ncv, maxiter, v0, rng, block_size)

    order = np.argsort(-s, kind="stable")
    u, s, vh = u[:, order], s[order], vh[order]
    if s.size:
        idx = np.argmax(np.round(np.abs(vh), 12), axis=1)
        signs = np.sign(vh[np.arange(len(s)), idx].real)
        signs[signs == 0] = 1
        u, vh = u * signs, vh * signs[:, None]
    return u, s, vh


def _ritz_svd(op: Operator, basis: np.ndarray, image: np.ndarray | None = None):
    """SVD of ``A`` restricted to the orthonormal ``basis`` of right vectors."""
    if image is None:
        image = op.matmat(basis)
    u, s, wh = np.linalg.svd(image, full_matrices=False)
    return u, s, (basis @ wh.conj().T).conj().T


def _svds_arpack(op, k, tol, ncv, maxiter, v0, rng):
    m, n = op.shape
    lin = op.linear_operator()
    # Work on the smaller Gram matrix; its eigenvectors are right (or left)
    # singular vectors.
    if n <= m:
        gram = spla.LinearOperator(
            (n, n), matvec=lambda x: lin.rmatvec(lin.matvec(x)), dtype=op.dtype
        )
        size = n
    else:
        gram = spla.LinearOperator(
            (m, m), matvec=lambda x: lin.matvec(lin.rmatvec(x)), dtype=op.dtype
        )
        size = m
    if v0 is None or n > m:
        v0 = rng.standard_normal(size)
    try:
        _, vecs = spla.eigsh(
            gram, k=k, which="LM", tol=tol, ncv=ncv, maxiter=maxiter, v0=v0
        )
    except spla.ArpackNoConvergence as exc:
        vecs = exc.eigenvectors
        _warn_partial(vecs.shape[1], k, "singular triplets", "ARPACK")
    vecs = np.linalg.qr(vecs)[0] if vecs.shape[1] else vecs
    if n <= m:
        return _ritz_svd(op, vecs)
    # Left vectors found: A^H restricted to them gives the transpose problem.
    ut, s, vht = np.linalg.svd(op.rmatmat(vecs), full_matrices=False)
    u = vecs @ vht.conj().T
    return u, s, ut.conj().T


def _svds_randomized(op, k, n_oversamples, n_iter, v0, rng):
    n = op.shape[1]
    width = min(min(op.shape), k + n_oversamples)
    omega = rng.standard_normal((n, width)).astype(op.dtype, copy=False)
    if v0 is not None:
        omega[:, 0] = v0
    q = np.linalg.qr(op.matmat(omega))[0]
    for _ in range(n_iter):
        z = np.linalg.qr(op.rmatmat(q))[0]
        q = np.linalg.qr(op.matmat(z))[0]
    bt = op.rmatmat(q)  # B^H = A^H Q, shape (n, width)
    vb, s, ubh = np.linalg.svd(bt, full_matrices=False)
    u = q @ ubh.conj().T
    return u[:, :k], s[:k], vb[:, :k].conj().T


def _svds_block(op, k, tol, ncv, maxiter, v0, rng, block_size):
    n = op.shape[1]
    p = min(op.shape)
    b = block_size or min(k, DEFAULT_BLOCK)
    mbasis = min(p, ncv or max(4 * k, k + 4 * b, 64))
    mbasis = max(mbasis, min(p, k + b))
    cycles = maxiter or 100
    dtype = np.float64 if op.dtype.kind == "f" else np.complex128

    start = rng.standard_normal((n, b)).astype(dtype)
    if v0 is not None:
        start[:, 0] = v0
    basis = np.linalg.qr(start)[0]
    image = op.matmat(basis).astype(dtype, copy=False)
    cand = op.rmatmat(image).astype(dtype, copy=False)  # A^H A applied to last
    scale = 0.0
    conv = np.zeros(k, dtype=bool)

    for cycle in range(cycles):
        while basis.shape[1] < mbasis:
            scale = max(scale, float(np.linalg.norm(cand, axis=0).max()))
            room = min(b, mbasis - basis.shape[1])
            new = _next_block(cand, basis, room, scale, rng)
            if new.shape[1] == 0:
                break
            new_image = op.matmat(new).astype(dtype, copy=False)
            basis = np.hstack([basis, new])
            image = np.hstack([image, new_image])
            cand = op.rmatmat(new_image).astype(dtype, copy=False)

        u, s, wh = np.linalg.svd(image, full_matrices=False)
        kk = min(k, len(s))
        w = wh.conj().T
        v = basis @ w[:, :kk]
        # A v_i = s_i u_i holds by construction; check A^H u_i = s_i v_i.
        keep = min(mbasis - b, k + (mbasis - k) // 2)
        au = op.rmatmat(u[:, :keep]).astype(dtype, copy=False)
        res = np.linalg.norm(au[:, :kk] - v * s[:kk], axis=0)
        scale = max(scale, float(s[0]))
        threshold = (tol if tol > 0 else BLOCK_DEFAULT_TOL) * max(scale, 1e-300)
        conv = res <= threshold
        logger.debug(
            "block svds cycle %d: basis %d, %d of %d converged, max residual %.2e",
            cycle,
            basis.shape[1],
            conv.sum(),
            k,
            res.max(),
        )
        if conv.all() or basis.shape[1] >= p:
            return u[:, :kk], s[:kk], v.conj().T

        # Restart with the leading right vectors; A^H A on them is A^H u s.
        basis = basis @ w[:, :keep]
        image = u[:, :keep] * s[:keep]
        cand = au * s[:keep]

    _warn_partial(int(conv.sum()), k, "singular triplets", "the block method")
    return u[:, :kk][:, conv], s[:kk][conv], v[:, conv].conj().T
