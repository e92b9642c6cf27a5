"""Refusals of bad input: each names the parameter, the rule and the value."""

import sys
import types

import numpy as np
import pytest
import torch
from _helpers import assert_close
from torch import nn

import opextract
from opextract import OperatorTooLargeError, UnsupportedLayerError


def conv(cin=3, cout=4, **options):
    return nn.Conv2d(
        cin, cout, 3, padding=1, bias=options.pop("bias", False), **options
    )


@pytest.mark.parametrize(
    "layer",
    [nn.ReLU(), nn.MaxPool2d(2), nn.Softmax(dim=1), nn.GELU(), nn.Tanh()],
    ids=lambda m: type(m).__name__,
)
def test_nonlinear_layer_is_named_with_path_type_and_supported_types(layer):
    model = nn.Sequential(conv(), nn.Sequential(conv(4, 4), layer))
    name = type(layer).__name__
    with pytest.raises(
        UnsupportedLayerError, match=rf"'1\.1'.*{name}.*supported types: .*Conv2d"
    ):
        opextract.to_sparse(model, (3, 8, 8))


def test_unsupported_model_itself():
    with pytest.raises(UnsupportedLayerError, match=r"the model itself\) of type GELU"):
        opextract.factors(nn.GELU(), (3, 8, 8))


@pytest.mark.parametrize(
    "shape, message",
    [
        (
            (1, 8, 8),
            r"input_shape \(1, 8, 8\) has 1 channels but Conv2d at '0' needs "
            r"in_channels=3",
        ),
        (
            (3, 8),
            r"input_shape must be \(C, H, W\) with positive sizes for Conv2d at "
            r"'0'; got \(3, 8\)",
        ),
        ((3, 8, 8, 8), r"input_shape must be \(C, H, W\).*got \(3, 8, 8, 8\)"),
        (
            (3, 0, 8),
            r"input_shape must be a tuple of positive integers .*got \(3, 0, 8\)",
        ),
        ((3, 8.5, 8), r"input_shape must be a tuple of positive integers"),
        ("3x8x8", r"input_shape must be a tuple of positive integers .*got '3x8x8'"),
    ],
    ids=["channels", "two-entries", "four-entries", "zero", "float", "string"],
)
def test_input_shape_that_does_not_fit(shape, message):
    with pytest.raises(ValueError, match=message):
        opextract.to_sparse(nn.Sequential(conv()), shape)


def test_input_too_small_for_kernel():
    model = nn.Sequential(nn.Conv2d(3, 4, 5, bias=False))
    with pytest.raises(
        ValueError,
        match=r"input_shape \(3, 2, 2\) is too small for Conv2d at '0': spatial size 2 "
        r"plus padding \(0, 0\) is below the dilated kernel extent 5",
    ):
        opextract.to_sparse(model, (3, 2, 2))


def test_later_layer_shape_mismatch_names_that_layer():
    model = nn.Sequential(conv(3, 4), conv(3, 2))
    with pytest.raises(ValueError, match=r"has 4 channels but Conv2d at '1' needs"):
        opextract.to_sparse(model, (3, 8, 8))


def test_bias_is_refused_by_default():
    model = nn.Sequential(conv(), conv(4, 2, bias=True))
    with pytest.raises(
        ValueError,
        match=r"module '1' \(Conv2d\) has a bias, so the network is affine.*"
        r"bias='offset'",
    ):
        opextract.to_sparse(model, (3, 8, 8))
    with pytest.raises(ValueError, match=r"bias must be 'error', 'offset' or 'ignore'"):
        opextract.to_sparse(model, (3, 8, 8), bias="subtract")


