"""Convolution matrices against torch's forward pass in float64."""

import numpy as np
import pytest
import torch
from _helpers import assert_close
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import opextract
from opextract import _conv, _validate

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def _check(nd, cin, cout, size, *, dtype=np.float64, **options):
    torch.manual_seed(0)
    layer = CONV[nd](cin, cout, bias=False, **options).double()
    shape = (cin, *((size,) * nd if np.isscalar(size) else size))
    kwargs = {k: v for k, v in options.items() if k != "kernel_size"}
    A, out_shape = opextract.conv_matrix(layer.weight, shape, dtype=dtype, **kwargs)
    x = torch.randn(3, *shape, dtype=torch.float64)
    y = layer(x).detach()
    assert out_shape == tuple(y.shape[1:])
    assert A.shape == (int(np.prod(out_shape)), int(np.prod(shape)))
    assert A.dtype == dtype
    assert A.has_sorted_indices
    got = (A @ x.reshape(3, -1).numpy().T).T
    assert_close(got, y.reshape(3, -1).numpy(), dtype=dtype)
    return A


CASES = {
    "2d-k3-s1-p1": (2, 3, 4, 8, dict(kernel_size=3, padding=1)),
    "2d-k3-s2-p1": (2, 3, 4, 8, dict(kernel_size=3, stride=2, padding=1)),
    "2d-k3-s8-p1": (2, 3, 5, 32, dict(kernel_size=3, stride=8, padding=1)),
    "2d-k5-p2-dil2": (2, 2, 3, 9, dict(kernel_size=5, padding=2, dilation=2)),
    "2d-rect-kernel": (2, 2, 3, (7, 5), dict(kernel_size=(3, 2), padding=(1, 0))),
    "2d-tuple-stride": (2, 2, 2, 9, dict(kernel_size=3, stride=(2, 1), padding=1)),
    "2d-groups-2": (2, 4, 6, 6, dict(kernel_size=3, padding=1, groups=2)),
    "2d-depthwise": (2, 4, 4, 6, dict(kernel_size=3, padding=1, groups=4)),
    "2d-same-even-kernel": (2, 2, 3, 7, dict(kernel_size=4, padding="same")),
    "2d-same-dilated": (2, 2, 3, 8, dict(kernel_size=3, padding="same", dilation=2)),
    "2d-valid": (2, 2, 3, 7, dict(kernel_size=3, padding="valid")),
    "2d-circular": (
        2,
        2,
        3,
        6,
        dict(kernel_size=3, padding=1, padding_mode="circular"),
    ),
    "2d-circular-wrap": (
        2,
        1,
        2,
        3,
        dict(kernel_size=5, padding=3, padding_mode="circular"),
    ),
    "2d-reflect": (2, 2, 3, 6, dict(kernel_size=3, padding=2, padding_mode="reflect")),
    "2d-replicate": (
        2,
        2,
        3,
        4,
        dict(kernel_size=5, padding=4, padding_mode="replicate"),
    ),
    "2d-reflect-stride": (
        2,
        2,
        2,
        7,
        dict(kernel_size=3, stride=2, padding=1, padding_mode="reflect"),
    ),
    "2d-1x1": (2, 5, 3, 4, dict(kernel_size=1)),
    "2d-pad-beyond-kernel": (2, 1, 2, 3, dict(kernel_size=3, padding=3)),
    "1d-k3-s2": (1, 2, 3, 11, dict(kernel_size=3, stride=2, padding=1)),
    "1d-circular": (
        1,
        2,
        2,
        5,
        dict(kernel_size=3, padding=1, padding_mode="circular"),
    ),
    "3d-k3-p1": (3, 2, 3, 5, dict(kernel_size=3, padding=1)),
    "3d-mixed": (3, 2, 4, (5, 4, 6), dict(kernel_size=(3, 1, 2), stride=(2, 1, 1))),
    "3d-replicate": (
        3,
        1,
        2,
        4,
        dict(kernel_size=3, padding=1, padding_mode="replicate"),
    ),
}


