"""as_linear_operator: every backend against the dense operator."""

import numpy as np
import pytest
import scipy.sparse.linalg as spla
import torch
from _helpers import assert_close
from torch import nn

import opextract

# The torch backend's first torch.func.jvp loads torch's forward-mode
# decompositions, which call torch.jit.script inside torch itself; the
# deprecation is torch's, not this project's, and nothing here can avoid it.
pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning"
)


def model_ds_like(bias=False):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, 2, 1, bias=bias),
        nn.Upsample(scale_factor=2),
        nn.Conv2d(4, 3, 3, 1, 1, bias=bias),
    )


SHAPE = (2, 6, 6)


@pytest.mark.parametrize("backend", ["auto", "factors", "sparse", "torch"])
@pytest.mark.parametrize("layout", ["compact", "padded"])
def test_backends_agree_with_the_dense_operator(backend, layout):
    model = model_ds_like()
    A = opextract.to_sparse(model, SHAPE, layout=layout).toarray()
    op = opextract.as_linear_operator(model, SHAPE, backend=backend, layout=layout)
    assert isinstance(op, spla.LinearOperator)
    assert op.shape == A.shape and op.dtype == np.float64
    rng = np.random.default_rng(0)
    x = rng.standard_normal((A.shape[1], 3))
    y = rng.standard_normal((A.shape[0], 3))
    assert_close(op.matvec(x[:, 0]), A @ x[:, 0])
    assert_close(op.matmat(x), A @ x)
    assert_close(op.rmatvec(y[:, 0]), A.T @ y[:, 0])
    assert_close(op.rmatmat(y), A.T @ y)
    assert_close(op.H @ y, A.T @ y)


def test_torch_backend_drops_the_bias_and_follows_at():
    model = model_ds_like(bias=True)
    A = opextract.to_sparse(model, SHAPE, bias="ignore").toarray()
    op = opextract.as_linear_operator(model, SHAPE, backend="torch")
    x = np.random.default_rng(1).standard_normal((A.shape[1], 2))
    assert_close(op @ x, A @ x)
    assert_close(op.T @ (A @ x), A.T @ (A @ x))

    leaky = nn.Sequential(model_ds_like(), nn.LeakyReLU(0.2)).double()
    point = torch.randn(*SHAPE, dtype=torch.float64)
    J = opextract.to_sparse(leaky, SHAPE, at=point).toarray()
    for backend in ("torch", "factors", "sparse"):
        op = opextract.as_linear_operator(leaky, SHAPE, backend=backend, at=point)
        assert_close(op @ x, J @ x, rtol=1e-9, atol=1e-11)
        assert_close(op.rmatmat(J @ x), J.T @ (J @ x), rtol=1e-9, atol=1e-11)


def test_float32_operator():
    model = model_ds_like()
    A = opextract.to_sparse(model, SHAPE).toarray()
    x = np.random.default_rng(2).standard_normal(A.shape[1])
    for backend in ("factors", "torch"):
        op = opextract.as_linear_operator(
            model, SHAPE, backend=backend, dtype=np.float32
        )
        assert op.dtype == np.float32
        assert_close(op @ x, A @ x, dtype=np.float32)


def test_auto_falls_back_to_torch_when_factors_are_too_large():
    model = model_ds_like()
    op = opextract.as_linear_operator(model, SHAPE, max_bytes=2000)
    A = opextract.to_sparse(model, SHAPE).toarray()
    x = np.ones(A.shape[1])
    assert_close(op @ x, A @ x)
    assert type(op).__name__ == "_TorchOperator"


def test_eigs_runs_on_the_operator():
    model = model_ds_like()
    op = opextract.as_linear_operator(model, (2, 6, 6), backend="factors")
    A = opextract.to_sparse(model, SHAPE).toarray()
    top = spla.svds(op, k=2, return_singular_vectors=False, rng=0)
    assert_close(np.sort(top), np.linalg.svd(A, compute_uv=False)[:2][::-1], rtol=1e-8)


def test_unsupported_layer_raises_in_auto():
    with pytest.raises(opextract.UnsupportedLayerError, match="supported types"):
        opextract.as_linear_operator(nn.Sequential(nn.GELU()), SHAPE)
