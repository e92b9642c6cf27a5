"""Benchmark of the transposed-convolution and bilinear builders, and of the
local operator of a nonlinear network.

Run from the repository root::

    python benchmarks/bench_layers.py            # all sections
    python benchmarks/bench_layers.py --quick    # small cases only
    python benchmarks/bench_layers.py --local-channels 64
    python benchmarks/bench_layers.py --skip-local   # builders only
    python benchmarks/bench_layers.py --local-only --local-model nld-64-192
    python benchmarks/bench_layers.py --local-only --local-model unet

Every row is measured in this process. ``builder`` is the best of a few runs
after a warm-up (the first call's time, which loads or compiles the Numba
kernels, is printed separately). Baselines:

* ``numpy COO``: the same matrix built by vectorized NumPy index arithmetic
  into COO triplets, converted to CSR by scipy;
* ``identity batch``: the dense matrix obtained by forwarding the identity
  basis through the torch layer in float64. Large cases forward one chunk of
  the basis and scale the time up; those entries are marked ``*``.

The last section compares ``to_sparse(model, input_shape, at=x)`` (best of
three, built from windowed patches) on a D-type network with LeakyReLU after
every convolution but the last with ``torch.func.jacrev`` in float64 on
3x32x32, and with the paths taken when the patches are switched off (the
compressed products where they apply, then the composed factors alone), and
prints the largest differences between the Jacobians.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

import opextract

_CHUNK = 512
_CHUNK_BYTES = 2**28


def _best(fn, repeat: int = 3) -> tuple[float, object]:
    best, out = math.inf, None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def _identity_batch(forward, n_in: int, in_shape, n_out: int) -> tuple[float, bool]:
    """Seconds to forward the identity basis; extrapolated from a chunk if large."""
    # A chunk's output stays below _CHUNK_BYTES so that big cases fit in memory.
    k = max(1, min(n_in, _CHUNK, _CHUNK_BYTES // (8 * n_out)))
    basis = torch.eye(n_in, k, dtype=torch.float64).T.reshape(k, *in_shape)
    t = time.perf_counter()
    with torch.no_grad():
        forward(basis)
    seconds = time.perf_counter() - t
    return seconds * n_in / k, k < n_in


def _fmt(seconds: float, extrapolated: bool = False) -> str:
    return f"{seconds:10.3f}{'*' if extrapolated else ' '}"


# ---------------------------------------------------------------------------
# Transposed convolution


def conv_transpose_coo(weight: np.ndarray, in_shape, stride, padding, output_padding):
    """ConvTranspose2d matrix by vectorized NumPy COO construction (groups=1)."""
    c_in, c_out, kh, kw = weight.shape
    _, h, w = in_shape
    ho = (h - 1) * stride - 2 * padding + kh + output_padding
    wo = (w - 1) * stride - 2 * padding + kw + output_padding
    ci, y, x, co, ky, kx = np.meshgrid(
        np.arange(c_in), np.arange(h), np.arange(w), np.arange(c_out),
        np.arange(kh), np.arange(kw), indexing="ij", sparse=True,
    )  # fmt: skip
    oy = y * stride - padding + ky
    ox = x * stride - padding + kx
    valid = (oy >= 0) & (oy < ho) & (ox >= 0) & (ox < wo)
    shape = np.broadcast_shapes(ci.shape, oy.shape, ox.shape, co.shape)
    valid = np.broadcast_to(valid, shape)
    rows = np.broadcast_to((co * ho + oy) * wo + ox, shape)[valid]
    cols = np.broadcast_to((ci * h + y) * w + x, shape)[valid]
    vals = np.broadcast_to(weight[ci, co, ky, kx], shape)[valid]
    n_out, n_in = c_out * ho * wo, c_in * h * w
    return sp.coo_array((vals, (rows, cols)), shape=(n_out, n_in)).tocsr()


def bench_conv_transpose(quick: bool) -> None:
    cases = [
        (16, 16, 16, 4, 2, 1, 0),
        (64, 64, 16, 4, 2, 1, 0),
        (128, 64, 16, 3, 2, 1, 1),
        (192, 64, 8, 4, 2, 1, 0),
        (64, 3, 32, 3, 1, 1, 0),
    ]
    if quick:
        cases = cases[:1]
    print("ConvTranspose2d (c_in, c_out, s, k, stride, padding, output_padding)")
    header = (
        f"{'case':<28}{'nnz':>12}{'builder s':>11}{'numpy COO':>11}{'x':>7}"
        f"{'identity':>11}{'x':>10}{'max diff':>10}"
    )
    print(header)
    rng = np.random.default_rng(0)
    first = None
    for c_in, c_out, s, k, stride, pad, opad in cases:
        weight = rng.standard_normal((c_in, c_out, k, k))
        in_shape = (c_in, s, s)

        def build(weight=weight, in_shape=in_shape, stride=stride, pad=pad, opad=opad):
            return opextract.conv_transpose_matrix(
                weight, in_shape, stride=stride, padding=pad, output_padding=opad
            )[0]

        if first is None:
            t = time.perf_counter()
            build()
            first = time.perf_counter() - t
        t_ours, A = _best(build)
        t_coo, B = _best(
            lambda w=weight, i=in_shape, s=stride, p=pad, o=opad: conv_transpose_coo(
                w, i, s, p, o
            ),
            repeat=1,
        )
        diff = abs(A - B).max()
        wt = torch.tensor(weight)

        def forward(x, wt=wt, stride=stride, pad=pad, opad=opad):
            return F.conv_transpose2d(x, wt, stride=stride, padding=pad,
                                      output_padding=opad)  # fmt: skip

        t_id, ext = _identity_batch(forward, math.prod(in_shape), in_shape, A.shape[0])
        name = str((c_in, c_out, s, k, stride, pad, opad))
        print(
            f"{name:<28}{A.nnz:>12,}{_fmt(t_ours)}{_fmt(t_coo)}{t_coo / t_ours:>6.1f}x"
            f"{_fmt(t_id, ext)}{t_id / t_ours:>9.0f}x{diff:>10.1e}"
        )
    print(f"first call (kernel load or compile): {first:.3f} s\n")


# ---------------------------------------------------------------------------
# Bilinear interpolation


def bilinear_coo(in_shape, scale: float, align_corners: bool):
    """Bilinear matrix by vectorized NumPy COO construction."""
    c, h, w = in_shape
    ho, wo = math.floor(h * scale), math.floor(w * scale)

    def axis(n_in, n_out):
        o = np.arange(n_out, dtype=np.float64)
        if align_corners:
            src = o * ((n_in - 1) / (n_out - 1) if n_out > 1 else 0.0)
        else:
            src = np.maximum((o + 0.5) / scale - 0.5, 0.0)
        i0 = src.astype(np.int64)
        lam = src - i0
        return i0, np.minimum(i0 + 1, n_in - 1), 1.0 - lam, lam

    y0, y1, wy0, wy1 = axis(h, ho)
    x0, x1, wx0, wx1 = axis(w, wo)
    ch = np.arange(c)[:, None, None]
    oy = np.arange(ho)[None, :, None]
    ox = np.arange(wo)[None, None, :]
    rows, cols, vals = [], [], []
    for yy, wy in ((y0, wy0), (y1, wy1)):
        for xx, wx in ((x0, wx0), (x1, wx1)):
            shape = (c, ho, wo)
            rows.append(np.broadcast_to((ch * ho + oy) * wo + ox, shape).ravel())
            cols.append(
                np.broadcast_to(
                    (ch * h + yy[None, :, None]) * w + xx[None, None, :], shape
                ).ravel()  # fmt: skip
            )
            vals.append(np.broadcast_to(wy[None, :, None] * wx[None, None, :],
                                        shape).ravel())  # fmt: skip
    coo = sp.coo_array(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
        shape=(c * ho * wo, c * h * w),
    )
    return coo.tocsr()


def bench_bilinear(quick: bool) -> None:
    cases = [(64, 16, 2.0, False), (128, 32, 2.0, False), (3, 32, 4.0, True),
             (64, 32, 1.5, False)]  # fmt: skip
    if quick:
        cases = cases[:1]
    print("Bilinear upsampling (channels, size, scale_factor, align_corners)")
    print(
        f"{'case':<28}{'nnz':>12}{'builder s':>11}{'numpy COO':>11}{'x':>7}"
        f"{'identity':>11}{'x':>10}{'max diff':>10}"
    )
    first = None
    for c, s, scale, align in cases:
        in_shape = (c, s, s)

        def build(in_shape=in_shape, scale=scale, align=align):
            return opextract.interpolate_matrix(
                in_shape, scale_factor=scale, mode="bilinear", align_corners=align
            )[0]

        if first is None:
            t = time.perf_counter()
            build()
            first = time.perf_counter() - t
        t_ours, A = _best(build)
        t_coo, B = _best(
            lambda i=in_shape, s=scale, a=align: bilinear_coo(i, s, a), repeat=1
        )
        diff = abs(A - B).max()

        def forward(x, scale=scale, align=align):
            return F.interpolate(x, scale_factor=scale, mode="bilinear",
                                 align_corners=align)  # fmt: skip

        t_id, ext = _identity_batch(forward, math.prod(in_shape), in_shape, A.shape[0])
        name = str((c, s, scale, align))
        print(
            f"{name:<28}{A.nnz:>12,}{_fmt(t_ours)}{_fmt(t_coo)}{t_coo / t_ours:>6.1f}x"
            f"{_fmt(t_id, ext)}{t_id / t_ours:>9.0f}x{diff:>10.1e}"
        )
    print(f"first call (kernel load or compile): {first:.3f} s\n")


# ---------------------------------------------------------------------------
# Local operator of a nonlinear D-type network


def nonlinear_d(channels: int, negative_slope: float = 0.2) -> nn.Sequential:
    """Conv 3->c stride 8, Upsample x8, three Convs c->c, Conv c->3 (3x3, pad 1),
    a LeakyReLU after every convolution but the last, no bias."""
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, channels, 3, stride=8, padding=1, bias=False)]
    layers += [nn.LeakyReLU(negative_slope), nn.Upsample(scale_factor=8)]
    for _ in range(3):
        layers += [nn.Conv2d(channels, channels, 3, padding=1, bias=False)]
        layers += [nn.LeakyReLU(negative_slope)]
    layers += [nn.Conv2d(channels, 3, 3, padding=1, bias=False)]
    return nn.Sequential(*layers).double().eval()


def _other_paths(model, shape, x) -> dict:
    """Seconds and matrix of ``to_sparse(at=x)`` with patches, then compression, off."""
    from opextract import _compose, _patches

    plan, gain = _patches.plan, _compose.COMPRESSION_GAIN
    others = {}
    try:
        _patches.plan = lambda layers: None
        others["  patches off"] = _best(
            lambda: opextract.to_sparse(model, shape, at=x), repeat=1
        )
        _compose.COMPRESSION_GAIN = math.inf
        others["  composed factors only"] = _best(
            lambda: opextract.to_sparse(model, shape, at=x), repeat=1
        )
    finally:
        _patches.plan, _compose.COMPRESSION_GAIN = plan, gain
    return others


def bench_local(channels: int, model_name: str = "d") -> None:
    if model_name == "d":
        model = nonlinear_d(channels)
        title = f"nonlinear D (channels={channels})"
    elif model_name == "unet":
        from analysis.models import unet

        model = unet(3, 32, linear=False, seed=0).double().eval()
        title = "a LeakyReLU U-Net (3 levels, width 32)"
    else:
        from analysis.models import nld_ab

        model = nld_ab(64, 192, seed=0).double().eval()
        title = "NLD_{64,192}"
    shape = (3, 32, 32)
    x = torch.tensor(np.random.default_rng(0).standard_normal((1, *shape)))
    print(f"Local operator of {title} on 3x32x32, float64")
    t = time.perf_counter()
    opextract.to_sparse(model, shape, at=x)
    first = time.perf_counter() - t
    t_ours, J = _best(lambda: opextract.to_sparse(model, shape, at=x), repeat=3)

    # The same matrix by the other paths: with the windowed patches switched
    # off (compressed products where they apply), then with compression off
    # too (the composed factors alone). Not for the U-Net: a graph without
    # patches is composed from the input side, minutes here.
    others = {} if model_name == "unet" else _other_paths(model, shape, x)

    def f(z):
        return model(z[None])[0]

    t = time.perf_counter()
    jac = torch.func.jacrev(f, chunk_size=256)(x[0]).reshape(J.shape).detach()
    t_jac = time.perf_counter() - t
    diff = float(np.abs(J.toarray() - jac.numpy()).max())
    print(f"{'to_sparse(at=x)':<28}{t_ours:9.3f} s   (first call {first:.3f} s)")
    for name, (seconds, other) in others.items():
        print(
            f"{name:<28}{seconds:9.3f} s   max |difference| {abs(J - other).max():.1e}"
        )
    print(f"{'torch.func.jacrev':<28}{t_jac:9.3f} s   speed-up {t_jac / t_ours:.1f}x")
    print(f"nonzeros {J.nnz:,}; max |difference| from jacrev {diff:.1e}\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small cases only")
    parser.add_argument(
        "--local-channels",
        type=int,
        default=32,
        help="filters of the nonlinear D network (D has 128)",
    )
    parser.add_argument(
        "--local-model",
        choices=["d", "nld-64-192", "unet"],
        default="d",
        help="the nonlinear network: D-type with --local-channels, NLD_{64,192} "
        "or a LeakyReLU U-Net",
    )
    parser.add_argument("--skip-local", action="store_true")  # fmt: skip
    parser.add_argument(
        "--local-only", action="store_true", help="only the local operator section"
    )
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    if not args.local_only:
        bench_conv_transpose(args.quick)
        bench_bilinear(args.quick)
    if not args.skip_local:
        bench_local(8 if args.quick else args.local_channels, args.local_model)


if __name__ == "__main__":
    main()