# torch notes that 'same' padding of an even kernel copies the input: that is
# the case tested, not a problem.
@pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_conv_matrix_matches_torch(case):
    nd, cin, cout, size, options = case
    _check(nd, cin, cout, size, **options)


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_direct_kernel_matches_templates(case, monkeypatch):
    nd, cin, cout, size, options = case
    templated = _check(nd, cin, cout, size, **options)
    monkeypatch.setattr(_conv, "_TEMPLATE_FRACTION", -1.0)
    monkeypatch.setattr(_conv, "_TEMPLATE_MIN", -1)
    direct = _check(nd, cin, cout, size, **options)
    assert (templated != direct).nnz == 0


def test_float32_values_and_int64_indices(monkeypatch):
    _check(2, 3, 4, 8, dtype=np.float32, kernel_size=3, stride=2, padding=1)
    monkeypatch.setattr(_validate, "index_dtype", lambda largest: np.dtype(np.int64))
    A = _check(2, 3, 4, 8, kernel_size=3, padding=1, padding_mode="circular")
    assert A.indices.dtype == np.int64 and A.indptr.dtype == np.int64


def test_index_dtype_switches_at_int32_limit():
    assert _validate.index_dtype(2**31 - 1) == np.int32
    assert _validate.index_dtype(2**31) == np.int64


def test_exact_allocation_and_nnz():
    # 3x3 conv, padding 1 on 5x5: per axis 2*2 + 3*3 = 13 taps, so 13^2 per
    # (c_out, c_in) pair.
    A, _ = opextract.conv2d_matrix(np.ones((2, 3, 3, 3)), (3, 5, 5), padding=1)
    assert A.nnz == 2 * 3 * 13**2
    assert len(A.indices) == A.nnz and len(A.data) == A.nnz


def test_conv2d_matrix_rejects_other_dimensions():
    with pytest.raises(ValueError, match=r"weight must have shape .*kH, kW.*got shape"):
        opextract.conv2d_matrix(np.ones((1, 1, 3)), (1, 5))


@pytest.mark.parametrize(
    "layer",
    [
        nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, bias=False),
        nn.Conv2d(4, 2, 4, padding="same", padding_mode="circular", bias=False),
        nn.Conv2d(4, 2, 3, padding="valid", dilation=2, bias=False),
        nn.Conv1d(4, 2, 3, padding=2, padding_mode="reflect", bias=False),
        nn.Conv3d(4, 2, 3, stride=(1, 2, 2), padding=1, bias=False),
    ],
    ids=["groups-stride", "same-circular", "valid-dilated", "1d-reflect", "3d"],
)
def test_module_handler_uses_module_options(layer):
    torch.manual_seed(1)
    layer = layer.double()
    shape = (4,) + (9,) * (layer.weight.ndim - 2)
    A = opextract.to_sparse(layer, shape)
    x = torch.randn(1, *shape, dtype=torch.float64)
    assert_close(A @ x.reshape(-1).numpy(), layer(x).detach().reshape(-1).numpy())


@st.composite
def conv_configs(draw):
    nd = draw(st.sampled_from([1, 2, 2, 2, 3]))
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    cin = groups * draw(st.integers(1, 2))
    cout = groups * draw(st.integers(1, 2))
    kernel = tuple(draw(st.integers(1, 4)) for _ in range(nd))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(nd))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(nd))
    mode = draw(st.sampled_from(["zeros", "zeros", "circular", "reflect", "replicate"]))
    max_size = 7 if nd < 3 else 5
    size = tuple(draw(st.integers(1, max_size)) for _ in range(nd))
    same = all(s == 1 for s in stride) and draw(st.booleans())
    if same:
        padding = "same"
        pads = [d * (k - 1) for k, d in zip(kernel, dilation)]
        pads = [(p + 1) // 2 for p in pads]
    else:
        pads = [draw(st.integers(0, 3)) for _ in range(nd)]
        padding = tuple(pads)
    extent = [d * (k - 1) + 1 for k, d in zip(kernel, dilation)]
    # Sizes torch accepts: the padded input holds the kernel; reflect needs
    # padding below the size, circular at most the size.
    size = tuple(
        max(n, e - 2 * p, p + 1 if mode == "reflect" else p, 1)
        for n, e, p in zip(size, extent, pads)
    )
    return (
        nd,
        cin,
        cout,
        size,
        dict(
            kernel_size=kernel,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            padding_mode=mode,
        ),
    )


@settings(max_examples=200, deadline=None)
@given(conv_configs())
def test_random_convolutions_match_torch(config):
    nd, cin, cout, size, options = config
    _check(nd, cin, cout, size, **options)
