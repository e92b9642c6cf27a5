"""The convolutional autoencoders of the memorization study.

Every constructor returns a :class:`torch.nn.Module` with four attributes that
the rest of the toolkit reads:

``input_shape``
    ``(C, H, W)`` of one input image.
``r_min_bound``
    An upper bound on r_min, the smallest rank among the network's factors:
    the minimum over the layers every signal must pass through of
    ``min(n_in, n_out)`` (a factor's rank never exceeds its smaller side).
    Weights in general position attain it for the chains built here.
``downsampling``
    Whether the network contains a strided convolution.
``linear``
    Whether the network is a composition of linear maps only (convolutions
    without bias, nearest upsampling, concatenation), so that
    ``opextract.to_sparse`` gives its exact operator.

The chains (DS, D, ND, D_{a,b}, ND_{a,b}, NLD_{a,b}, NLND_{a,b}) are
:class:`torch.nn.Sequential` subclasses whose children are named ``"0"``,
``"1"``, ... in forward order, so the chain exporter of opextract sees one
factor per layer. The U-Net has concatenation skips and is not a chain.

All convolutions have 3x3 kernels, zero padding 1 and no bias unless
``bias=True``. ``model.config`` holds the name and options that rebuild the
architecture with :func:`build`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "INITS",
    "Autoencoder",
    "UNet",
    "build",
    "d",
    "d_ab",
    "ds",
    "initialize",
    "names",
    "nd",
    "nd_ab",
    "nld_ab",
    "nlnd_ab",
    "unet",
]

INITS = (
    "default",
    "xavier_uniform",
    "xavier_normal",
    "kaiming_uniform",
    "kaiming_normal",
)
"""Names accepted by ``init=`` for every network (DS also takes ``"identity"``)."""


class Autoencoder(nn.Sequential):
    """A chain of layers with the attributes the toolkit reads.

    A plain :class:`torch.nn.Sequential` in everything else; see the module
    docstring for ``input_shape``, ``r_min_bound``, ``downsampling``,
    ``linear`` and ``config``.
    """

    def __init__(
        self,
        layers: Sequence[nn.Module],
        *,
        input_shape: tuple[int, int, int],
        downsampling: bool,
        linear: bool,
        config: dict[str, Any],
    ) -> None:
        super().__init__(*layers)
        self.input_shape = tuple(int(v) for v in input_shape)
        self.downsampling = bool(downsampling)
        self.linear = bool(linear)
        self.config = dict(config)
        self.r_min_bound = _chain_rank_bound(self, self.input_shape)

    def extra_repr(self) -> str:
        return (
            f"input_shape={self.input_shape}, r_min_bound={self.r_min_bound}, "
            f"downsampling={self.downsampling}, linear={self.linear}"
        )


class UNet(nn.Module):
    """U-Net autoencoder with concatenation skips; built by :func:`unet`.

    Layers, for ``depth`` levels and widths ``w_l = width * 2**l``:

    - ``inc``: Conv ``C -> w_0`` (stride 1);
    - ``down[l-1]`` for ``l = 1..depth``: Conv ``w_{l-1} -> w_l``, stride 2;
    - ``up[l-1]`` for ``l = depth..1``: nearest Upsample x2 of the level-``l``
      features, concatenation with the level-``l-1`` encoder features (upsampled
      first, skip second, along channels), Conv ``w_l + w_{l-1} -> w_{l-1}``;
    - ``outc``: Conv ``w_0 -> C``.

    In the nonlinear variant a LeakyReLU follows every convolution except
    ``outc``.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        input_size: int,
        depth: int,
        width: int,
        linear: bool,
        negative_slope: float,
        bias: bool,
        config: dict[str, Any],
    ) -> None:
        super().__init__()
        widths = [width * 2**level for level in range(depth + 1)]

        def act() -> nn.Module:
            return nn.Identity() if linear else nn.LeakyReLU(negative_slope)

        self.inc = nn.Sequential(_conv(in_channels, widths[0], 1, bias), act())
        self.down = nn.ModuleList(
            nn.Sequential(_conv(widths[i], widths[i + 1], 2, bias), act())
            for i in range(depth)
        )
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.up = nn.ModuleList(
            nn.Sequential(_conv(widths[i + 1] + widths[i], widths[i], 1, bias), act())
            for i in range(depth)
        )
        self.outc = _conv(widths[0], in_channels, 1, bias)

        self.input_shape = (int(in_channels), int(input_size), int(input_size))
        self.downsampling = depth > 0
        self.linear = bool(linear) and not bias
        self.config = dict(config)
        # Every signal passes through ``inc`` and ``outc``; the skips bypass
        # all other layers, so only these two bound the rank.
        n = in_channels * input_size**2
        n_inner = widths[0] * input_size**2
        self.r_min_bound = int(min(n, n_inner))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        h = self.inc(x)
        for block in self.down:
            skips.append(h)
            h = block(h)
        for i in range(len(self.up) - 1, -1, -1):
            h = torch.cat([self.upsample(h), skips[i]], dim=1)
            h = self.up[i](h)
        return self.outc(h)


