"""The memorization report: one call from a network (or its operator) and its
training set to a measured verdict on the two-part conjecture of the
literature. For a network trained to zero loss on images X, with r_min the
smallest factor rank and ``c s^2`` the image size:

(a) a *downsampling* network has rank(A) = min(dim span X, r_min), with the
    eigenvalues near 1 and their eigenvectors inside span X;
(b) a *non-downsampling* network has
    min(dim span X, r_min) <= rank(A) <= c s^2.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import scipy.sparse.linalg as spla

from analysis._linalg import as_operator, check_k, make_rng
from analysis.alignment import span_alignment
from analysis.ranks import flatten_images, rank_bound, rank_measures, span_dimension

__all__ = ["MemorizationReport", "memorization_report"]

logger = logging.getLogger(__name__)

# All singular values are computed densely up to this operator size (a few
# seconds of LAPACK at 3072); beyond it only the leading ones.
FULL_SVD_MAX_N = 4096
# ... and all eigenvalues densely up to this size (for display: the k
# leading ones) ...
FULL_EIG_MAX_N = 512
# ... and, to find the eigenvalues near 1, up to this size (a dense
# eigendecomposition of 1024 x 1024 takes about a second); beyond it they are
# found by shift-invert around 1.
FULL_NEAR_MAX_N = 1024
# Shift-invert computes at least this many eigenvalues nearest 1. It makes
# one pass: once more than the predicted rank are near 1 the eigenvalue check
# fails whatever their number, so a longer search would only refine an
# "at least" (at a cost of seconds per doubling at n = 3072).
NEAR_ONE_MIN_K = 16
# The shift sits just off 1 so that A - sigma I stays invertible when 1 is an
# exact eigenvalue (the identity, a projector).
SIGMA = 1.0 + 1e-6


@dataclass
class MemorizationReport:
    """What an operator does with its training set, and the verdict.

    Attributes
    ----------
    verdict : str
        ``"holds"`` when all checks of the tested part pass, else
        ``"does not hold"``.
    reason : str
        The numbers behind the verdict, one clause per check.
    checks : dict of str to bool
        Part (a): ``"rank"``: ``numerical_rank == predicted_rank``;
        ``"eigenvalues"``: ``n_near_one == predicted_rank``; ``"alignment"``:
        every eigenvector with eigenvalue near 1 has
        ``alignment_max_residual <= align_tol`` (no such eigenvector fails the
        check). Part (b): ``"rank"`` only:
        ``predicted_rank <= numerical_rank <= rank_upper``.
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
        Number of leading eigenvalues computed (largest modulus first), for
        display; the eigenvalues near 1 are searched for separately.
    n_near_one : int
        Eigenvalues found whose modulus is within ``delta`` of 1: those among
        ``near_one_eigenvalues``, plus those among the ``k`` leading ones
        that lie farther from 1 than every one of ``near_one_eigenvalues``.
    n_near_one_complex : int
        Eigenvalues found with ``abs(w - 1) <= delta`` (near 1 in the complex
        plane).
    near_one_complete : bool
        Whether ``n_near_one`` is exact. False means "at least": the search
        was not exhaustive, e.g. when all ``k`` leading eigenvalues have a
        modulus above ``1 - delta`` and no dense eigendecomposition was made.
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
    part : str
        The part of the conjecture tested: ``"a"`` (downsampling) or ``"b"``
        (non-downsampling).
    downsampling : bool or None
        Whether the network downsamples, as used to choose ``part``; None when
        it was unknown (part (a) is then tested).
    downsampling_source : str
        Where ``downsampling`` came from: ``"argument"``, ``"model"`` (its
        ``downsampling`` attribute), ``"factors"`` (their shapes, see
        :func:`memorization_report`) or ``"default"`` (unknown).
    rank_upper : int
        The upper bound ``c s^2`` of part (b): the number of entries of one
        unpadded image (``n`` when ``input_shape`` is unknown).
    identity_distance : float or None
        ``||A - I||_F / sqrt(n)``, informative (0 for the identity, 1 for
        the zero operator); None for an operator given as LinearOperator.
    near_one_complex_complete : bool
        Whether ``n_near_one_complex`` is exact: True when all eigenvalues
        were computed, or when the eigenvalues nearest 1 that were found
        include one farther than ``delta`` from 1.
    near_one_method : str
        How the eigenvalues near 1 were found: ``"dense"`` (all
        eigenvalues), ``"shift-invert"`` (ARPACK around sigma = 1) or
        ``"top-k"`` (only the ``k`` leading ones, for a LinearOperator too
        large to make dense).
    near_one_eigenvalues : ndarray, complex
        The eigenvalues nearest 1 that were found, increasing distance to 1
        (with ``"dense"``: those within ``delta`` of 1, or the nearest one
        when none is).
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
    # Defaults below keep reports saved before these fields existed readable.
    part: str = "a"
    downsampling: bool | None = None
    downsampling_source: str = "default"
    rank_upper: int | None = None
    identity_distance: float | None = None
    near_one_complex_complete: bool = True
    near_one_method: str = "top-k"
    near_one_eigenvalues: np.ndarray = field(
        default_factory=lambda: np.zeros(0, complex), repr=False, compare=False
    )
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
        for key in ("eigenvalues", "near_one_eigenvalues"):
            w = np.asarray(out.pop(key), dtype=np.complex128)
            out[f"{key}_real"] = w.real.tolist()
            out[f"{key}_imag"] = w.imag.tolist()
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
        for key in ("eigenvalues", "near_one_eigenvalues"):
            if f"{key}_real" not in d and key == "near_one_eigenvalues":
                continue
            re = np.asarray(d.pop(f"{key}_real"), dtype=np.float64)
            im = np.asarray(d.pop(f"{key}_imag"), dtype=np.float64)
            d[key] = re + 1j * im
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
        near = f"{self.n_near_one} ({self.near_one_method})"
        if not self.near_one_complete:
            near = "at least " + near
        near_c = str(self.n_near_one_complex)
        if not self.near_one_complex_complete:
            near_c = "at least " + near_c
        part = "(a), downsampling" if self.part == "a" else "(b), non-downsampling"
        ds = {True: "yes", False: "no", None: "unknown"}[self.downsampling]
        if len(self.near_one_eigenvalues):
            w1 = complex(self.near_one_eigenvalues[0])
            nearest = f"{_fmt_complex(w1)} (|w - 1| = {abs(w1 - 1):.3g})"
        else:
            nearest = "n/a"
        predicted = str(self.predicted_rank)
        if self.part == "b":
            predicted = f"{self.predicted_rank} <= rank <= {self.rank_upper}"
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
            ("downsampling", f"{ds} ({self.downsampling_source})"),
            ("conjecture part tested", part),
            ("predicted rank, from min(dim span X, r_min)", predicted),
            (f"numerical rank (rtol {self.rtol:g})", str(self.numerical_rank)),
            ("numpy rank", str(self.numpy_rank)),
            ("effective rank", fmt(self.effective_rank)),
            ("energy rank (99%)", fmt(self.energy_rank, "d")),
            (f"eigenvalues with ||w| - 1| <= {self.delta:g}", near),
            (
                f"eigenvalues with |w - 1| <= {self.delta:g}",
                near_c,
            ),
            ("eigenvalue nearest 1", nearest),
            ("top eigenvalues", top),
            ("distance to identity ||A - I||_F / sqrt(n)", fmt(self.identity_distance)),
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
    downsampling: bool | None = None,
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
        Number of leading eigenvalues to compute (for display, and beside the
        search for eigenvalues near 1). Default: all of them when
        ``n <= 512``, else ``max(2 * predicted_rank + 8, 16)`` (capped at n).
    delta : float
        An eigenvalue counts as near 1 when its modulus is within ``delta``
        of 1 (``n_near_one``; ``n_near_one_complex`` counts those within
        ``delta`` of 1 in the complex plane).
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
    downsampling : bool, optional
        Whether the network downsamples: True tests part (a) of the
        conjecture, False part (b). None infers it, in this order: from the
        model's ``downsampling`` attribute (the networks of
        :mod:`analysis.models` have one); else from the factors: some factor
        with an output of fewer pixels per channel (``prod(out_shape[1:])``)
        than the input, for ``opextract.Factor`` objects, or, for plain
        matrices, some factor with fewer rows than ``n`` (a bottleneck);
        else, for an operator given without factors, part (a) is tested and
        ``downsampling_source`` says ``"default"``.

    Returns
    -------
    MemorizationReport

    Notes
    -----
    The eigenvalues near 1 are searched for directly, not only among the
    ``k`` of largest modulus (a trained network often has several
    eigenvalues of modulus well above 1 that would crowd them out): all
    eigenvalues densely when ``n <= 1024``, else ARPACK in shift-invert mode
    around ``sigma = 1 + 1e-6`` (just off 1, so that an exact eigenvalue 1
    leaves ``A - sigma I`` invertible; a dense LU when the operator is dense
    or at most 4096 wide, a sparse LU otherwise) for the
    ``max(predicted_rank + 8, 16)`` eigenvalues nearest 1. When all of those
    lie within ``delta`` of 1 the counts are lower bounds ("at least"), which
    already exceed the predicted rank. An operator given as a
    LinearOperator wider than 4096 only gets the ``k`` leading eigenvalues.
    Eigenvalues with modulus near 1 that lie far from 1 in the complex plane
    (near -1, say) are counted only when found among the ``k`` leading ones
    (or by the dense path); ``near_one_complete`` says whether the count is
    exact.

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

    A non-downsampling network is held to part (b) instead, which the
    identity satisfies:

    >>> report = memorization_report(np.eye(4), x, downsampling=False)
    >>> report.part, report.verdict, report.identity_distance
    ('b', 'holds', 0.0)
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
    if downsampling is not None and not isinstance(downsampling, (bool, np.bool_)):
        raise TypeError(
            f"downsampling must be True, False or None; got {downsampling!r}"
        )

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
    source = "default"
    if downsampling is not None:
        source = "argument"
    elif model is not None and getattr(model, "downsampling", None) is not None:
        downsampling, source = bool(model.downsampling), "model"
    if model is not None:
        need_factors = r_min is None or downsampling is None
        operator, factors = _from_model(model, input_shape, layout, need_factors)
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
    if downsampling is None and factors is not None:
        downsampling, source = _downsamples(factors, n), "factors"
    part = "b" if downsampling is False else "a"

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
    rank_upper = n if input_shape is None else int(np.prod(input_shape))

    # Singular values: all of them when affordable, else enough to see past
    # the predicted rank.
    dense = op.dense() if n <= FULL_SVD_MAX_N or op.kind == "array" else None
    if n <= FULL_SVD_MAX_N:
        ranks = rank_measures(dense, rtol=rtol)
    else:
        ranks = rank_measures(op.obj, rtol=rtol, k=min(n - 1, predicted + 16))

    if k is None:
        k = n if n <= FULL_EIG_MAX_N else min(n, max(2 * predicted + 8, 16))
    k = check_k(k, n, f"1 <= k <= n (n = {n})")
    from analysis.spectra import eigs

    w, v = eigs(op.obj, k, method=method, rng=rng)
    k_near = max(predicted + 8, NEAR_ONE_MIN_K)
    near = _near_one(op, dense, w, v, delta, k_near, rng)
    n_near = near["n_near"]

    if n_near:
        align = span_alignment(near["vectors"], flat, rtol=span_rtol)
        max_res = align.max_residual
        max_angle = float(np.degrees(np.arcsin(min(1.0, max_res))))
        principal = np.degrees(align.principal_angles).tolist()
    else:
        max_res = max_angle = float("nan")
        principal = []

    at_least = "" if near["complete"] else "at least "
    rank_clause = (
        f"min(dim span X {span.dim}, r_min {'unknown' if r_min is None else r_min})"
    )
    if part == "a":
        checks = {
            "rank": ranks.numerical_rank == predicted,
            "eigenvalues": n_near == predicted,
            "alignment": bool(n_near) and max_res <= align_tol,
        }
        clauses = [
            f"part (a) ({_SOURCES[source]}); rank {ranks.numerical_rank} "
            f"{'=' if checks['rank'] else '!='} predicted {predicted} = "
            f"{rank_clause} at rtol {rtol:g}",
            f"{at_least}{n_near} eigenvalue(s) with modulus within {delta:g} of 1 "
            f"{'=' if checks['eigenvalues'] else '!='} predicted {predicted}",
        ]
        if n_near:
            clauses.append(
                f"eigenvectors near 1 "
                f"{'within' if checks['alignment'] else 'not within'}"
                f" {align_tol:g} of span X (max residual {max_res:.3g})"
            )
        else:
            clauses.append("no eigenvector near 1 to align with span X")
    else:
        ok = predicted <= ranks.numerical_rank <= rank_upper
        checks = {"rank": ok}
        clauses = [
            f"part (b) ({_SOURCES[source]}); rank {ranks.numerical_rank} "
            f"{'within' if ok else 'not within'} [{predicted}, {rank_upper}] = "
            f"[{rank_clause}, c s^2] at rtol {rtol:g}",
            f"(informative: {at_least}{n_near} eigenvalue(s) with modulus within "
            f"{delta:g} of 1, distance to identity "
            f"{_fmt_optional(near['identity_distance'])})",
        ]
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
        n_near_one_complex=near["n_near_complex"],
        near_one_complete=near["complete"],
        alignment_max_residual=float(max_res),
        alignment_max_angle=float(max_angle),
        principal_angles=[float(a) for a in principal],
        align_tol=align_tol,
        eigenvalues=np.asarray(w),
        singular_values=np.asarray(ranks.singular_values),
        seconds=float(seconds),
        part=part,
        downsampling=None if downsampling is None else bool(downsampling),
        downsampling_source=source,
        rank_upper=rank_upper,
        identity_distance=near["identity_distance"],
        near_one_complex_complete=near["complex_complete"],
        near_one_method=near["method"],
        near_one_eigenvalues=near["eigenvalues"],
        eigenvectors=v,
    )


