"""Training images and probe inputs for the memorization study.

Every loader returns a float32 ndarray of shape ``(n, C, H, W)`` with values
in [0, 1], selected deterministically from ``seed``:

- :func:`sample_images`: colour crops of scikit-learn's two sample photographs
  (no download needed);
- :func:`digits`: scikit-learn's 8x8 handwritten digits, one channel;
- :func:`basis_2x2`, :func:`span_set_2x2`: the 1x2x2 sets of the literature;
- :func:`load_cifar10`: a local copy of the CIFAR-10 Python batches;
- :func:`load_image_folder`: any folder of PNG/JPEG files.

Probe inputs (:func:`gaussian_noise`, :func:`white_squares`,
:func:`held_out_images`) feed a trained network inputs it was not trained on.
:func:`check_images` is the validation every consumer of images applies.
"""

from __future__ import annotations

import logging
import pickle
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from opextract import OpextractWarning

__all__ = [
    "CIFAR10_CLASSES",
    "basis_2x2",
    "check_images",
    "digits",
    "gaussian_noise",
    "held_out_images",
    "load_cifar10",
    "load_image_folder",
    "sample_images",
    "span_set_2x2",
    "white_squares",
]

logger = logging.getLogger(__name__)

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
"""CIFAR-10 class names in label order (as in ``batches.meta``)."""

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# Sample-photo crops: train crops come from the left part of each photograph,
# held-out crops from the right part, so the two never share a pixel.
_HELD_OUT_FROM = 0.7


# ---------------------------------------------------------------------------
# Validation


def check_images(
    images: Any,
    *,
    input_shape: Sequence[int] | None = None,
    value_range: tuple[float, float] | None = (0.0, 1.0),
    on_range: str = "warn",
    name: str = "images",
    stacklevel: int = 2,
) -> np.ndarray:
    """Validate a stack of images and return it as a float ndarray.

    Parameters
    ----------
    images : array_like or torch.Tensor
        Shape ``(n, C, H, W)``, or ``(C, H, W)`` for one image.
    input_shape : sequence of int, optional
        The ``(C, H, W)`` a network expects; a mismatch is an error.
    value_range : (float, float) or None, default (0, 1)
        The documented range of the values; ``None`` skips the range check.
    on_range : {"warn", "rescale", "error", "ignore"}, default "warn"
        What to do with values outside ``value_range``: warn with
        :class:`opextract.OpextractWarning` and keep them, min-max rescale the
        whole stack into the range, raise ``ValueError``, or nothing.
    name : str, default "images"
        Parameter name used in messages.
    stacklevel : int, default 2
        Passed to :func:`warnings.warn`, so that callers that validate on a
        user's behalf make the warning point at the user's line.

    Returns
    -------
    ndarray of shape (n, C, H, W)
        float32 or float64 as given (other dtypes become float32).

    Raises
    ------
    ValueError
        Wrong number of dimensions, an empty stack, a shape that is not
        ``input_shape``, NaN or infinite values, or (with ``on_range="error"``)
        values outside ``value_range``.

    Examples
    --------
    >>> check_images(np.zeros((2, 1, 2, 2)), input_shape=(1, 2, 2)).shape
    (2, 1, 2, 2)
    >>> check_images(np.zeros((1, 3, 3)), input_shape=(1, 2, 2))
    Traceback (most recent call last):
    ...
    ValueError: images must have shape (n, 1, 2, 2) for this network; got (1, 1, 3, 3)
    """
    if on_range not in ("warn", "rescale", "error", "ignore"):
        raise ValueError(
            "on_range must be one of 'warn', 'rescale', 'error', 'ignore'; "
            f"got {on_range!r}"
        )
    if hasattr(images, "detach"):
        images = images.detach().cpu().numpy()
    x = np.asarray(images)
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float32)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ValueError(
            f"{name} must have shape (n, C, H, W) or (C, H, W); got {x.shape}"
        )
    if x.shape[0] == 0:
        raise ValueError(f"{name} must contain at least one image; got shape {x.shape}")
    if input_shape is not None and tuple(x.shape[1:]) != tuple(input_shape):
        raise ValueError(
            f"{name} must have shape (n, {', '.join(map(str, input_shape))}) for "
            f"this network; got {x.shape}"
        )
    finite = np.isfinite(x)
    if not finite.all():
        bad = np.argwhere(~finite)[0]
        raise ValueError(
            f"{name} must be finite; got {int((~finite).sum())} NaN or infinite "
            f"values, the first at index {tuple(int(i) for i in bad)}"
        )
    if value_range is not None and on_range != "ignore":
        lo, hi = value_range
        xmin, xmax = float(x.min()), float(x.max())
        if xmin < lo or xmax > hi:
            message = (
                f"{name} should have values in [{lo:g}, {hi:g}]; got values in "
                f"[{xmin:g}, {xmax:g}]"
            )
            if on_range == "error":
                raise ValueError(message)
            if on_range == "warn":
                warnings.warn(message, OpextractWarning, stacklevel=stacklevel)
            else:
                span = xmax - xmin
                x = (x - xmin) / span * (hi - lo) + lo if span > 0 else x * 0 + lo
                x = x.astype(x.dtype, copy=False)
    return x


