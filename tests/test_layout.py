"""The compact and padded layouts, and the published padded examples."""

import numpy as np
import pytest
import torch
from _helpers import assert_close
from torch import nn

import opextract
from opextract import _layout


def test_ds_first_layer_padded_matrix():
    # Network DS, first layer: Conv 1->4, 3x3, stride 2, padding 1 on 1x2x2.
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 4, 3, stride=2, padding=1, bias=False)
    (factor,) = opextract.factors(conv, (1, 2, 2), layout="padded")
    M = factor.matrix.toarray()
    assert M.shape == (36, 16)
    w = conv.weight.detach().numpy()[:, 0].reshape(4, 9)
    for i in range(4):
        block = M[9 * i : 9 * i + 9]
        assert np.flatnonzero(np.abs(block).sum(axis=1)).tolist() == [4]
        assert np.flatnonzero(block[4]).tolist() == [5, 6, 9, 10]
        # Kernel entries 5, 6, 8, 9 counted from 1 in row-major order.
        assert_close(block[4, [5, 6, 9, 10]], w[i, [4, 5, 7, 8]])


def test_upsampling_padded_matrix():
    (factor,) = opextract.factors(
        nn.Upsample(scale_factor=2), (1, 1, 1), layout="padded"
    )
    M = factor.matrix.toarray()
    assert M.shape == (16, 9)
    assert [tuple(ij) for ij in np.argwhere(M)] == [(5, 4), (6, 4), (9, 4), (10, 4)]
    assert np.all(M[M != 0] == 1)


@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 2, 4), (2, 5), (2, 2, 3, 2), (4,)])
def test_embedding_properties(shape):
    E = opextract.padding_embedding(shape)
    n = int(np.prod(shape))
    assert E.shape == (_layout.layout_size(shape, "padded"), n)
    assert_close((E.T @ E).toarray(), np.eye(n))
    x = np.random.default_rng(0).standard_normal(shape)
    padded = np.pad(x, [(0, 0)] + [(1, 1)] * (len(shape) - 1))
    assert_close(E @ x.ravel(), padded.ravel())
    assert_close(_layout.compact_to_padded(x.ravel(), shape), padded.ravel())
    assert_close(_layout.padded_to_compact(padded.ravel(), shape), x.ravel())


def _model():
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1, bias=False),
        nn.Upsample(scale_factor=2),
        nn.Conv2d(4, 2, 3, padding=1, bias=False),
    )


def test_padded_operator_is_embedded_compact_operator():
    model = _model()
    A = opextract.to_sparse(model, (2, 6, 6))
    P = opextract.to_sparse(model, (2, 6, 6), layout="padded")
    E_in = opextract.padding_embedding((2, 6, 6))
    E_out = opextract.padding_embedding((2, 6, 6))
    assert_close(P, E_out @ A @ E_in.T)
    ring = np.diff(E_out.indptr) == 0
    assert ring.sum() == 2 * (8 * 8 - 6 * 6)
    assert not P.toarray()[ring].any()
    assert not P.toarray()[:, ring].any()


def test_padded_factors_multiply_to_padded_operator():
    model = _model()
    fs = opextract.factors(model, (2, 6, 6), layout="padded")
    assert [f.layout for f in fs] == ["padded"] * 3
    product = fs[0].matrix
    for f in fs[1:]:
        assert f.matrix.shape[1] == product.shape[0]
        product = f.matrix @ product
    assert_close(product, opextract.to_sparse(model, (2, 6, 6), layout="padded"))


def test_unknown_layout_is_refused():
    with pytest.raises(
        ValueError, match=r"layout must be 'compact' or 'padded'; got 'pad'"
    ):
        opextract.to_sparse(_model(), (2, 6, 6), layout="pad")