_SOURCES = {
    "argument": "downsampling given",
    "model": "downsampling from the model",
    "factors": "downsampling inferred from the factors",
    "default": "downsampling unknown, part (a) by default",
}


def _fmt_optional(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3g}"


def _downsamples(factors: Sequence[Any], n: int) -> bool:
    """Whether a chain of factors downsamples: some factor's output has fewer
    pixels per channel than the input (``opextract.Factor``), or, for plain
    matrices, fewer rows than ``n``."""
    factors = list(factors)
    shapes = [getattr(f, "out_shape", None) for f in factors]
    first = getattr(factors[0], "in_shape", None) if factors else None
    if first and all(shapes):
        pixels = int(np.prod(first[1:]))
        return any(int(np.prod(shape[1:])) < pixels for shape in shapes)
    return any(np.shape(getattr(f, "matrix", f))[0] < n for f in factors)


def _identity_distance(op, dense) -> float | None:
    """``||A - I||_F / sqrt(n)`` without forming ``A - I``."""
    n = op.shape[0]
    if dense is not None:
        sq, trace = float(np.vdot(dense, dense).real), float(np.trace(dense).real)
    elif op.kind == "sparse":
        sq = float(np.vdot(op.obj.data, op.obj.data).real)
        trace = float(op.obj.diagonal().sum().real)
    else:
        return None
    return float(np.sqrt(max(sq - 2 * trace + n, 0.0) / n))


