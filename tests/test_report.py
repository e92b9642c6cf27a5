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
