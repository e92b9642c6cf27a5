"""Whole networks: to_sparse and factors against the torch forward in float64."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from _helpers import assert_close
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import opextract
from opextract import _compose


def conv(cin, cout, stride=1, **options):
    options.setdefault("padding", 1)
    return nn.Conv2d(
        cin, cout, options.pop("kernel_size", 3), stride, bias=False, **options
    )


def forward_matrix(model, shape):
    """Dense matrix of a linear model by forwarding the identity basis."""
    n = int(np.prod(shape))
    with torch.no_grad():
        basis = torch.eye(n, dtype=torch.float64).reshape(n, *shape)
        return model.double()(basis).reshape(n, -1).numpy().T


def check_model(model, shape, *, dtype=np.float64):
    model = model.double()
    A = opextract.to_sparse(model, shape, dtype=dtype)
    assert isinstance(A, sp.csr_array) and A.dtype == dtype
    assert_close(A, forward_matrix(model, shape), dtype=dtype)
    assert A.has_sorted_indices and not np.any(A.data == 0)
    fs = opextract.factors(model, shape, dtype=dtype)
    product = fs[0].matrix
    for f in fs[1:]:
        product = f.matrix @ product
    assert_close(product, A, dtype=dtype)
    return A, fs


def _seeded(builder):
    def make():
        torch.manual_seed(0)
        return builder()

    return make


CASES = {
    "ds": _seeded(
        lambda: nn.Sequential(
            conv(1, 4, 2),
            nn.Upsample(scale_factor=2),
            conv(4, 4),
            conv(4, 4),
            conv(4, 4),
            conv(4, 1),
        )
    ),
    "d-small": _seeded(
        lambda: nn.Sequential(
            conv(3, 8, 4), nn.Upsample(scale_factor=4), conv(8, 8), conv(8, 3)
        )
    ),
    "d_ab-small": _seeded(
        lambda: nn.Sequential(
            conv(3, 4, 2),
            conv(4, 4, 2),
            conv(4, 6, 2),
            nn.Upsample(scale_factor=8),
            conv(6, 4),
            conv(4, 4),
            conv(4, 3),
        )
    ),
    "nd-small": _seeded(lambda: nn.Sequential(conv(3, 6), conv(6, 6), conv(6, 3))),
    "nested": _seeded(
        lambda: nn.Sequential(
            nn.Sequential(conv(3, 4, 2)),
            nn.Sequential(nn.Upsample(scale_factor=2), nn.Sequential(conv(4, 3))),
        )
    ),
    "upsample-last": _seeded(
        lambda: nn.Sequential(conv(3, 2, 2), nn.Upsample(scale_factor=2))
    ),
    "two-upsamplings": _seeded(
        lambda: nn.Sequential(
            conv(3, 2, 4),
            nn.Upsample(scale_factor=2),
            nn.Upsample(scale_factor=2),
            conv(2, 3),
        )
    ),
    "circular-dilated-groups": _seeded(
        lambda: nn.Sequential(
            conv(3, 6, 2, padding_mode="circular"),
            conv(6, 6, groups=3, dilation=2, padding=2),
            nn.Upsample(scale_factor=2),
            conv(6, 3, padding_mode="reflect"),
        )
    ),
    "size-upsample-5x5": _seeded(
        lambda: nn.Sequential(
            conv(3, 4, 3, kernel_size=5, padding=2),
            nn.Upsample(size=(8, 8)),
            conv(4, 3, kernel_size=5, padding=2),
        )
    ),
    "flatten-linear": _seeded(
        lambda: nn.Sequential(conv(3, 2, 2), nn.Flatten(), nn.Linear(32, 5, bias=False))
    ),
    "single-layer": _seeded(lambda: conv(3, 5, 2)),
}


@pytest.mark.parametrize("make", list(CASES.values()), ids=list(CASES))
def test_chain_matches_forward(make):
    check_model(make(), (3, 8, 8) if make is not CASES["ds"] else (1, 2, 2))


def test_ds_paths_and_shapes():
    _, fs = check_model(CASES["ds"](), (1, 2, 2))
    assert [f.path for f in fs] == ["0", "1", "2", "3", "4", "5"]
    assert [f.module_type for f in fs] == ["Conv2d", "Upsample"] + ["Conv2d"] * 4
    assert fs[0].in_shape == (1, 2, 2) and fs[0].out_shape == (4, 1, 1)
    assert fs[1].out_shape == (4, 2, 2)


def test_nested_paths():
    fs = opextract.factors(CASES["nested"](), (3, 8, 8))
    assert [f.path for f in fs] == ["0.0", "1.0", "1.1.0"]


def test_float32():
    check_model(CASES["d_ab-small"](), (3, 8, 8), dtype=np.float32)


def test_one_and_three_dimensional_chains():
    torch.manual_seed(0)
    check_model(
        nn.Sequential(
            nn.Conv1d(2, 3, 3, 2, 1, bias=False),
            nn.Upsample(scale_factor=2),
            nn.Conv1d(3, 2, 3, 1, 1, bias=False),
        ),
        (2, 12),
    )
    check_model(
        nn.Sequential(
            nn.Conv3d(1, 2, 3, 2, 1, bias=False),
            nn.Upsample(scale_factor=2),
            nn.Conv3d(2, 1, 3, 1, 1, bias=False),
        ),
        (1, 4, 4, 4),
    )


@pytest.mark.parametrize(
    "strategy", ["composed-kernels", "representative-rows", "generic"]
)
def test_every_product_strategy_matches_forward(strategy, monkeypatch):
    if strategy != "composed-kernels":
        monkeypatch.setattr(_compose, "_MAX_CONTRACTION", 0)
    if strategy == "generic":
        monkeypatch.setattr(_compose, "_MAX_PATHS", 0)
    for name in ("d_ab-small", "ds", "circular-dilated-groups", "two-upsamplings"):
        model = CASES[name]().double()
        shape = (1, 2, 2) if name == "ds" else (3, 16, 16)
        assert_close(opextract.to_sparse(model, shape), forward_matrix(model, shape))


def test_network_d_has_363_nonzero_columns():
    torch.manual_seed(0)
    model = nn.Sequential(
        conv(3, 128, 8), nn.Upsample(scale_factor=8), conv(128, 128), conv(128, 3)
    )
    A = opextract.to_sparse(model, (3, 32, 32))
    assert A.shape == (3072, 3072)
    assert np.count_nonzero(np.diff(A.tocsc().indptr)) == 3 * 11 * 11
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    y = model.double()(x).detach().reshape(-1).numpy()
    assert_close(A @ x.reshape(-1).numpy(), y)


def test_bias_offset_and_ignore():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, 2, 1), nn.Upsample(scale_factor=2), nn.Conv2d(3, 2, 3, 1, 1)
    ).double()
    A, b = opextract.to_sparse(model, (2, 6, 6), bias="offset")
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    y = model(x).detach().reshape(-1).numpy()
    assert_close(A @ x.reshape(-1).numpy() + b, y)
    assert_close(b, model(torch.zeros_like(x)).detach().reshape(-1).numpy())
    assert_close(opextract.to_sparse(model, (2, 6, 6), bias="ignore"), A)
    # With a linearization point the bias is allowed: the Jacobian is A.
    assert_close(opextract.to_sparse(model, (2, 6, 6), at=x[0]), A)
    fs = opextract.factors(model, (2, 6, 6), bias="offset")
    assert_close(fs[0].offset, np.repeat(model[0].bias.detach().numpy(), 9))
    assert fs[1].offset is None
    P, pb = opextract.to_sparse(model, (2, 6, 6), bias="offset", layout="padded")
    assert_close(pb, opextract.padding_embedding((2, 6, 6)) @ b)


def test_local_operator_of_leaky_relu_network():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, 2, 1),
        nn.LeakyReLU(0.1),
        nn.Upsample(scale_factor=2),
        nn.Conv2d(3, 2, 3, 1, 1),
    ).double()
    x = torch.randn(2, 6, 6, dtype=torch.float64)
    A = opextract.to_sparse(model, (2, 6, 6), at=x)
    J = torch.func.jacrev(lambda v: model(v[None])[0])(x).reshape(72, 72)
    assert_close(A, J.detach().numpy())


@st.composite
def chains(draw):
    cin = draw(st.integers(1, 3))
    size = draw(st.integers(3, 9))
    shape = (cin, size, size)
    layers, c, s = [], cin, size
    for _ in range(draw(st.integers(1, 4))):
        if draw(st.integers(0, 3)) == 0 and s <= 8:
            scale = draw(st.integers(1, 3))
            layers.append(nn.Upsample(scale_factor=scale))
            s *= scale
            continue
        cout = draw(st.integers(1, 4))
        k = draw(st.integers(1, 4))
        stride = draw(st.integers(1, 3))
        padding = draw(st.integers(0, 2))
        mode = draw(st.sampled_from(["zeros", "zeros", "circular", "replicate"]))
        if s + 2 * padding < k or (mode == "circular" and padding > s):
            continue
        layers.append(
            nn.Conv2d(c, cout, k, stride, padding, padding_mode=mode, bias=False)
        )
        c, s = cout, (s + 2 * padding - k) // stride + 1
    if not layers:
        layers.append(nn.Conv2d(c, 2, 1, bias=False))
    seed = draw(st.integers(0, 2**16))
    return layers, shape, seed


@settings(max_examples=200, deadline=None)
@given(chains())
def test_random_chains_match_forward(chain):
    layers, shape, seed = chain
    torch.manual_seed(seed)
    for layer in layers:
        layer.reset_parameters() if hasattr(layer, "reset_parameters") else None
    model = nn.Sequential(*layers).double()
    A = opextract.to_sparse(model, shape)
    assert_close(A, forward_matrix(model, shape))
