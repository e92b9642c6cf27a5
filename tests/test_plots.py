"""Figures: the data drawn, no pyplot state, PNG output."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from analysis import plots
from analysis.alignment import eigenvector_images


def test_import_does_not_touch_pyplot():
    code = (
        "import sys, analysis.plots as p; p.plot_eigenvalue_moduli([1.0]);"
        "print('matplotlib.pyplot' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"


def test_eigenvalue_moduli_sorted_with_band(tmp_path):
    w = np.array([0.2, 1 + 0.1j, 1 - 0.1j, -0.9])
    fig = plots.plot_eigenvalue_moduli(w, delta=0.05, log=True)
    ax = fig.axes[0]
    np.testing.assert_allclose(ax.lines[0].get_ydata(), np.sort(np.abs(w))[::-1])
    np.testing.assert_array_equal(ax.lines[0].get_xdata(), [1, 2, 3, 4])
    assert ax.get_yscale() == "log" and len(ax.patches) == 1  # the 1 +- delta band
    fig.savefig(tmp_path / "m.png")
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"


def test_complex_plane_has_unit_circle_and_points():
    w = np.array([1.0, 0.6 + 0.8j, 0.6 - 0.8j])
    fig = plots.plot_complex_eigenvalues(w)
    ax = fig.axes[0]
    circle = ax.lines[0]
    np.testing.assert_allclose(np.hypot(circle.get_xdata(), circle.get_ydata()), 1.0)
    np.testing.assert_allclose(ax.collections[0].get_offsets(), np.c_[w.real, w.imag])


def test_singular_values_decay_and_threshold():
    fig = plots.plot_singular_values([1e-3, 3.0, 0.0, 1.0], rtol=1e-2)
    ax = fig.axes[0]
    np.testing.assert_allclose(ax.lines[0].get_ydata(), [3.0, 1.0, 1e-3])  # 0 left out
    np.testing.assert_allclose(ax.lines[1].get_ydata(), [0.03, 0.03])


def test_eigenvector_grid_row_major_real_and_imag(tmp_path):
    rng = np.random.default_rng(0)
    v = rng.standard_normal((3 * 4 * 4, 70)) + 1j * rng.standard_normal((48, 70))
    images = eigenvector_images(v, (3, 4, 4))
    fig = plots.plot_eigenvector_grid(images, title="top 64")
    real_ax, imag_ax = fig.axes
    assert (real_ax.get_title(), imag_ax.get_title()) == ("real part", "imaginary part")
    tiles = real_ax.images[0].get_array()
    assert tiles.shape == (8 * 5 - 1, 8 * 5 - 1, 3)  # 8 x 8 images of 4 x 4, gaps

    def scaled(img):
        return np.moveaxis((img - img.min()) / (img.max() - img.min()), 0, -1)

    # Image 9 (the 10th) sits in row 1, column 1: row-major order.
    np.testing.assert_allclose(tiles[5:9, 5:9], scaled(images[9, 0]))
    np.testing.assert_allclose(tiles[35:39, 35:39], scaled(images[63, 0]))
    np.testing.assert_allclose(
        imag_ax.images[0].get_array()[0:4, 4 * 5 : 4 * 5 + 4], scaled(images[4, 1])
    )
    np.testing.assert_array_equal(tiles[4, :], 1.0)  # white gap between rows
    fig.savefig(tmp_path / "grid.png", dpi=40)


def test_grid_single_channel_and_errors():
    fig = plots.plot_eigenvector_grid(np.ones((3, 1, 2, 2)), part="real")
    assert len(fig.axes) == 1 and fig.axes[0].images[0].get_cmap().name == "gray"
    assert fig.axes[0].images[0].get_array().shape == (2, 8)
    with pytest.raises(ValueError, match=r"images must have shape \(k, 2, C, H, W\)"):
        plots.plot_eigenvector_grid(np.ones((2, 2)))
    with pytest.raises(ValueError, match="part must be"):
        plots.plot_eigenvector_grid(np.ones((1, 2, 1, 2, 2)), part="abs")
    with pytest.raises(ValueError, match=r"w must be a non-empty 1-D array"):
        plots.plot_eigenvalue_moduli([])
    with pytest.raises(ValueError, match="s must be real"):
        plots.plot_singular_values([1j])


def test_singular_values_refuse_negative_values():
    with pytest.raises(ValueError, match=r"s must be non-negative; got minimum -2"):
        plots.plot_singular_values([3.0, -2.0, 1.0])