def test_memory_budget_refuses_before_allocating():
    model = nn.Sequential(conv(3, 64), conv(64, 3))
    with pytest.raises(
        OperatorTooLargeError,
        match=r"needs an estimated \d+ bytes .*more than max_bytes=100000",
    ):
        opextract.to_sparse(model, (3, 16, 16), max_bytes=100_000)
    with pytest.raises(OperatorTooLargeError, match=r"max_bytes=10\b"):
        opextract.conv_matrix(np.ones((2, 2, 3, 3)), (2, 4, 4), max_bytes=10)
    with pytest.raises(
        ValueError, match=r"max_bytes must be a positive integer; got -1"
    ):
        opextract.to_sparse(model, (3, 16, 16), max_bytes=-1)
    # The default budget admits it.
    assert opextract.to_sparse(model, (3, 16, 16)).shape == (768, 768)


@pytest.mark.parametrize("dtype", [np.int32, "float16", "complex128"])
def test_unknown_dtype(dtype):
    with pytest.raises(ValueError, match=r"dtype must be float32 or float64; got"):
        opextract.to_sparse(conv(), (3, 8, 8), dtype=dtype)


def test_unknown_layout_and_backend():
    with pytest.raises(
        ValueError, match=r"layout must be 'compact' or 'padded'; got 'x'"
    ):
        opextract.factors(conv(), (3, 8, 8), layout="x")
    with pytest.raises(ValueError, match=r"backend must be .*got 'gpu'"):
        opextract.as_linear_operator(conv(), (3, 8, 8), backend="gpu")


def test_bad_linearization_point_and_model():
    with pytest.raises(ValueError, match=r"at must have shape input_shape=\(3, 8, 8\)"):
        opextract.to_sparse(conv(), (3, 8, 8), at=np.zeros((3, 4, 4)))
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module; got str"):
        opextract.to_sparse("model", (3, 8, 8))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(stride=0), r"stride must be positive; got \(0, 0\)"),
        (dict(padding="half"), r"padding must be .*'same' or 'valid'; got 'half'"),
        (dict(padding=-1), r"padding must be non-negative; got -1"),
        (dict(padding="same", stride=2), r"padding='same' needs stride 1"),
        (dict(groups=3), r"groups must be a positive divisor of C_out=2; got 3"),
        (dict(padding_mode="mirror"), r"padding_mode must be one of .*got 'mirror'"),
        (dict(dilation=(1, 2, 3)), r"dilation must be an int or a tuple of 2 ints"),
    ],
    ids=[
        "stride",
        "padding-str",
        "padding-neg",
        "same-stride",
        "groups",
        "mode",
        "dil",
    ],
)
def test_conv_matrix_argument_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        opextract.conv_matrix(np.ones((2, 2, 3, 3)), (2, 6, 6), **kwargs)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = conv(3, 3)

    def forward(self, x):
        return self.conv(x) + x


def test_graphs_go_to_the_graph_tracer(monkeypatch):
    calls = []

    def graph_factors(model, input_shape, *, dtype, at, bias):
        calls.append((type(model).__name__, input_shape, bias))
        return "a factor graph"

    fake = types.ModuleType("opextract._graph")
    fake.graph_factors = graph_factors
    monkeypatch.setitem(sys.modules, "opextract._graph", fake)
    monkeypatch.setattr(opextract, "_graph", fake, raising=False)
    assert opextract.factors(Residual(), (3, 8, 8)) == "a factor graph"
    assert calls == [("Residual", (3, 8, 8), "error")]


def test_graphs_without_tracer_are_refused(monkeypatch):
    empty = types.ModuleType("opextract._graph")
    monkeypatch.setitem(sys.modules, "opextract._graph", empty)
    monkeypatch.setattr(opextract, "_graph", empty, raising=False)
    with pytest.raises(
        UnsupportedLayerError,
        match=r"model of type Residual is not a chain of layers .*graphs are not "
        r"supported",
    ):
        opextract.to_sparse(Residual(), (3, 8, 8))


def test_residual_graph_round_trip_when_tracer_present():
    torch.manual_seed(0)
    model = Residual().double()
    A = opextract.to_sparse(model, (3, 6, 6))
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    got = A @ x.reshape(-1).numpy()
    assert_close(got, model(x).detach().reshape(-1).numpy())
