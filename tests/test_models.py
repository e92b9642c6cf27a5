"""The networks of the study: layers, shapes, rank bounds, initializations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _helpers import assert_close
from torch import nn

import opextract
from analysis import models


def _dense_operator(model: nn.Module, input_shape) -> np.ndarray:
    """The matrix of a linear network, by forwarding the identity basis in float64."""
    n = int(np.prod(input_shape))
    model64 = _float64_copy(model)
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *input_shape)
    with torch.no_grad():
        out = model64(basis).reshape(n, -1)
    return out.T.numpy()


def _float64_copy(model: nn.Module) -> nn.Module:
    clone = models.build(**model.config)
    clone.load_state_dict(model.state_dict())
    return clone.double()


# name, options, expected input_shape, expected r_min_bound, downsampling, linear
CASES = [
    ("ds", {}, (1, 2, 2), 4, True, True),
    ("d", dict(channels=4, depth=3, input_size=8), (3, 8, 8), 4, True, True),
    ("nd", dict(channels=4, depth=3, input_size=8), (3, 8, 8), 192, False, True),
    ("d_ab", dict(a=3, b=5, input_size=8), (3, 8, 8), 5, True, True),
    ("d_ab", dict(a=2, b=3, in_channels=1, input_size=8), (1, 8, 8), 3, True, True),
    ("nd_ab", dict(a=2, b=3, input_size=8), (3, 8, 8), 128, False, True),
    ("nld_ab", dict(a=3, b=5, input_size=8), (3, 8, 8), 5, True, False),
    ("nlnd_ab", dict(a=3, b=5, input_size=8), (3, 8, 8), 192, False, False),
    ("unet", dict(depth=2, width=2, input_size=8), (3, 8, 8), 128, True, True),
    (
        "unet",
        dict(depth=1, width=3, input_size=4, linear=False),
        (3, 4, 4),
        48,
        True,
        False,
    ),
]
IDS = [f"{c[0]}-{i}" for i, c in enumerate(CASES)]


@pytest.mark.parametrize("name, options, shape, bound, down, linear", CASES, ids=IDS)
def test_attributes_and_output_shape(name, options, shape, bound, down, linear):
    model = models.build(name, seed=0, **options)
    assert model.input_shape == shape
    assert model.r_min_bound == bound
    assert model.downsampling is down
    assert model.linear is linear
    with torch.no_grad():
        out = model(torch.rand(2, *shape))
    assert tuple(out.shape) == (2, *shape)


LINEAR = [c for c in CASES if c[5]]


@pytest.mark.parametrize(
    "name, options", [c[:2] for c in LINEAR], ids=[c[0] for c in LINEAR]
)
def test_linear_networks_match_their_operator(name, options):
    model = models.build(name, seed=1, **options)
    shape = model.input_shape
    expected = _dense_operator(model, shape)

    A = opextract.to_sparse(model, shape)
    assert_close(A, expected, dtype=np.float64, label=name)

    # Linearity itself: the operator reproduces the torch forward on new inputs.
    x = torch.rand(3, *shape, dtype=torch.float64)
    with torch.no_grad():
        y = _float64_copy(model)(x).reshape(3, -1).numpy()
    assert_close(x.reshape(3, -1).numpy() @ expected.T, y, dtype=np.float64)


@pytest.mark.parametrize(
    "name, options", [c[:2] for c in LINEAR], ids=[c[0] for c in LINEAR]
)
def test_rank_bound_is_attained_by_random_weights(name, options):
    model = models.build(name, seed=2, **options)
    A = _dense_operator(model, model.input_shape)
    assert np.linalg.matrix_rank(A) == model.r_min_bound


def test_chains_are_sequential_with_one_child_per_layer():
    net = models.nld_ab(3, 5, input_size=8, seed=0)
    assert isinstance(net, nn.Sequential)
    names = [name for name, _ in net.named_children()]
    assert names == [str(i) for i in range(12)]
    kinds = [type(m).__name__ for m in net]
    assert kinds.count("LeakyReLU") == 5 and kinds[-1] == "Conv2d"
    for conv in (m for m in net if isinstance(m, nn.Conv2d)):
        assert conv.kernel_size == (3, 3) and conv.padding == (1, 1)
        assert conv.bias is None


def test_ds_identity_init_is_exactly_the_identity():
    net = models.ds("identity")
    basis = torch.eye(4).reshape(4, 1, 2, 2)
    with torch.no_grad():
        assert torch.equal(net(basis), basis)
    np.testing.assert_array_equal(_dense_operator(net, (1, 2, 2)), np.eye(4))


def test_ds_identity_init_exports_the_identity_operator():
    net = models.ds("identity")
    A = opextract.to_sparse(net, (1, 2, 2))
    np.testing.assert_array_equal(A.toarray(), np.eye(4))


def test_ds_identity_init_follows_appendix_a():
    net = models.ds("identity")
    w0 = net[0].weight.detach()
    assert w0.sum() == 4 and w0[2, 0, 2, 1] == 1
    assert net[4].weight[3, 3, 0, 0] == 1 and net[4].weight.sum() == 4
    assert net[5].weight[0, :, 1, 1].tolist() == [1, 1, 1, 1]


def test_ds_identity_scale():
    net = models.ds("identity", scale=0.5)
    x = torch.rand(3, 1, 2, 2)
    with torch.no_grad():
        assert_close(net(x), x / 32, dtype=np.float32)


def test_default_init_with_seed_matches_pytorch_own_draws():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        reference = nn.Conv2d(4, 5, 3, padding=1, bias=True)
    conv = models.initialize(nn.Conv2d(4, 5, 3, padding=1, bias=True), seed=7)
    assert torch.equal(conv.weight, reference.weight)
    assert torch.equal(conv.bias, reference.bias)


def test_seed_is_local_and_reproducible():
    state = torch.random.get_rng_state()
    a = models.d_ab(3, 5, input_size=8, seed=3)
    b = models.d_ab(3, 5, input_size=8, seed=3)
    c = models.d_ab(3, 5, input_size=8, seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    for pa, pb, pc in zip(a.parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb)
        assert not torch.equal(pa, pc)


@pytest.mark.parametrize("init", models.INITS)
def test_initializations_and_scale(init):
    one = models.d_ab(3, 5, input_size=8, init=init, seed=0)
    two = models.d_ab(3, 5, input_size=8, init=init, scale=2.0, seed=0)
    for p1, p2 in zip(one.parameters(), two.parameters()):
        assert torch.equal(2 * p1, p2)
    weight = one[4].weight.detach()
    fan_in = weight[0].numel()
    fan_out = weight.shape[0] * weight[0, 0].numel()
    expected_std = {
        "default": 1 / np.sqrt(3 * fan_in),
        "xavier_uniform": np.sqrt(2 / (fan_in + fan_out)),
        "xavier_normal": np.sqrt(2 / (fan_in + fan_out)),
        "kaiming_uniform": np.sqrt(2 / fan_in),
        "kaiming_normal": np.sqrt(2 / fan_in),
    }[init]
    # 3*5*9 = 135 draws: the sample std is within 30% of the law's.
    assert abs(weight.std().item() / expected_std - 1) < 0.3


def test_bias_option_makes_network_affine():
    net = models.d_ab(3, 5, input_size=8, bias=True, seed=0)
    assert not net.linear
    assert all(m.bias is not None for m in net if isinstance(m, nn.Conv2d))


def test_build_round_trip_and_names():
    net = models.build("NLD_AB", a=2, b=3, in_channels=1, input_size=8, seed=5)
    again = models.build(**net.config)
    for p, q in zip(net.parameters(), again.parameters()):
        assert torch.equal(p, q)
    assert "unet" in models.names()


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda: models.d_ab(4, 4, input_size=12),
            "input_size must be a multiple of 8; got 12",
        ),
        (lambda: models.d(channels=0), "channels must be a positive integer; got 0"),
        (lambda: models.d(depth=1), "depth must be at least 2; got 1"),
        (lambda: models.ds("orthogonal"), "init must be one of .*; got 'orthogonal'"),
        (lambda: models.d_ab(4, 4, init="identity"), "init must be one of"),
        (lambda: models.unet(depth=3, input_size=12), "multiple of 8; got 12"),
        (lambda: models.ds(scale=float("nan")), "scale must be a finite number"),
        (lambda: models.build("vgg"), "name must be one of .*; got 'vgg'"),
    ],
    ids=[
        "size",
        "channels",
        "depth",
        "init",
        "identity-only-ds",
        "unet",
        "scale",
        "name",
    ],
)
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_build_bad_option():
    with pytest.raises(TypeError, match="invalid options for network 'ds'"):
        models.build("ds", channels=3)


def test_ds_factors_have_the_shapes_of_appendix_b():
    # A_X = A_5 A_4 A_3 A_2 U A_1 on zero-padded 1x2x2 images: A_1 is
    # 4*3*3 x 1*4*4, U is 4*4*4 x 4*3*3, A_2..A_4 are 64 x 64, A_5 is 16 x 64.
    factors = opextract.factors(models.ds(seed=0), (1, 2, 2), layout="padded")
    assert [f.path for f in factors] == ["0", "1", "2", "3", "4", "5"]
    shapes = [f.matrix.shape for f in factors]
    assert shapes == [(36, 16), (64, 36), (64, 64), (64, 64), (64, 64), (16, 64)]
