"""SVD ablation: how many singular components the learned map really uses.

The operator ``A`` is truncated to its top ``k`` singular components,
``A_k = U_k S_k V_k^T``, and each training image ``x`` is reconstructed as
``A_k x``; the reconstructions are compared with the images by mean squared
error after min-max scaling, as in Table 1 of Radhakrishnan, Belkin and Uhler.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from analysis._linalg import as_operator, check_k
from analysis.ranks import flatten_images

__all__ = ["AblationResult", "svd_ablation", "minmax_scale"]

_SCALINGS = ("per_image", "global", "none")


@dataclass
class AblationResult:
    """MSE of the reconstructions by truncated operators.

    Attributes
    ----------
    ks : list of int
        The truncation ranks, in the order given.
    mse : list of float
        MSE after ``scaling`` of the reconstructions by ``A_k``, per ``k``.
    mse_all : float
        The same for the operator itself (all components).
    raw_mse, raw_mse_all : list of float, float
        The MSE without any scaling, for reference.
    scaling : str
        ``"per_image"``, ``"global"`` or ``"none"`` (see
        :func:`minmax_scale`).
    singular_values : ndarray of shape (max(ks),)
        The top singular values of the operator.
    n_images : int
        Number of training images.
    """

    ks: list[int]
    mse: list[float]
    mse_all: float
    raw_mse: list[float]
    raw_mse_all: float
    scaling: str
    singular_values: np.ndarray = field(repr=False)
    n_images: int

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["singular_values"] = self.singular_values.tolist()
        return out

    def __str__(self) -> str:
        head = (
            f"{'components':>12}  {'MSE (' + self.scaling + ')':>22}  {'raw MSE':>12}"
        )
        rows = [head, "-" * len(head)]
        rows.append(f"{'all':>12}  {self.mse_all:>22.6g}  {self.raw_mse_all:>12.6g}")
        for k, m, r in zip(self.ks, self.mse, self.raw_mse):
            rows.append(f"{'top ' + str(k):>12}  {m:>22.6g}  {r:>12.6g}")
        return "\n".join(rows)


def minmax_scale(x: np.ndarray, scaling: str = "per_image") -> np.ndarray:
    """Min-max scale flattened images to [0, 1].

    Parameters
    ----------
    x : ndarray of shape (n_images, n_features)
        Flattened images (all channels of an image in one row).
    scaling : {"per_image", "global", "none"}
        ``"per_image"``: each row becomes ``(x - min(x)) / (max(x) - min(x))``
        with min and max over that image's entries (all channels together).
        ``"global"``: the same with min and max over the whole array.
        ``"none"``: unchanged.

    Returns
    -------
    ndarray of shape (n_images, n_features)
        A constant row (or array) maps to zeros.

    Examples
    --------
    >>> import numpy as np
    >>> minmax_scale(np.array([[1.0, 3.0, 2.0], [5.0, 5.0, 5.0]]))
    array([[0. , 1. , 0.5],
           [0. , 0. , 0. ]])
    """
    if scaling not in _SCALINGS:
        raise ValueError(f"scaling must be one of {_SCALINGS}; got {scaling!r}")
    if scaling == "none":
        return x
    axis = 1 if scaling == "per_image" else None
    lo = x.min(axis=axis, keepdims=True)
    span = x.max(axis=axis, keepdims=True) - lo
    return np.divide(x - lo, span, out=np.zeros_like(x), where=span > 0)


def svd_ablation(
    operator: Any,
    X: Any,
    ks: Iterable[int],
    *,
    scaling: str = "per_image",
    method: str = "auto",
    rng: Any = None,
) -> AblationResult:
    """Reconstruction error of the training set under truncated operators.

    Parameters
    ----------
    operator : ndarray, sparse matrix, torch.Tensor or LinearOperator
        The operator ``A`` of shape ``(d, d)``, in the layout of ``X``.
    X : array_like or torch.Tensor of shape (n_images, ...)
        The training images, ``d`` entries each once flattened.
    ks : iterable of int
        Truncation ranks, each in ``1 <= k <= d``.
    scaling : {"per_image", "global", "none"}
        Min-max scaling applied to both the reconstructions and the images
        before the MSE (see :func:`minmax_scale`). The default,
        ``"per_image"``, maps each image and each reconstruction separately
        to [0, 1] over all its entries, so a perfect reconstruction scores 0.
    method : str
        Passed to :func:`analysis.svds` for the top ``max(ks)`` triplets.
    rng : None, int or numpy.random.Generator
        Passed to :func:`analysis.svds`.

    Returns
    -------
    AblationResult

    Notes
    -----
    The MSE is the mean over all images and all their entries of the squared
    difference of the scaled reconstruction ``scale(A_k x)`` and the scaled
    image ``scale(x)``. The literature does not say which min-max scaling its
    Table 1 used; ``raw_mse`` gives the unscaled figures beside it.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.eye(4)[:2].reshape(2, 1, 2, 2)      # two basis images
    >>> a = np.diag([2.0, 1.0, 0.1, 0.0])          # keeps their span
    >>> r = svd_ablation(a, x, [1, 2])
    >>> r.mse, r.mse_all
    ([0.125, 0.0], 0.0)
    """
    flat = flatten_images(X)
    op = as_operator(operator)
    d = flat.shape[1]
    if op.shape != (d, d):
        raise ValueError(
            f"operator must have shape (d, d) with d = {d} entries per image of X; "
            f"got shape {op.shape}"
        )
    if not np.any(flat):
        raise ValueError("X must have a nonzero image; got all entries zero")
    if scaling not in _SCALINGS:
        raise ValueError(f"scaling must be one of {_SCALINGS}; got {scaling!r}")
    ks = [check_k(k, d, f"1 <= k <= d (d = {d})", "ks entry") for k in ks]

    from analysis.spectra import svds

    target = minmax_scale(flat, scaling)
    full = op.matmat(flat.T).T
    mse_all = float(np.mean((minmax_scale(full, scaling) - target) ** 2))
    raw_all = float(np.mean((full - flat) ** 2))

    mse, raw = [], []
    s = np.zeros(0)
    if ks:
        u, s, vh = svds(op.obj, max(ks), method=method, rng=rng)
        coeff = flat @ vh.T * s  # (n, kmax): S V^T x for each image
        for k in ks:
            rec = coeff[:, :k] @ u[:, :k].T
            mse.append(float(np.mean((minmax_scale(rec, scaling) - target) ** 2)))
            raw.append(float(np.mean((rec - flat) ** 2)))
    return AblationResult(
        ks=ks,
        mse=mse,
        mse_all=mse_all,
        raw_mse=raw,
        raw_mse_all=raw_all,
        scaling=scaling,
        singular_values=np.asarray(s),
        n_images=flat.shape[0],
    )
