"""Rank measures, factor rank bounds and span dimensions against numpy."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from threadpoolctl import threadpool_limits

from analysis.ranks import rank_bound, rank_measures, span_dimension


@pytest.fixture(autouse=True)
def _one_blas_thread():
    # Small problems; OpenBLAS threads spin-wait badly on a loaded machine.
    with threadpool_limits(1):
        yield


def low_rank(m, n, r, noise, seed):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((m, r)) @ rng.standard_normal((r, n))
    return a + noise * rng.standard_normal((m, n))


@pytest.mark.parametrize(
    ("noise", "rtol", "expected"),
    [(0.0, 1e-6, 7), (1e-9, 1e-6, 7), (1e-3, 1e-6, 60), (1e-3, 1e-2, 7)],
    ids=["exact", "tiny-noise", "noise-above-rtol", "noise-below-rtol"],
)
def test_numerical_rank_low_rank_plus_noise(noise, rtol, expected):
    a = low_rank(80, 60, 7, noise, seed=1)
    r = rank_measures(a, rtol=rtol)
    s = np.linalg.svd(a, compute_uv=False)
    assert r.numerical_rank == expected == int((s > rtol * s[0]).sum())
    assert r.numpy_rank == np.linalg.matrix_rank(a)
    np.testing.assert_allclose(r.singular_values, s, rtol=1e-12)
    assert r.complete and r.shape == (80, 60)


def test_effective_and_energy_rank_known_values():
    s = np.array([3.0, 1.0, 1.0, 1.0, 0.0])
    r = rank_measures(s, energy=0.9, shape=(5, 7))
    p = np.array([0.5, 1 / 6, 1 / 6, 1 / 6])
    assert r.effective_rank == pytest.approx(np.exp(-(p * np.log(p)).sum()))
    # Energies 9, 1, 1, 1 of 12: 75%, 83%, 92% -> three components hold 90%.
    assert r.energy_rank == 3
    assert r.numerical_rank == 4
    assert r.numpy_tol == pytest.approx(3.0 * 7 * np.finfo(float).eps)
    assert rank_measures(np.ones(4) / 2, energy=1.0).energy_rank == 4


def test_partial_singular_values_are_marked():
    a = low_rank(600, 600, 3, 0.0, seed=2)
    r = rank_measures(a, k=5)
    assert not r.complete and r.effective_rank is None and r.energy_rank is None
    assert r.numerical_rank == 3
    assert r.to_dict()["complete"] is False


def test_zero_operator_and_bad_values():
    r = rank_measures(np.zeros((3, 3)))
    assert (r.numerical_rank, r.numpy_rank, r.effective_rank) == (0, 0, 0.0)
    with pytest.raises(ValueError, match=r"rtol must be a number in \[0, 1\); got 2"):
        rank_measures(np.eye(2), rtol=2)
    with pytest.raises(ValueError, match=r"energy must be a number in \(0, 1\]"):
        rank_measures(np.eye(2), energy=0)
    with pytest.raises(ValueError, match="non-negative"):
        rank_measures(np.array([1.0, -1.0]))


def test_rank_bound_exact_and_structural():
    rng = np.random.default_rng(3)
    f1 = rng.standard_normal((10, 3)) @ rng.standard_normal((3, 8))  # rank 3
    f2 = sp.csr_array(np.diag([1.0, 2.0, 0.0, 0.0, 5.0, 1.0, 0.0, 0.0, 1.0, 1.0]))
    b = rank_bound([f1, f2])
    assert (b.r_min, b.ranks, b.methods, b.argmin) == (3, [3, 6], ["svd", "svd"], 0)
    # With exact ranks too costly, nonzero rows/columns bound them.
    s = rank_bound([f1, f2], max_cost=1.0)
    assert s.methods == ["structural", "structural"]
    assert s.ranks == [8, 6] and s.r_min == 6
    assert all(exact <= bound for exact, bound in zip(b.ranks, s.ranks))


def test_rank_bound_of_opextract_factors_bounds_the_operator():
    from torch import nn

    import opextract

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 2, 3, stride=2, padding=1, bias=False),
        nn.Upsample(scale_factor=2),
        nn.Conv2d(2, 1, 3, padding=1, bias=False),
    ).double()
    fs = opextract.factors(net, (1, 6, 6))
    b = rank_bound(fs)
    a = opextract.to_sparse(net, (1, 6, 6)).toarray()
    assert b.r_min == 18  # 2 channels x 3 x 3 after the stride-2 conv
    assert np.linalg.matrix_rank(a) <= b.r_min
    assert b.paths == [f.path for f in fs]


def test_rank_bound_empty():
    with pytest.raises(ValueError, match="at least one factor; got none"):
        rank_bound([])


def test_span_dimension_2x2_sets_any_shape_and_tensor():
    e = np.eye(4).reshape(4, 1, 2, 2)
    sets = {1: e[:1], 2: e[:2], 3: np.stack([e[0], e[1], e[2], e[0] + e[1]]), 4: e}
    for dim, x in sets.items():
        assert span_dimension(x).dim == dim
        assert span_dimension(torch.from_numpy(x)).dim == dim
        assert span_dimension(x.reshape(len(x), -1)).dim == dim
    sd = span_dimension(sets[3])
    assert sd.n_images == 4 and sd.n_features == 4
    np.testing.assert_allclose(sd.singular_values[3], 0.0, atol=1e-15)


def test_span_dimension_tolerance_and_degenerate_sets():
    rng = np.random.default_rng(4)
    x = low_rank(20, 48, 5, 1e-8, seed=4).reshape(20, 3, 4, 4)
    assert span_dimension(x).dim == 20  # numpy's default sees the noise
    assert span_dimension(x, rtol=1e-6).dim == 5
    assert span_dimension(np.zeros((3, 1, 2, 2))).dim == 0
    assert span_dimension(rng.random((1, 3, 8, 8))).dim == 1  # one image
    with pytest.raises(ValueError, match=r"X must be finite; got 1 NaN .*image 2"):
        bad = np.ones((3, 4))
        bad[2, 1] = np.nan
        span_dimension(bad)
    with pytest.raises(
        ValueError, match=r"shape \(n_images, \.\.\.\).*got shape \(4,\)"
    ):
        span_dimension(np.ones(4))
