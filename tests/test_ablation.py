"""svd_ablation against reconstructions computed with numpy's full SVD."""

from __future__ import annotations

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from analysis.ablation import minmax_scale, svd_ablation


@pytest.fixture(autouse=True)
def _one_blas_thread():
    # Small problems; OpenBLAS threads spin-wait badly on a loaded machine.
    with threadpool_limits(1):
        yield


def reference_mse(a, flat, k, scaling):
    u, s, vh = np.linalg.svd(a)
    ak = a if k is None else (u[:, :k] * s[:k]) @ vh[:k]
    rec = flat @ ak.T

    def scale(y):
        if scaling == "none":
            return y
        axis = 1 if scaling == "per_image" else None
        lo, hi = y.min(axis=axis, keepdims=True), y.max(axis=axis, keepdims=True)
        return np.where(hi > lo, (y - lo) / np.where(hi > lo, hi - lo, 1), 0.0)

    return np.mean((scale(rec) - scale(flat)) ** 2)


@pytest.fixture(scope="module")
def learned_case():
    """An operator that maps a 5-image training set to itself plus small
    components elsewhere, like a trained downsampling network."""
    rng = np.random.default_rng(0)
    x = rng.random((5, 3, 6, 6))
    flat = x.reshape(5, -1)
    q = np.linalg.qr(flat.T)[0]
    a = q @ q.T + 1e-3 * rng.standard_normal((108, 108))
    return a, x, flat


@pytest.mark.parametrize("scaling", ["per_image", "global", "none"])
def test_ablation_matches_numpy_reference(learned_case, scaling):
    a, x, flat = learned_case
    ks = [1, 2, 5, 8]
    r = svd_ablation(a, x, ks, scaling=scaling)
    assert r.ks == ks and r.n_images == 5 and r.scaling == scaling
    for k, mse in zip(ks, r.mse):
        assert mse == pytest.approx(reference_mse(a, flat, k, scaling), rel=1e-9)
    assert r.mse_all == pytest.approx(reference_mse(a, flat, None, scaling), rel=1e-9)
    assert r.raw_mse_all == pytest.approx(reference_mse(a, flat, None, "none"))
    np.testing.assert_allclose(
        r.singular_values, np.linalg.svd(a, compute_uv=False)[:8], rtol=1e-10
    )


def test_ablation_reads_off_components_used(learned_case):
    a, x, _ = learned_case
    r = svd_ablation(a, x, [1, 4, 5, 6])
    # Five components hold the training set: the error drops there and
    # matches the full operator's.
    assert r.mse[0] > 100 * r.mse[2] and r.mse[1] > 10 * r.mse[2]
    assert r.mse[2] == pytest.approx(r.mse_all, rel=0.5, abs=1e-6)
    text = str(r)
    assert "all" in text and "top 5" in text


def test_minmax_scaling_exact():
    y = np.array([[2.0, 4.0, 3.0], [-1.0, 1.0, 0.0]])
    np.testing.assert_allclose(minmax_scale(y), [[0, 1, 0.5], [0, 1, 0.5]])
    np.testing.assert_allclose(minmax_scale(y, "global"), (y + 1) / 5)
    np.testing.assert_array_equal(minmax_scale(np.ones((1, 3))), np.zeros((1, 3)))


def test_ablation_one_image_and_bad_inputs():
    x = np.random.default_rng(1).random((1, 1, 4, 4))
    r = svd_ablation(np.eye(16), x, [1, 16])
    assert r.mse[1] == pytest.approx(0.0, abs=1e-24) and r.mse_all == 0.0
    with pytest.raises(ValueError, match=r"X must have a nonzero image"):
        svd_ablation(np.eye(4), np.zeros((2, 1, 2, 2)), [1])
    with pytest.raises(
        ValueError, match=r"operator must have shape \(d, d\) with d = 4"
    ):
        svd_ablation(np.eye(5), np.ones((2, 1, 2, 2)), [1])
    with pytest.raises(
        ValueError, match=r"ks entry must satisfy 1 <= k <= d \(d = 4\)"
    ):
        svd_ablation(np.eye(4), np.ones((2, 1, 2, 2)), [5])
    with pytest.raises(ValueError, match="X must be finite"):
        svd_ablation(np.eye(4), np.full((1, 4), np.nan), [1])
    with pytest.raises(ValueError, match="scaling must be one of"):
        svd_ablation(np.eye(4), np.ones((1, 4)), [1], scaling="zscore")