def _check_count(name: str, n: Any, *, allow_zero: bool = False) -> int:
    try:
        ok = not isinstance(n, bool) and int(n) == n and n >= (0 if allow_zero else 1)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        rule = "a non-negative" if allow_zero else "a positive"
        raise ValueError(f"{name} must be {rule} integer; got {n!r}")
    return int(n)


def _check_shape(shape: Any) -> tuple[int, int, int]:
    try:
        shape = tuple(int(v) for v in shape)
    except (TypeError, ValueError):
        raise ValueError(f"shape must be (C, H, W); got {shape!r}") from None
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be (C, H, W) with positive sizes; got {shape}")
    return shape


# ---------------------------------------------------------------------------
# Embedded data sets


def _sample_crops(n: int, size: int, seed: int, held_out: bool) -> np.ndarray:
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    out = np.empty((n, 3, size, size), dtype=np.float32)
    for i in range(n):
        photo = photos[int(rng.integers(len(photos)))]
        height, width = photo.shape[:2]
        x0 = int(width * _HELD_OUT_FROM) if held_out else 0
        x1 = width if held_out else int(width * _HELD_OUT_FROM)
        # Crop a square of side ``size * zoom`` and shrink it to ``size``: a
        # raw 32x32 patch of a 640x427 photo is nearly flat.
        max_side = min(height, x1 - x0)
        side = int(rng.integers(min(size, max_side), min(4 * size, max_side) + 1))
        top = int(rng.integers(0, height - side + 1))
        left = x0 + int(rng.integers(0, x1 - x0 - side + 1))
        patch = Image.fromarray(photo[top : top + side, left : left + side])
        if side != size:
            patch = patch.resize((size, size), Image.Resampling.LANCZOS)
        out[i] = np.asarray(patch, dtype=np.float32).transpose(2, 0, 1) / 255.0
    return np.clip(out, 0.0, 1.0)


def sample_images(n: int = 1, *, size: int = 32, seed: int = 0) -> np.ndarray:
    """Colour crops of scikit-learn's sample photographs (no download).

    Each crop picks one of the two photographs of
    :func:`sklearn.datasets.load_sample_images` (a temple in China, a flower)
    at random, a square of random side between ``size`` and ``4 * size``
    pixels at a random position in the left 70% of the photograph, and
    shrinks it to ``size x size`` (Lanczos). Pixel values are divided by 255.

    Parameters
    ----------
    n : int, default 1
        Number of crops.
    size : int, default 32
        Side of the crops (at most 427, the photographs' height).
    seed : int, default 0
        Seed of :func:`numpy.random.default_rng`; the same seed gives the
        same crops.

    Returns
    -------
    ndarray of shape (n, 3, size, size)
        float32 values in [0, 1].

    See Also
    --------
    held_out_images : crops from the right 30% of the photographs.

    Examples
    --------
    >>> x = sample_images(2, size=16, seed=0)
    >>> x.shape, x.dtype, bool(x.min() >= 0 and x.max() <= 1)
    ((2, 3, 16, 16), dtype('float32'), True)
    """
    n = _check_count("n", n)
    size = _check_count("size", size)
    if size > 427:
        raise ValueError(f"size must be at most 427 for the sample photos; got {size}")
    return _sample_crops(n, size, int(seed), held_out=False)


