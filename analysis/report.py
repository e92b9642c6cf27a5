"""The memorization report: one call from a network (or its operator) and its
training set to a measured verdict on the conjecture

    rank(A) = min(dim span X, r_min),

with the eigenvalues near 1 and their eigenvectors inside span X.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from analysis._linalg import as_operator, check_k
from analysis.alignment import span_alignment
from analysis.ranks import flatten_images, rank_bound, rank_measures, span_dimension

__all__ = ["MemorizationReport", "memorization_report"]

logger = logging.getLogger(__name__)

# All singular values are computed densely up to this operator size (a few
# seconds of LAPACK at 3072); beyond it only the leading ones.
FULL_SVD_MAX_N = 4096
# ... and all eigenvalues densely up to this size.
FULL_EIG_MAX_N = 512


@dataclass
class MemorizationReport:
    """What an operator does with its training set, and the verdict.

    Attributes
    ----------
    verdict : str
        ``"holds"`` when all three checks pass, else ``"does not hold"``.
    reason : str
        The numbers behind the verdict, one clause per check.
    checks : dict of str to bool
        ``"rank"``: ``numerical_rank == predicted_rank``; ``"eigenvalues"``:
        ``n_near_one == predicted_rank``; ``"alignment"``: every eigenvector
        with eigenvalue near 1 has ``alignment_max_residual <= align_tol``
        (no such eigenvector fails the check).
    n_images : int
        Number of training images.
    input_shape : tuple of int or None
        Image shape ``(C, H, W)`` when known.
    layout : str
        Layout of the operator (``"compact"`` or ``"padded"``).
    n : int
        Operator size (it is ``n x n``).
    span_dim : int
        Dimension of span X (numpy's default tolerance unless ``span_rtol``).
    span_rtol : float or None
        Relative tolerance of ``span_dim``.
    r_min : int or None
        Smallest factor rank (None when no factors were available).
    factor_ranks, factor_methods : list or None
        Per factor rank (or bound) and how it was obtained
        (:class:`analysis.RankBound`).
    predicted_rank : int
        ``min(span_dim, r_min)`` (``span_dim`` when ``r_min`` is None).
    numerical_rank : int
        Singular values above ``rtol * s[0]``.
    numpy_rank : int
        Singular values above numpy's default tolerance.
    effective_rank : float or None
        Entropy effective rank (None when not all singular values known).
    energy_rank : int or None
        Components holding 99% of the energy (None likewise).
    rank_complete : bool
        Whether all singular values were computed.
    rtol : float
        Relative tolerance of ``numerical_rank``.
    delta : float
        An eigenvalue is *near 1* when ``abs(abs(w) - 1) <= delta``.
    k : int
        Number of eigenvalues computed (largest modulus first).
    n_near_one : int
        Eigenvalues among the ``k`` whose modulus is within ``delta`` of 1.
    n_near_one_complex : int
        Those with ``abs(w - 1) <= delta`` (near 1 in the complex plane).
    near_one_complete : bool
        False when the ``k``-th eigenvalue is itself near 1, so that
        ``n_near_one`` may be a lower bound.
    alignment_max_residual : float
        Largest ``||v - P v|| / ||v||`` over the real and imaginary parts of
        the eigenvectors near 1 (P: projector onto span X); NaN if none.
    alignment_max_angle : float
        The matching largest angle, in degrees.
    principal_angles : list of float
        Principal angles (degrees, increasing) between the span of those
        eigenvectors' parts and span X.
    align_tol : float
        Tolerance of the alignment check.
    eigenvalues : ndarray of shape (k,), complex
        The computed eigenvalues, decreasing modulus.
    singular_values : ndarray
        The computed singular values, decreasing.
    seconds : float
        Time the report took.
    eigenvectors : ndarray of shape (n, k) or None
        Eigenvectors of ``eigenvalues`` (kept in memory, not serialized).
    """

    verdict: str
    reason: str
    checks: dict[str, bool]
    n_images: int
    input_shape: tuple[int, ...] | None
    layout: str
    n: int
    span_dim: int
    span_rtol: float | None
    r_min: int | None
    factor_ranks: list[int] | None
    factor_methods: list[str] | None
    predicted_rank: int
    numerical_rank: int
    numpy_rank: int
    effective_rank: float | None
    energy_rank: int | None
    rank_complete: bool
    rtol: float
    delta: float
    k: int
    n_near_one: int
    n_near_one_complex: int
    near_one_complete: bool
    alignment_max_residual: float
    alignment_max_angle: float
    principal_angles: list[float]
    align_tol: float
    eigenvalues: np.ndarray = field(repr=False)
    singular_values: np.ndarray = field(repr=False)
    seconds: float = 0.0
    eigenvectors: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def holds(self) -> bool:
        """Whether the verdict is ``"holds"``."""
        return self.verdict == "holds"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict: scalars at the top level, arrays as lists
        (complex eigenvalues as ``eigenvalues_real`` and ``eigenvalues_imag``).
        """
        out = asdict(self)
        out.pop("eigenvectors")
        w = np.asarray(out.pop("eigenvalues"), dtype=np.complex128)
        out["eigenvalues_real"] = w.real.tolist()
        out["eigenvalues_imag"] = w.imag.tolist()
        out["singular_values"] = np.asarray(self.singular_values).tolist()
        if out["input_shape"] is not None:
            out["input_shape"] = list(out["input_shape"])
        for key in ("alignment_max_residual", "alignment_max_angle"):
            out[key] = None if np.isnan(out[key]) else float(out[key])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MemorizationReport:
        """Inverse of :meth:`to_dict`."""
        d = dict(data)
        re = np.asarray(d.pop("eigenvalues_real"), dtype=np.float64)
        im = np.asarray(d.pop("eigenvalues_imag"), dtype=np.float64)
        d["eigenvalues"] = re + 1j * im
        d["singular_values"] = np.asarray(d["singular_values"], dtype=np.float64)
        if d.get("input_shape") is not None:
            d["input_shape"] = tuple(int(s) for s in d["input_shape"])
        for key in ("alignment_max_residual", "alignment_max_angle"):
            d[key] = float("nan") if d.get(key) is None else float(d[key])
        names = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - names
        if unknown:
            raise ValueError(
                f"report data must have only MemorizationReport fields; got unknown "
                f"keys {sorted(unknown)}"
            )
        return cls(**d)

    def __str__(self) -> str:
        def fmt(x, spec=".4g"):
            return "n/a" if x is None else format(x, spec)

        top = ", ".join(_fmt_complex(w) for w in self.eigenvalues[:6])
        if len(self.eigenvalues) > 6:
            top += ", ..."
        r_min = "unknown" if self.r_min is None else str(self.r_min)
        if self.factor_methods and "structural" in self.factor_methods:
            r_min += " (some factor ranks are structural bounds)"
        shape = (
            "?" if self.input_shape is None else "x".join(map(str, self.input_shape))
        )
        near = f"{self.n_near_one} of top {self.k}"
        if not self.near_one_complete:
            near += " (at least)"
        if np.isnan(self.alignment_max_residual):
            align = "n/a (no eigenvalue near 1)"
        else:
            align = (
                f"{self.alignment_max_residual:.3g} "
                f"(angle {self.alignment_max_angle:.3g} deg)"
            )
        rows = [
            ("training images", str(self.n_images)),
            ("input shape, layout", f"{shape}, {self.layout}"),
            ("operator size", f"{self.n} x {self.n}"),
            ("dim span X", str(self.span_dim)),
            ("r_min", r_min),
            ("predicted rank min(dim span X, r_min)", str(self.predicted_rank)),
            (f"numerical rank (rtol {self.rtol:g})", str(self.numerical_rank)),
            ("numpy rank", str(self.numpy_rank)),
            ("effective rank", fmt(self.effective_rank)),
            ("energy rank (99%)", fmt(self.energy_rank, "d")),
            (f"eigenvalues with ||w| - 1| <= {self.delta:g}", near),
            (
                f"eigenvalues with |w - 1| <= {self.delta:g}",
                str(self.n_near_one_complex),
            ),
            ("top eigenvalues", top),
            ("residual to span X (near-1 vectors)", align),
            ("verdict", self.verdict),
        ]
        width = max(len(r[0]) for r in rows)
        lines = ["Memorization report", "=" * (width + 30)]
        lines += [f"{name:<{width}}  {value}" for name, value in rows]
        lines += ["", "why: " + self.reason]
        return "\n".join(lines)


def _fmt_complex(w: complex) -> str:
    if abs(w.imag) < 1e-12 * max(1.0, abs(w)):
        return f"{w.real:.4g}"
    return f"{w.real:.4g}{w.imag:+.4g}j"


def _pad_images(flat: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Flattened compact images -> flattened padded images (one zero ring)."""
    images = flat.reshape(flat.shape[0], *shape)
    width = [(0, 0), (0, 0)] + [(1, 1)] * (len(shape) - 1)
    return np.pad(images, width).reshape(flat.shape[0], -1)


def memorization_report(
    model_or_operator: Any,
    X: Any,
    *,
    input_shape: Sequence[int] | None = None,
    layout: str = "compact",
    k: int | None = None,
    delta: float = 0.05,
    factors: Sequence[Any] | None = None,
    r_min: int | None = None,
    rtol: float = 1e-2,
    span_rtol: float | None = None,
    align_tol: float = 0.1,
    method: str = "auto",
    rng: Any = None,
) -> MemorizationReport:
    """Rank, spectrum and alignment of a network's operator, and the verdict.

    Parameters
    ----------
    model_or_operator : torch.nn.Module or operator
        A linear network (its operator is built with ``opextract.to_sparse``
        and its factors with ``opextract.factors``), or an operator of shape
        ``(n, n)`` directly (dense, sparse, tensor or LinearOperator).
    X : array_like or torch.Tensor of shape (n_images, C, H, W)
        The training images (compact, unpadded, in either layout).
    input_shape : tuple of int, optional
        ``(C, H, W)``; default ``model.input_shape`` when the model has one,
        else ``X.shape[1:]``.
    layout : {"compact", "padded"}
        Layout of the operator; in the padded layout the images are padded
        with one ring of zeros before they are compared with it.
    k : int, optional
        Number of leading eigenvalues to compute. Default: all of them when
        ``n <= 512``, else ``max(2 * predicted_rank + 8, 16)`` (capped at n).
    delta : float
        An eigenvalue counts as near 1 when its modulus is within ``delta``
        of 1.
    factors : sequence of opextract.Factor or matrices, optional
        Factors of an operator given directly, for ``r_min``.
    r_min : int, optional
        Use this ``r_min`` instead of computing it from factors.
    rtol : float
        Relative tolerance of the numerical rank. The default, ``1e-2``,
        counts singular values below 1% of the largest as zero, which suits
        trained networks whose unused directions decay but do not vanish;
        ``numpy_rank`` gives the strict count beside it.
    span_rtol : float, optional
        Tolerance of the span dimension (default numpy's rule).
    align_tol : float
        Largest residual ``||v - P v|| / ||v||`` (sine of the angle to span
        X) of an eigenvector near 1 for the alignment check.
    method : str
        Passed to :func:`analysis.eigs` and :func:`analysis.svds`.
    rng : None, int or numpy.random.Generator
        Passed to the iterative solvers.

    Returns
    -------
    MemorizationReport

    Examples
    --------
    The operator of a network that has memorized one image maps everything
    onto it:

    >>> import numpy as np
    >>> x = np.arange(1.0, 5.0).reshape(1, 1, 2, 2)
    >>> u = x.ravel() / np.linalg.norm(x)
    >>> report = memorization_report(np.outer(u, u), x, r_min=4)
    >>> report.verdict, report.span_dim, report.numerical_rank, report.n_near_one
    ('holds', 1, 1, 1)
    >>> memorization_report(np.eye(4), x).verdict
    'does not hold'
    """
    started = time.perf_counter()
    if layout not in ("compact", "padded"):
        raise ValueError(f"layout must be one of ('compact', 'padded'); got {layout!r}")
    delta = float(delta)
    if not np.isfinite(delta) or delta <= 0:
        raise ValueError(f"delta must be a positive number; got {delta!r}")
    align_tol = float(align_tol)
    if not np.isfinite(align_tol) or align_tol < 0:
        raise ValueError(f"align_tol must be a number >= 0; got {align_tol!r}")

    model = None
    if _is_module(model_or_operator):
        model = model_or_operator
        if input_shape is None:
            input_shape = getattr(model, "input_shape", None)
        if input_shape is None:
            input_shape = tuple(np.shape(X)[1:])
    if input_shape is not None:
        input_shape = tuple(int(s) for s in input_shape)
        if len(input_shape) < 2 or min(input_shape) < 1:
            raise ValueError(
                f"input_shape must be (C, H, W) with positive sizes; got {input_shape}"
            )
        if tuple(np.shape(X)) == input_shape:
            raise ValueError(
                f"X must have shape (n_images, *{input_shape}); got a single image "
                f"of shape {input_shape}: pass X[None]"
            )
        if tuple(np.shape(X)[1:]) != input_shape:
            raise ValueError(
                f"X must have shape (n_images, *{input_shape}); got shape "
                f"{tuple(np.shape(X))}"
            )
    flat = flatten_images(X)
    if layout == "padded":
        if input_shape is None:
            raise ValueError("input_shape is required for layout='padded'; got None")
        flat = _pad_images(flat, input_shape)

    rank_info = None
    if model is not None:
        operator, rank_info = _from_model(model, input_shape, layout, r_min)
    else:
        operator = model_or_operator
        if r_min is None and factors is not None:
            rank_info = rank_bound(factors)
    op = as_operator(operator, square=True)
    n = op.shape[0]
    if flat.shape[1] != n:
        raise ValueError(
            f"X must have {n} entries per image to match the operator of shape "
            f"{op.shape} ({layout} layout); got {flat.shape[1]}"
        )

    span = span_dimension(flat, rtol=span_rtol)
    if span.dim == 0:
        raise ValueError(
            "X must span at least one direction; got all images zero (span dimension 0)"
        )
    if r_min is not None:
        r_min = check_k(r_min, n, f"1 <= r_min <= n (n = {n})", "r_min")
    elif rank_info is not None:
        r_min = rank_info.r_min
    predicted = span.dim if r_min is None else min(span.dim, r_min)

    # Singular values: all of them when affordable, else enough to see past
    # the predicted rank.
    if n <= FULL_SVD_MAX_N:
        ranks = rank_measures(op.dense(), rtol=rtol)
    else:
        ranks = rank_measures(op.obj, rtol=rtol, k=min(n - 1, predicted + 16))

    if k is None:
        k = n if n <= FULL_EIG_MAX_N else min(n, max(2 * predicted + 8, 16))
    k = check_k(k, n, f"1 <= k <= n (n = {n})")
    from analysis.spectra import eigs

    w, v = eigs(op.obj, k, method=method, rng=rng)
    modulus_gap = np.abs(np.abs(w) - 1)
    near = modulus_gap <= delta
    n_near = int(near.sum())
    near_complete = len(w) == n or not (len(w) and near[-1])

    if n_near:
        align = span_alignment(v[:, near], flat, rtol=span_rtol)
        max_res = align.max_residual
        max_angle = float(np.degrees(np.arcsin(min(1.0, max_res))))
        principal = np.degrees(align.principal_angles).tolist()
    else:
        max_res = max_angle = float("nan")
        principal = []

    checks = {
        "rank": ranks.numerical_rank == predicted,
        "eigenvalues": n_near == predicted,
        "alignment": bool(n_near) and max_res <= align_tol,
    }
    clauses = [
        f"rank {ranks.numerical_rank} {'=' if checks['rank'] else '!='} predicted "
        f"{predicted} = min(dim span X {span.dim}, r_min "
        f"{'unknown' if r_min is None else r_min}) at rtol {rtol:g}",
        f"{n_near} eigenvalue(s) with modulus within {delta:g} of 1 "
        f"{'=' if checks['eigenvalues'] else '!='} predicted {predicted}",
    ]
    if n_near:
        clauses.append(
            f"eigenvectors near 1 {'within' if checks['alignment'] else 'not within'}"
            f" {align_tol:g} of span X (max residual {max_res:.3g})"
        )
    else:
        clauses.append("no eigenvector near 1 to align with span X")
    verdict = "holds" if all(checks.values()) else "does not hold"
    seconds = time.perf_counter() - started
    logger.info("memorization report: %s in %.2f s", verdict, seconds)

    return MemorizationReport(
        verdict=verdict,
        reason="; ".join(clauses),
        checks=checks,
        n_images=span.n_images,
        input_shape=input_shape,
        layout=layout,
        n=n,
        span_dim=span.dim,
        span_rtol=span_rtol,
        r_min=r_min,
        factor_ranks=None if rank_info is None else list(rank_info.ranks),
        factor_methods=None if rank_info is None else list(rank_info.methods),
        predicted_rank=predicted,
        numerical_rank=ranks.numerical_rank,
        numpy_rank=ranks.numpy_rank,
        effective_rank=ranks.effective_rank,
        energy_rank=ranks.energy_rank,
        rank_complete=ranks.complete,
        rtol=float(rtol),
        delta=delta,
        k=int(len(w)),
        n_near_one=n_near,
        n_near_one_complex=int((np.abs(w - 1) <= delta).sum()),
        near_one_complete=bool(near_complete),
        alignment_max_residual=float(max_res),
        alignment_max_angle=float(max_angle),
        principal_angles=[float(a) for a in principal],
        align_tol=align_tol,
        eigenvalues=np.asarray(w),
        singular_values=np.asarray(ranks.singular_values),
        seconds=float(seconds),
        eigenvectors=v,
    )


def _is_module(obj: Any) -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    return isinstance(obj, torch.nn.Module)


def _from_model(model, input_shape, layout, r_min):
    import opextract

    operator = opextract.to_sparse(model, input_shape, layout=layout)
    rank_info = None
    if r_min is None:
        try:
            rank_info = rank_bound(opextract.factors(model, input_shape, layout=layout))
        except (NotImplementedError, TypeError, ValueError) as exc:
            # Graphs whose factors do not form a chain: no r_min from factors.
            logger.info("no factor rank bound: %s", exc)
    return operator, rank_info
