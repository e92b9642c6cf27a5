"""Shared assertions and tolerances for the test suite.

Import from a test module as ``from _helpers import assert_close, tolerance``
(pytest puts ``tests/`` on ``sys.path``). Keep tolerances here, one entry per
dtype, rather than choosing them test by test.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

# Comparisons of an exported operator against the torch forward pass. The
# float64 entries allow for the different summation order of a sparse product
# and a convolution; float32 for single-precision accumulation over a few
# thousand terms.
TOLERANCES: dict[np.dtype, dict[str, float]] = {
    np.dtype(np.float64): {"rtol": 1e-10, "atol": 1e-12},
    np.dtype(np.float32): {"rtol": 2e-4, "atol": 1e-5},
}


def tolerance(dtype) -> dict[str, float]:
    """Return ``{"rtol": ..., "atol": ...}`` for comparisons in ``dtype``."""
    return dict(TOLERANCES[np.dtype(dtype)])


def _as_dense(value) -> np.ndarray:
    if sp.issparse(value):
        return value.toarray()
    if hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def assert_close(
    actual,
    expected,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    dtype=None,
    n_worst: int = 5,
    label: str = "",
) -> None:
    """Assert ``|actual - expected| <= atol + rtol * |expected|`` entrywise.

    Accepts ndarrays, torch tensors and scipy sparse matrices (densified). When
    ``rtol``/``atol`` are not given they come from :data:`TOLERANCES` for
    ``dtype`` (default: the dtype of ``actual``, float64 when not floating).
    On failure the message lists the ``n_worst`` entries with the largest
    excess over the tolerance, with their indices and both values.
    """
    a = _as_dense(actual)
    e = _as_dense(expected)
    if dtype is None:
        dtype = a.dtype if a.dtype in (np.float32, np.float64) else np.float64
    tol = tolerance(dtype)
    rtol = tol["rtol"] if rtol is None else rtol
    atol = tol["atol"] if atol is None else atol
    prefix = f"{label}: " if label else ""

    if a.shape != e.shape:
        raise AssertionError(
            f"{prefix}shapes differ: actual {a.shape}, expected {e.shape}"
        )
    a64 = a.astype(np.float64, copy=False)
    e64 = e.astype(np.float64, copy=False)
    if a64.size == 0:
        return
    excess = np.abs(a64 - e64) - (atol + rtol * np.abs(e64))
    excess = np.where(np.isnan(excess), np.inf, excess)
    if not (excess > 0).any():
        return

    n_bad = int((excess > 0).sum())
    flat = np.argsort(excess, axis=None)[::-1][: min(n_worst, n_bad)]
    lines = [
        f"{prefix}{n_bad} of {a64.size} entries differ beyond "
        f"atol={atol:g} + rtol={rtol:g}*|expected|; "
        f"max abs diff {np.nanmax(np.abs(a64 - e64)):.3e}; worst:"
    ]
    for i in flat:
        idx = np.unravel_index(i, a64.shape)
        lines.append(
            f"  at {tuple(int(j) for j in idx)}: actual {float(a64[idx])!r}, "
            f"expected {float(e64[idx])!r}, diff {a64[idx] - e64[idx]:.3e}"
        )
    raise AssertionError("\n".join(lines))