def held_out_images(n: int = 1, *, size: int = 32, seed: int = 0) -> np.ndarray:
    """Crops like :func:`sample_images` from the right 30% of the photographs.

    They share no pixel with any crop of :func:`sample_images`, whatever the
    seeds, so they are real images a network trained on sample crops has not
    seen.

    Parameters
    ----------
    n : int, default 1
        Number of crops.
    size : int, default 32
        Side of the crops (at most 192, the width of the right part).
    seed : int, default 0
        Seed of :func:`numpy.random.default_rng`.

    Returns
    -------
    ndarray of shape (n, 3, size, size)
        float32 values in [0, 1].

    Examples
    --------
    >>> held_out_images(3, size=8, seed=1).shape
    (3, 3, 8, 8)
    """
    n = _check_count("n", n)
    size = _check_count("size", size)
    if size > 192:
        raise ValueError(f"size must be at most 192 for held-out crops; got {size}")
    return _sample_crops(n, size, int(seed), held_out=True)


def digits(
    n: int | None = None, *, digit: int | None = None, seed: int = 0
) -> np.ndarray:
    """scikit-learn's handwritten digits as 1x8x8 images in [0, 1].

    The 1797 images of :func:`sklearn.datasets.load_digits` (about 180 per
    class) have integer values 0..16; they are divided by 16.

    Parameters
    ----------
    n : int or None, default None
        Number of images; ``None`` takes all that match ``digit``.
    digit : int or None, default None
        Keep only this class (0..9); ``None`` keeps all classes.
    seed : int, default 0
        Seed of the random selection (a permutation of the matching images,
        from :func:`numpy.random.default_rng`).

    Returns
    -------
    ndarray of shape (n, 1, 8, 8)
        float32.

    Examples
    --------
    >>> x = digits(5, digit=3, seed=0)
    >>> x.shape, float(x.max()) <= 1.0
    ((5, 1, 8, 8), True)
    """
    from sklearn.datasets import load_digits

    if digit is not None and (isinstance(digit, bool) or digit not in range(10)):
        raise ValueError(f"digit must be an integer in 0..9 or None; got {digit!r}")
    bunch = load_digits()
    index = np.arange(len(bunch.target))
    if digit is not None:
        index = index[bunch.target == digit]
    available = len(index)
    if n is None:
        n = available
    n = _check_count("n", n)
    if n > available:
        what = "digits" if digit is None else f"images of digit {digit}"
        raise ValueError(f"n must be at most {available} (the {what}); got {n}")
    chosen = np.sort(np.random.default_rng(seed).permutation(index)[:n])
    return (bunch.images[chosen] / 16.0).astype(np.float32)[:, None]


def basis_2x2(indices: Sequence[int] = (0, 1, 2, 3)) -> np.ndarray:
    """Standard basis images of 1x2x2, ``e_i`` with pixel ``i`` (row-major) 1.

    Parameters
    ----------
    indices : sequence of int, default (0, 1, 2, 3)
        Which basis images, each in 0..3, no repeats, at least one.

    Returns
    -------
    ndarray of shape (len(indices), 1, 2, 2)
        float32.

    Examples
    --------
    >>> basis_2x2([1])[0, 0]
    array([[0., 1.],
           [0., 0.]], dtype=float32)
    """
    idx = [int(i) for i in indices]
    if not idx or len(set(idx)) != len(idx) or any(i not in range(4) for i in idx):
        raise ValueError(
            "indices must be distinct integers in 0..3, at least one; "
            f"got {tuple(indices)!r}"
        )
    return np.eye(4, dtype=np.float32)[idx].reshape(len(idx), 1, 2, 2)


