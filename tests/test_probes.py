"""Memorization probes against maps whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from analysis import data, memorization_probe, models, train


class _Constant(nn.Module):
    """The point map onto ``image`` (times ``sign``), whatever the input."""

    def __init__(self, image, sign=1.0):
        super().__init__()
        self.register_buffer("image", torch.as_tensor(image))
        self.weight = nn.Parameter(torch.zeros(()))  # gives the probe a dtype
        self.sign = sign
        self.input_shape = tuple(image.shape)

    def forward(self, x):
        return self.sign * self.image.expand_as(x) + 0 * self.weight


def _brute_force(outputs, train_images, metric):
    y = outputs.reshape(len(outputs), -1).astype(np.float64)
    x = train_images.reshape(len(train_images), -1).astype(np.float64)
    diff = np.linalg.norm(y[:, None] - x[None], axis=2)
    if metric == "rmse":
        return diff / np.sqrt(y.shape[1])
    return diff / np.linalg.norm(x, axis=1)[None]


def test_point_map_lands_on_its_image():
    train_images = data.sample_images(3, size=8, seed=0)
    probes = np.concatenate(
        [
            data.gaussian_noise(5, (3, 8, 8), rng=0),
            data.white_squares(5, (3, 8, 8), rng=1),
            data.held_out_images(5, size=8, seed=2),
        ]
    )
    result = memorization_probe(_Constant(train_images[1]), train_images, probes)
    assert result.n_within == 15 and result.fraction_within == 1.0
    assert result.nearest.tolist() == [1] * 15
    assert result.counts.tolist() == [0, 15, 0]
    np.testing.assert_allclose(result.distances, 0, atol=1e-7)
    np.testing.assert_array_equal(result.outputs[0], train_images[1])
    assert "15 of 15 outputs (100.0%)" in str(result)


def test_identity_does_not_land_and_distances_match_brute_force():
    train_images = data.digits(4, digit=5)
    probes = data.digits(6, digit=8)
    identity = models.nd_ab(1, 1, in_channels=1, input_size=8)
    with torch.no_grad():
        for conv in (m for m in identity if isinstance(m, nn.Conv2d)):
            conv.weight.zero_()
            conv.weight[0, 0, 1, 1] = 1.0
    for metric in ("rmse", "relative"):
        result = memorization_probe(identity, train_images, probes, metric=metric)
        np.testing.assert_allclose(result.input_distances, 0, atol=1e-7)
        full = _brute_force(probes, train_images, metric)
        np.testing.assert_array_equal(result.nearest, full.argmin(axis=1))
        np.testing.assert_allclose(result.distances, full.min(axis=1), rtol=1e-9)
        assert result.n_within == int((full.min(axis=1) <= 0.05).sum())


def test_sign_invariance():
    train_images = data.basis_2x2([0, 2])
    probes = data.gaussian_noise(4, (1, 2, 2), rng=3)
    flipped = _Constant(train_images[1], sign=-1.0)
    plain = memorization_probe(flipped, train_images, probes)
    assert plain.n_within == 0
    invariant = memorization_probe(flipped, train_images, probes, sign_invariant=True)
    assert invariant.n_within == 4
    assert invariant.signs.tolist() == [-1.0] * 4
    assert invariant.nearest.tolist() == [1] * 4
    assert invariant.to_dict()["counts"] == [0, 4]


def test_trained_downsampling_net_maps_probes_into_the_training_direction():
    # DS trained on e_0 learns a rank-one map onto the line through e_0: the
    # relative distance of every output to that line is tiny.
    net, _ = train(
        models.ds(seed=0),
        data.basis_2x2([0]),
        lr=1e-3,
        max_iter=2000,
        tol=0,
        device="cpu",
        progress=False,
        num_threads=1,
    )
    probes = data.gaussian_noise(20, (1, 2, 2), rng=0)
    result = memorization_probe(net, data.basis_2x2([0]), probes)
    off_axis = np.abs(result.outputs.reshape(20, 4)[:, 1:]).max()
    assert off_axis < 0.1 * np.abs(result.outputs.reshape(20, 4)[:, 0]).max()
    assert result.input_distances.min() > 0.1  # not the identity


def test_probe_errors():
    net = models.ds()
    with pytest.raises(ValueError, match="metric must be 'rmse' or 'relative'"):
        memorization_probe(net, data.basis_2x2([0]), data.basis_2x2([1]), metric="l1")
    with pytest.raises(
        ValueError, match=r"probe_inputs must have shape \(n, 1, 2, 2\)"
    ):
        memorization_probe(net, data.basis_2x2([0]), np.zeros((2, 1, 3, 3)))
    with pytest.raises(ValueError, match="train_images must be finite"):
        memorization_probe(net, np.full((1, 1, 2, 2), np.nan), data.basis_2x2([1]))