# ---------------------------------------------------------------------------
# Validation and initialization helpers


def _conv(c_in: int, c_out: int, stride: int, bias: bool) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=bias)


def _positive_int(name: str, value: Any) -> int:
    try:
        ok = not isinstance(value, bool) and int(value) == value and value >= 1
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{name} must be a positive integer; got {value!r}")
    return int(value)


def _check_size(name: str, size: Any, multiple: int) -> int:
    size = _positive_int(name, size)
    if size % multiple:
        raise ValueError(f"{name} must be a multiple of {multiple}; got {size}")
    return size


def _check_init(init: str, allowed: Sequence[str]) -> str:
    if init not in allowed:
        raise ValueError(f"init must be one of {tuple(allowed)}; got {init!r}")
    return init


def _check_scale(scale: Any) -> float:
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number; got {scale!r}")
    return scale


def _chain_rank_bound(chain: nn.Sequential, input_shape: tuple[int, ...]) -> int:
    """min over the layers of min(n_in, n_out), from one shape-only pass."""
    bound = math.prod(input_shape)
    n_in = bound
    with torch.no_grad():
        x = torch.zeros((1, *input_shape))
        for layer in chain:
            x = layer(x)
            n_out = math.prod(x.shape[1:])
            bound = min(bound, n_in, n_out)
            n_in = n_out
    return int(bound)


def _default_reset(conv: nn.Conv2d, generator: torch.Generator | None) -> None:
    # The same draws as nn.Conv2d.reset_parameters, routed through ``generator``.
    nn.init.kaiming_uniform_(conv.weight, a=math.sqrt(5), generator=generator)
    if conv.bias is not None:
        fan_in = conv.weight[0].numel()
        bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        nn.init.uniform_(conv.bias, -bound, bound, generator=generator)


_INITIALIZERS: dict[str, Callable[[torch.Tensor, torch.Generator | None], Any]] = {
    "xavier_uniform": lambda w, g: nn.init.xavier_uniform_(w, generator=g),
    "xavier_normal": lambda w, g: nn.init.xavier_normal_(w, generator=g),
    "kaiming_uniform": lambda w, g: nn.init.kaiming_uniform_(w, generator=g),
    "kaiming_normal": lambda w, g: nn.init.kaiming_normal_(w, generator=g),
}


def initialize(
    model: nn.Module,
    init: str = "default",
    *,
    scale: float = 1.0,
    seed: int | None = None,
) -> nn.Module:
    """Initialize every convolution of ``model`` in place.

    Parameters
    ----------
    model : torch.nn.Module
        Any module; its :class:`torch.nn.Conv2d` layers are initialized in
        the order of ``model.modules()``.
    init : str, default "default"
        ``"default"`` (PyTorch's own: Kaiming uniform with ``a = sqrt(5)``,
        i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)), same for the bias),
        ``"xavier_uniform"``, ``"xavier_normal"``, ``"kaiming_uniform"`` or
        ``"kaiming_normal"`` (the ``torch.nn.init`` functions with their
        default gains; biases, if any, are set to zero).
    scale : float, default 1.0
        Factor applied to every weight (not the biases) after drawing.
    seed : int or None, default None
        Seed of a local :class:`torch.Generator`; ``None`` draws from
        PyTorch's global generator, as PyTorch itself does.

    Returns
    -------
    torch.nn.Module
        ``model`` itself.

    Examples
    --------
    >>> from torch import nn
    >>> conv = initialize(nn.Conv2d(1, 2, 3), "xavier_normal", scale=0.5, seed=0)
    >>> tuple(conv.weight.shape)
    (2, 1, 3, 3)
    """
    init = _check_init(init, INITS)
    scale = _check_scale(scale)
    generator = None if seed is None else torch.Generator().manual_seed(int(seed))

    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, nn.Conv2d):
                continue
            if init == "default":
                _default_reset(module, generator)
            else:
                _INITIALIZERS[init](module.weight, generator)
                if module.bias is not None:
                    module.bias.zero_()
            module.weight.mul_(scale)
    return model