def _near_one(op, dense, w_top, v_top, delta, k_near, rng) -> dict[str, Any]:
    """Eigenvalues near 1, their eigenvectors, counts and completeness flags.

    See the Notes of :func:`memorization_report` for the search.
    """
    n = op.shape[0]
    top_mod = np.abs(np.abs(w_top) - 1) <= delta
    top_reaches_below = len(w_top) == n or abs(w_top[-1]) < 1 - delta
    out = {"identity_distance": _identity_distance(op, dense)}

    if dense is not None and n <= FULL_NEAR_MAX_N:
        w_all, v_all = np.linalg.eig(dense)
        mod = np.abs(np.abs(w_all) - 1) <= delta
        order = np.argsort(np.abs(w_all - 1))
        inside = np.abs(w_all - 1) <= delta
        out.update(
            method="dense",
            n_near=int(mod.sum()),
            n_near_complex=int(inside.sum()),
            complete=True,
            complex_complete=True,
            vectors=v_all[:, mod],
            # Those within delta of 1, or the nearest one when there is none.
            eigenvalues=w_all[order[: max(1, int(inside.sum()))]],
        )
        return out

    matrix = dense if dense is not None else op.obj
    if op.kind == "linop" and dense is None:
        # No factorization of A - I to invert: only the leading eigenvalues.
        logger.info("eigenvalues near 1 only among the %d leading ones", len(w_top))
        out.update(
            method="top-k",
            n_near=int(top_mod.sum()),
            n_near_complex=int((np.abs(w_top - 1) <= delta).sum()),
            complete=bool(top_reaches_below),
            complex_complete=bool(top_reaches_below),
            vectors=v_top[:, top_mod],
            eigenvalues=w_top[np.argsort(np.abs(w_top - 1))],
        )
        return out

    from opextract import NonConvergenceWarning

    limit = n - 2  # ARPACK needs k < n - 1 for a real operator
    k = min(limit, k_near)
    v0 = make_rng(rng).standard_normal(n)
    converged = True
    try:
        w, v = spla.eigs(matrix, k=k, sigma=SIGMA, which="LM", v0=v0)
    except spla.ArpackNoConvergence as exc:
        w, v = exc.eigenvalues, exc.eigenvectors
        converged = False
        warnings.warn(
            f"shift-invert around 1 found {len(w)} of {k} eigenvalues; the "
            "counts of eigenvalues near 1 are lower bounds",
            NonConvergenceWarning,
            stacklevel=3,
        )
    order = np.argsort(np.abs(w - 1))
    w, v = w[order], v[:, order]
    all_inside = len(w) > 0 and bool((np.abs(w - 1) <= delta).all())

    complex_complete = converged and not all_inside
    mod = np.abs(np.abs(w) - 1) <= delta
    # w holds every eigenvalue within `radius` of sigma; leading eigenvalues
    # clearly outside that disc are not among w and are counted on their own.
    radius = float(np.abs(w - SIGMA).max()) if len(w) else 0.0
    outside = np.abs(w_top - SIGMA) > radius + 1e-8 * (1 + radius)
    extra = top_mod & outside
    out.update(
        method="shift-invert",
        n_near=int(mod.sum() + extra.sum()),
        n_near_complex=int((np.abs(w - 1) <= delta).sum()),
        complete=bool(converged and top_reaches_below),
        complex_complete=bool(complex_complete),
        vectors=np.concatenate([v[:, mod], v_top[:, extra]], axis=1),
        eigenvalues=w,
    )
    return out


def _is_module(obj: Any) -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    return isinstance(obj, torch.nn.Module)


def _from_model(model, input_shape, layout, need_factors):
    import opextract

    operator = opextract.to_sparse(model, input_shape, layout=layout)
    factors = None
    if need_factors:
        try:
            factors = opextract.factors(model, input_shape, layout=layout)
        except (NotImplementedError, TypeError, ValueError) as exc:
            # Graphs whose factors do not form a chain: no r_min from factors.
            logger.info("no factors: %s", exc)
        if factors is not None and not isinstance(factors, list):
            factors = None
    return operator, factors
