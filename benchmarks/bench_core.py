"""Benchmark of the opextract core: layer builders and a whole network.

Run from the repository root::

    .venv/bin/python benchmarks/bench_core.py            # everything (~3 min)
    .venv/bin/python benchmarks/bench_core.py --no-conv --no-cold   # network only

Every row is measured in this process, so ratios compare like with like.
Conv layers are 3x3 with padding 1; the builder is ``opextract.conv_matrix``
(Numba), against a vectorized NumPy COO construction, a naive Python loop
(run on a slice of the output channels and extrapolated when the whole loop
would be slow, marked ``~``), the dense Jacobian from forwarding the identity
basis (small inputs only) and the floor: allocating and filling fresh arrays
of the CSR's byte size. The network row compares ``to_sparse`` on D_{64,192}
with forwarding the identity basis through the model in float64.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from functools import partial

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

import opextract

CONV_CASES = [(3, 64, 32, 2), (64, 64, 16, 2), (64, 192, 8, 2), (192, 64, 32, 1),
              (128, 128, 32, 1)]  # fmt: skip


def best_of(fn, repeats):
    best, result = np.inf, None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
        if best > 5:
            break
    return best, result


def numpy_coo(weight, in_shape, stride, padding):
    """Vectorized COO construction, then conversion to CSR (the usual way)."""
    cout, cin, k, _ = weight.shape
    _, h, w = in_shape
    oh = (h + 2 * padding - k) // stride + 1
    ow = (w + 2 * padding - k) // stride + 1
    co, ci, y, x, ky, kx = np.meshgrid(
        np.arange(cout), np.arange(cin), np.arange(oh), np.arange(ow),
        np.arange(k), np.arange(k), indexing="ij", sparse=True,
    )  # fmt: skip
    iy = y * stride - padding + ky
    ix = x * stride - padding + kx
    valid = (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)
    valid = np.broadcast_to(valid, (cout, cin, oh, ow, k, k))
    rows = np.broadcast_to((co * oh + y) * ow + x, valid.shape)[valid]
    cols = np.broadcast_to((ci * h + iy) * w + ix, valid.shape)[valid]
    vals = np.broadcast_to(weight[:, :, None, None], valid.shape)[valid]
    shape = (cout * oh * ow, cin * h * w)
    return sp.coo_array((vals, (rows, cols)), shape=shape).tocsr()


def python_loop(weight, in_shape, stride, padding, channels):
    """Naive loops over the first ``channels`` output channels (dict of keys)."""
    cout, cin, k, _ = weight.shape
    _, h, w = in_shape
    oh = (h + 2 * padding - k) // stride + 1
    ow = (w + 2 * padding - k) // stride + 1
    entries = {}
    for co in range(channels):
        for y in range(oh):
            for x in range(ow):
                row = (co * oh + y) * ow + x
                for ci in range(cin):
                    for ky in range(k):
                        iy = y * stride - padding + ky
                        if not 0 <= iy < h:
                            continue
                        for kx in range(k):
                            ix = x * stride - padding + kx
                            if 0 <= ix < w:
                                entries[row, (ci * h + iy) * w + ix] = weight[
                                    co, ci, ky, kx
                                ]
    return entries


def identity_forward(model, in_shape, batch=512):
    """Dense matrix by forwarding the identity basis in float64."""
    n = int(np.prod(in_shape))
    model = model.double()
    cols = []
    with torch.no_grad():
        for start in range(0, n, batch):
            stop = min(n, start + batch)
            basis = torch.zeros((stop - start, n), dtype=torch.float64)
            basis[torch.arange(stop - start), torch.arange(start, stop)] = 1
            cols.append(model(basis.reshape(-1, *in_shape)).reshape(stop - start, -1))
    return torch.cat(cols).T.numpy()


def floor(matrix):
    """Allocate and fill fresh arrays of the CSR's dtypes and sizes."""
    data = np.empty(matrix.nnz, dtype=matrix.data.dtype)
    data.fill(1)
    indices = np.empty(matrix.nnz, dtype=matrix.indices.dtype)
    indices.fill(1)
    indptr = np.empty(len(matrix.indptr), dtype=matrix.indptr.dtype)
    indptr.fill(1)
    return data, indices, indptr


def cold_compile_seconds():
    """First call in a fresh interpreter with an empty Numba cache."""
    code = (
        "import time, numpy as np, torch; t = time.perf_counter();"
        "import opextract; from torch import nn;"
        "m = nn.Sequential(nn.Conv2d(1, 2, 3, 2, 1, bias=False),"
        " nn.Upsample(scale_factor=2), nn.Conv2d(2, 1, 3, 1, 1, bias=False));"
        "opextract.to_sparse(m, (1, 8, 8)); print(time.perf_counter() - t)"
    )
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True,
            check=True,
        )  # fmt: skip
    return float(out.stdout.strip().splitlines()[-1])