def _construct(make: Callable[[], nn.Module], init, scale, seed) -> nn.Module:
    """Build with ``make`` and initialize, leaving global RNG state alone when
    ``seed`` is given (layer construction draws from the global generator)."""
    if seed is None:
        model = make()
        if init != "default":
            initialize(model, init, scale=scale)
        elif scale != 1.0:
            with torch.no_grad():
                for m in model.modules():
                    if isinstance(m, nn.Conv2d):
                        m.weight.mul_(scale)
        return model
    with torch.random.fork_rng(devices=[]):
        model = make()
    return initialize(model, init, scale=scale, seed=seed)


# ---------------------------------------------------------------------------
# Networks


def ds(
    init: str = "default", *, scale: float = 1.0, seed: int | None = None
) -> Autoencoder:
    """Network DS of the literature: the small downsampling net on 1x2x2 images.

    Layers (children ``"0"`` .. ``"5"``):

    ====  ==========================================  ===========
    name  layer                                       output
    ====  ==========================================  ===========
    0     Conv 1 -> 4, 3x3, stride 2, padding 1       4 x 1 x 1
    1     Upsample x2, nearest                        4 x 2 x 2
    2     Conv 4 -> 4, 3x3, padding 1                 4 x 2 x 2
    3     Conv 4 -> 4, 3x3, padding 1                 4 x 2 x 2
    4     Conv 4 -> 4, 3x3, padding 1                 4 x 2 x 2
    5     Conv 4 -> 1, 3x3, padding 1                 1 x 2 x 2
    ====  ==========================================  ===========

    ``r_min_bound`` is 4 (= n): layer 0 maps 4 values to 4, so DS can
    represent the identity.

    Parameters
    ----------
    init : str, default "default"
        One of :data:`INITS`, or ``"identity"``: the manual initialization of
        the literature's Appendix A, which makes the network exactly the
        identity on 1x2x2 images. Positions are (channel, row, column),
        0-based: layer 0's four filters have (1,1), (1,2), (2,1), (2,2) set
        to 1 (filter k picks pixel k); layer 2's filter i has (i,1,2) set and
        layer 3's filter i has (i,2,1) set (together they move each upsampled
        constant to the top-left pixel); layer 4's filters have (0,1,1),
        (1,1,0), (2,0,1), (3,0,0) set (pixel k back to its place); layer 5
        has (i,1,1) set for every i (sum of the channels). All other weights
        are 0.
    scale : float, default 1.0
        Factor on every weight after initialization (with ``"identity"`` the
        network becomes ``scale**5`` times the identity).
    seed : int or None, default None
        Seed of the initialization (see :func:`initialize`).

    Returns
    -------
    Autoencoder
        ``input_shape == (1, 2, 2)``, ``downsampling=True``, ``linear=True``.

    Examples
    --------
    >>> import torch
    >>> net = ds("identity")
    >>> x = torch.tensor([[[[0.1, 0.2], [0.3, 0.4]]]])
    >>> bool(torch.equal(net(x), x))
    True
    >>> net.r_min_bound
    4
    """
    init = _check_init(init, (*INITS, "identity"))
    scale = _check_scale(scale)
    config = {"name": "ds", "init": init, "scale": scale, "seed": seed}

    def make() -> Autoencoder:
        layers = [
            _conv(1, 4, 2, False),
            nn.Upsample(scale_factor=2, mode="nearest"),
            _conv(4, 4, 1, False),
            _conv(4, 4, 1, False),
            _conv(4, 4, 1, False),
            _conv(4, 1, 1, False),
        ]
        return Autoencoder(
            layers,
            input_shape=(1, 2, 2),
            downsampling=True,
            linear=True,
            config=config,
        )

    if init != "identity":
        return _construct(make, init, scale, seed)

    with torch.random.fork_rng(devices=[]):
        model = make()
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, nn.Conv2d):
                layer.weight.zero_()
        w0, w2, w3, w4, w5 = (model[i].weight for i in (0, 2, 3, 4, 5))
        for k, (r, c) in enumerate([(1, 1), (1, 2), (2, 1), (2, 2)]):
            w0[k, 0, r, c] = 1.0
        for i in range(4):
            w2[i, i, 1, 2] = 1.0
            w3[i, i, 2, 1] = 1.0
            w5[0, i, 1, 1] = 1.0
        for k, (ch, r, c) in enumerate([(0, 1, 1), (1, 1, 0), (2, 0, 1), (3, 0, 0)]):
            w4[k, ch, r, c] = 1.0
        for layer in model:
            if isinstance(layer, nn.Conv2d):
                layer.weight.mul_(scale)
    return model


