"""span_alignment and eigenvector_images against direct computations."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
from threadpoolctl import threadpool_limits

import opextract
from analysis.alignment import eigenvector_images, span_alignment
from analysis.spectra import eigs


@pytest.fixture(autouse=True)
def _one_blas_thread():
    with threadpool_limits(1):
        yield


def test_known_angles_real_and_complex():
    x = np.eye(4)[:2].reshape(2, 1, 2, 2)  # span of e0, e1
    theta = 0.3
    v = np.zeros((4, 2), complex)
    v[:, 0] = [np.cos(theta), 0, np.sin(theta), 0]  # real, angle theta
    v[:, 1] = [1, 1j, 0, 1j]  # real part inside; imaginary part at 45 degrees
    a = span_alignment(v, x)
    np.testing.assert_allclose(a.angles_real, [theta, 0.0], atol=1e-15)
    assert np.isnan(a.angles_imag[0]) and np.isnan(a.residual_imag[0])
    np.testing.assert_allclose(a.angles_imag[1], np.pi / 4)
    np.testing.assert_allclose(a.residual_real, [np.sin(theta), 0.0], atol=1e-15)
    np.testing.assert_allclose(a.residual_imag[1], np.sqrt(0.5))
    assert a.max_residual == pytest.approx(np.sqrt(0.5))
    assert a.block_dim == 3 and a.span_dim == 2
    # Reference principal angles from scipy on explicit bases.
    block = scipy.linalg.orth(np.column_stack([v.real, v[:, 1].imag]))
    expected = np.sort(scipy.linalg.subspace_angles(block, np.eye(4)[:, :2]))
    np.testing.assert_allclose(a.principal_angles, expected, atol=1e-12)


def test_eigenvectors_of_projector_lie_in_span():
    rng = np.random.default_rng(0)
    x = rng.random((3, 2, 5, 5))
    q = np.linalg.qr(x.reshape(3, -1).T)[0]
    w, v = eigs(q @ q.T + 1e-9 * rng.standard_normal((50, 50)), 3)
    a = span_alignment(v, x)
    assert a.max_residual < 1e-7
    assert np.all(a.principal_angles < 1e-7)


def test_span_alignment_errors():
    with pytest.raises(ValueError, match="X must span at least one direction"):
        span_alignment(np.ones((4, 1)), np.zeros((2, 4)))
    with pytest.raises(
        ValueError, match=r"vectors must have shape \(d, k\) with d = 4"
    ):
        span_alignment(np.ones((5, 1)), np.ones((2, 4)))
    with pytest.raises(ValueError, match="X must be finite; got 1 NaN"):
        span_alignment(np.ones((4, 1)), np.array([[1.0, np.nan, 0.0, 0.0]]))


def test_eigenvector_images_compact_roundtrip():
    rng = np.random.default_rng(1)
    v = rng.standard_normal((48, 3)) + 1j * rng.standard_normal((48, 3))
    img = eigenvector_images(v, (3, 4, 4))
    assert img.shape == (3, 2, 3, 4, 4)
    np.testing.assert_array_equal(img[:, 0].reshape(3, -1).T, v.real)
    np.testing.assert_array_equal(img[:, 1].reshape(3, -1).T, v.imag)


def test_eigenvector_images_padded_strips_ring():
    rng = np.random.default_rng(2)
    compact = rng.standard_normal((2 * 3 * 5, 2))
    e = opextract.padding_embedding((2, 3, 5))
    padded = e @ compact
    assert padded.shape[0] == 2 * 5 * 7
    np.testing.assert_allclose(
        eigenvector_images(padded, (2, 3, 5), "padded"),
        eigenvector_images(compact, (2, 3, 5)),
    )


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (((3, 0, 4), "compact"), r"input_shape must be \(C, H, W\).*got \(3, 0, 4\)"),
        (((3, 4, 4), "flat"), r"layout must be one of .*got 'flat'"),
        (((3, 4, 4), "padded"), r"d = 108 for input_shape \(3, 4, 4\) in the padded"),
    ],
    ids=["shape", "layout", "size"],
)
def test_eigenvector_images_errors(args, match):
    with pytest.raises(ValueError, match=match):
        eigenvector_images(np.ones((48, 1)), *args)