def conv_table(repeats):
    rng = np.random.default_rng(0)
    print(
        f"{'conv (c_in,c_out,s,stride)':28} {'nnz':>11} {'numba s':>8} {'floor s':>8} "
        f"{'xfloor':>6} {'coo s':>7} {'coo/nb':>7} {'loop s':>9} {'identity s':>10}"
    )
    for cin, cout, s, stride in CONV_CASES:
        weight = rng.standard_normal((cout, cin, 3, 3))
        shape = (cin, s, s)
        build = partial(opextract.conv_matrix, weight, shape, stride=stride, padding=1)
        t_nb, (A, _) = best_of(build, repeats)
        t_floor, _ = best_of(partial(floor, A), repeats)
        t_coo, B = best_of(partial(numpy_coo, weight, shape, stride, 1), 1)
        B.sort_indices()
        assert np.array_equal(A.indptr, B.indptr)
        assert np.array_equal(A.indices, B.indices) and np.array_equal(A.data, B.data)
        del B
        # The naive loop: whole for small cases, else a slice, extrapolated.
        channels = cout if A.nnz <= 2_000_000 else max(1, cout * 1_000_000 // A.nnz)
        loop_fn = partial(python_loop, weight, shape, stride, 1, channels)
        t_loop, _ = best_of(loop_fn, 1)
        loop = f"{t_loop * cout / channels:8.1f}" + ("~" if channels < cout else " ")
        if cin * s * s <= 16384:
            conv = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            conv.weight.data = torch.as_tensor(weight)
            t_id, dense = best_of(partial(identity_forward, conv, shape), 1)
            assert np.abs(dense - A.toarray()).max() < 1e-12
            ident = f"{t_id:10.2f}"
        else:
            ident = f"{'-':>10}"
        print(
            f"{str((cin, cout, s, stride)):28} {A.nnz:11d} {t_nb:8.3f} {t_floor:8.3f} "
            f"{t_nb / t_floor:6.2f} {t_coo:7.2f} {t_coo / t_nb:7.1f} {loop} {ident}",
            flush=True,
        )
        del A


def d_ab(a=64, b=192):
    def c(i, o, s=1):
        return nn.Conv2d(i, o, 3, s, 1, bias=False)

    torch.manual_seed(0)
    return nn.Sequential(
        c(3, a, 2), c(a, a, 2), c(a, b, 2), nn.Upsample(scale_factor=8),
        c(b, a), c(a, a), c(a, 3),
    )  # fmt: skip


def network_table(baseline):
    model = d_ab()
    shape = (3, 32, 32)
    t_first, _ = best_of(lambda: opextract.to_sparse(model, shape), 1)
    t_sparse, A = best_of(lambda: opextract.to_sparse(model, shape), 2)
    t_factors, _ = best_of(lambda: opextract.factors(model, shape), 1)
    print(f"\nnetwork D_64,192 on 3x32x32: operator {A.shape}, nnz {A.nnz}")
    print(f"  to_sparse (best of 2)            {t_sparse:8.2f} s")
    print(f"  to_sparse, first call            {t_first:8.2f} s")
    print(f"  factors alone (for reference)    {t_factors:8.2f} s")
    if baseline:
        t_id, dense = best_of(lambda: identity_forward(model, shape), 1)
        diff = np.abs(dense - A.toarray()).max()
        print(f"  identity-basis forward, float64  {t_id:8.2f} s")
        print(f"  speed-up                         {t_id / t_sparse:8.1f} x")
        print(f"  largest |difference|             {diff:8.2e}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-network", action="store_true")
    parser.add_argument("--no-conv", action="store_true", help="skip the layer table")
    parser.add_argument(
        "--no-baseline", action="store_true", help="skip the identity-basis forward"
    )
    parser.add_argument(
        "--no-cold", action="store_true", help="skip the cold-cache compile time"
    )
    args = parser.parse_args()

    print(
        f"opextract {opextract.__version__}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch threads, load {os.getloadavg()[0]:.1f}"
    )
    start = time.perf_counter()
    opextract.conv_matrix(np.ones((1, 1, 3, 3)), (1, 4, 4), padding=1)
    first = time.perf_counter() - start
    print(f"first conv_matrix call in this process: {first:.2f} s (cache load)")
    if not args.no_cold:
        print(f"first to_sparse call, fresh interpreter, empty Numba cache: "
              f"{cold_compile_seconds():.1f} s (import and compile)")  # fmt: skip
    print()
    if not args.no_conv:
        conv_table(args.repeats)
    if not args.no_network:
        network_table(not args.no_baseline)


if __name__ == "__main__":
    main()