def _d_layers(in_channels, channels, depth, downsample, bias):
    stride = 8 if downsample else 1
    layers: list[nn.Module] = [_conv(in_channels, channels, stride, bias)]
    if downsample:
        layers.append(nn.Upsample(scale_factor=8, mode="nearest"))
    layers += [_conv(channels, channels, 1, bias) for _ in range(depth - 2)]
    layers.append(_conv(channels, in_channels, 1, bias))
    return layers


def _d_common(
    name, downsample, channels, depth, in_channels, input_size, init, scale, seed, bias
):
    channels = _positive_int("channels", channels)
    depth = _positive_int("depth", depth)
    if depth < 2:
        raise ValueError(f"depth must be at least 2; got {depth}")
    in_channels = _positive_int("in_channels", in_channels)
    input_size = _check_size("input_size", input_size, 8 if downsample else 1)
    init = _check_init(init, INITS)
    scale = _check_scale(scale)
    config = {
        "name": name,
        "channels": channels,
        "depth": depth,
        "in_channels": in_channels,
        "input_size": input_size,
        "init": init,
        "scale": scale,
        "seed": seed,
        "bias": bool(bias),
    }

    def make() -> Autoencoder:
        return Autoencoder(
            _d_layers(in_channels, channels, depth, downsample, bias),
            input_shape=(in_channels, input_size, input_size),
            downsampling=downsample,
            linear=not bias,
            config=config,
        )

    return _construct(make, init, scale, seed)


def d(
    channels: int = 128,
    depth: int = 5,
    *,
    in_channels: int = 3,
    input_size: int = 32,
    init: str = "default",
    scale: float = 1.0,
    seed: int | None = None,
    bias: bool = False,
) -> Autoencoder:
    """Network D: one stride-8 convolution, Upsample x8, then convolutions.

    Layers, with ``c = channels`` and ``depth`` convolutions in all:

    - ``"0"``: Conv ``in_channels -> c``, stride 8 (``s -> s/8``);
    - ``"1"``: Upsample x8, nearest (``s/8 -> s``);
    - ``depth - 2`` Convs ``c -> c``;
    - last: Conv ``c -> in_channels``.

    ``r_min_bound = min(C s^2, c (s/8)^2)``: 2048 for the defaults, so D
    cannot represent the identity on 3x32x32 images.

    Parameters
    ----------
    channels : int, default 128
        Filters of every convolution but the last (the literature's 128).
    depth : int, default 5
        Number of convolutions (at least 2). The text of the literature does
        not state D's depth; 5 matches the convolution count of DS.
    in_channels : int, default 3
        Channels C of the images.
    input_size : int, default 32
        Side s of the square images; a multiple of 8.
    init, scale, seed
        See :func:`initialize`.
    bias : bool, default False
        Give every convolution a bias (the network is then affine, not
        linear, and ``linear`` is False).

    Returns
    -------
    Autoencoder

    Examples
    --------
    >>> net = d(channels=8, depth=3, input_size=16, seed=0)
    >>> net.input_shape, net.r_min_bound, net.downsampling
    ((3, 16, 16), 32, True)
    """
    return _d_common(
        "d", True, channels, depth, in_channels, input_size, init, scale, seed, bias
    )


def nd(
    channels: int = 128,
    depth: int = 5,
    *,
    in_channels: int = 3,
    input_size: int = 32,
    init: str = "default",
    scale: float = 1.0,
    seed: int | None = None,
    bias: bool = False,
) -> Autoencoder:
    """Network ND: :func:`d` without the stride and the upsampling.

    Layers: Conv ``in_channels -> c``, ``depth - 2`` Convs ``c -> c``, Conv
    ``c -> in_channels``, all stride 1. ``r_min_bound = C s^2`` when
    ``c >= C`` (full rank is possible). Parameters as in :func:`d`
    (``input_size`` may be any positive integer).

    Returns
    -------
    Autoencoder

    Examples
    --------
    >>> net = nd(channels=8, depth=3, input_size=8, seed=0)
    >>> net.r_min_bound, net.downsampling
    (192, False)
    """
    return _d_common(
        "nd", False, channels, depth, in_channels, input_size, init, scale, seed, bias
    )


