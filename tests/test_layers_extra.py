"""Every layer beyond Conv2d and nearest upsampling, against torch in float64.

One case table covers each layer type and option. Each case is exported
through the public ``to_sparse`` (as a one-layer model, with the offset when
the layer is affine) and compared with the layer's own forward pass on a
random input; the low-level builders are checked against ``torch.nn.functional``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _helpers import assert_close
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import opextract
from opextract import UnsupportedLayerError


def _bn(cls, c):
    layer = cls(c)
    gen = torch.Generator().manual_seed(1)
    layer.running_mean.copy_(torch.randn(c, generator=gen))
    layer.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
    layer.weight.data.copy_(torch.randn(c, generator=gen))
    layer.bias.data.copy_(torch.randn(c, generator=gen))
    return layer.eval()


def _bn_no_affine(c):
    layer = nn.BatchNorm2d(c, affine=False)
    layer.running_mean.fill_(0.3)
    layer.running_var.fill_(2.0)
    return layer.eval()


CT = nn.ConvTranspose2d
# (make module, input shape); ids say what each case covers.
CASES = [
    # transposed convolutions
    pytest.param(lambda: CT(2, 3, 3, bias=False), (2, 4, 5), id="convT2d-k3"),
    pytest.param(lambda: CT(2, 3, 3, stride=2, padding=1, bias=False), (2, 4, 4),
                 id="convT2d-stride2-pad1"),
    pytest.param(lambda: CT(2, 2, 4, stride=2, padding=1, output_padding=1,
                            bias=False), (2, 3, 3), id="convT2d-output_padding"),
    pytest.param(lambda: CT(4, 6, (3, 2), stride=(2, 3), padding=(1, 0),
                            dilation=(2, 1), groups=2, bias=False), (4, 3, 4),
                 id="convT2d-groups-dilation-rect"),
    pytest.param(lambda: CT(2, 2, 3, stride=1, dilation=3, output_padding=2,
                            bias=False), (2, 3, 3), id="convT2d-outpad>=stride"),
    pytest.param(lambda: CT(2, 3, 2, stride=2), (2, 3, 3), id="convT2d-bias"),
    pytest.param(lambda: nn.ConvTranspose1d(3, 2, 5, stride=3, padding=2,
                                            output_padding=1, bias=False), (3, 6),
                 id="convT1d"),
    pytest.param(lambda: nn.ConvTranspose3d(2, 2, 3, stride=2, padding=1, groups=2,
                                            bias=False), (2, 2, 3, 2), id="convT3d"),
    # Conv1d / Conv3d (same options as Conv2d)
    pytest.param(lambda: nn.Conv1d(2, 4, 3, stride=2, padding=1, dilation=2,
                                   groups=2, bias=False), (2, 11), id="conv1d"),
    pytest.param(lambda: nn.Conv1d(2, 2, 3, padding="same", padding_mode="circular",
                                   bias=False), (2, 7), id="conv1d-circular-same"),
    pytest.param(lambda: nn.Conv3d(2, 3, (3, 2, 3), stride=(1, 2, 2), padding=1,
                                   bias=False), (2, 4, 5, 5), id="conv3d"),
    pytest.param(lambda: nn.Conv3d(2, 2, 3, padding=1, padding_mode="replicate",
                                   bias=False), (2, 3, 3, 4), id="conv3d-replicate"),
    # interpolation
    pytest.param(lambda: nn.Upsample(scale_factor=2, mode="bilinear"), (2, 3, 4),
                 id="bilinear-x2"),
    pytest.param(lambda: nn.Upsample(scale_factor=(1.7, 2.4), mode="bilinear",
                                     align_corners=True), (2, 3, 4),
                 id="bilinear-align_corners-per-axis"),
    pytest.param(lambda: nn.Upsample(size=(5, 2), mode="bilinear"), (1, 3, 4),
                 id="bilinear-size-down"),
    pytest.param(lambda: nn.UpsamplingBilinear2d(scale_factor=3), (1, 2, 3),
                 id="UpsamplingBilinear2d"),
    pytest.param(lambda: nn.Upsample(scale_factor=1.5, mode="nearest-exact"),
                 (2, 4, 5), id="nearest-exact-1.5"),
    pytest.param(lambda: nn.Upsample(size=(3, 7), mode="nearest-exact"), (1, 5, 4),
                 id="nearest-exact-size"),
    pytest.param(lambda: nn.Upsample(scale_factor=2.5, mode="linear"), (2, 5),
                 id="linear-1d"),
    pytest.param(lambda: nn.Upsample(scale_factor=(2, 1.5, 0.7), mode="trilinear"),
                 (1, 2, 4, 5), id="trilinear"),
    pytest.param(lambda: nn.Upsample(scale_factor=2, mode="bicubic"), (1, 3, 3),
                 id="bicubic"),
    pytest.param(lambda: nn.Upsample(scale_factor=(1.13, 2.0), mode="nearest"),
                 (1, 5, 4), id="nearest-fractional"),
    # pooling
    pytest.param(lambda: nn.AvgPool2d(2), (3, 4, 6), id="avgpool2d-k2"),
    pytest.param(lambda: nn.AvgPool2d(3, stride=2, padding=1), (2, 7, 6),
                 id="avgpool2d-pad-count_include_pad"),
    pytest.param(lambda: nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False),
                 (2, 7, 6), id="avgpool2d-pad-exclude"),
    pytest.param(lambda: nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True),
                 (2, 6, 8), id="avgpool2d-ceil_mode"),
    pytest.param(lambda: nn.AvgPool2d((3, 2), stride=(2, 3), padding=(1, 1),
                                      ceil_mode=True, count_include_pad=False),
                 (1, 7, 8), id="avgpool2d-ceil-exclude-rect"),
    pytest.param(lambda: nn.AvgPool2d(2, divisor_override=3), (2, 4, 4),
                 id="avgpool2d-divisor_override"),
    pytest.param(lambda: nn.AvgPool1d(4, stride=3, padding=2, ceil_mode=True),
                 (2, 11), id="avgpool1d"),
    pytest.param(lambda: nn.AvgPool3d(2, stride=2, padding=1, ceil_mode=True,
                                      count_include_pad=False), (2, 3, 5, 4),
                 id="avgpool3d"),
    pytest.param(lambda: nn.AdaptiveAvgPool2d((3, 2)), (2, 7, 5), id="adaptiveavg2d"),
    pytest.param(lambda: nn.AdaptiveAvgPool2d((3, None)), (2, 7, 5),
                 id="adaptiveavg2d-None"),
    pytest.param(lambda: nn.AdaptiveAvgPool1d(4), (2, 11), id="adaptiveavg1d"),
    pytest.param(lambda: nn.AdaptiveAvgPool3d(2), (1, 5, 3, 4), id="adaptiveavg3d"),
    # permutations and reshapes
    pytest.param(lambda: nn.PixelShuffle(2), (8, 3, 2), id="pixelshuffle"),
    pytest.param(lambda: nn.PixelUnshuffle(3), (2, 6, 3), id="pixelunshuffle"),
    pytest.param(lambda: nn.ChannelShuffle(2), (4, 2, 3), id="channelshuffle"),
    pytest.param(lambda: nn.Flatten(), (2, 3, 4), id="flatten"),
    pytest.param(lambda: nn.Flatten(2), (2, 3, 4), id="flatten-start2"),
    pytest.param(lambda: nn.Unflatten(2, (3, 4)), (2, 12), id="unflatten"),
    pytest.param(lambda: nn.Identity(), (2, 3, 3), id="identity"),
    pytest.param(lambda: nn.Dropout(0.5).eval(), (2, 3, 3), id="dropout-eval"),
    pytest.param(lambda: nn.Dropout2d(0.3).eval(), (2, 3, 3), id="dropout2d-eval"),
    pytest.param(lambda: nn.Dropout(0.0), (2, 3), id="dropout-p0-train"),
    # dense and normalization
    pytest.param(lambda: nn.Linear(12, 5, bias=False), (12,), id="linear"),
    pytest.param(lambda: nn.Linear(4, 3), (2, 4), id="linear-bias-leading-axis"),
    pytest.param(lambda: _bn(nn.BatchNorm2d, 3), (3, 4, 4), id="batchnorm2d"),
    pytest.param(lambda: _bn(nn.BatchNorm1d, 3), (3, 5), id="batchnorm1d-CL"),
    pytest.param(lambda: _bn(nn.BatchNorm1d, 4), (4,), id="batchnorm1d-C"),
    pytest.param(lambda: _bn(nn.BatchNorm3d, 2), (2, 2, 3, 2), id="batchnorm3d"),
    pytest.param(lambda: _bn_no_affine(2), (2, 3, 3), id="batchnorm2d-no-affine"),
]  # fmt: skip


@pytest.mark.parametrize(("make", "shape"), CASES)
def test_layer_matches_torch(make, shape):
    torch.manual_seed(0)
    layer = make().double()
    x = torch.randn(1, *shape, dtype=torch.float64)
    with torch.no_grad():
        expected = layer(x).reshape(-1).numpy()
    A, offset = opextract.to_sparse(layer, shape, bias="offset")
    n_out = expected.size
    assert A.shape == (n_out, math.prod(shape))
    assert_close(A @ x.reshape(-1).numpy() + offset, expected)

    # The linear part alone: the forward minus its value at zero.
    with torch.no_grad():
        at_zero = layer(torch.zeros_like(x)).reshape(-1).numpy()
    assert_close(offset, at_zero)
    (factor,) = opextract.factors(layer, shape, bias="ignore")
    assert factor.out_shape == tuple(layer(x).shape[1:])
    assert_close(factor.matrix, A)


@pytest.mark.parametrize(("make", "shape"), CASES[:8])
def test_layer_float32_and_padded(make, shape):
    layer = make().double()
    A = opextract.to_sparse(layer, shape, bias="ignore")
    A32 = opextract.to_sparse(layer, shape, bias="ignore", dtype=np.float32)
    assert A32.dtype == np.float32
    assert_close(A32, A, dtype=np.float32)
    if len(shape) == 3:
        P = opextract.to_sparse(layer, shape, bias="ignore", layout="padded")
        out_shape = opextract.factors(layer, shape, bias="ignore")[0].out_shape
        E_out = opextract.padding_embedding(out_shape)
        E_in = opextract.padding_embedding(shape)
        assert_close(P, E_out @ A @ E_in.T)


# ---------------------------------------------------------------------------
# Low-level builders


def test_conv_transpose_matrix_is_adjoint_of_conv():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((4, 3, 3, 3))
    T, out_shape = opextract.conv_transpose_matrix(w, (4, 5, 5), stride=2, padding=1)
    C, conv_out = opextract.conv_matrix(w, out_shape, stride=2, padding=1)
    assert conv_out == (4, 5, 5)
    assert_close(T, C.T)
    x = torch.tensor(rng.standard_normal((1, 4, 5, 5)))
    y = F.conv_transpose2d(x, torch.tensor(w), stride=2, padding=1)
    assert_close(T @ x.reshape(-1).numpy(), y.reshape(-1))


@pytest.mark.parametrize(
    ("shape", "options"),
    [
        ((2, 3, 4), {"scale_factor": 2, "mode": "bilinear"}),
        ((2, 3, 4), {"scale_factor": 2, "mode": "bilinear", "align_corners": True}),
        ((1, 4, 4), {"size": 3, "mode": "bilinear", "align_corners": False}),
        ((1, 5, 3), {"scale_factor": (0.6, 1.7), "mode": "nearest-exact"}),
        ((1, 8, 3), {"scale_factor": (1.1, 2.2), "mode": "bilinear",
                     "recompute_scale_factor": True}),
        ((1, 8, 6), {"scale_factor": (1.1, 1.2), "mode": "bilinear"}),
        ((1, 3, 6), {"scale_factor": 2.088, "mode": "nearest"}),
        ((2, 7), {"size": 3, "mode": "area"}),
        ((1, 6, 6), {"scale_factor": 0.5, "mode": "area"}),
        ((1, 4, 3), {"size": (7, 5), "mode": "bicubic", "align_corners": True}),
    ],
    ids=["bilinear", "bilinear-align", "bilinear-down-size", "nearest-exact-axes",
         "recompute", "same-size-axis", "nearest-2d-x2-shortcut", "area-1d",
         "area-2d", "bicubic-align"],
)  # fmt: skip
def test_interpolate_matrix_matches_functional(shape, options):
    x = torch.randn(1, *shape, dtype=torch.float64)
    y = F.interpolate(x, **options)
    A, out_shape = opextract.interpolate_matrix(shape, **options)
    assert out_shape == tuple(y.shape[1:])
    assert_close(A @ x.reshape(-1).numpy(), y.reshape(-1))


def test_interpolate_matrix_float32_and_int32_indices():
    A, _ = opextract.interpolate_matrix((3, 4, 4), scale_factor=2, dtype=np.float32)
    assert A.dtype == np.float32 and A.indices.dtype == np.int32
    assert A.has_sorted_indices


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"in_shape": (1, 4, 4), "mode": "cubic", "scale_factor": 2}, "mode must be"),
        ({"in_shape": (1, 4), "mode": "bilinear", "scale_factor": 2},
         "needs 2 spatial axes"),
        ({"in_shape": (1, 4, 4), "mode": "nearest", "align_corners": True,
          "scale_factor": 2}, "align_corners can only be set"),
        ({"in_shape": (1, 4, 4), "size": 3, "scale_factor": 2},
         "exactly one of size and scale_factor"),
        ({"in_shape": (1, 4, 4)}, "exactly one of size and scale_factor"),
        ({"in_shape": (1, 0, 4), "size": 3}, r"input_shape must be .*got \(1, 0, 4\)"),
        ({"in_shape": (1, 4, 4), "scale_factor": -1.0},
         "scale_factor must be positive"),
        ({"in_shape": (1, 4, 4), "scale_factor": (2, 2, 2)},
         "one entry per spatial axis"),
        ({"in_shape": (1, 4, 4), "scale_factor": 0.1},
         "output size must be positive"),
    ],
    ids=["mode", "mode-dims", "align-nearest", "both", "neither", "bad-shape",
         "negative-scale", "axes", "empty-output"],
)  # fmt: skip
def test_interpolate_matrix_refusals(kwargs, match):
    in_shape = kwargs.pop("in_shape")
    with pytest.raises(ValueError, match=match):
        opextract.interpolate_matrix(in_shape, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"stride": 0}, "stride and dilation must be positive"),
        ({"padding": -1}, "padding must be non-negative"),
        ({"stride": 2, "output_padding": 2}, "output_padding must be"),
        ({"groups": 3}, "groups must be a positive divisor of C_in=4"),
        ({"in_shape": (3, 4, 4)}, r"C=4 .*got \(3, 4, 4\)"),
        ({"in_shape": (4, 4)}, r"must be \(C, H, W\)"),
        ({"padding": 5}, "too small"),
        ({"weight": np.ones((4, 2))}, "weight must have shape"),
    ],
    ids=["stride", "padding", "output_padding", "groups", "channels", "rank",
         "too-small", "weight"],
)  # fmt: skip
def test_conv_transpose_matrix_refusals(kwargs, match):
    weight = kwargs.pop("weight", np.ones((4, 2, 3, 3)))
    in_shape = kwargs.pop("in_shape", (4, 3, 3))
    with pytest.raises(ValueError, match=match):
        opextract.conv_transpose_matrix(weight, in_shape, **kwargs)


# ---------------------------------------------------------------------------
# Refusals of the layer handlers


@pytest.mark.parametrize(
    ("layer", "shape", "error", "match"),
    [
        (nn.Dropout(0.5), (2, 3), UnsupportedLayerError, "training mode.*model.eval"),
        (nn.BatchNorm2d(2), (2, 3, 3), UnsupportedLayerError,
         "BatchNorm2d.*training mode.*model.eval"),
        (nn.BatchNorm2d(2, track_running_stats=False).eval(), (2, 3, 3),
         UnsupportedLayerError, "track_running_stats=False"),
        (nn.BatchNorm2d(3).eval(), (2, 3, 3), ValueError,
         r"num_features=3.*got \(2, 3, 3\)"),
        (nn.Linear(4, 2), (3,), ValueError,
         r"in_features=4.*must end in 4.*got \(3,\)"),
        (nn.LazyLinear(3), (4,), UnsupportedLayerError, "not initialized"),
        (nn.Flatten(0), (2, 3), UnsupportedLayerError, "start_dim must not be 0"),
        (nn.Unflatten(0, (1, 1)), (2, 3), UnsupportedLayerError, "dim must not be 0"),
        (nn.PixelShuffle(2), (6, 2, 2), ValueError, r"divisible by 4.*got \(6, 2, 2\)"),
        (nn.PixelUnshuffle(2), (1, 3, 4), ValueError, "H and W divisible by 2"),
        (nn.ChannelShuffle(3), (4, 2, 2), ValueError, "divisible by groups=3"),
        (nn.AvgPool2d(2), (2, 4), ValueError, r"must be \(C, H, W\).*got \(2, 4\)"),
        (nn.AvgPool2d(5), (1, 3, 3), ValueError, "too small"),
        (nn.AvgPool2d(2, padding=2), (1, 6, 6), ValueError, "at most half"),
        (nn.AdaptiveAvgPool2d(0), (1, 3, 3), ValueError, "output_size .* positive"),
        (nn.ConvTranspose2d(2, 2, 3, padding_mode="zeros"), (3, 3, 3), ValueError,
         "C=2"),
        (nn.Upsample(scale_factor=2, mode="bilinear"), (1, 4), ValueError,
         "needs 2 spatial axes"),
    ],
    ids=["dropout-train", "bn-train", "bn-no-stats", "bn-channels", "linear-features",
         "lazy-linear", "flatten-batch", "unflatten-batch", "pixelshuffle",
         "pixelunshuffle", "channelshuffle", "pool-rank", "pool-too-small",
         "pool-padding", "adaptive-zero", "convT-channels", "bilinear-rank"],
)  # fmt: skip
def test_layer_refusals(layer, shape, error, match):
    with pytest.raises(error, match=match):
        opextract.to_sparse(layer, shape, bias="ignore")


def test_memory_budget_is_checked_before_allocation():
    from opextract import OperatorTooLargeError

    layer = nn.Upsample(scale_factor=4, mode="bilinear")
    with pytest.raises(OperatorTooLargeError, match=r"interpolation matrix .*bytes"):
        opextract.to_sparse(layer, (64, 32, 32), max_bytes=10**6)
    layer = nn.ConvTranspose2d(64, 64, 4, stride=2, padding=1, bias=False)
    with pytest.raises(OperatorTooLargeError, match=r"transposed-convolution .*bytes"):
        opextract.to_sparse(layer, (64, 16, 16), max_bytes=10**6)


# ---------------------------------------------------------------------------
# Random configurations


@st.composite
def _conv_transpose_case(draw):
    nd = draw(st.integers(1, 3))
    groups = draw(st.sampled_from([1, 2]))
    c_in = groups * draw(st.integers(1, 2))
    c_out = groups * draw(st.integers(1, 2))
    axes = st.lists(st.integers(1, 3), min_size=nd, max_size=nd)
    kernel, stride, dilation = draw(axes), draw(axes), draw(axes)
    dilation = [min(d, 2) for d in dilation]
    padding = draw(st.lists(st.integers(0, 2), min_size=nd, max_size=nd))
    out_pad = [draw(st.integers(0, max(s, d) - 1)) for s, d in zip(stride, dilation)]
    size = draw(st.lists(st.integers(1, 4), min_size=nd, max_size=nd))
    return nd, c_in, c_out, kernel, stride, padding, out_pad, dilation, groups, size


@settings(max_examples=40, deadline=None)
@given(case=_conv_transpose_case(), seed=st.integers(0, 2**16))
def test_random_conv_transpose_matches_torch(case, seed):
    nd, c_in, c_out, kernel, stride, padding, out_pad, dilation, groups, size = case
    torch.manual_seed(seed)
    layer = getattr(nn, f"ConvTranspose{nd}d")(
        c_in, c_out, kernel, stride, padding, out_pad, groups, bias=False,
        dilation=dilation,
    ).double()  # fmt: skip
    x = torch.randn(1, c_in, *size, dtype=torch.float64)
    try:
        y = layer(x)
    except RuntimeError:
        with pytest.raises(ValueError, match="too small"):
            opextract.to_sparse(layer, (c_in, *size))
        return
    A = opextract.to_sparse(layer, (c_in, *size))
    assert_close(A @ x.reshape(-1).numpy(), y.reshape(-1))


@settings(max_examples=40, deadline=None)
@given(
    mode=st.sampled_from(["nearest", "nearest-exact", "bilinear", "bicubic", "area"]),
    size=st.tuples(st.integers(1, 9), st.integers(1, 9)),
    out=st.one_of(
        st.tuples(st.integers(1, 12), st.integers(1, 12)).map(lambda s: {"size": s}),
        st.tuples(st.floats(0.4, 3.5), st.floats(0.4, 3.5)).map(
            lambda f: {"scale_factor": tuple(round(v, 3) for v in f)}
        ),
    ),
    align=st.booleans(),
    recompute=st.booleans(),
)
def test_random_interpolation_matches_torch(mode, size, out, align, recompute):
    options = dict(out, mode=mode)
    if mode in ("bilinear", "bicubic"):
        options["align_corners"] = align
    if "scale_factor" in options and recompute:
        options["recompute_scale_factor"] = True
    x = torch.randn(1, 2, *size, dtype=torch.float64)
    try:
        y = F.interpolate(x, **options)
    except RuntimeError:  # torch refuses an empty output
        y = None
    if y is None or y.numel() == 0:
        with pytest.raises(ValueError, match="output size must be positive"):
            opextract.interpolate_matrix((2, *size), **options)
        return
    A, out_shape = opextract.interpolate_matrix((2, *size), **options)
    assert out_shape == tuple(y.shape[1:])
    assert_close(A @ x.reshape(-1).numpy(), y.reshape(-1))


@settings(max_examples=40, deadline=None)
@given(
    kernel=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    pad=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    size=st.tuples(st.integers(1, 9), st.integers(1, 9)),
    ceil_mode=st.booleans(),
    count_include_pad=st.booleans(),
    divisor=st.sampled_from([None, 3]),
)
def test_random_avg_pool_matches_torch(
    kernel, stride, pad, size, ceil_mode, count_include_pad, divisor
):
    pad = tuple(min(p, k // 2) for p, k in zip(pad, kernel))
    layer = nn.AvgPool2d(kernel, stride, pad, ceil_mode, count_include_pad, divisor)
    x = torch.randn(1, 2, *size, dtype=torch.float64)
    try:
        y = layer(x)
    except RuntimeError:
        with pytest.raises(ValueError, match="too small"):
            opextract.to_sparse(layer, (2, *size))
        return
    A = opextract.to_sparse(layer, (2, *size))
    assert_close(A @ x.reshape(-1).numpy(), y.reshape(-1))