def span_set_2x2(dim: int, *, n: int | None = None) -> np.ndarray:
    """A set of 1x2x2 images whose span has dimension ``dim``.

    The first ``dim`` images are ``e_0 .. e_{dim-1}``; the others are
    dependent on them: ``e_0 + e_1``, ``e_1 + e_2``, ... (cycling over the
    pairs of the first ``dim``), or ``0.5 e_0`` when ``dim == 1``. For
    example ``span_set_2x2(3, n=4)`` is ``e_0, e_1, e_2, e_0 + e_1``.

    Parameters
    ----------
    dim : int
        Span dimension, 1..4.
    n : int or None, default None
        Number of images, at least ``dim``; ``None`` means ``dim``.

    Returns
    -------
    ndarray of shape (n, 1, 2, 2)
        float32 values in [0, 1].

    Examples
    --------
    >>> x = span_set_2x2(3, n=4)
    >>> int(np.linalg.matrix_rank(x.reshape(4, -1)))
    3
    >>> x[3, 0]
    array([[1., 1.],
           [0., 0.]], dtype=float32)
    """
    if isinstance(dim, bool) or dim not in range(1, 5):
        raise ValueError(f"dim must be an integer in 1..4; got {dim!r}")
    n = dim if n is None else _check_count("n", n)
    if n < dim:
        raise ValueError(f"n must be at least dim={dim}; got {n}")
    eye = np.eye(4, dtype=np.float32)
    rows = [eye[i] for i in range(dim)]
    pairs = [(i, i + 1) for i in range(dim - 1)]
    for j in range(n - dim):
        if dim == 1:
            rows.append((0.5 / (j + 1)) * eye[0])
        else:
            a, b = pairs[j % len(pairs)]
            rows.append(eye[a] + eye[b])
    return np.stack(rows).reshape(n, 1, 2, 2)


# ---------------------------------------------------------------------------
# Files


def _cifar_dir(root: str | Path) -> Path:
    root = Path(root)
    for candidate in (root, root / "cifar-10-batches-py"):
        if (candidate / "batches.meta").is_file():
            return candidate
    inner = root / "cifar-10-batches-py"
    raise FileNotFoundError(
        "root must be a 'cifar-10-batches-py' folder (with batches.meta, "
        "data_batch_1 .. data_batch_5 and test_batch, the Python version from "
        "https://www.cs.toronto.edu/~kriz/cifar.html) or the folder holding it; "
        f"found no batches.meta in {str(root)!r} or {str(inner)!r}"
    )


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(
            f"CIFAR-10 batch file {path.name!r} is missing from {str(path.parent)!r}"
        )
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}


