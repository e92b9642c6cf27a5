"""Local operators by windowed reverse-mode patches (``opextract._patches``).

Every chain of zero-padded convolutions, nearest upsamplings by integer
factors and elementwise activations takes this path with ``at=x``; each case
checks that it did and compares with ``torch.func.jacrev``, at a random point
and at one made of small integers (many exact kinks). Chains the patches do
not cover must fall back to the other paths and still be exact.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _helpers import assert_close
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import opextract
from opextract import OperatorTooLargeError, _patches

# torch notes that 'same' padding of an even kernel copies the input; that is
# the case tested, not a problem.
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")


def _jacobian(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    jac = torch.func.jacrev(lambda z: model(z[None].clone())[0])(x[0])
    return jac.reshape(-1, x[0].numel()).detach().numpy()


def _points(shape):
    rng = np.random.default_rng(0)
    gen = torch.Generator().manual_seed(0)
    yield torch.tensor(rng.standard_normal((1, *shape)))
    yield torch.randint(-2, 3, (1, *shape), generator=gen).to(torch.float64)


@pytest.fixture
def used(monkeypatch):
    """Records whether ``to_sparse`` built the operator from patches."""
    calls = []
    original = _patches.local_rows

    def spy(*args, **kwargs):
        calls.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(_patches, "local_rows", spy)
    return calls


def _seeded(make):
    def build():
        torch.manual_seed(0)
        return make().double().eval()

    return build


C2, C1, C3 = nn.Conv2d, nn.Conv1d, nn.Conv3d
UP = nn.Upsample

CASES = [
    pytest.param(
        lambda: nn.Sequential(
            C2(2, 4, 3, stride=8, padding=1),
            nn.LeakyReLU(0.2),
            UP(scale_factor=8),
            C2(4, 4, 3, padding=1),
            nn.LeakyReLU(0.2),
            C2(4, 2, 3, padding=1),
        ),
        (2, 32, 32),
        id="d-type-stride-8",
    ),
    pytest.param(
        lambda: nn.Sequential(
            C2(2, 3, 3, stride=2, padding=1),
            nn.ReLU(),
            C2(3, 3, 3, stride=2, padding=1),
            nn.PReLU(3, init=0.3),
            UP(scale_factor=4),
            C2(3, 3, 3, padding=1),
            nn.LeakyReLU(),
            C2(3, 2, 3, padding=1),
        ),
        (2, 16, 16),
        id="nld-type-two-strides",
    ),
    pytest.param(
        lambda: nn.Sequential(
            C2(2, 4, 3, stride=3, padding=2, dilation=2),
            nn.ReLU6(),
            UP(scale_factor=3),
            C2(4, 4, 5, stride=2, padding=1, groups=2),
            nn.Hardtanh(-0.5, 0.5),
            C2(4, 1, 2),
        ),
        (2, 9, 11),
        id="dilation-groups-stride-after-upsampling",
    ),
    pytest.param(
        lambda: nn.Sequential(
            C2(2, 4, 3, stride=2, padding=1),
            nn.LeakyReLU(0.2),
            UP(scale_factor=(2, 3)),
            C2(4, 3, (3, 5), stride=(1, 2), padding=(1, 2), dilation=(2, 1)),
            nn.ReLU(),
            C2(3, 2, 3),
        ),
        (2, 8, 10),
        id="anisotropic-upsampling-and-kernel",
    ),
    pytest.param(
        lambda: nn.Sequential(
            C2(2, 3, 3, padding="same"),
            nn.LeakyReLU(0.1),
            C2(3, 3, 4, padding="same", dilation=2),
            C2(3, 2, 3, padding="valid"),
        ),
        (2, 10, 9),
        id="same-valid-and-two-convs-in-a-row",
    ),
    pytest.param(
        lambda: nn.Sequential(
            nn.LeakyReLU(0.3),
            C2(2, 3, 3, stride=2, padding=1),
            UP(scale_factor=2),
            nn.ReLU(),
            nn.Identity(),
            nn.Dropout(0.5),
            C2(3, 2, 3, padding=1),
            nn.LeakyReLU(0.5),
        ),
        (2, 8, 8),
        id="activation-first-and-last-upsampling-alone",
    ),
    pytest.param(
        lambda: nn.Sequential(
            C2(2, 3, 3, stride=2, padding=1),
            nn.BatchNorm2d(3),
            nn.ReLU(),
            UP(scale_factor=2),
            C2(3, 2, 3, padding=1),
        ),
        (2, 8, 8),
        id="batchnorm-eval",
    ),
    pytest.param(
        lambda: nn.Sequential(
            *[m for _ in range(4) for m in (C2(2, 2, 3, padding=1), nn.LeakyReLU(0.2))],
            C2(2, 3, 3, stride=2, padding=1),
            nn.ReLU(),
            UP(scale_factor=2),
            C2(3, 2, 3, padding=1),
        ),
        (2, 6, 5),
        id="windows-wider-than-the-image",
    ),
    pytest.param(
        lambda: nn.Sequential(
            C1(2, 4, 3, stride=4, padding=1),
            nn.LeakyReLU(0.2),
            UP(scale_factor=4),
            C1(4, 2, 5, padding=2, dilation=1),
            nn.ReLU(),
            C1(2, 2, 3, padding=1),
        ),
        (2, 32),
        id="conv1d",
    ),
    pytest.param(
        lambda: nn.Sequential(
            C3(2, 3, 3, stride=2, padding=1),
            nn.LeakyReLU(0.2),
            UP(scale_factor=(2, 1, 3)),
            C3(3, 2, (3, 1, 2), padding=(1, 0, 1)),
        ),
        (2, 6, 5, 4),
        id="conv3d",
    ),
]


@pytest.mark.parametrize(("make", "shape"), CASES)
def test_patches_match_jacrev(make, shape, used):
    model = _seeded(make)()
    for x in _points(shape):
        used.clear()
        J = opextract.to_sparse(model, shape, at=x)
        assert used, "the chain should have been built from patches"
        expected = _jacobian(model, x)
        assert_close(J, expected, rtol=1e-12, atol=1e-14)
        # Exact zeros are not stored, and the columns of each row are sorted.
        assert J.nnz == np.count_nonzero(J.toarray())
        assert J.has_sorted_indices
        check = J.copy()
        check.sort_indices()
        np.testing.assert_array_equal(check.indices, J.indices)


def test_biases_offset_and_padded_layout(used):
    torch.manual_seed(0)
    model = nn.Sequential(
        C2(2, 3, 3, stride=2, padding=1), nn.LeakyReLU(0.2), UP(scale_factor=2),
        C2(3, 2, 3, padding=1),
    ).double()  # fmt: skip
    shape = (2, 8, 8)
    x = next(_points(shape))
    J, offset = opextract.to_sparse(model, shape, at=x, bias="offset")
    assert used
    with torch.no_grad():
        fx = model(x).reshape(-1).numpy()
    assert_close(J @ x.reshape(-1).numpy() + offset, fx)
    padded = opextract.to_sparse(model, shape, at=x, layout="padded", bias="ignore")
    assert padded.shape == (2 * 10 * 10, 2 * 10 * 10)
    E = opextract.padding_embedding(shape)
    assert_close(padded, E @ J @ E.T)


def test_float32(used):
    model = _seeded(CASES[0].values[0])()
    shape = CASES[0].values[1]
    x = next(_points(shape))
    J = opextract.to_sparse(model, shape, at=x, dtype=np.float32)
    assert used and J.dtype == np.float32
    assert_close(J, _jacobian(model, x), rtol=2e-4, atol=1e-5)


def test_small_blocks_give_the_same_rows(monkeypatch):
    model = _seeded(CASES[1].values[0])()
    shape = CASES[1].values[1]
    x = next(_points(shape))
    J = opextract.to_sparse(model, shape, at=x)
    monkeypatch.setattr(_patches, "BLOCK_BYTES", 1)  # one row per block
    assert_close(opextract.to_sparse(model, shape, at=x), J, rtol=0, atol=0)


def _built(make, shape):
    from opextract import _api

    model = _seeded(make)()
    x = next(_points(shape))
    return _api._build(model, shape, dtype=np.float64, at=x, bias="none", fuse=True)[1]


def test_budget_is_checked():
    from opextract._validate import budget

    make, shape = CASES[0].values
    steps = _patches.plan(_built(make, shape))
    # 2048 rows of at most 2 x 11 x 11 entries, 12 bytes each: about 6 MB.
    with budget(1_000_000):
        with pytest.raises(OperatorTooLargeError, match="the local operator needs"):
            _patches.local_rows(steps, shape, shape, np.float64)
    with budget(10_000_000):
        assert (
            _patches.local_rows(steps, shape, shape, np.float64).shape
            == (math.prod(shape),) * 2
        )


FALLBACKS = [
    pytest.param(
        lambda: nn.Sequential(
            C2(2, 3, 3, stride=2, padding=1, padding_mode="circular"),
            nn.ReLU(),
            UP(scale_factor=2),
            C2(3, 2, 3, padding=1),
        ),
        (2, 8, 8),
        id="circular-padding",
    ),
    pytest.param(
        lambda: nn.Sequential(
            C2(2, 3, 3, padding=1),
            nn.LeakyReLU(0.2),
            UP(scale_factor=1.5),
            C2(3, 2, 3, padding=1),
        ),
        (2, 6, 6),
        id="fractional-upsampling",
    ),
    pytest.param(
        lambda: nn.Sequential(
            C2(2, 3, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            UP(scale_factor=2),
            C2(3, 2, 3, padding=1),
        ),
        (2, 8, 8),
        id="max-pooling",
    ),
    pytest.param(
        lambda: nn.Sequential(
            C2(2, 3, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.ConvTranspose2d(3, 2, 4, stride=2, padding=1),
        ),
        (2, 8, 8),
        id="transposed-convolution-in-a-chain",
    ),
    pytest.param(
        lambda: nn.Sequential(
            C2(2, 3, 3, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(3 * 16, 8),
        ),
        (2, 4, 4),
        id="flatten-linear",
    ),
]


@pytest.mark.parametrize(("make", "shape"), FALLBACKS)
def test_uncovered_chains_fall_back(make, shape, used):
    model = _seeded(make)()
    x = next(_points(shape))
    J = opextract.to_sparse(model, shape, at=x)
    assert not used
    assert_close(J, _jacobian(model, x), rtol=1e-12, atol=1e-14)


_layer = st.one_of(
    st.tuples(
        st.just("conv"),
        st.integers(1, 3),  # output channels
        st.integers(1, 3),  # kernel
        st.integers(1, 3),  # stride
        st.integers(0, 2),  # padding
        st.integers(1, 2),  # dilation
    ),
    st.tuples(st.just("up"), st.integers(2, 3)),
    st.tuples(st.just("act"), st.sampled_from(["relu", "leaky", "prelu"])),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(program=st.lists(_layer, min_size=1, max_size=6), seed=st.integers(0, 2**16))
def test_random_chains_match_jacrev(program, seed):
    torch.manual_seed(seed)
    channels, size = 2, 7
    layers = []
    for op in program:
        if op[0] == "conv":
            _, c, k, s, p, d = op
            if (size + 2 * p - d * (k - 1) - 1) // s + 1 < 1:
                continue
            layers.append(C2(channels, c, k, stride=s, padding=p, dilation=d))
            channels, size = c, (size + 2 * p - d * (k - 1) - 1) // s + 1
        elif op[0] == "up":
            if size * op[1] > 24:
                continue
            layers.append(UP(scale_factor=op[1]))
            size *= op[1]
        else:
            if op[1] == "prelu":
                layers.append(nn.PReLU(channels, init=0.2))
            else:
                layers.append(nn.ReLU() if op[1] == "relu" else nn.LeakyReLU(0.3))
    if not layers:
        layers = [nn.ReLU()]
    model = nn.Sequential(*layers).double()
    shape = (2, 7, 7)
    x = torch.tensor(np.random.default_rng(seed).standard_normal((1, *shape)))
    J = opextract.to_sparse(model, shape, at=x)
    assert J.shape == (channels * size * size, math.prod(shape))
    assert_close(J, _jacobian(model, x), rtol=1e-12, atol=1e-14)


def test_plan_refuses_what_it_cannot_window():
    assert _patches.plan(_built(*FALLBACKS[0].values)) is None
    steps = _patches.plan(_built(*CASES[0].values))
    # The fused upsampling by 8 and convolution reads coarse entries.
    dens = [[a.den for a in s.axes] for s in steps if isinstance(s, _patches._Map)]
    assert dens == [[1, 1], [8, 8], [1, 1]]


# ---------------------------------------------------------------------------
# Graphs


@pytest.fixture
def graph_used(monkeypatch):
    calls = []
    original = _patches.graph_rows

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(_patches, "graph_rows", spy)
    return calls


@pytest.mark.parametrize("linear", [True, False], ids=["linear", "leaky"])
def test_unet_by_patches(linear, graph_used):
    from analysis import models

    net = models.unet(2, 4, linear=linear, input_size=16, seed=0).double().eval()
    shape = (3, 16, 16)
    for x in _points(shape):
        graph_used.clear()
        J = opextract.to_sparse(net, shape, at=None if linear else x)
        assert graph_used
        point = torch.zeros_like(x) if linear else x
        assert_close(J, _jacobian(net, point), rtol=1e-12, atol=1e-14)
        assert J.nnz == np.count_nonzero(J.toarray()) and J.has_sorted_indices


class _Skips(nn.Module):
    """A drawn program of convolutions, upsamplings, activations and skips
    (sums and channel concatenations with an earlier value of the same
    spatial size), resolved at construction so that the forward traces."""

    def __init__(self, program, channels: int, size: int):
        super().__init__()
        shapes = [(channels, size)]
        self.plan, self.mods = [], nn.ModuleList()
        for op in program:
            c, s = shapes[-1]
            if op[0] == "conv":
                _, c_out, k, stride = op
                self.mods.append(nn.Conv2d(c, c_out, k, stride, padding=k // 2))
                self.plan.append(("mod",))
                shapes.append((c_out, (s + 2 * (k // 2) - k) // stride + 1))
            elif op[0] == "up":
                self.mods.append(nn.Upsample(scale_factor=2))
                self.plan.append(("mod",))
                shapes.append((c, 2 * s))
            elif op[0] == "act":
                self.mods.append(nn.LeakyReLU(0.2))
                self.plan.append(("mod",))
                shapes.append((c, s))
            else:
                same = [i for i, (ci, si) in enumerate(shapes) if si == s]
                j = same[op[1] % len(same)]
                if op[0] == "add" and shapes[j][0] == c:
                    self.plan.append(("add", j, op[2]))
                    shapes.append((c, s))
                else:
                    self.plan.append(("cat", j))
                    shapes.append((c + shapes[j][0], s))
        self.out_shape = shapes[-1]

    def forward(self, x):
        values = [x]
        mods = iter(self.mods)
        for step in self.plan:
            h = values[-1]
            if step[0] == "mod":
                h = next(mods)(h)
            elif step[0] == "add":
                h = h + step[2] * values[step[1]]
            else:
                h = torch.cat([h, values[step[1]]], dim=1)
            values.append(h)
        return values[-1]


_graph_op = st.one_of(
    st.tuples(
        st.just("conv"), st.integers(1, 3), st.sampled_from([1, 3]), st.integers(1, 2)
    ),
    st.tuples(st.just("up")),
    st.tuples(st.just("act")),
    st.tuples(st.just("add"), st.integers(0, 10), st.sampled_from([1.0, -0.5])),
    st.tuples(st.just("cat"), st.integers(0, 10)),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(program=st.lists(_graph_op, min_size=1, max_size=7), seed=st.integers(0, 99))
def test_random_skip_graphs_by_patches(program, seed):
    torch.manual_seed(seed)
    model = _Skips(program, 2, 6).double()
    if model.out_shape[1] > 24:
        return
    shape = (2, 6, 6)
    x = torch.tensor(np.random.default_rng(seed).standard_normal((1, *shape)))
    J = opextract.to_sparse(model, shape, at=x)
    assert_close(J, _jacobian(model, x), rtol=1e-12, atol=1e-14)


class _Bilinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        up = torch.nn.functional.interpolate(h, scale_factor=2, mode="bilinear")
        return torch.nn.functional.interpolate(x, scale_factor=2) + up


def test_graph_with_uncovered_node_is_composed(graph_used):
    torch.manual_seed(0)
    model = _Bilinear().double()
    shape = (2, 5, 5)
    x = next(_points(shape))
    J = opextract.to_sparse(model, shape, at=x)
    assert not graph_used
    assert_close(J, _jacobian(model, x), rtol=1e-12, atol=1e-14)


def test_graph_step_that_disagrees_is_not_used(monkeypatch, graph_used):
    # A step that does not reproduce the node's own matrix is refused by the
    # sampled-row check, and the graph is composed instead.
    original = _patches._module_step

    def wrong(module, in_shape, out_shape):
        step = original(module, in_shape, out_shape)
        if step is not None:
            step.weight = -step.weight
        return step

    monkeypatch.setattr(_patches, "_module_step", wrong)
    from analysis import models

    net = models.unet(1, 2, input_size=8, seed=0).double()
    J = opextract.to_sparse(net, (3, 8, 8))
    assert not graph_used
    assert_close(J, _jacobian(net, torch.zeros(1, 3, 8, 8, dtype=torch.float64)))


class _FunctionalUNet(nn.Module):
    """A two-level U-Net written with functional calls in its forward."""

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode
        self.w_in = nn.Parameter(torch.randn(4, 2, 3, 3) / 3)
        self.w_down = nn.Parameter(torch.randn(8, 4, 3, 3) / 6)
        self.w_up = nn.Parameter(torch.randn(4, 12, 3, 3) / 10)
        self.w_out = nn.Parameter(torch.randn(2, 4, 3, 3) / 6)

    def forward(self, x):
        F = torch.nn.functional
        a = F.leaky_relu(F.conv2d(x, self.w_in, padding=1), 0.1)
        b = F.relu(F.conv2d(a, self.w_down, stride=2, padding=1))
        up = F.interpolate(b, scale_factor=2, mode=self.mode)
        c = F.leaky_relu(F.conv2d(torch.cat([up, a], 1), self.w_up, padding=1), 0.1)
        return F.conv2d(c, self.w_out, padding=1) + 0.5 * x


# jacrev, the reference here, has no batching rule for nearest-exact's
# backward and says so; that is torch's note, not a problem of the test.
@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
@pytest.mark.parametrize("mode", ["nearest", "nearest-exact", "bilinear"])
def test_functional_unet(mode, graph_used):
    torch.manual_seed(0)
    model = _FunctionalUNet(mode).double()
    shape = (2, 8, 8)
    for x in _points(shape):
        graph_used.clear()
        J = opextract.to_sparse(model, shape, at=x)
        # A bilinear upsampling is not a nearest one: the sampled rows refuse
        # the guess and the graph is composed.
        assert bool(graph_used) == (mode != "bilinear")
        assert_close(J, _jacobian(model, x), rtol=1e-12, atol=1e-14)


class _TransposedUNet(nn.Module):
    """Two levels, up by transposed convolutions (1-D, 2-D or 3-D)."""

    def __init__(self, nd: int):
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[nd]
        up = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[nd]
        self.inc = conv(2, 3, 3, padding=1)
        self.down = conv(3, 4, 3, stride=2, padding=1)
        # Three ways of doubling the size, with groups, output_padding and
        # dilation.
        options = {
            1: dict(kernel_size=4, padding=1, groups=2),
            2: dict(kernel_size=3, padding=1, output_padding=1),
            3: dict(kernel_size=3, padding=2, output_padding=1, dilation=2),
        }[nd]
        self.up = up(4, 4, stride=2, **options)
        self.mix = up(7, 3, 3, stride=1, padding=1, dilation=1)
        self.out = conv(3, 2, 3, padding=1)

    def forward(self, x):
        a = torch.nn.functional.leaky_relu(self.inc(x), 0.2)
        b = torch.relu(self.down(a))
        c = torch.cat([self.up(b), a], dim=1)
        return self.out(torch.nn.functional.leaky_relu(self.mix(c), 0.2))


@pytest.mark.parametrize(
    ("nd", "shape"), [(1, (2, 12)), (2, (2, 8, 6)), (3, (2, 4, 4, 6))]
)
def test_transposed_convolutions_in_graphs(nd, shape, graph_used):
    torch.manual_seed(0)
    model = _TransposedUNet(nd).double()
    for x in _points(shape):
        graph_used.clear()
        J = opextract.to_sparse(model, shape, at=x)
        assert graph_used
        assert_close(J, _jacobian(model, x), rtol=1e-12, atol=1e-14)