def _ab_common(
    name,
    a,
    b,
    downsample,
    nonlinear,
    negative_slope,
    in_channels,
    input_size,
    init,
    scale,
    seed,
    bias,
):
    a = _positive_int("a", a)
    b = _positive_int("b", b)
    in_channels = _positive_int("in_channels", in_channels)
    input_size = _check_size("input_size", input_size, 8 if downsample else 1)
    init = _check_init(init, INITS)
    scale = _check_scale(scale)
    negative_slope = float(negative_slope)
    config = {
        "name": name,
        "a": a,
        "b": b,
        "in_channels": in_channels,
        "input_size": input_size,
        "init": init,
        "scale": scale,
        "seed": seed,
        "bias": bool(bias),
    }
    if nonlinear:
        config["negative_slope"] = negative_slope
    stride = 2 if downsample else 1
    plan = [
        (in_channels, a, stride),
        (a, a, stride),
        (a, b, stride),
        "up",
        (b, a, 1),
        (a, a, 1),
        (a, in_channels, 1),
    ]

    def make() -> Autoencoder:
        layers: list[nn.Module] = []
        n_conv = sum(1 for p in plan if p != "up")
        seen = 0
        for p in plan:
            if p == "up":
                if downsample:
                    layers.append(nn.Upsample(scale_factor=8, mode="nearest"))
                continue
            layers.append(_conv(p[0], p[1], p[2], bias))
            seen += 1
            if nonlinear and seen < n_conv:
                layers.append(nn.LeakyReLU(negative_slope))
        return Autoencoder(
            layers,
            input_shape=(in_channels, input_size, input_size),
            downsampling=downsample,
            linear=not (nonlinear or bias),
            config=config,
        )

    return _construct(make, init, scale, seed)


def d_ab(
    a: int,
    b: int,
    *,
    in_channels: int = 3,
    input_size: int = 32,
    init: str = "default",
    scale: float = 1.0,
    seed: int | None = None,
    bias: bool = False,
) -> Autoencoder:
    """Network D_{a,b}: three stride-2 convolutions, Upsample x8, three convs.

    Layers (children ``"0"`` .. ``"6"``), for C x s x s inputs:

    ====  =====================================  ==============
    name  layer                                  output
    ====  =====================================  ==============
    0     Conv C -> a, stride 2                  a x s/2 x s/2
    1     Conv a -> a, stride 2                  a x s/4 x s/4
    2     Conv a -> b, stride 2                  b x s/8 x s/8
    3     Upsample x8, nearest                   b x s x s
    4     Conv b -> a                            a x s x s
    5     Conv a -> a                            a x s x s
    6     Conv a -> C                            C x s x s
    ====  =====================================  ==============

    ``r_min_bound = min(C s^2, a s^2/16, b s^2/64)``; on 3x32x32 images it
    reaches the full 3072 only when ``b >= 192`` and ``a >= 48``.

    Parameters
    ----------
    a : int
        Filters on the full-resolution representations.
    b : int
        Filters on the most downsampled representation.
    in_channels : int, default 3
        Channels C of the images.
    input_size : int, default 32
        Side s of the square images (a multiple of 8 when downsampling).
    init, scale, seed
        See :func:`initialize`.
    bias : bool, default False
        Give every convolution a bias.

    Returns
    -------
    Autoencoder

    Examples
    --------
    >>> net = d_ab(4, 12, in_channels=1, input_size=8, seed=0)
    >>> [type(m).__name__ for m in net]  # doctest: +NORMALIZE_WHITESPACE
    ['Conv2d', 'Conv2d', 'Conv2d', 'Upsample', 'Conv2d', 'Conv2d', 'Conv2d']
    >>> net.r_min_bound
    12
    """
    return _ab_common(
        "d_ab",
        a,
        b,
        True,
        False,
        0.0,
        in_channels,
        input_size,
        init,
        scale,
        seed,
        bias,
    )


