"""The local operator ``at=x`` of piecewise-linear networks.

Small networks are compared with ``torch.func.jacrev`` (the exact Jacobian by
autograd, with PyTorch's choice of one-sided derivative at kinks); a large one
with central finite differences along random directions. Inputs with exact
zeros, values on the clamp bounds and tied maxima put points on the kinks.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _helpers import assert_close
from torch import nn

import opextract
from opextract import UnsupportedLayerError

# torch.func.jvp, which the local operator uses on layers it cannot run
# itself, loads torch's forward-mode decompositions through torch.jit.script
# on first use; the deprecation is inside torch and nothing here avoids it.
pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning"
)


def _jacobian(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    """Dense Jacobian of ``model`` at ``x`` (shape (1, *in_shape)) by autograd."""
    jac = torch.func.jacrev(lambda z: model(z[None].clone())[0])(x[0])
    n_in = x[0].numel()
    return jac.reshape(-1, n_in).detach().numpy()


def _kinky(shape, seed=0) -> torch.Tensor:
    """Small integers: many exact zeros, values on the bounds 1 and -1, ties."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-2, 3, (1, *shape), generator=gen).to(torch.float64)


ACTIVATIONS = [
    pytest.param(lambda: nn.ReLU(), id="relu"),
    pytest.param(lambda: nn.ReLU(inplace=True), id="relu-inplace"),
    pytest.param(lambda: nn.LeakyReLU(0.1), id="leaky-0.1"),
    pytest.param(lambda: nn.LeakyReLU(-0.5), id="leaky-negative-slope"),
    pytest.param(lambda: nn.LeakyReLU(2.0), id="leaky-slope-2"),
    pytest.param(lambda: nn.PReLU(), id="prelu-1"),
    pytest.param(lambda: nn.PReLU(3, init=0.2), id="prelu-per-channel"),
    pytest.param(lambda: nn.ReLU6(), id="relu6"),
    pytest.param(lambda: nn.Hardtanh(-1.0, 1.0), id="hardtanh"),
    pytest.param(lambda: nn.Hardtanh(0.0, 2.0), id="hardtanh-0-2"),
    pytest.param(lambda: nn.Threshold(0.0, 0.0), id="threshold-0"),
    pytest.param(lambda: nn.Threshold(1.0, 5.0), id="threshold-value"),
]

POOLS = [
    pytest.param(lambda: nn.MaxPool2d(2), (3, 4, 6), id="maxpool2d-k2"),
    pytest.param(lambda: nn.MaxPool2d(3, stride=2, padding=1), (2, 7, 6),
                 id="maxpool2d-overlap-pad"),
    pytest.param(lambda: nn.MaxPool2d(3, stride=1, padding=1, dilation=2,
                                      ceil_mode=True), (2, 7, 6),
                 id="maxpool2d-dilation-ceil"),
    pytest.param(lambda: nn.MaxPool1d(3, stride=2, ceil_mode=True), (2, 8),
                 id="maxpool1d"),
    pytest.param(lambda: nn.MaxPool3d(2, stride=1), (2, 3, 4, 3), id="maxpool3d"),
    pytest.param(lambda: nn.AdaptiveMaxPool2d((3, 2)), (2, 7, 5),
                 id="adaptivemaxpool2d"),
    pytest.param(lambda: nn.AdaptiveMaxPool1d(3), (2, 8), id="adaptivemaxpool1d"),
]  # fmt: skip


@pytest.mark.parametrize("make", ACTIVATIONS)
@pytest.mark.parametrize("seed", [0, 1])
def test_activation_matches_autograd_at_kinks(make, seed):
    layer = make().double()
    x = _kinky((3, 4, 5), seed)
    J = opextract.to_sparse(layer, (3, 4, 5), at=x)
    assert_close(J, _jacobian(make().double(), x))
    # Random points away from kinks as well.
    x = torch.randn(
        1, 3, 4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)
    )
    assert_close(opextract.to_sparse(layer, (3, 4, 5), at=x), _jacobian(layer, x))


@pytest.mark.parametrize(("make", "shape"), POOLS)
def test_max_pool_is_the_selection_autograd_uses(make, shape):
    layer = make().double()
    x = _kinky(shape)  # many tied maxima
    J = opextract.to_sparse(layer, shape, at=x)
    assert_close(J, _jacobian(layer, x))
    assert np.all(np.diff(J.indptr) == 1)  # one selected entry per output


