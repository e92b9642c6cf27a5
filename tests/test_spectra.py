"""eigs and svds against dense LAPACK on matrices of known spectrum."""

from __future__ import annotations

import time
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch
from threadpoolctl import threadpool_limits
from torch import nn

from analysis.spectra import choose_method, eigs, svds
from opextract import NonConvergenceWarning

N = 240  # iterative cases: large enough for ARPACK, small enough to be fast
EIG_RTOL = 1e-9


@pytest.fixture(autouse=True)
def _one_blas_thread():
    # These problems are small; on a loaded 2-core machine OpenBLAS threads
    # spin-waiting for each other make LAPACK calls 100x slower.
    with threadpool_limits(1):
        yield


def planted(n: int, values: np.ndarray, rng, pairs: int = 0) -> np.ndarray:
    """Non-symmetric ``S D S^-1`` with eigenvalues ``values`` and ``pairs``
    complex pairs ``values[i] * exp(+-i phi)`` in 2x2 rotation blocks."""
    d = np.zeros((n, n))
    i = 0
    for j in range(pairs):
        r, phi = values[j], 0.3 + 0.2 * j
        d[i : i + 2, i : i + 2] = r * np.array(
            [[np.cos(phi), -np.sin(phi)], [np.sin(phi), np.cos(phi)]]
        )
        i += 2
    rest = values[pairs : pairs + n - i]
    d[np.arange(i, n), np.arange(i, n)] = rest
    s = np.eye(n) + 0.3 * rng.standard_normal((n, n)) / np.sqrt(n)
    return s @ d @ np.linalg.inv(s)


def reference(a: np.ndarray, k: int) -> np.ndarray:
    w = np.linalg.eigvals(a)
    return w[np.lexsort((-w.imag, -np.abs(w)))][:k]


@pytest.fixture(scope="module")
def spectrum_case():
    rng = np.random.default_rng(3)
    values = np.concatenate(
        [[5.0, 4.0, -3.5, 3.0, 2.5], 0.5 * rng.uniform(-1, 1, N - 5) ** 3]
    )
    return planted(N, values, rng), values


@pytest.mark.parametrize("method", ["dense", "arpack", "block"])
def test_eigs_planted_real_spectrum(spectrum_case, method):
    a, values = spectrum_case
    w, v = eigs(a, 5, method=method)
    np.testing.assert_allclose(w, [5.0, 4.0, -3.5, 3.0, 2.5], rtol=EIG_RTOL)
    np.testing.assert_allclose(w, reference(a, 5), rtol=EIG_RTOL)
    assert v.shape == (N, 5)
    np.testing.assert_allclose(a @ v, v * w, atol=1e-8)
    np.testing.assert_allclose(np.linalg.norm(v, axis=0), 1.0, rtol=1e-12)
    # Phase convention: real eigenvectors come back real, largest entry > 0.
    np.testing.assert_array_equal(v.imag, 0.0)
    top = v[np.argmax(np.abs(v), axis=0), np.arange(5)]
    assert (top.real > 0).all()


@pytest.mark.parametrize("method", ["dense", "arpack", "block"])
def test_eigs_conjugate_pairs_adjacent(method):
    rng = np.random.default_rng(5)
    values = np.concatenate([[3.0, 2.0], 0.3 * rng.uniform(-1, 1, N)])
    a = planted(N, values, rng, pairs=2)
    w, v = eigs(a, 4, method=method)
    expected = reference(a, 4)
    np.testing.assert_allclose(w, expected, rtol=EIG_RTOL)
    assert w[0].imag > 0 and w[2].imag > 0
    np.testing.assert_allclose(w[1], np.conj(w[0]), rtol=EIG_RTOL)
    np.testing.assert_allclose(w[3], np.conj(w[2]), rtol=EIG_RTOL)
    # The phase convention makes the pair's vectors conjugates of each other.
    np.testing.assert_allclose(v[:, 1], np.conj(v[:, 0]), atol=1e-8)
    np.testing.assert_allclose(a @ v, v * w, atol=1e-8)


def test_eigs_inputs_sparse_linear_operator_tensor(spectrum_case):
    a, _ = spectrum_case
    expected = reference(a, 3)
    cases = {
        "sparse": sp.csr_array(np.where(np.abs(a) > 1e-3, a, 0.0)),
        "linop": spla.aslinearoperator(a),
        "tensor": torch.from_numpy(a),
    }
    w_sparse, _ = eigs(cases["sparse"], 3, method="arpack")
    dense_sparse = cases["sparse"].toarray()
    np.testing.assert_allclose(w_sparse, reference(dense_sparse, 3), rtol=EIG_RTOL)
    for name in ("linop", "tensor"):
        w, _ = eigs(cases[name], 3)
        np.testing.assert_allclose(w, expected, rtol=EIG_RTOL, err_msg=name)


