"""Data loaders, probe inputs and image validation."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from PIL import Image

from analysis import data
from opextract import OpextractWarning


def _write_cifar(folder, per_batch=20, seed=0):
    """Write a miniature CIFAR-10 copy in the exact format of the Python batches."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    meta = {
        b"label_names": [name.encode() for name in data.CIFAR10_CLASSES],
        b"num_cases_per_batch": per_batch,
        b"num_vis": 3072,
    }
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump(meta, f)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        pixels = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=per_batch)]
        batch = {
            b"batch_label": name.encode(),
            b"labels": labels,
            b"data": pixels,
            b"filenames": [f"img{i}.png".encode() for i in range(per_batch)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
        batches[name] = (pixels, labels)
    return batches


def test_sample_images_deterministic_in_range():
    a = data.sample_images(4, size=16, seed=3)
    b = data.sample_images(4, size=16, seed=3)
    c = data.sample_images(4, size=16, seed=4)
    assert a.shape == (4, 3, 16, 16) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.min() >= 0 and a.max() <= 1
    # Real photographs: not flat patches.
    assert a.reshape(4, -1).std(axis=1).min() > 0.01


def test_held_out_images_differ_from_training_crops():
    train = data.sample_images(20, size=8, seed=0).reshape(20, -1)
    held = data.held_out_images(20, size=8, seed=0).reshape(20, -1)
    dist = np.linalg.norm(train[:, None] - held[None], axis=2)
    assert dist.min() > 0


def test_digits_by_class():
    x = data.digits(10, digit=7, seed=1)
    assert x.shape == (10, 1, 8, 8) and x.max() <= 1 and x.min() >= 0
    np.testing.assert_array_equal(x, data.digits(10, digit=7, seed=1))
    from sklearn.datasets import load_digits

    bunch = load_digits()
    sevens = bunch.images[bunch.target == 7] / 16
    for img in x:
        assert np.abs(sevens - img[0]).sum(axis=(1, 2)).min() == 0
    assert len(data.digits(digit=0)) == (bunch.target == 0).sum()


def test_basis_and_span_sets():
    np.testing.assert_array_equal(
        data.basis_2x2().reshape(4, 4), np.eye(4, dtype=np.float32)
    )
    assert data.basis_2x2([2, 0]).reshape(2, 4)[0, 2] == 1
    for dim in range(1, 5):
        for n in (dim, dim + 2):
            x = data.span_set_2x2(dim, n=n)
            assert x.shape == (n, 1, 2, 2)
            assert np.linalg.matrix_rank(x.reshape(n, 4)) == dim
            assert x.min() >= 0 and x.max() <= 1
    expected = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [1, 1, 0, 0]])
    np.testing.assert_array_equal(data.span_set_2x2(3, n=4).reshape(4, 4), expected)


def test_cifar10_by_class_and_count(tmp_path):
    batches = _write_cifar(tmp_path / "cifar-10-batches-py")
    x, y = data.load_cifar10(
        tmp_path, classes=["dog", 1], n=2, seed=5, return_labels=True
    )
    assert x.shape == (4, 3, 32, 32) and x.dtype == np.float32
    assert y.tolist() == [5, 5, 1, 1]
    train_pixels = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)])
    for img in x:
        match = np.all(train_pixels == np.round(img.reshape(-1) * 255), axis=1)
        assert match.any()
    again = data.load_cifar10(
        tmp_path / "cifar-10-batches-py", classes=["dog", 1], n=2, seed=5
    )
    np.testing.assert_array_equal(x, again)

    test_pixels, test_labels = batches["test_batch"]
    t, ty = data.load_cifar10(tmp_path, split="test", return_labels=True)
    assert len(t) == len(test_labels)
    assert sorted(ty.tolist()) == sorted(test_labels)


