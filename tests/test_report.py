"""memorization_report on operators of known structure and on real networks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_limits

import opextract
from analysis import models
from analysis.report import MemorizationReport, memorization_report


@pytest.fixture(autouse=True)
def _one_blas_thread():
    with threadpool_limits(1):
        yield


def projector(flat):
    q = np.linalg.qr(flat.T)[0]
    return q @ q.T


def test_ds_identity_init_is_identity_all_eigenvalues_one():
    net = models.ds(init="identity").double()
    basis = np.eye(4).reshape(4, 1, 2, 2)
    report = memorization_report(net, basis)
    np.testing.assert_array_equal(report.eigenvalues, np.ones(4))
    assert report.k == 4 and report.n_near_one == 4 and report.r_min == 4
    assert (report.span_dim, report.numerical_rank, report.predicted_rank) == (4, 4, 4)
    assert report.verdict == "holds" and report.alignment_max_residual == 0.0
    # On one training image the identity is not the predicted rank-1 map.
    one = memorization_report(net, basis[:1])
    assert one.verdict == "does not hold"
    assert one.checks == {"rank": False, "eigenvalues": False, "alignment": False}
    assert "rank 4 != predicted 1" in one.reason


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_projector_onto_span_holds_with_noise(dim):
    rng = np.random.default_rng(dim)
    x = rng.random((dim + 1, 3, 4, 4))
    if dim < len(x):
        x[-1] = x[0] + x[1] if dim >= 2 else 2 * x[0]  # a dependent image
    flat = x.reshape(len(x), -1)
    a = projector(flat[:dim]) + 1e-4 * rng.standard_normal((48, 48))
    report = memorization_report(a, x, r_min=40)
    assert report.span_dim == dim == report.predicted_rank
    assert report.numerical_rank == dim and report.numpy_rank == 48
    assert report.n_near_one == dim and report.verdict == "holds"
    assert report.alignment_max_residual < 1e-3
    np.testing.assert_allclose(
        np.sort(np.abs(report.eigenvalues))[::-1][: dim + 1],
        np.sort(np.abs(np.linalg.eigvals(a)))[::-1][: dim + 1],
        rtol=1e-10,
    )


def test_r_min_limits_predicted_rank_from_factors():
    rng = np.random.default_rng(0)
    x = rng.random((3, 1, 2, 2))
    f1 = rng.standard_normal((2, 4))  # a bottleneck of width 2
    f2 = rng.standard_normal((4, 2))
    a = f2 @ f1
    report = memorization_report(a, x, factors=[f1, f2])
    assert report.r_min == 2 and report.factor_methods == ["svd", "svd"]
    assert report.predicted_rank == 2 == report.numerical_rank
    assert report.verdict == "does not hold"  # random factors: no eigenvalue 1


def test_network_report_matches_direct_computation():
    net = models.d_ab(2, 3, input_size=8, seed=0).double()
    x = np.random.default_rng(1).random((2, 3, 8, 8))
    report = memorization_report(net, x)
    a = opextract.to_sparse(net, (3, 8, 8)).toarray()
    s = np.linalg.svd(a, compute_uv=False)
    assert report.r_min == net.r_min_bound == 3
    assert report.numerical_rank == int((s > 1e-2 * s[0]).sum())
    assert report.numpy_rank == np.linalg.matrix_rank(a)
    assert report.n == 192 and report.k == 192  # small: all eigenvalues
    w = np.linalg.eigvals(a)
    np.testing.assert_allclose(
        np.abs(report.eigenvalues[:3]), np.sort(np.abs(w))[::-1][:3], rtol=1e-9
    )


def test_padded_layout_agrees_with_compact():
    net = models.ds(init="identity").double()
    x = np.eye(4)[:2].reshape(2, 1, 2, 2)
    compact = memorization_report(net, x)
    padded = memorization_report(net, x, layout="padded")
    assert padded.n == 16 and padded.layout == "padded"
    for key in ("span_dim", "numerical_rank", "n_near_one", "predicted_rank"):
        assert getattr(padded, key) == getattr(compact, key), key


def test_roundtrip_dict_json_and_table():
    rng = np.random.default_rng(2)
    x = rng.random((1, 1, 3, 3))
    report = memorization_report(projector(x.reshape(1, -1)), x)
    d = json.loads(json.dumps(report.to_dict()))
    back = MemorizationReport.from_dict(d)
    np.testing.assert_array_equal(back.eigenvalues, report.eigenvalues)
    assert back.to_dict() == report.to_dict()
    text = str(report)
    for line in ("dim span X", "r_min", "predicted rank", "verdict", "holds"):
        assert line in text
    with pytest.raises(ValueError, match=r"unknown keys \['bogus'\]"):
        MemorizationReport.from_dict({**d, "bogus": 1})
    # Reports saved before the part (b) and near-1 fields existed still load.
    new = ("part", "downsampling", "downsampling_source", "rank_upper")
    old = {key: value for key, value in d.items() if key not in new}
    old = {key: value for key, value in old.items() if "near_one_eig" not in key}
    assert MemorizationReport.from_dict(old).part == "a"


def test_no_eigenvalue_near_one():
    x = np.ones((1, 1, 2, 2))
    report = memorization_report(0.5 * np.eye(4), x)
    assert report.n_near_one == 0 and np.isnan(report.alignment_max_residual)
    assert not report.checks["alignment"] and "no eigenvector near 1" in report.reason
    assert report.to_dict()["alignment_max_residual"] is None


@pytest.mark.parametrize(
    ("x", "kwargs", "match"),
    [
        (np.zeros((2, 1, 2, 2)), {}, r"X must span at least one direction"),
        (np.full((1, 1, 2, 2), np.nan), {}, r"X must be finite; got 4 NaN"),
        (np.ones((1, 2, 2)), {"input_shape": (1, 2, 2)}, r"single image .* X\[None\]"),
        (np.ones((1, 1, 3, 3)), {}, r"X must have 4 entries per image .* got 9"),
        (np.ones((1, 1, 2, 2)), {"delta": 0}, r"delta must be a positive number"),
        (np.ones((1, 1, 2, 2)), {"layout": "flat"}, r"layout must be one of"),
        (np.ones((1, 1, 2, 2)), {"k": 5}, r"k must satisfy 1 <= k <= n \(n = 4\)"),
    ],
    ids=["zeros", "nan", "unbatched", "size", "delta", "layout", "k"],
)
def test_bad_inputs(x, kwargs, match):
    with pytest.raises(ValueError, match=match):
        memorization_report(np.eye(4), x, **kwargs)


def test_model_input_shape_checked():
    net = models.ds(init="identity").double()
    with pytest.raises(
        ValueError, match=r"X must have shape \(n_images, \*\(1, 2, 2\)\)"
    ):
        memorization_report(net, torch.ones(2, 1, 3, 3))


# --------------------------------------------------------------------------
# parts (a) and (b) of the conjecture


def test_part_b_identity_holds_and_low_rank_fails():
    rng = np.random.default_rng(3)
    x = rng.random((2, 1, 2, 2))
    ident = memorization_report(np.eye(4), x, downsampling=False)
    assert (ident.part, ident.downsampling, ident.downsampling_source) == (
        "b",
        False,
        "argument",
    )
    assert ident.checks == {"rank": True} and ident.verdict == "holds"
    assert ident.rank_upper == 4 and ident.identity_distance == 0.0
    assert ident.n_near_one == 4 and "part (b)" in ident.reason
    assert "(b), non-downsampling" in str(ident)
    # Rank 1 < min(dim span X, r_min) = 2: part (b) fails.
    low = memorization_report(projector(x.reshape(2, -1)[:1]), x, downsampling=False)
    assert low.predicted_rank == 2 and low.numerical_rank == 1
    assert low.checks == {"rank": False} and low.verdict == "does not hold"
    # The same projector judged by part (a) fails on rank, not on alignment.
    a = memorization_report(projector(x.reshape(2, -1)[:1]), x, downsampling=True)
    assert a.part == "a" and a.checks["alignment"] and not a.checks["rank"]


def test_identity_distance_matches_dense():
    a = np.random.default_rng(4).standard_normal((9, 9))
    report = memorization_report(a, np.ones((1, 1, 3, 3)))
    expected = np.linalg.norm(a - np.eye(9)) / 3
    assert report.identity_distance == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (lambda: models.ds(init="identity"), True),
        (lambda: models.nd(channels=2, depth=2, input_size=8, seed=0), False),
        (lambda: models.d(channels=2, depth=2, input_size=8, seed=0), True),
    ],
    ids=["ds", "nd", "d"],
)
def test_downsampling_from_model_and_from_factors(build, expected):
    net = build().double()
    shape = net.input_shape
    x = np.random.default_rng(5).random((1, *shape))
    from_model = memorization_report(net, x)
    assert from_model.downsampling is expected
    assert from_model.downsampling_source == "model"
    assert from_model.part == ("a" if expected else "b")
    # The same network as operator plus factors: inferred from their shapes.
    a = opextract.to_sparse(net, shape)
    fs = opextract.factors(net, shape)
    from_factors = memorization_report(a, x, factors=fs)
    assert from_factors.downsampling is expected
    assert from_factors.downsampling_source == "factors"
    # Without any: part (a), saying so.
    bare = memorization_report(a, x, r_min=1)
    assert (bare.part, bare.downsampling, bare.downsampling_source) == (
        "a",
        None,
        "default",
    )
    assert "part (a) by default" in bare.reason


def test_downsampling_from_plain_matrix_factors():
    rng = np.random.default_rng(6)
    x = rng.random((1, 1, 2, 2))
    square = [rng.standard_normal((4, 4)) for _ in range(2)]
    report = memorization_report(square[1] @ square[0], x, factors=square)
    assert (report.downsampling, report.part) == (False, "b")


def test_downsampling_must_be_bool():
    with pytest.raises(TypeError, match=r"downsampling must be True, False or None"):
        memorization_report(np.eye(4), np.ones((1, 1, 2, 2)), downsampling="yes")


# --------------------------------------------------------------------------
# eigenvalues near 1 are searched for, not only among the leading ones


def rotated_diagonal(d, seed):
    q = np.linalg.qr(np.random.default_rng(seed).standard_normal((len(d), len(d))))[0]
    return (q * d) @ q.T, q


@pytest.mark.parametrize("n", [40, 1100], ids=["dense", "shift-invert"])
def test_eigenvalue_one_found_behind_large_ones(n):
    # One eigenvalue 1 whose eigenvector is the training image, behind 20
    # eigenvalues of modulus about 3 that fill the top k.
    rng = np.random.default_rng(7)
    d = np.r_[1.0, 3 + rng.random(20), 0.01 * rng.random(n - 21)]
    a, q = rotated_diagonal(d, 8)
    x = q[:, :1].T.reshape(1, 1, 1, n)
    report = memorization_report(a, x, k=16, r_min=1, downsampling=True)
    assert np.abs(report.eigenvalues).min() > 2.9  # the top 16: all near 3
    assert report.near_one_method == ("dense" if n <= 1024 else "shift-invert")
    assert report.n_near_one == 1 == report.n_near_one_complex
    assert report.near_one_eigenvalues[0] == pytest.approx(1.0, abs=1e-8)
    assert report.alignment_max_residual < 1e-6 and report.checks["alignment"]
    assert report.near_one_complex_complete
    # The top 16 do not reach below 1 - delta: eigenvalues of modulus near 1
    # away from 1 could hide behind them, so the count is "at least" with
    # shift-invert, exact with all eigenvalues.
    assert report.near_one_complete is (n <= 1024)


def test_many_eigenvalues_one_counted_as_lower_bound():
    n = 1100
    d = np.r_[np.ones(200), np.zeros(n - 200)]
    a, q = rotated_diagonal(d, 9)
    x = q[:, :2].T.reshape(2, 1, 1, n)
    report = memorization_report(a, x, k=8, r_min=200, downsampling=True)
    # Shift-invert computes the 16 = max(predicted + 8, 16) nearest 1, all
    # within delta.
    assert report.n_near_one_complex == 16 and not report.near_one_complex_complete
    assert not report.near_one_complete and "at least 16" in str(report)
    assert "at least 16 eigenvalue(s)" in report.reason
    assert not report.checks["eigenvalues"]  # 16 > 2 = predicted, whatever the rest


def test_shift_invert_agrees_with_dense_on_a_random_operator():
    n = 1030
    rng = np.random.default_rng(10)
    # Eigenvalues fill a disc of radius 0.6 around 1: about 7 within 0.05.
    a = np.eye(n) + 0.6 * rng.standard_normal((n, n)) / np.sqrt(n)
    x = rng.random((3, 1, 1, n))
    report = memorization_report(a, x, k=8, r_min=n, downsampling=True)
    w = np.linalg.eigvals(a)
    expected = np.sort(np.abs(w - 1))[: len(report.near_one_eigenvalues)]
    np.testing.assert_allclose(
        np.abs(report.near_one_eigenvalues - 1), expected, rtol=1e-8, atol=1e-10
    )
    assert report.near_one_complex_complete
    assert report.n_near_one_complex == int((np.abs(w - 1) <= 0.05).sum()) > 3