def test_kink_conventions():
    x = torch.tensor([[-1.0, 0.0, 1.0, 6.0]], dtype=torch.float64)
    slopes = {
        nn.ReLU(): [0, 0, 1, 1],  # derivative 0 at exactly 0
        nn.LeakyReLU(0.2): [0.2, 0.2, 1, 1],  # negative slope at exactly 0
        nn.ReLU6(): [0, 0, 1, 0],  # 0 on both bounds
        nn.Hardtanh(-1.0, 1.0): [0, 1, 0, 0],
        nn.Threshold(1.0, 0.0): [0, 0, 0, 1],  # 0 at exactly the threshold
    }
    for layer, expected in slopes.items():
        J = opextract.to_sparse(layer, (4,), at=x)
        assert_close(J.diagonal(), np.array(expected, dtype=np.float64))
        assert_close(J, _jacobian(layer, x))


def test_tied_maxima_go_to_the_first_entry():
    x = torch.ones((1, 1, 2, 2), dtype=torch.float64)
    J = opextract.to_sparse(nn.MaxPool2d(2), (1, 2, 2), at=x)
    assert J.toarray().tolist() == [[1.0, 0.0, 0.0, 0.0]]


@pytest.mark.parametrize(
    "layer",
    [nn.ReLU(), nn.LeakyReLU(), nn.PReLU(), nn.ReLU6(), nn.Hardtanh(),
     nn.Threshold(0.1, 0.0), nn.MaxPool2d(2), nn.AdaptiveMaxPool2d(1)],
    ids=lambda m: type(m).__name__,
)  # fmt: skip
def test_piecewise_linear_without_at_is_refused(layer):
    model = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1, bias=False), layer)
    with pytest.raises(UnsupportedLayerError, match=r"'1' \(.*\) is not linear.*at=x"):
        opextract.to_sparse(model, (2, 4, 4))


def test_at_with_wrong_shape_is_refused():
    with pytest.raises(ValueError, match=r"at must have shape .*got \(1, 2, 3\)"):
        opextract.to_sparse(nn.ReLU(), (2, 2), at=torch.zeros(1, 2, 3))


def test_prelu_channels_must_match():
    layer = nn.PReLU(3).double()
    with pytest.raises(ValueError, match=r"PReLU with 3 parameters.*got \(2, 4\)"):
        opextract.to_sparse(layer, (2, 4), at=torch.zeros(1, 2, 4))


# ---------------------------------------------------------------------------
# Small networks: whole Jacobians


def _small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),  # biases are allowed with at
        nn.LeakyReLU(0.1),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.BatchNorm2d(4).eval(),
        nn.PReLU(4),
        nn.Upsample(scale_factor=2, mode="bilinear"),
        nn.ConvTranspose2d(4, 3, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(3, 2, 3, padding=1),
    ).double()


class _Skip(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 3, 3, padding=1)
        self.b = nn.Conv2d(3, 3, 3, stride=2, padding=1)
        self.c = nn.Conv2d(6, 2, 3, padding=1)

    def forward(self, x):
        h = F.leaky_relu(self.a(x), 0.2)
        g = torch.relu(self.b(h))
        g = F.interpolate(g, scale_factor=2, mode="nearest")
        return self.c(torch.cat([h, F.hardtanh(g)], dim=1)) + x


@pytest.mark.parametrize("make", [_small_net, lambda: _Skip().double()],
                         ids=["chain", "graph"])  # fmt: skip
def test_small_network_matches_jacrev(make):
    model = make()
    shape = (2, 6, 6)
    x = torch.randn(
        1, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2)
    )
    expected = _jacobian(model, x)
    J = opextract.to_sparse(model, shape, at=x)
    assert_close(J, expected)

    fs = opextract.factors(model, shape, at=x)
    if isinstance(fs, list):
        product = fs[0].matrix
        for f in fs[1:]:
            product = f.matrix @ product
    else:
        product = fs.to_sparse()
    assert_close(product, expected)

    op = opextract.as_linear_operator(model, shape, at=x, backend="sparse")
    v = np.random.default_rng(0).standard_normal(op.shape[1])
    assert_close(op.matvec(v), expected @ v)

    # The affine model at x: J x + offset = f(x).
    J, offset = opextract.to_sparse(model, shape, at=x, bias="offset")
    with torch.no_grad():
        fx = model(x).reshape(-1).numpy()
    assert_close(J @ x.reshape(-1).numpy() + offset, fx)