def test_eigs_k_equal_n_dense_and_which():
    a = np.diag([1.0, -4.0, 2.0, 0.5])
    w, v = eigs(a, 4)
    np.testing.assert_allclose(w, [-4.0, 2.0, 1.0, 0.5])
    np.testing.assert_allclose(np.abs(v), np.eye(4)[:, [1, 2, 0, 3]])
    w_small, _ = eigs(a, 1, which="SM")
    np.testing.assert_allclose(w_small, [0.5])
    w_lr, _ = eigs(a, 2, which="LR")
    np.testing.assert_allclose(w_lr, [2.0, 1.0])  # still by decreasing modulus


def test_eigs_repeatable_with_default_rng(spectrum_case):
    a, _ = spectrum_case
    w1, v1 = eigs(a, 3, method="arpack")
    w2, v2 = eigs(a, 3, method="arpack")
    np.testing.assert_array_equal(w1, w2)
    np.testing.assert_array_equal(v1, v2)


def test_ds_identity_network_all_four_eigenvalues_one():
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=2, padding=1, bias=False),
        nn.Upsample(scale_factor=2),
        *[nn.Conv2d(4, 4, 3, padding=1, bias=False) for _ in range(3)],
        nn.Conv2d(4, 1, 3, padding=1, bias=False),
    ).double()
    convs = [m for m in net if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        for m in convs:
            m.weight.zero_()
        for i, (r, c) in enumerate([(1, 1), (1, 2), (2, 1), (2, 2)]):
            convs[0].weight[i, 0, r, c] = 1
        for i in range(4):
            convs[1].weight[i, i, 1, 2] = 1
            convs[2].weight[i, i, 2, 1] = 1
            convs[4].weight[0, i, 1, 1] = 1
        for i, (r, c) in enumerate([(1, 1), (1, 0), (0, 1), (0, 0)]):
            convs[3].weight[i, i, r, c] = 1
        a = net(torch.eye(4, dtype=torch.float64).reshape(4, 1, 2, 2))
    a = a.reshape(4, 4).T.numpy()
    np.testing.assert_array_equal(a, np.eye(4))
    w, v = eigs(a, 4)
    np.testing.assert_array_equal(w, np.ones(4))
    np.testing.assert_allclose(np.abs(np.linalg.det(v)), 1.0)


class _TimedOperator(spla.LinearOperator):
    """A LinearOperator whose products cost a fixed time per call (``block``)
    or per vector (``single``), to check the cost-based method choice."""

    def __init__(self, a, batched: bool):
        super().__init__(a.dtype, a.shape)
        self.a, self.batched = a, batched

    def _matvec(self, x):
        time.sleep(0.004)
        return self.a @ x

    def _matmat(self, x):
        if not self.batched:
            return np.column_stack([self._matvec(c) for c in x.T])
        time.sleep(0.004)
        return self.a @ x


def test_choose_method_by_cost():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((600, 600))
    assert choose_method(a[:100, :100], 3) == "dense"
    assert choose_method(a, 200) == "dense"  # k above a quarter of n
    assert choose_method(a, 5) == "arpack"
    assert choose_method(sp.random(600, 600, density=0.01, rng=rng), 5) == "arpack"
    assert choose_method(_TimedOperator(a, batched=True), 8) == "block"
    assert choose_method(_TimedOperator(a, batched=False), 8) == "arpack"


def test_auto_block_on_batched_linear_operator():
    rng = np.random.default_rng(2)
    values = np.concatenate([[2.0, 1.5, 1.2], 0.2 * rng.uniform(-1, 1, 597)])
    a = planted(600, values, rng)
    w, v = eigs(_TimedOperator(a, batched=True), 3, block_size=8)
    np.testing.assert_allclose(w, [2.0, 1.5, 1.2], rtol=EIG_RTOL)


def test_arpack_nonconvergence_returns_partial_with_warning():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((N, N))
    with pytest.warns(NonConvergenceWarning, match=r"converged for \d+ of k=8") as rec:
        w, v = eigs(a, 8, method="arpack", maxiter=1, ncv=20)
    assert rec[0].filename == __file__  # stacklevel points at the caller
    assert len(w) < 8 and v.shape == (N, len(w))
    if len(w):
        np.testing.assert_allclose(a @ v, v * w, atol=1e-6)


def test_block_nonconvergence_returns_partial_with_warning():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((N, N))
    with pytest.warns(NonConvergenceWarning, match="the block method") as rec:
        w, _ = eigs(a, 8, method="block", maxiter=1, ncv=24)
    assert rec[0].filename == __file__
    assert len(w) < 8


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"k": 5}, ValueError, r"k must satisfy 1 <= k <= n \(n = 4\); got k=5"),
        ({"k": 0}, ValueError, r"got k=0"),
        ({"k": 2.5}, TypeError, r"k must be an integer; got 2.5"),
        (
            {"k": 3, "method": "arpack"},
            ValueError,
            r"k < n - 1 for method='arpack' \(n = 4\); got k=3",
        ),
        (
            {"k": 1, "method": "lanczos"},
            ValueError,
            r"method must be one of .*'lanczos'",
        ),
        ({"k": 1, "which": "XX"}, ValueError, r"which must be one of .*'XX'"),
        ({"k": 1, "method": "block", "which": "SR"}, ValueError, r"which must be 'LM'"),
        (
            {"k": 1, "tol": -1.0},
            ValueError,
            r"tol must be a finite number >= 0; got -1",
        ),
        (
            {"k": 1, "v0": np.ones(3)},
            ValueError,
            r"v0 must have shape \(4,\); got \(3,\)",
        ),
        (
            {"k": 1, "v0": np.array([1.0, np.nan, np.inf, 0.0])},
            ValueError,
            r"v0 must be finite; got 2 NaN or infinite entries",
        ),
        (
            {"k": 1, "v0": np.zeros(4)},
            ValueError,
            r"v0 must not be all zero; got a zero vector",
        ),
    ],
    ids=[
        "k>n",
        "k=0",
        "k-float",
        "arpack-k",
        "method",
        "which",
        "block-which",
        "tol",
        "v0",
        "v0-nonfinite",
        "v0-zero",
    ],
)
def test_eigs_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        eigs(np.eye(4), **kwargs)