def load_cifar10(
    root: str | Path,
    *,
    classes: Sequence[str | int] | str | int | None = None,
    n: int | None = None,
    seed: int = 0,
    split: str = "train",
    return_labels: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Images of a local CIFAR-10 copy (the Python-pickle batches).

    Parameters
    ----------
    root : str or Path
        The ``cifar-10-batches-py`` folder, or the folder that holds it.
        Nothing is downloaded.
    classes : str, int, sequence of them, or None, default None
        Class names (see :data:`CIFAR10_CLASSES`) or labels 0..9; ``None``
        means all ten.
    n : int or None, default None
        Images per class; ``None`` takes every image of the class.
    seed : int, default 0
        Seed of the selection: for each class, a permutation of its images
        from :func:`numpy.random.default_rng` (seeded with ``(seed, label)``),
        of which the first ``n`` are kept, in file order.
    split : {"train", "test"}, default "train"
        ``data_batch_1`` .. ``data_batch_5`` or ``test_batch``.
    return_labels : bool, default False
        Also return the labels.

    Returns
    -------
    images : ndarray of shape (n * len(classes), 3, 32, 32)
        float32 in [0, 1] (bytes divided by 255), grouped by class in the
        order of ``classes``.
    labels : ndarray of shape (n * len(classes),)
        Only with ``return_labels=True``.

    Raises
    ------
    FileNotFoundError
        ``root`` has no ``batches.meta`` or a batch file is missing.
    ValueError
        Unknown class, bad ``split``, or ``n`` larger than a class holds.

    Examples
    --------
    A folder without the batches says what it expected:

    >>> load_cifar10("no-such-folder", classes="dog", n=2000)
    Traceback (most recent call last):
    ...
    FileNotFoundError: root must be a 'cifar-10-batches-py' folder (with ...
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test'; got {split!r}")
    folder = _cifar_dir(root)
    meta = _unpickle(folder / "batches.meta")
    names = [v.decode() if isinstance(v, bytes) else v for v in meta["label_names"]]

    if classes is None:
        labels_wanted = list(range(len(names)))
    else:
        if isinstance(classes, (str, int)):
            classes = [classes]
        labels_wanted = []
        for c in classes:
            if isinstance(c, str) and c in names:
                labels_wanted.append(names.index(c))
            elif isinstance(c, (int, np.integer)) and 0 <= c < len(names):
                labels_wanted.append(int(c))
            else:
                raise ValueError(
                    f"classes must be names in {names} or labels; got {c!r}"
                )
    if not labels_wanted:
        raise ValueError("classes must name at least one class; got an empty selection")
    if n is not None:
        n = _check_count("n", n)

    files = (
        [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    )
    data, labels = [], []
    for fname in files:
        batch = _unpickle(folder / fname)
        data.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch["labels"], dtype=np.int64))
    data = np.concatenate(data)
    labels = np.concatenate(labels)

    chosen = []
    for label in labels_wanted:
        index = np.flatnonzero(labels == label)
        if n is not None and n > len(index):
            raise ValueError(
                f"n must be at most {len(index)} (the {split} images of class "
                f"{names[label]!r} in {str(folder)!r}); got {n}"
            )
        if len(index) == 0:
            raise ValueError(
                f"class {names[label]!r} has no {split} images in {str(folder)!r}"
            )
        rng = np.random.default_rng([int(seed), label])
        take = len(index) if n is None else n
        chosen.append(np.sort(rng.permutation(index)[:take]))
    chosen = np.concatenate(chosen)
    logger.info("loaded %d CIFAR-10 images from %s", len(chosen), folder)
    images = data[chosen].astype(np.float32) / 255.0
    return (images, labels[chosen]) if return_labels else images


def load_image_folder(
    path: str | Path,
    *,
    size: int = 32,
    mode: str = "crop",
    n: int | None = None,
    grayscale: bool = False,
) -> np.ndarray:
    """Load every PNG/JPEG file of a folder as a ``size x size`` image.

    Parameters
    ----------
    path : str or Path
        Folder; files ending in .png, .jpg or .jpeg (any case), in sorted
        name order. Subfolders are not searched.
    size : int, default 32
        Output side s.
    mode : {"crop", "resize"}, default "crop"
        ``"crop"``: cut the largest centred square, then resize it to s x s
        (keeps the aspect ratio); ``"resize"``: resize the whole image to
        s x s (stretches non-square images). Resampling is Lanczos.
    n : int or None, default None
        Keep the first ``n`` files; ``None`` keeps all.
    grayscale : bool, default False
        One channel (PIL's "L" conversion) instead of RGB.

    Returns
    -------
    ndarray of shape (n, 3 or 1, size, size)
        float32 in [0, 1] (bytes divided by 255).

    Examples
    --------
    >>> import tempfile
    >>> from PIL import Image
    >>> folder = tempfile.mkdtemp()
    >>> Image.new("RGB", (40, 30), "red").save(f"{folder}/a.png")
    >>> x = load_image_folder(folder, size=8)
    >>> x.shape, float(x[0, 0, 0, 0]), float(x[0, 1, 0, 0])
    ((1, 3, 8, 8), 1.0, 0.0)
    """
    from PIL import Image

    if mode not in ("crop", "resize"):
        raise ValueError(f"mode must be 'crop' or 'resize'; got {mode!r}")
    size = _check_count("size", size)
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"path must be an existing folder; got {str(folder)!r}")
    files = sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES
    )
    if n is not None:
        files = files[: _check_count("n", n)]
    if not files:
        raise ValueError(
            f"path must contain PNG or JPEG files ({', '.join(_IMAGE_SUFFIXES)}); "
            f"found none in {str(folder)!r}"
        )

    out = []
    for file in files:
        with Image.open(file) as img:
            img = img.convert("L" if grayscale else "RGB")
            if mode == "crop":
                w, h = img.size
                side = min(w, h)
                left, top = (w - side) // 2, (h - side) // 2
                img = img.crop((left, top, left + side, top + side))
            if img.size != (size, size):
                img = img.resize((size, size), Image.Resampling.LANCZOS)
            arr = np.asarray(img, dtype=np.float32) / 255.0
        out.append(arr[None] if grayscale else arr.transpose(2, 0, 1))
    return np.stack(out)


