"""Memorization probes: does a network map new inputs onto its training images?

The literature feeds trained autoencoders inputs they never saw (Gaussian
noise, white squares, held-out images) and looks at the outputs: a network
that memorized returns (close to) one of its training images whatever the
input, one that learned the identity returns the input. This module measures
that with numbers instead of eyes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from torch import nn

from analysis.data import check_images

__all__ = ["ProbeResult", "memorization_probe"]


@dataclasses.dataclass
class ProbeResult:
    """Outputs of a network on probe inputs, and how close they are to the
    training images.

    Attributes
    ----------
    outputs : ndarray of shape (m, C, H, W)
        The network's output for each probe input.
    nearest : ndarray of shape (m,)
        Index of the training image nearest to each output.
    distances : ndarray of shape (m,)
        Distance of each output to that training image (``metric``).
    input_distances : ndarray of shape (m,)
        Distance of each output to its own input, same metric (small for a
        network that learned the identity).
    signs : ndarray of shape (m,)
        +1, or -1 where ``sign_invariant`` found ``-output`` nearer.
    within : ndarray of bool, shape (m,)
        ``distances <= tol``.
    counts : ndarray of shape (n,)
        For each training image, how many outputs landed within ``tol`` of it
        (as their nearest training image).
    tol : float
        The tolerance.
    metric : str
        ``"rmse"`` (root mean squared difference per pixel) or
        ``"relative"`` (``||output - x|| / ||x||``).
    sign_invariant : bool
        Whether ``-output`` was compared too.
    """

    outputs: np.ndarray
    nearest: np.ndarray
    distances: np.ndarray
    input_distances: np.ndarray
    signs: np.ndarray
    within: np.ndarray
    counts: np.ndarray
    tol: float
    metric: str
    sign_invariant: bool

    @property
    def n_within(self) -> int:
        """Number of outputs within ``tol`` of a training image."""
        return int(self.within.sum())

    @property
    def fraction_within(self) -> float:
        """``n_within`` divided by the number of probes."""
        return self.n_within / len(self.within)

    def summary(self) -> str:
        """One paragraph: how many outputs land on training images.

        Examples
        --------
        >>> r = ProbeResult(np.zeros((2, 1, 1, 1)), np.array([0, 0]),
        ...                 np.array([0.01, 0.3]), np.array([0.5, 0.1]),
        ...                 np.ones(2), np.array([True, False]), np.array([1]),
        ...                 0.05, "rmse", False)
        >>> print(r.summary())
        1 of 2 outputs (50.0%) lie within rmse 0.05 of a training image;
        distances to the nearest training image: median 0.155, min 0.01,
        max 0.3; distances to the input: median 0.3.
        """
        m = len(self.within)
        return (
            f"{self.n_within} of {m} outputs ({100 * self.fraction_within:.1f}%) "
            f"lie within {self.metric} {self.tol:g} of a training image;\n"
            f"distances to the nearest training image: median "
            f"{np.median(self.distances):.3g}, min {self.distances.min():.3g},\n"
            f"max {self.distances.max():.3g}; distances to the input: median "
            f"{np.median(self.input_distances):.3g}."
        )

    def __str__(self) -> str:
        return self.summary()

    def to_dict(self, *, outputs: bool = False) -> dict[str, Any]:
        """JSON-serializable dictionary (without the outputs unless asked).

        Examples
        --------
        >>> r = ProbeResult(np.zeros((1, 1, 1, 1)), np.array([0]), np.array([0.0]),
        ...                 np.array([1.0]), np.ones(1), np.array([True]),
        ...                 np.array([1]), 0.05, "rmse", False)
        >>> r.to_dict()["n_within"]
        1
        """
        out: dict[str, Any] = {
            "nearest": self.nearest.tolist(),
            "distances": self.distances.tolist(),
            "input_distances": self.input_distances.tolist(),
            "signs": self.signs.tolist(),
            "within": self.within.tolist(),
            "counts": self.counts.tolist(),
            "tol": self.tol,
            "metric": self.metric,
            "sign_invariant": self.sign_invariant,
            "n_within": self.n_within,
            "fraction_within": self.fraction_within,
        }
        if outputs:
            out["outputs"] = self.outputs.tolist()
        return out


def _forward(model: nn.Module, x: np.ndarray, batch_size: int) -> np.ndarray:
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.no_grad():
            for start in range(0, len(x), batch_size):
                xb = torch.as_tensor(x[start : start + batch_size])
                yb = model(xb.to(device=device, dtype=dtype))
                out.append(yb.detach().cpu().to(torch.float64).numpy())
    finally:
        model.train(was_training)
    return np.concatenate(out)


def memorization_probe(
    model: nn.Module,
    train_images: Any,
    probe_inputs: Any,
    *,
    tol: float = 0.05,
    metric: str = "rmse",
    sign_invariant: bool = False,
    batch_size: int = 256,
) -> ProbeResult:
    """Run ``model`` on probe inputs and match each output to the training set.

    Parameters
    ----------
    model : torch.nn.Module
        The trained network; run in eval mode without gradients on the device
        and dtype of its parameters (its mode is restored).
    train_images : array_like of shape (n, C, H, W)
        The images it was trained on.
    probe_inputs : array_like of shape (m, C, H, W)
        New inputs, e.g. :func:`analysis.data.gaussian_noise`,
        :func:`analysis.data.white_squares`,
        :func:`analysis.data.held_out_images`; any finite values.
    tol : float, default 0.05
        An output "lands on" a training image when its distance to it is at
        most ``tol``.
    metric : {"rmse", "relative"}, default "rmse"
        ``"rmse"``: ``||y - x|| / sqrt(C H W)``, the root mean squared pixel
        difference (for images in [0, 1], 0.05 is 5% of the range);
        ``"relative"``: ``||y - x|| / ||x||``.
    sign_invariant : bool, default False
        Also compare ``-y``: networks without bias may learn the point map up
        to sign, as the literature notes.
    batch_size : int, default 256
        Probe inputs per forward pass.

    Returns
    -------
    ProbeResult

    Examples
    --------
    The identity-initialized DS reproduces its inputs, so noise does not land
    on the training image:

    >>> from analysis import data, models
    >>> probe = memorization_probe(models.ds("identity"), data.basis_2x2([0]),
    ...                            data.gaussian_noise(8, (1, 2, 2), rng=0))
    >>> probe.n_within, float(probe.input_distances.max())
    (0, 0.0)
    """
    if metric not in ("rmse", "relative"):
        raise ValueError(f"metric must be 'rmse' or 'relative'; got {metric!r}")
    if not tol >= 0:
        raise ValueError(f"tol must be non-negative; got {tol!r}")
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
    shape = getattr(model, "input_shape", None)
    X = check_images(train_images, input_shape=shape, name="train_images", stacklevel=3)
    if shape is None:
        shape = X.shape[1:]
    P = check_images(
        probe_inputs, input_shape=shape, value_range=None, name="probe_inputs"
    )

    Y = _forward(model, P, int(batch_size))
    d = int(np.prod(shape))
    y = Y.reshape(len(Y), d)
    x = X.reshape(len(X), d).astype(np.float64)
    p = P.reshape(len(P), d).astype(np.float64)

    # Squared distances through the Gram matrix; clipped at 0 against rounding.
    yy = np.einsum("ij,ij->i", y, y)[:, None]
    xx = np.einsum("ij,ij->i", x, x)[None, :]
    cross = y @ x.T
    sq_plus = np.maximum(yy + xx - 2 * cross, 0.0)
    if sign_invariant:
        sq_minus = np.maximum(yy + xx + 2 * cross, 0.0)
        flip = sq_minus < sq_plus
        sq = np.where(flip, sq_minus, sq_plus)
    else:
        flip = np.zeros_like(sq_plus, dtype=bool)
        sq = sq_plus
    if metric == "rmse":
        scale = np.full((1, len(x)), np.sqrt(d))
    else:
        scale = np.sqrt(np.maximum(xx, np.finfo(float).tiny))
    dist = np.sqrt(sq) / scale
    nearest = np.argmin(dist, axis=1)
    rows = np.arange(len(y))
    distances = dist[rows, nearest]
    signs = np.where(flip[rows, nearest], -1.0, 1.0)

    own = np.linalg.norm(y - p, axis=1)
    if metric == "rmse":
        input_distances = own / np.sqrt(d)
    else:
        input_distances = own / np.maximum(
            np.linalg.norm(p, axis=1), np.finfo(float).tiny
        )
    within = distances <= tol
    counts = np.bincount(nearest[within], minlength=len(x))
    return ProbeResult(
        outputs=Y.astype(np.float32).reshape(len(Y), *shape),
        nearest=nearest,
        distances=distances,
        input_distances=input_distances,
        signs=signs,
        within=within,
        counts=counts,
        tol=float(tol),
        metric=metric,
        sign_invariant=bool(sign_invariant),
    )
