"""Nearest-neighbour upsampling matrices against torch in float64."""

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


def _torch_nearest(x, **options):
    return F.interpolate(x, mode="nearest", **options)


def _check(shape, **options):
    A, out_shape = opextract.upsample_nearest_matrix(shape, **options)
    x = torch.randn(2, *shape, dtype=torch.float64)
    y = _torch_nearest(x, **options)
    assert out_shape == tuple(y.shape[1:])
    assert A.shape == (int(np.prod(out_shape)), int(np.prod(shape)))
    assert np.all(np.diff(A.indptr) == 1) and np.all(A.data == 1)
    assert_close((A @ x.reshape(2, -1).numpy().T).T, y.reshape(2, -1).numpy())


CASES = {
    "2d-x2": ((2, 3, 3), dict(scale_factor=2)),
    "2d-x8": ((3, 4, 4), dict(scale_factor=8)),
    "2d-per-axis": ((1, 3, 2), dict(scale_factor=(2, 3))),
    "2d-fractional": ((1, 5, 7), dict(scale_factor=1.7)),
    "2d-below-one": ((1, 9, 9), dict(scale_factor=0.5)),
    "2d-size": ((2, 3, 5), dict(size=(7, 11))),
    "2d-size-down": ((1, 8, 8), dict(size=(3, 5))),
    "1d-x3": ((2, 5), dict(scale_factor=3)),
    "3d-x2": ((1, 2, 3, 2), dict(scale_factor=2)),
    "3d-size": ((1, 2, 2, 3), dict(size=(3, 5, 4))),
}


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_nearest_matrix_matches_torch(case):
    shape, options = case
    _check(shape, **options)


def test_modules_use_their_options():
    x = torch.randn(1, 2, 3, 4, dtype=torch.float64)
    for module in (
        nn.Upsample(scale_factor=3),
        nn.Upsample(size=(5, 9)),
        nn.UpsamplingNearest2d(scale_factor=2),
        nn.Upsample(scale_factor=1.5, recompute_scale_factor=True),
    ):
        A = opextract.to_sparse(module, (2, 3, 4))
        assert_close(A @ x.reshape(-1).numpy(), module(x).reshape(-1).numpy())


def test_other_modes_are_delegated():
    module = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
    x = torch.randn(1, 1, 3, 3, dtype=torch.float64)
    A = opextract.to_sparse(module, (1, 3, 3))
    assert_close(A @ x.reshape(-1).numpy(), module(x).reshape(-1).numpy())


def test_bad_arguments():
    with pytest.raises(ValueError, match="exactly one of scale_factor and size"):
        opextract.upsample_nearest_matrix((1, 2, 2))
    with pytest.raises(ValueError, match=r"scale_factor must be positive; got -2"):
        opextract.upsample_nearest_matrix((1, 2, 2), scale_factor=-2)
    with pytest.raises(ValueError, match=r"input_shape must be \(C, \*spatial\)"):
        opextract.upsample_nearest_matrix((1, 0, 2), scale_factor=2)
    with pytest.raises(ValueError, match=r"size must be .* tuple of 2; got \(3,\)"):
        opextract.upsample_nearest_matrix((1, 2, 2), size=(3,))


@st.composite
def configs(draw):
    nd = draw(st.integers(1, 3))
    shape = (draw(st.integers(1, 2)),) + tuple(
        draw(st.integers(1, 6)) for _ in range(nd)
    )
    if draw(st.booleans()):
        size = tuple(draw(st.integers(1, 13)) for _ in range(nd))
        return shape, dict(size=size)
    scales = tuple(
        draw(
            st.one_of(
                st.integers(1, 4),
                st.floats(0.3, 4.0).map(lambda v: round(v, 3)),
            )
        )
        for _ in range(nd)
    )
    # Keep the output non-empty, as torch requires.
    scales = tuple(
        s if math.floor(n * s) >= 1 else 1 for s, n in zip(scales, shape[1:])
    )
    return shape, dict(scale_factor=scales)


@settings(max_examples=200, deadline=None)
@given(configs())
def test_random_upsampling_matches_torch(config):
    shape, options = config
    _check(shape, **options)
