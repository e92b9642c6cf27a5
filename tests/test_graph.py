"""Networks that are not chains: U-Nets, random skip graphs, functional code.

Every exported operator is compared with the model's forward pass in float64;
every refusal is checked for the node, target and reason in its message.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _helpers import assert_close
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import opextract
from opextract import FactorGraph, UnsupportedLayerError


def _forward(model: nn.Module, x: np.ndarray, shape) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(x.reshape(1, *shape))).reshape(-1).numpy()


def _identity_batch(model: nn.Module, shape) -> np.ndarray:
    """Dense operator by forwarding the identity basis (the slow reference)."""
    n = math.prod(shape)
    with torch.no_grad():
        out = model(torch.eye(n, dtype=torch.float64).reshape(n, *shape))
    return out.reshape(n, -1).numpy().T


def _round_trip(model: nn.Module, shape, seed=0):
    x = np.random.default_rng(seed).standard_normal(math.prod(shape))
    A = opextract.to_sparse(model, shape)
    assert_close(A @ x, _forward(model, x, shape))
    return A


# ---------------------------------------------------------------------------
# U-Nets


class _UNet(nn.Module):
    """Linear U-Net: strided convs down, transposed conv / bilinear up, cat skips."""

    def __init__(self, levels: int, c: int = 2):
        super().__init__()
        widths = [c * 2**i for i in range(levels + 1)]
        self.inc = nn.Conv2d(1, widths[0], 3, padding=1, bias=False)
        self.down = nn.ModuleList(
            nn.Conv2d(widths[i], widths[i + 1], 3, stride=2, padding=1, bias=False)
            for i in range(levels)
        )
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(widths[i + 1], widths[i + 1], 2, stride=2, bias=False)
            if i % 2 == 0
            else nn.Upsample(scale_factor=2, mode="bilinear")
            for i in range(levels)
        )
        self.merge = nn.ModuleList(
            nn.Conv2d(widths[i + 1] + widths[i], widths[i], 3, padding=1, bias=False)
            for i in range(levels)
        )
        self.outc = nn.Conv2d(widths[0], 1, 1, bias=False)

    def forward(self, x):
        skips, h = [], self.inc(x)
        for down in self.down:
            skips.append(h)
            h = down(h)
        for i in reversed(range(len(self.down))):
            h = self.merge[i](torch.cat([self.up[i](h), skips[i]], dim=1))
        return self.outc(h)


@pytest.mark.parametrize("levels", [2, 3])
def test_linear_unet_round_trip(levels):
    torch.manual_seed(levels)
    model = _UNet(levels).double()
    shape = (1, 8, 8)
    A = _round_trip(model, shape)
    assert_close(A, _identity_batch(model, shape))

    graph = opextract.factors(model, shape)
    assert isinstance(graph, FactorGraph)
    kinds = [node.op for node in graph.nodes]
    assert kinds[0] == "input" and kinds.count("cat") == levels
    assert [n.target for n in graph.nodes if n.op == "layer"][0] == "inc"
    for i, node in enumerate(graph.nodes):
        assert all(j < i for j in node.inputs)  # topological order
        if node.op == "layer":
            assert node.factor.matrix.shape == (
                math.prod(node.shape),
                math.prod(graph.nodes[node.inputs[0]].shape),
            )
    x = np.random.default_rng(1).standard_normal(math.prod(shape))
    assert_close(graph.evaluate(x), A @ x)
    assert_close(graph.to_sparse(), A)


@pytest.mark.parametrize("depth", [2, 3])
def test_models_unet_linear_and_local(depth):
    from analysis.models import unet

    model = unet(depth=depth, width=2, in_channels=1, input_size=8, seed=0).double()
    A = _round_trip(model, (1, 8, 8))
    assert A.shape == (64, 64)

    nonlinear = unet(depth=depth, width=2, in_channels=1, input_size=8, seed=0,
                     linear=False).double()  # fmt: skip
    x = torch.randn(1, 1, 8, 8, dtype=torch.float64)
    J = opextract.to_sparse(nonlinear, (1, 8, 8), at=x)
    jac = torch.func.jacrev(lambda z: nonlinear(z[None])[0])(x[0])
    assert_close(J, jac.reshape(64, 64).detach())


def test_graph_layouts_and_linear_operator():
    torch.manual_seed(0)
    model = _UNet(2).double()
    shape = (1, 8, 8)
    A = opextract.to_sparse(model, shape)
    P = opextract.to_sparse(model, shape, layout="padded")
    E = opextract.padding_embedding(shape)
    assert_close(P, E @ A @ E.T)

    A32 = opextract.to_sparse(model, shape, dtype=np.float32)
    assert A32.dtype == np.float32
    assert_close(A32, A, dtype=np.float32)

    op = opextract.as_linear_operator(model, shape)
    v = np.random.default_rng(0).standard_normal(64)
    assert_close(op.matvec(v), A @ v)
    assert_close(op.rmatvec(v), A.T @ v)
    op = opextract.as_linear_operator(model, shape, backend="sparse")
    assert_close(op.matvec(v), A @ v)


# ---------------------------------------------------------------------------
# Random chains with random skips


class _Random(nn.Module):
    """Runs a drawn program: convs, skips (add or cat + conv), scalings.

    Skip sources are resolved here, from the channel counts, so that the
    forward has no shape-dependent control flow for torch.fx to trip on.
    """

    def __init__(self, program, c_in: int):
        super().__init__()
        channels = [c_in]
        self.plan = []
        self.convs = nn.ModuleList()
        for step in program:
            kind, c = step[0], channels[-1]
            if kind == "conv":
                _, k, c_out, pool = step
                self.convs.append(nn.Conv2d(c, c_out, k, padding=k // 2, bias=False))
                self.plan.append(("conv", pool))
                c = c_out
            elif kind == "cat":
                src = step[1] % len(channels)
                self.convs.append(nn.Conv2d(c + channels[src], c, 1, bias=False))
                self.plan.append(("cat", src))
            elif kind == "add":
                same = [i for i, ci in enumerate(channels) if ci == c]
                self.plan.append(("add", same[step[1] % len(same)], step[2]))
            else:
                self.plan.append(("neg",))
            channels.append(c)

    def forward(self, x):
        values = [x]
        convs = iter(self.convs)
        for step in self.plan:
            h = values[-1]
            if step[0] == "conv":
                h = next(convs)(h)
                if step[1]:
                    h = F.interpolate(
                        F.avg_pool2d(h, 2), scale_factor=2, mode="bilinear"
                    )
            elif step[0] == "cat":
                h = next(convs)(torch.cat([h, values[step[1]]], dim=1))
            elif step[0] == "add":
                h = h + step[2] * values[step[1]]
            else:
                h = -h / 2
            values.append(h)
        return values[-1]


_step = st.one_of(
    st.tuples(
        st.just("conv"), st.sampled_from([1, 3]), st.integers(1, 3), st.booleans()
    ),
    st.tuples(st.just("cat"), st.integers(0, 10)),
    st.tuples(st.just("add"), st.integers(0, 10), st.sampled_from([1.0, -0.5, 2.0])),
    st.tuples(st.just("neg")),
)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(program=st.lists(_step, min_size=1, max_size=6), seed=st.integers(0, 2**16))
def test_random_skip_graphs_match_forward(program, seed):
    torch.manual_seed(seed)
    model = _Random(program, 2).double()
    shape = (2, 4, 4)
    x = np.random.default_rng(seed).standard_normal(math.prod(shape))
    A = opextract.to_sparse(model, shape)
    assert_close(A @ x, _forward(model, x, shape))


# ---------------------------------------------------------------------------
# Functional code: reshapes, slices, padding, chunks, scalings, Linear


class _KitchenSink(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.fc = nn.Linear(2 * 4 * 4, 2 * 4 * 4, bias=False)
        self.scale = nn.Parameter(torch.linspace(0.5, 2.0, 2).reshape(1, 2, 1, 1))
        self.w = nn.Parameter(torch.randn(2, 1, 3, 3))

    def forward(self, x):
        h = self.conv(x)
        a, b = torch.chunk(h, 2, dim=1)
        c = a[:, :, 1:3, :].permute(0, 1, 3, 2).contiguous()
        c = F.pad(c, (1, 1, 0, 0))
        d = b.view(b.size(0), -1)
        d = self.fc(torch.flatten(x, 1) * 0.5 + d).view(x.shape) * self.scale
        e = F.interpolate(c[:, :, :, 1:5], size=(4, 4), mode="nearest-exact")
        g = F.conv2d(
            F.avg_pool2d(x, 3, stride=1, padding=1), self.w, padding=1, groups=2
        )
        g = F.adaptive_avg_pool2d(F.pixel_unshuffle(g, 2), (2, 1))
        out = (
            torch.cat((d, e, x.flip(-1), F.pixel_shuffle(g.repeat(1, 1, 1, 2), 2)), 1)
            / 3.0
        )
        out += torch.roll(out, 1, dims=2).to(x.dtype)  # in place, out not read again
        return torch.transpose(out, 2, 3) - F.dropout(out, 0.5, training=False)


def test_functional_ops_match_forward():
    torch.manual_seed(0)
    model = _KitchenSink().double()
    _round_trip(model, (2, 4, 4))


def test_bias_in_graph():
    torch.manual_seed(0)

    class Biased(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3, padding=1)
            self.w = nn.Parameter(torch.randn(4, 4))
            self.b = nn.Parameter(torch.randn(4))

        def forward(self, x):
            h = F.linear(x, self.w, self.b)
            return torch.cat([self.conv(x), x + 1.0, h], dim=1)

    model = Biased().double()
    shape = (1, 4, 4)
    match = r"graph node 'linear' \(call_function linear\).*affine.*bias='offset'"
    with pytest.raises(ValueError, match=match):
        opextract.to_sparse(model, shape)
    A, offset = opextract.to_sparse(model, shape, bias="offset")
    x = np.random.default_rng(0).standard_normal(16)
    assert_close(A @ x + offset, _forward(model, x, shape))

    graph = opextract.factors(model, shape, bias="offset")
    assert_close(graph.evaluate(x, affine=True), _forward(model, x, shape))
    assert_close(graph.evaluate(x), A @ x)
    A_only = opextract.to_sparse(model, shape, bias="ignore")
    assert_close(A_only, A)


# ---------------------------------------------------------------------------
# Refusals


def _module(fn, **children):
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            # A child module makes the model a graph to the chain walker even
            # when fn uses no layer.
            self.unused = nn.Identity()
            for name, child in children.items():
                setattr(self, name, child)

        def forward(self, x):
            return fn(self, x)

    return Model()


class _Counter(nn.Module):
    """Its forward depends on Python state that the trace freezes."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x * float(self.calls)