# ---------------------------------------------------------------------------
# Probe inputs


def _rng(rng: Any) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def gaussian_noise(
    n: int, shape: Sequence[int], *, rng: np.random.Generator | int | None = None
) -> np.ndarray:
    """Standard normal noise images (not in [0, 1]: a probe, not training data).

    Parameters
    ----------
    n : int
        Number of images.
    shape : (C, H, W)
        Image shape.
    rng : numpy.random.Generator, int or None
        Generator or seed for :func:`numpy.random.default_rng`.

    Returns
    -------
    ndarray of shape (n, C, H, W)
        float32.

    Examples
    --------
    >>> gaussian_noise(2, (1, 2, 2), rng=0).shape
    (2, 1, 2, 2)
    """
    n = _check_count("n", n)
    shape = _check_shape(shape)
    return _rng(rng).standard_normal((n, *shape)).astype(np.float32)


def white_squares(
    n: int,
    shape: Sequence[int],
    *,
    rng: np.random.Generator | int | None = None,
    min_size: int = 1,
    max_size: int | None = None,
) -> np.ndarray:
    """One white square (all channels 1) of random size and position on black.

    Parameters
    ----------
    n : int
        Number of images.
    shape : (C, H, W)
        Image shape.
    rng : numpy.random.Generator, int or None
        Generator or seed for :func:`numpy.random.default_rng`.
    min_size, max_size : int
        Side range of the squares (inclusive); ``max_size`` defaults to
        ``min(H, W) // 2`` (at least ``min_size``).

    Returns
    -------
    ndarray of shape (n, C, H, W)
        float32, values 0 and 1.

    Examples
    --------
    >>> x = white_squares(4, (3, 8, 8), rng=0, min_size=2, max_size=3)
    >>> x.shape, {int(img[0].sum()) for img in x} <= {4, 9}
    ((4, 3, 8, 8), True)
    """
    n = _check_count("n", n)
    c, h, w = _check_shape(shape)
    min_size = _check_count("min_size", min_size)
    if max_size is None:
        max_size = max(min_size, min(h, w) // 2)
    max_size = _check_count("max_size", max_size)
    if not min_size <= max_size <= min(h, w):
        raise ValueError(
            f"min_size <= max_size <= min(H, W)={min(h, w)} is required; got "
            f"min_size={min_size}, max_size={max_size}"
        )
    gen = _rng(rng)
    out = np.zeros((n, c, h, w), dtype=np.float32)
    for i in range(n):
        side = int(gen.integers(min_size, max_size + 1))
        top = int(gen.integers(0, h - side + 1))
        left = int(gen.integers(0, w - side + 1))
        out[i, :, top : top + side, left : left + side] = 1.0
    return out
