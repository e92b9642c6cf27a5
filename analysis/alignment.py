"""How far eigenvectors lie from the span of the training images, and the
eigenvectors as images."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.linalg

from analysis.ranks import flatten_images, span_basis

__all__ = ["Alignment", "span_alignment", "eigenvector_images"]

_LAYOUTS = ("compact", "padded")


@dataclass
class Alignment:
    """Angles between vectors and the span of a set of images.

    Attributes
    ----------
    angles_real, angles_imag : ndarray of shape (k,)
        Angle in radians between the real (imaginary) part of each vector and
        the span; NaN where that part is zero (the imaginary part of a real
        eigenvector).
    residual_real, residual_imag : ndarray of shape (k,)
        ``||x - P x|| / ||x||`` for each part ``x``, ``P`` the orthogonal
        projector onto the span (the sine of the angle); NaN where undefined.
    principal_angles : ndarray
        Principal angles in radians, increasing, between the subspace spanned
        by all real and imaginary parts together and the span of the images;
        ``min(block_dim, span_dim)`` of them.
    block_dim : int
        Dimension of the subspace spanned by the vectors' parts.
    span_dim : int
        Dimension of the span of the images.
    """

    angles_real: np.ndarray
    angles_imag: np.ndarray
    residual_real: np.ndarray
    residual_imag: np.ndarray
    principal_angles: np.ndarray
    block_dim: int
    span_dim: int

    @property
    def max_residual(self) -> float:
        """Largest residual over all defined real and imaginary parts."""
        both = np.concatenate([self.residual_real, self.residual_imag])
        both = both[~np.isnan(both)]
        return float(both.max()) if both.size else float("nan")

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for key, value in self.__dict__.items():
            out[key] = value.tolist() if isinstance(value, np.ndarray) else value
        return out


def _angles(parts: np.ndarray, basis: np.ndarray):
    norms = np.linalg.norm(parts, axis=0)
    inside = basis @ (basis.T @ parts)
    out = np.linalg.norm(parts - inside, axis=0)
    defined = norms > 0
    angle = np.full(parts.shape[1], np.nan)
    residual = np.full(parts.shape[1], np.nan)
    # arctan2 keeps small angles accurate, where arccos of a cosine near 1
    # would not.
    angle[defined] = np.arctan2(out[defined], np.linalg.norm(inside, axis=0)[defined])
    residual[defined] = out[defined] / norms[defined]
    return angle, residual


def span_alignment(vectors: Any, X: Any, *, rtol: float | None = None) -> Alignment:
    """Angles between eigenvectors (real and imaginary parts) and span X.

    Parameters
    ----------
    vectors : ndarray of shape (d, k) or (d,)
        Vectors as columns (as :func:`analysis.eigs` returns them), real or
        complex, in the layout of ``X``.
    X : array_like or torch.Tensor of shape (n_images, ...)
        The images, ``d`` entries each once flattened.
    rtol : float, optional
        Tolerance deciding the span, as in :func:`analysis.span_dimension`.

    Returns
    -------
    Alignment

    Examples
    --------
    >>> import numpy as np
    >>> x = np.eye(3)[:2]                                  # span of e1, e2
    >>> v = np.array([[1.0, 1.0], [0.0, 0.0], [0.0, 1.0]])
    >>> a = span_alignment(v, x)
    >>> np.degrees(a.angles_real).round(6)
    array([ 0., 45.])
    >>> a.principal_angles.round(6)
    array([0.      , 1.570796])
    """
    flat = flatten_images(X)
    v = np.asarray(vectors)
    if v.ndim == 1:
        v = v[:, None]
    if v.ndim != 2 or v.shape[0] != flat.shape[1] or v.shape[1] < 1:
        raise ValueError(
            f"vectors must have shape (d, k) with d = {flat.shape[1]} entries per "
            f"image of X and k >= 1; got shape {v.shape}"
        )
    if not np.isfinite(v).all():
        raise ValueError("vectors must be finite; got NaN or infinite entries")
    basis, dim = span_basis(flat, rtol)
    if dim == 0:
        raise ValueError(
            "X must span at least one direction; got all images zero (span dimension 0)"
        )

    real, imag = v.real.astype(np.float64), np.imag(v).astype(np.float64)
    angles_real, residual_real = _angles(real, basis)
    angles_imag, residual_imag = _angles(imag, basis)
    parts = np.hstack([real, imag[:, np.linalg.norm(imag, axis=0) > 0]])
    block = scipy.linalg.orth(parts)
    principal = np.sort(scipy.linalg.subspace_angles(block, basis))
    return Alignment(
        angles_real=angles_real,
        angles_imag=angles_imag,
        residual_real=residual_real,
        residual_imag=residual_imag,
        principal_angles=principal,
        block_dim=int(block.shape[1]),
        span_dim=dim,
    )


def eigenvector_images(
    vectors: Any, input_shape: Sequence[int], layout: str = "compact"
) -> np.ndarray:
    """Eigenvectors back as images, real and imaginary parts.

    Parameters
    ----------
    vectors : ndarray of shape (d, k) or (d,)
        Vectors as columns. ``d = prod(input_shape)`` for the compact layout,
        ``C * (H + 2) * (W + 2)`` (2 more per spatial axis) for the padded one.
    input_shape : tuple of int
        ``(C, H, W)`` (or ``(C, *spatial)``) without padding.
    layout : {"compact", "padded"}
        The vectors' layout; in the padded layout the ring of padding is
        stripped.

    Returns
    -------
    ndarray of shape (k, 2, C, H, W)
        ``[:, 0]`` the real parts, ``[:, 1]`` the imaginary parts.

    Examples
    --------
    >>> import numpy as np
    >>> v = np.zeros((16, 1), complex)
    >>> v[[5, 6, 9, 10], 0] = [1, 2, 3, 4j]      # padded 1 x 2 x 2 image
    >>> eigenvector_images(v, (1, 2, 2), "padded")[0]
    array([[[[1., 2.],
             [3., 0.]]],
    <BLANKLINE>
    <BLANKLINE>
           [[[0., 0.],
             [0., 4.]]]])
    """
    shape = tuple(input_shape) if isinstance(input_shape, Sequence) else None
    if (
        not shape
        or len(shape) < 2
        or not all(isinstance(s, (int, np.integer)) and s > 0 for s in shape)
    ):
        raise ValueError(
            "input_shape must be (C, H, W) (or (C, *spatial)) with positive sizes; "
            f"got {input_shape!r}"
        )
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be one of {_LAYOUTS}; got {layout!r}")
    stored = shape if layout == "compact" else (shape[0], *(s + 2 for s in shape[1:]))
    v = np.asarray(vectors)
    if v.ndim == 1:
        v = v[:, None]
    d = int(np.prod(stored))
    if v.ndim != 2 or v.shape[0] != d:
        raise ValueError(
            f"vectors must have shape (d, k) with d = {d} for input_shape {shape} in "
            f"the {layout} layout; got shape {v.shape}"
        )
    k = v.shape[1]
    images = np.stack([v.real.T, np.imag(v).T], axis=1).reshape(k, 2, *stored)
    if layout == "padded":
        inner = (slice(None), slice(None), slice(None)) + tuple(
            slice(1, -1) for _ in shape[1:]
        )
        images = images[inner]
    return np.ascontiguousarray(images, dtype=np.float64)