def nd_ab(
    a: int,
    b: int,
    *,
    in_channels: int = 3,
    input_size: int = 32,
    init: str = "default",
    scale: float = 1.0,
    seed: int | None = None,
    bias: bool = False,
) -> Autoencoder:
    """Network ND_{a,b}: the convolutions of :func:`d_ab`, all with stride 1,
    and no upsampling.

    Layers ``"0"`` .. ``"5"``: Conv C -> a, a -> a, a -> b, b -> a, a -> a,
    a -> C. ``r_min_bound = C s^2`` when ``min(a, b) >= C``.

    Parameters
    ----------
    a : int
        Filters on the full-resolution representations.
    b : int
        Filters on the most downsampled representation.
    in_channels : int, default 3
        Channels C of the images.
    input_size : int, default 32
        Side s of the square images (a multiple of 8 when downsampling).
    init, scale, seed
        See :func:`initialize`.
    bias : bool, default False
        Give every convolution a bias.

    Returns
    -------
    Autoencoder

    Examples
    --------
    >>> net = nd_ab(4, 4, input_size=8, seed=0)
    >>> len(net), net.r_min_bound, net.downsampling
    (6, 192, False)
    """
    return _ab_common(
        "nd_ab",
        a,
        b,
        False,
        False,
        0.0,
        in_channels,
        input_size,
        init,
        scale,
        seed,
        bias,
    )


def nld_ab(
    a: int,
    b: int,
    *,
    negative_slope: float = 0.01,
    in_channels: int = 3,
    input_size: int = 32,
    init: str = "default",
    scale: float = 1.0,
    seed: int | None = None,
    bias: bool = False,
) -> Autoencoder:
    """Network NLD_{a,b}: :func:`d_ab` with a LeakyReLU after every
    convolution but the last.

    Layers: Conv, LeakyReLU, Conv, LeakyReLU, Conv, LeakyReLU, Upsample x8,
    Conv, LeakyReLU, Conv, LeakyReLU, Conv (children ``"0"`` .. ``"11"``).
    ``linear`` is False; ``r_min_bound`` bounds the rank of the Jacobian at
    any point (a LeakyReLU's Jacobian is diagonal and invertible for
    ``negative_slope != 0``) and equals that of D_{a,b}.

    Parameters
    ----------
    a : int
        Filters on the full-resolution representations.
    b : int
        Filters on the most downsampled representation.
    negative_slope : float, default 0.01
        Slope of the LeakyReLUs for negative inputs (PyTorch's default; the
        literature does not state it).
    in_channels : int, default 3
        Channels C of the images.
    input_size : int, default 32
        Side s of the square images (a multiple of 8 when downsampling).
    init, scale, seed
        See :func:`initialize`.
    bias : bool, default False
        Give every convolution a bias.

    Returns
    -------
    Autoencoder

    Examples
    --------
    >>> net = nld_ab(4, 12, in_channels=1, input_size=8, seed=0)
    >>> len(net), net.linear
    (12, False)
    """
    return _ab_common(
        "nld_ab",
        a,
        b,
        True,
        True,
        negative_slope,
        in_channels,
        input_size,
        init,
        scale,
        seed,
        bias,
    )


def nlnd_ab(
    a: int,
    b: int,
    *,
    negative_slope: float = 0.01,
    in_channels: int = 3,
    input_size: int = 32,
    init: str = "default",
    scale: float = 1.0,
    seed: int | None = None,
    bias: bool = False,
) -> Autoencoder:
    """Network NLND_{a,b}: :func:`nd_ab` with a LeakyReLU after every
    convolution but the last (children ``"0"`` .. ``"10"``).

    Parameters
    ----------
    a : int
        Filters on the full-resolution representations.
    b : int
        Filters on the most downsampled representation.
    negative_slope : float, default 0.01
        Slope of the LeakyReLUs for negative inputs (PyTorch's default; the
        literature does not state it).
    in_channels : int, default 3
        Channels C of the images.
    input_size : int, default 32
        Side s of the square images (a multiple of 8 when downsampling).
    init, scale, seed
        See :func:`initialize`.
    bias : bool, default False
        Give every convolution a bias.

    Returns
    -------
    Autoencoder

    Examples
    --------
    >>> net = nlnd_ab(4, 4, input_size=8, seed=0)
    >>> len(net), net.downsampling, net.linear
    (11, False, False)
    """
    return _ab_common(
        "nlnd_ab",
        a,
        b,
        False,
        True,
        negative_slope,
        in_channels,
        input_size,
        init,
        scale,
        seed,
        bias,
    )