def test_network_with_kinks_matches_jacrev():
    model = nn.Sequential(
        nn.Conv2d(1, 2, 2, bias=False), nn.ReLU(), nn.MaxPool2d(2, stride=1),
        nn.LeakyReLU(0.3), nn.Conv2d(2, 1, 1, bias=False),
    ).double()  # fmt: skip
    nn.init.constant_(model[0].weight, 1.0)  # integer sums: zeros and ties
    nn.init.constant_(model[4].weight, 1.0)
    x = _kinky((1, 5, 5), seed=3)
    assert_close(opextract.to_sparse(model, (1, 5, 5), at=x), _jacobian(model, x))


# ---------------------------------------------------------------------------
# A large network: directional finite differences


def test_large_network_matches_finite_differences():
    torch.manual_seed(0)
    c = 8
    layers = [nn.Conv2d(3, c, 3, stride=2, padding=1), nn.LeakyReLU(0.1)]
    layers += [nn.Conv2d(c, c, 3, stride=2, padding=1), nn.LeakyReLU(0.1)]
    layers += [nn.Upsample(scale_factor=4), nn.Conv2d(c, c, 3, padding=1)]
    layers += [nn.LeakyReLU(0.1), nn.Conv2d(c, 3, 3, padding=1)]
    model = nn.Sequential(*layers).double()
    shape = (3, 32, 32)
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.standard_normal((1, *shape)))
    J = opextract.to_sparse(model, shape, at=x)
    assert J.shape == (math.prod(shape),) * 2

    h = 1e-6
    for _ in range(3):
        v = torch.tensor(rng.standard_normal((1, *shape)))
        with torch.no_grad():
            fd = (model(x + h * v) - model(x - h * v)).reshape(-1).numpy() / (2 * h)
        jv = J @ v.reshape(-1).numpy()
        assert_close(jv, fd, rtol=1e-6, atol=1e-6 * np.abs(fd).max())


# ---------------------------------------------------------------------------
# Compressed Jacobian-vector products (downsampling networks)


def _downsampling(dims: int, tail: str, bias: bool) -> nn.Module:
    """Conv stride 8, LeakyReLU, Upsample x8, Conv, ReLU, Conv (3-tap kernels)."""
    torch.manual_seed(0)
    conv = nn.Conv1d if dims == 1 else nn.Conv2d
    layers = [conv(2, 4, 3, stride=8, padding=1, bias=bias), nn.LeakyReLU(0.2)]
    layers += [nn.Upsample(scale_factor=8), conv(4, 4, 3, padding=1, bias=bias)]
    layers += [nn.ReLU(), conv(4, 2, 3, padding=1, bias=bias)]
    if tail == "upsample":
        # Not followed by a convolution: not fused, so the model is differentiated.
        layers += [nn.Upsample(scale_factor=2)]
    return nn.Sequential(*layers).double()


@pytest.mark.parametrize(
    ("dims", "tail", "linearized"),
    [(2, "conv", True), (2, "upsample", False), (1, "conv", True)],
    ids=["2d-layers", "2d-autograd", "1d-layers"],
)
def test_compressed_products_match_jacrev(dims, tail, linearized, monkeypatch):
    from opextract import _compose, _patches

    # These chains also have windowed patches; switch those off to reach the
    # compressed products, the path of chains that patches do not cover.
    monkeypatch.setattr(_patches, "plan", lambda layers: None)
    calls = {}

    def spy(name):
        original = getattr(_compose, name)

        def wrapped(*args, **kwargs):
            out = original(*args, **kwargs)
            calls[name] = out
            return out

        monkeypatch.setattr(_compose, name, wrapped)

    spy("compression_plan")
    spy("linearized_forward")
    model = _downsampling(dims, tail, bias=True)
    shape = (2, 256) if dims == 1 else (2, 32, 32)
    x = torch.tensor(np.random.default_rng(0).standard_normal((1, *shape)))
    J, offset = opextract.to_sparse(model, shape, at=x, bias="offset")
    assert calls["compression_plan"] is not None
    assert (calls["linearized_forward"] is not None) == linearized
    assert_close(J, _jacobian(model, x), rtol=1e-12, atol=1e-13)
    with torch.no_grad():
        fx = model(x).reshape(-1).numpy()
    assert_close(J @ x.reshape(-1).numpy() + offset, fx)

    # The composed factors give the same matrix.
    monkeypatch.setattr(_compose, "COMPRESSION_GAIN", 10**9)
    assert_close(opextract.to_sparse(model, shape, at=x, bias="ignore"), J)