def _conv():
    return nn.Conv2d(1, 1, 3, padding=1, bias=False)


def _two_inputs():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.unused = nn.Identity()

        def forward(self, x, y):
            return x + y

    return Two()


def _data_dependent(_, x):
    return x if x.sum() > 0 else -x


REFUSALS = [
    (lambda: _module(lambda m, x: m.c(x) * x, c=_conv()), UnsupportedLayerError,
     r"graph node 'mul' \(call_function mul\): multiplies or divides two"),
    (lambda: _module(lambda m, x: torch.sigmoid(x)), UnsupportedLayerError,
     r"graph node 'sigmoid' .*no exact linear matrix"),
    (lambda: _module(lambda m, x: m.s(x), s=nn.Softmax(dim=1)), UnsupportedLayerError,
     r"graph node 's' \(call_module s\): module type Softmax .*supported types: .*"
     r"Conv2d"),
    (lambda: _module(lambda m, x: F.relu(m.c(x)) + x, c=_conv()), UnsupportedLayerError,
     r"graph node 'relu' .*is not linear.*at=x"),
    (lambda: _module(lambda m, x: torch.relu_(x) + x), UnsupportedLayerError,
     r"graph node 'relu_' .*works in place on 'x', which node 'add' reads"),
    (lambda: _module(_data_dependent), UnsupportedLayerError,
     "torch.fx cannot trace it"),
    (lambda: _module(lambda m, x: torch.cat([x, x], dim=0)), UnsupportedLayerError,
     r"graph node 'cat' .*batch axis"),
    (lambda: _module(lambda m, x: x.view(-1)), UnsupportedLayerError,
     r"graph node 'view' .*batch axis"),
    (lambda: _module(lambda m, x: x.permute(1, 0, 2, 3)), UnsupportedLayerError,
     r"graph node 'permute' .*batch axis"),
    (lambda: _module(lambda m, x: x[0]), UnsupportedLayerError,
     r"graph node 'getitem' .*batch axis"),
    (lambda: _module(lambda m, x: torch.flatten(x)), UnsupportedLayerError,
     r"graph node 'flatten' .*batch axis"),
    (lambda: _module(lambda m, x: x.squeeze()), UnsupportedLayerError,
     r"graph node 'squeeze' .*batch axis"),
    (lambda: _module(lambda m, x: x.transpose(-4, 1)), UnsupportedLayerError,
     r"graph node 'transpose' .*batch axis"),
    (lambda: _module(lambda m, x: F.pad(x, (1, 1), value=1.0)), UnsupportedLayerError,
     "only zero padding"),
    (lambda: _module(lambda m, x: F.pad(x, (1, 1, 1, 1), mode="reflect")),
     UnsupportedLayerError, "only zero padding"),
    (_two_inputs, UnsupportedLayerError, "more than one input"),
    (lambda: _module(lambda m, x: (x, x)), UnsupportedLayerError,
     "must return one tensor"),
    (lambda: _module(lambda m, x: x + x[:, :, :1]), UnsupportedLayerError,
     r"graph node 'add' .*broadcasts the signal"),
    (lambda: _module(lambda m, x: 1.0 / x), UnsupportedLayerError,
     "divides by an input-dependent tensor"),
    (lambda: _module(lambda m, x: F.dropout(x, 0.5, training=True)),
     UnsupportedLayerError, "training mode"),
    (lambda: _module(lambda m, x: F.interpolate(x, scale_factor=2, mode="bilinear",
                                                antialias=True)),
     UnsupportedLayerError, r"graph node 'interpolate' .*antialias=True"),
    (lambda: _module(lambda m, x: x.long()), UnsupportedLayerError,
     r"graph node 'long' .*no exact linear matrix"),
    (lambda: _module(lambda m, x: x.to(torch.int32)), UnsupportedLayerError,
     r"graph node 'to' .*casts the signal to torch.int32"),
    (lambda: _module(lambda m, x: x.sum(dim=1)), UnsupportedLayerError,
     r"graph node 'sum_1' \(call_method sum\): .*no exact linear matrix"),
    (lambda: _module(lambda m, x: m.k(x) + 0 * x, k=_Counter()), UnsupportedLayerError,
     "does not reproduce the model"),
    (lambda: _module(lambda m, x: m.c(x[:, :, :1, :1]), c=nn.Conv2d(1, 1, 3)),
     ValueError, r"graph node 'c' .*too small"),
    (lambda: _module(lambda m, x: m.c(x), c=nn.Conv2d(2, 1, 1)), ValueError,
     r"graph node 'c' \(call_module c\): .*channels"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("make", "error", "match"),
    REFUSALS,
    ids=["product", "sigmoid", "softmax", "relu-without-at", "inplace-reused",
         "control-flow", "cat-batch", "view-flat", "permute-batch", "getitem-int",
         "flatten-all", "squeeze-all", "transpose-negative", "pad-value",
         "pad-reflect", "two-inputs", "tuple-output", "broadcast", "reciprocal",
         "dropout-train", "antialias", "long", "cast-int", "reduction",
         "python-state", "too-small", "channels"],
)  # fmt: skip
def test_graph_refusals(make, error, match):
    with pytest.raises(error, match=match):
        opextract.to_sparse(make().double(), (1, 4, 4))


# ---------------------------------------------------------------------------
# Models without children: a forward written with torch.nn.functional


class _FunctionalLinear(nn.Module):
    """A linear map by F.linear and F.conv2d only, with no child module."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.kernel = nn.Parameter(torch.randn(2, 3, 3, 3, generator=g))
        self.weight = nn.Parameter(torch.randn(5, 2 * 4 * 4, generator=g))

    def forward(self, x):
        y = F.conv2d(x, self.kernel, padding=1)
        return F.linear(y.flatten(1), self.weight)


@pytest.mark.parametrize("wrap", [False, True], ids=["alone", "in-sequential"])
def test_functional_model_without_children_is_traced(wrap):
    model = _FunctionalLinear().double()
    if wrap:
        model = nn.Sequential(nn.Identity(), model).double()
    shape = (3, 4, 4)
    assert list(_FunctionalLinear().children()) == []
    A = opextract.to_sparse(model, shape)
    assert A.shape == (5, 48)
    assert_close(A.toarray(), _identity_batch(model, shape))
    _round_trip(model, shape)


def test_builtin_layer_without_handler_is_still_refused_by_name():
    model = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.GELU())
    with pytest.raises(UnsupportedLayerError, match=r"module '1' of type GELU"):
        opextract.to_sparse(model, (1, 4, 4), bias="ignore")