@pytest.mark.parametrize(
    ("operator", "match"),
    [
        (np.ones((3, 4)), r"operator must be square; got shape \(3, 4\)"),
        (np.array([[1.0, np.nan], [0.0, 1.0]]), r"finite entries; got 1 NaN"),
        (np.ones(3), r"2-D with positive sizes; got shape \(3,\)"),
        ("abc", r"operator must be an ndarray.*got str"),
    ],
    ids=["non-square", "nan", "1-D", "str"],
)
def test_eigs_bad_operator(operator, match):
    with pytest.raises((ValueError, TypeError), match=match):
        eigs(operator, 1)


# --------------------------------------------------------------------------
# svds


@pytest.mark.parametrize("noise", [0.0, 1e-6, 1e-2])
@pytest.mark.parametrize("method", ["dense", "arpack", "block"])
def test_svds_low_rank_plus_noise(method, noise):
    rng = np.random.default_rng(7)
    m, n, r = 260, 220, 6
    a = rng.standard_normal((m, r)) @ rng.standard_normal((r, n))
    a += noise * rng.standard_normal((m, n))
    expected = np.linalg.svd(a, compute_uv=False)
    u, s, vh = svds(a, 8, method=method)
    np.testing.assert_allclose(s, expected[:8], rtol=1e-9, atol=1e-12 * expected[0])
    assert u.shape == (m, 8) and vh.shape == (8, n)
    np.testing.assert_allclose(u.T @ u, np.eye(8), atol=1e-8)
    np.testing.assert_allclose(vh @ vh.T, np.eye(8), atol=1e-8)
    # Each triplet satisfies A v = s u for the singular values above the noise.
    big = s > 1e-6 * s[0]
    np.testing.assert_allclose((a @ vh[big].T), u[:, big] * s[big], atol=1e-7 * s[0])


def test_svds_randomized_on_low_rank_is_close():
    rng = np.random.default_rng(8)
    a = rng.standard_normal((300, 5)) @ rng.standard_normal((5, 280))
    _, s, _ = svds(a, 5, method="randomized")
    np.testing.assert_allclose(s, np.linalg.svd(a, compute_uv=False)[:5], rtol=1e-8)


def test_svds_wide_and_linear_operator():
    rng = np.random.default_rng(9)
    a = rng.standard_normal((150, 700))
    expected = np.linalg.svd(a, compute_uv=False)[:4]
    for method in ("arpack", "block", "auto"):
        u, s, vh = svds(spla.aslinearoperator(a), 4, method=method)
        np.testing.assert_allclose(s, expected, rtol=1e-9, err_msg=method)
        np.testing.assert_allclose(a @ vh.T, u * s, atol=1e-8)


def test_svds_errors():
    with pytest.raises(ValueError, match=r"k must satisfy 1 <= k <= min\(m, n\)"):
        svds(np.ones((3, 5)), 4)
    with pytest.raises(ValueError, match=r"k < min\(m, n\) for method='arpack'"):
        svds(np.ones((3, 5)), 3, method="arpack")
    with pytest.raises(ValueError, match="method must be one of"):
        svds(np.ones((3, 5)), 1, method="qr")


def test_no_warning_when_converged(spectrum_case):
    a, _ = spectrum_case
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        eigs(a, 3, method="arpack")
        svds(a, 3, method="block")