def test_cifar10_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="found no batches.meta in"):
        data.load_cifar10(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar(folder, per_batch=5)
    with pytest.raises(ValueError, match="classes must be names in .*; got 'dragon'"):
        data.load_cifar10(tmp_path, classes="dragon")
    with pytest.raises(ValueError, match="n must be at most .* of class 'cat'"):
        data.load_cifar10(tmp_path, classes="cat", n=1000)
    with pytest.raises(ValueError, match="at least one class; got an empty"):
        data.load_cifar10(tmp_path, classes=[])
    (folder / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="'data_batch_3' is missing"):
        data.load_cifar10(tmp_path)


def test_image_folder_crop_and_resize(tmp_path):
    img = np.zeros((20, 40, 3), dtype=np.uint8)
    img[:, :10] = 255  # left quarter white: cropped away in "crop" mode
    Image.fromarray(img).save(tmp_path / "b.PNG")
    Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(tmp_path / "a.jpg")
    (tmp_path / "notes.txt").write_text("not an image")

    crop = data.load_image_folder(tmp_path, size=8, mode="crop")
    resize = data.load_image_folder(tmp_path, size=8, mode="resize")
    assert crop.shape == resize.shape == (2, 3, 8, 8)
    assert abs(crop[0].mean() - 128 / 255) < 0.02  # a.jpg comes first
    assert crop[1].max() < 0.05  # centred square holds no white column
    assert resize[1, :, :, 0].min() > 0.9  # stretched: white on the left
    gray = data.load_image_folder(tmp_path, size=4, grayscale=True, n=1)
    assert gray.shape == (1, 1, 4, 4)


def test_image_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="found none in"):
        data.load_image_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="path must be an existing folder"):
        data.load_image_folder(tmp_path / "missing")
    with pytest.raises(ValueError, match="mode must be 'crop' or 'resize'; got 'pad'"):
        data.load_image_folder(tmp_path, mode="pad")


def test_probes():
    noise = data.gaussian_noise(200, (3, 8, 8), rng=0)
    assert noise.shape == (200, 3, 8, 8)
    assert abs(noise.mean()) < 0.02 and abs(noise.std() - 1) < 0.02
    np.testing.assert_array_equal(noise, data.gaussian_noise(200, (3, 8, 8), rng=0))

    squares = data.white_squares(50, (3, 16, 16), rng=np.random.default_rng(1))
    assert set(np.unique(squares)) == {0.0, 1.0}
    for img in squares:
        rows, cols = np.nonzero(img[0])
        side = rows.max() - rows.min() + 1
        assert side == cols.max() - cols.min() + 1
        assert img[0].sum() == side**2 and 1 <= side <= 8
        np.testing.assert_array_equal(img[0], img[2])
    sizes = {int(img[0].sum()) for img in squares}
    assert len(sizes) > 3  # random sizes
    with pytest.raises(ValueError, match="max_size <= min"):
        data.white_squares(1, (1, 4, 4), max_size=5)
    with pytest.raises(ValueError, match=r"shape must be \(C, H, W\) with positive"):
        data.gaussian_noise(1, (3, 0, 4))


def test_check_images():
    x = data.check_images(
        np.ones((3, 3, 4, 4), dtype=np.float64), input_shape=(3, 4, 4)
    )
    assert x.dtype == np.float64
    assert data.check_images(np.ones((1, 2, 2), dtype=np.uint8)).dtype == np.float32

    bad = np.zeros((2, 1, 2, 2))
    bad[1, 0, 1, 0] = np.nan
    with pytest.raises(ValueError, match=r"finite; got 1 NaN .* index \(1, 0, 1, 0\)"):
        data.check_images(bad)
    with pytest.raises(ValueError, match="at least one image"):
        data.check_images(np.zeros((0, 1, 2, 2)))
    with pytest.raises(ValueError, match=r"shape \(n, 1, 2, 2\) for this network"):
        data.check_images(np.zeros((1, 3, 2, 2)), input_shape=(1, 2, 2))
    with pytest.raises(ValueError, match=r"\(n, C, H, W\) or \(C, H, W\); got \(4,\)"):
        data.check_images(np.zeros(4))

    wide = np.linspace(-1, 3, 16).reshape(1, 1, 4, 4)
    with pytest.warns(OpextractWarning, match=r"values in \[0, 1\]; got .*\[-1, 3\]"):
        data.check_images(wide)
    rescaled = data.check_images(wide, on_range="rescale")
    assert rescaled.min() == 0 and rescaled.max() == 1
    with pytest.raises(ValueError, match="should have values in"):
        data.check_images(wide, on_range="error")


def test_sample_size_limits():
    assert data.held_out_images(1, size=192).shape == (1, 3, 192, 192)
    with pytest.raises(ValueError, match="at most 192 for held-out crops; got 193"):
        data.held_out_images(1, size=193)
    with pytest.raises(ValueError, match="at most 427 for the sample photos; got 428"):
        data.sample_images(1, size=428)
    with pytest.raises(ValueError, match="n must be a positive integer; got 0"):
        data.sample_images(0)