def unet(
    depth: int = 3,
    width: int = 32,
    *,
    linear: bool = True,
    negative_slope: float = 0.01,
    in_channels: int = 3,
    input_size: int = 32,
    init: str = "default",
    scale: float = 1.0,
    seed: int | None = None,
    bias: bool = False,
) -> UNet:
    """A U-Net autoencoder with concatenation skips (see :class:`UNet`).

    Downsampling is by stride-2 convolutions and upsampling by nearest
    Upsample x2, the layers of the chains above, so the linear variant
    exports with ``opextract.to_sparse`` through its graph exporter.

    ``r_min_bound = min(C s^2, width s^2)``: the skips bypass the bottleneck,
    so only the first and the last convolution bound the rank.

    Parameters
    ----------
    depth : int, default 3
        Number of stride-2 levels (0 gives a plain three-layer chain).
    width : int, default 32
        Filters at full resolution; level ``l`` has ``width * 2**l``.
    linear : bool, default True
        Without activations (True) or with a LeakyReLU after every
        convolution but the last (False).
    negative_slope : float, default 0.01
        Slope of the LeakyReLUs (nonlinear variant only).
    in_channels : int, default 3
        Channels C of the images.
    input_size : int, default 32
        Side s; a multiple of ``2**depth``.
    init, scale, seed
        See :func:`initialize`.
    bias : bool, default False
        Give every convolution a bias.

    Returns
    -------
    UNet

    Examples
    --------
    >>> import torch
    >>> net = unet(depth=2, width=4, input_size=8, seed=0)
    >>> tuple(net(torch.zeros(1, 3, 8, 8)).shape), net.r_min_bound
    ((1, 3, 8, 8), 192)
    """
    depth = int(depth)
    if depth < 0:
        raise ValueError(f"depth must be a non-negative integer; got {depth}")
    width = _positive_int("width", width)
    in_channels = _positive_int("in_channels", in_channels)
    input_size = _check_size("input_size", input_size, 2**depth)
    init = _check_init(init, INITS)
    scale = _check_scale(scale)
    config = {
        "name": "unet",
        "depth": depth,
        "width": width,
        "linear": bool(linear),
        "negative_slope": float(negative_slope),
        "in_channels": in_channels,
        "input_size": input_size,
        "init": init,
        "scale": scale,
        "seed": seed,
        "bias": bool(bias),
    }

    def make() -> UNet:
        return UNet(
            in_channels=in_channels,
            input_size=input_size,
            depth=depth,
            width=width,
            linear=linear,
            negative_slope=float(negative_slope),
            bias=bias,
            config=config,
        )

    return _construct(make, init, scale, seed)


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "ds": ds,
    "d": d,
    "nd": nd,
    "d_ab": d_ab,
    "nd_ab": nd_ab,
    "nld_ab": nld_ab,
    "nlnd_ab": nlnd_ab,
    "unet": unet,
}


def names() -> list[str]:
    """Names accepted by :func:`build`.

    Examples
    --------
    >>> names()
    ['d', 'd_ab', 'ds', 'nd', 'nd_ab', 'nld_ab', 'nlnd_ab', 'unet']
    """
    return sorted(_BUILDERS)


def build(name: str, **options: Any) -> nn.Module:
    """Build a network by name, e.g. from a config file.

    Parameters
    ----------
    name : str
        One of :func:`names` (case-insensitive; ``"D_64_192"``-style names
        are not parsed, give ``a`` and ``b`` as options).
    **options
        Keyword arguments of the constructor; ``a`` and ``b`` for the
        ``*_ab`` networks. ``model.config`` holds the same dictionary, so
        ``build(**model.config)`` rebuilds the architecture.

    Returns
    -------
    torch.nn.Module

    Examples
    --------
    >>> net = build("d_ab", a=4, b=12, in_channels=1, input_size=8, seed=0)
    >>> net.config["name"], net.r_min_bound
    ('d_ab', 12)
    >>> build(**net.config).config == net.config
    True
    """
    key = str(name).lower()
    if key not in _BUILDERS:
        raise ValueError(f"name must be one of {names()}; got {name!r}")
    try:
        return _BUILDERS[key](**options)
    except TypeError as exc:
        raise TypeError(f"invalid options for network {key!r}: {exc}") from None
