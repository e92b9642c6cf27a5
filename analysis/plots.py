"""Figures of spectra and eigenvectors.

Every function returns a ``matplotlib.figure.Figure`` drawn on the Agg canvas,
built without ``pyplot``: nothing is shown, no global figure state changes,
and no display is needed. Save with ``fig.savefig(path)``; to draw into an
existing figure pass ``ax=``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = [
    "plot_complex_eigenvalues",
    "plot_eigenvalue_moduli",
    "plot_eigenvector_grid",
    "plot_singular_values",
    "mosaic",
]


def _figure(ax, figsize):
    if ax is not None:
        return ax.figure, ax
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _vector(values: Any, name: str, complex_ok: bool = True) -> np.ndarray:
    v = np.asarray(values)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array; got shape {v.shape}")
    if not np.isfinite(v).all():
        raise ValueError(f"{name} must be finite; got NaN or infinite values")
    if not complex_ok and np.iscomplexobj(v):
        raise ValueError(f"{name} must be real; got complex values")
    return v


def plot_eigenvalue_moduli(
    w: Any,
    *,
    delta: float | None = None,
    log: bool = False,
    title: str | None = None,
    ax: Any = None,
) -> Figure:
    """Eigenvalue moduli sorted in decreasing order against their index.

    Parameters
    ----------
    w : array_like of shape (k,)
        Eigenvalues (complex or real).
    delta : float, optional
        Shade the band ``1 +- delta`` (eigenvalues *near 1*).
    log : bool
        Logarithmic y axis.
    title : str, optional
        Axes title.
    ax : matplotlib Axes, optional
        Draw here instead of in a new figure.

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> fig = plot_eigenvalue_moduli([1.0, 0.5j, 0.98], delta=0.05)
    >>> fig.axes[0].lines[0].get_ydata().tolist()
    [1.0, 0.98, 0.5]
    """
    moduli = np.sort(np.abs(_vector(w, "w")))[::-1]
    fig, ax = _figure(ax, (5, 3.5))
    ax.plot(np.arange(1, moduli.size + 1), moduli, "o-", ms=3, lw=1)
    ax.axhline(1.0, color="0.5", lw=0.8, ls="--")
    if delta is not None:
        ax.axhspan(1 - delta, 1 + delta, color="C1", alpha=0.15, lw=0)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("index (decreasing modulus)")
    ax.set_ylabel("|eigenvalue|")
    ax.set_title(title or "Eigenvalue moduli")
    return fig


def plot_complex_eigenvalues(
    w: Any, *, title: str | None = None, ax: Any = None
) -> Figure:
    """Eigenvalues in the complex plane, with the unit circle.

    Examples
    --------
    >>> fig = plot_complex_eigenvalues([1.0, 0.3 + 0.4j, 0.3 - 0.4j])
    >>> fig.axes[0].collections[0].get_offsets().shape
    (3, 2)
    """
    w = _vector(w, "w").astype(np.complex128)
    fig, ax = _figure(ax, (4.5, 4.5))
    t = np.linspace(0, 2 * np.pi, 361)
    ax.plot(np.cos(t), np.sin(t), color="0.5", lw=0.8, ls="--", label="unit circle")
    ax.scatter(w.real, w.imag, s=12, color="C0", zorder=3, label="eigenvalues")
    ax.axhline(0, color="0.8", lw=0.5)
    ax.axvline(0, color="0.8", lw=0.5)
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_xlabel("real part")
    ax.set_ylabel("imaginary part")
    ax.set_title(title or "Eigenvalues")
    return fig


def plot_singular_values(
    s: Any,
    *,
    log: bool = True,
    rtol: float | None = None,
    title: str | None = None,
    ax: Any = None,
) -> Figure:
    """Singular value decay (decreasing), by default on a log scale.

    Parameters
    ----------
    s : array_like of shape (k,)
        Singular values.
    log : bool
        Logarithmic y axis (zeros are left out on it).
    rtol : float, optional
        Draw the numerical-rank threshold ``rtol * s[0]``.

    Examples
    --------
    >>> fig = plot_singular_values([3.0, 1.0, 1e-3], rtol=1e-2)
    >>> fig.axes[0].get_yscale()
    'log'
    """
    s = np.sort(_vector(s, "s", complex_ok=False).astype(np.float64))[::-1]
    if (s < 0).any():
        raise ValueError(f"s must be non-negative; got minimum {s.min():g}")
    fig, ax = _figure(ax, (5, 3.5))
    idx = np.arange(1, s.size + 1)
    keep = s > 0 if log else np.ones(s.size, bool)
    ax.plot(idx[keep], s[keep], "o-", ms=3, lw=1)
    if rtol is not None:
        ax.axhline(rtol * s[0], color="C3", lw=0.8, ls="--", label=f"rtol {rtol:g}")
        ax.legend(loc="upper right", fontsize="small")
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("index")
    ax.set_ylabel("singular value")
    ax.set_title(title or "Singular values")
    return fig


def _scaled(img: np.ndarray) -> np.ndarray:
    """(C, H, W) -> (H, W, 3) RGB for 3 channels, else (H, W, 1) from the first
    channel; min-max scaled to [0, 1] per image."""
    lo, hi = img.min(), img.max()
    img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
    return np.moveaxis(img if img.shape[0] == 3 else img[:1], 0, -1)


def mosaic(images: np.ndarray, ncols: int, gap: int = 1) -> np.ndarray:
    """Tile ``(k, C, H, W)`` images row-major into one ``(rows, cols, 3 or 1)``
    array, each image min-max scaled, separated by ``gap`` white pixels.

    Examples
    --------
    >>> import numpy as np
    >>> mosaic(np.arange(8.0).reshape(2, 1, 2, 2), ncols=2)[..., 0]
    array([[0.        , 0.33333333, 1.        , 0.        , 0.33333333],
           [0.66666667, 1.        , 1.        , 0.66666667, 1.        ]])
    """
    k, _, h, w = images.shape
    ncols = min(ncols, k)
    nrows = -(-k // ncols)
    depth = 3 if images.shape[1] == 3 else 1
    out = np.ones((nrows * (h + gap) - gap, ncols * (w + gap) - gap, depth))
    for i in range(k):
        r, c = divmod(i, ncols)
        out[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = (
            _scaled(images[i])
        )
    return out


def plot_eigenvector_grid(
    images: Any,
    *,
    n: int = 64,
    ncols: int = 8,
    part: str = "both",
    title: str | None = None,
) -> Figure:
    """Grids of eigenvector images, in row-major order (as Figure 9b).

    Parameters
    ----------
    images : ndarray of shape (k, 2, C, H, W) or (k, C, H, W)
        From :func:`analysis.eigenvector_images` (real and imaginary parts),
        or real images.
    n : int
        Show the first ``n`` (default 64: an 8 x 8 grid).
    ncols : int
        Images per row; image ``i`` sits in row ``i // ncols``, column
        ``i % ncols``.
    part : {"both", "real", "imag"}
        Which parts; ``"both"`` draws the real grid left of the imaginary one.
    title : str, optional
        Figure title.

    Returns
    -------
    matplotlib.figure.Figure
        One axes per part, each showing one mosaic image (see
        :func:`mosaic`) with one white pixel between images.

    Notes
    -----
    Each image is min-max scaled to [0, 1] on its own (an eigenvector's sign
    and scale are arbitrary). Three channels are shown as RGB; any other
    number of channels shows the first channel in grey.

    Examples
    --------
    >>> import numpy as np
    >>> imgs = np.random.default_rng(0).random((10, 2, 3, 4, 4))
    >>> fig = plot_eigenvector_grid(imgs, n=10, ncols=5)
    >>> [ax.get_title() for ax in fig.axes]
    ['real part', 'imaginary part']
    >>> fig.axes[0].images[0].get_array().shape    # 2 rows, 5 columns of 4 x 4
    (9, 24, 3)
    """
    a = np.asarray(images, dtype=np.float64)
    if a.ndim == 4:
        a = a[:, None]
        if part == "both":
            part = "real"
    if a.ndim != 5 or a.shape[1] not in (1, 2) or a.shape[0] == 0:
        raise ValueError(
            "images must have shape (k, 2, C, H, W) or (k, C, H, W) with k >= 1; got "
            f"shape {np.shape(images)}"
        )
    if part not in ("both", "real", "imag"):
        raise ValueError(f"part must be 'both', 'real' or 'imag'; got {part!r}")
    if part == "imag" and a.shape[1] == 1:
        raise ValueError(
            "part='imag' needs images of shape (k, 2, C, H, W); got shape "
            f"{np.shape(images)}"
        )
    if int(n) < 1 or int(ncols) < 1:
        raise ValueError(f"n and ncols must be positive; got n={n}, ncols={ncols}")
    a = a[: int(n)]
    parts = {"both": [0, 1], "real": [0], "imag": [1]}[part]
    labels = {0: "real part", 1: "imaginary part"}

    ncols = min(int(ncols), a.shape[0])
    nrows = -(-a.shape[0] // ncols)
    fig = Figure(
        figsize=(0.9 * ncols * len(parts) + 0.5, 0.9 * nrows + 0.7),
        layout="constrained",
    )
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(parts), squeeze=False)[0]
    for ax, p in zip(axes, parts):
        tiles = mosaic(a[:, p], ncols)
        if tiles.shape[-1] == 1:
            ax.imshow(
                tiles[..., 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest"
            )
        else:
            ax.imshow(tiles, interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(labels[p])
    if title:
        fig.suptitle(title)
    return fig
