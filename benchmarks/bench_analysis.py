"""Benchmark: the analysis of D_{a,b} on 3 x s x s, by hand and with opextract.

Run from the repository root::

    python benchmarks/bench_analysis.py            # D_{64,192} on 3x32x32
    python benchmarks/bench_analysis.py --skip-dense   # without the slow baseline

Rows, each measured in this process:

* the path a user writes by hand: forward the identity basis through the
  model in float64 (batches of 256), ``numpy.linalg.eig``, dense SVD;
* this toolkit's path: ``opextract.to_sparse``, top-k ``analysis.eigs``, and
  ``analysis.svd_ablation`` at k = 1, 2, 8, 64 (which computes the top-64
  singular triplets);
* the strongest hand-written iterative baseline: ARPACK (``scipy``'s
  ``eigs``/``svds``) driven by the torch forward and its vjp, one vector per
  product, against ``analysis.eigs``/``analysis.svds`` on the same
  LinearOperator (``method="auto"`` picks the block method when a batched
  forward costs less per vector).

The top-10 eigenvalue moduli of every path are compared with LAPACK's.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import scipy.sparse.linalg as spla
import torch

import opextract
from analysis import data, models
from analysis._linalg import as_operator, block_speedup
from analysis.ablation import svd_ablation
from analysis.spectra import choose_method, eigs, svds


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    seconds = time.perf_counter() - t0
    # Progress as it goes: the whole run takes minutes.
    print(f"  {getattr(fn, '__name__', fn)}: {seconds:.2f} s", flush=True)
    return out, seconds


def top_moduli(w, k=10):
    return np.sort(np.abs(np.asarray(w)))[::-1][:k]


def agreement(w, reference):
    a, b = top_moduli(w), top_moduli(reference)
    return float(np.max(np.abs(a - b) / np.abs(b)))


def identity_forward(model, shape, batch=256):
    n = int(np.prod(shape))
    cols = []
    with torch.no_grad():
        for start in range(0, n, batch):
            eye = torch.eye(n, dtype=torch.float64)[start : start + batch]
            cols.append(model(eye.reshape(-1, *shape)).reshape(len(eye), -1).numpy())
    return np.concatenate(cols).T


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--a", type=int, default=64)
    p.add_argument("--b", type=int, default=192)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--images", type=int, default=2, help="training images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-dense", action="store_true", help="skip the user path")
    p.add_argument("--skip-torch", action="store_true", help="skip the torch rows")
    p.add_argument(
        "--torch-method",
        default="auto",
        choices=["auto", "arpack", "block"],
        help="method of analysis.eigs/svds on the torch LinearOperator",
    )
    args = p.parse_args()

    shape = (3, args.size, args.size)
    model = models.d_ab(args.a, args.b, input_size=args.size, seed=args.seed).double()
    model.eval()
    x = data.sample_images(args.images, size=args.size, seed=args.seed)
    ks = sorted({k for k in (1, 2, 8, args.k) if k <= args.k})
    rows = []
    print(
        f"D_{{{args.a},{args.b}}} on {shape}, k={args.k}, torch threads "
        f"{torch.get_num_threads()}"
    )

    # The toolkit's path.
    A, t_sparse = timed(opextract.to_sparse, model, shape)
    (w_tk, _), t_eigs = timed(eigs, A, args.k)
    abl, t_abl = timed(svd_ablation, A, x, ks)
    t_toolkit = t_sparse + t_eigs + t_abl
    rows += [
        ("toolkit: to_sparse", t_sparse),
        (f"toolkit: eigs top-{args.k} ({choose_method(A, args.k)})", t_eigs),
        (f"toolkit: svd_ablation k={ks}", t_abl),
        ("toolkit: total", t_toolkit),
    ]

    w_ref = None
    if not args.skip_dense:
        dense, t_fwd = timed(identity_forward, model, shape)
        w_ref, t_eig = timed(np.linalg.eigvals, dense)
        _, t_svd = timed(np.linalg.svd, dense)
        t_user = t_fwd + t_eig + t_svd
        rows += [
            ("user: identity-basis forward (float64)", t_fwd),
            ("user: numpy.linalg.eig", t_eig),
            ("user: dense SVD", t_svd),
            ("user: total", t_user),
            ("ratio user / toolkit", t_user / t_toolkit),
        ]
        diff = np.abs(A.toarray() - dense).max() if hasattr(A, "toarray") else None
        print(f"max |to_sparse - identity forward| = {diff:.3g}")
    else:
        w_ref = np.linalg.eigvals(A.toarray())

    if not args.skip_torch:
        op = opextract.as_linear_operator(model, shape, backend="torch")
        v0 = np.random.default_rng(0).standard_normal(op.shape[0])
        (w_ar, _), t_ar = timed(spla.eigs, op, k=args.k, v0=v0)
        _, t_ar_svd = timed(spla.svds, op, k=args.k, v0=v0, solver="arpack")
        ratio = block_speedup(as_operator(op), min(args.k, 8), np.random.default_rng(0))
        print(f"measured block speedup per vector: {ratio:.2f}")
        method = args.torch_method
        if method == "auto":
            method = choose_method(op, args.k)
        (w_bk, _), t_bk = timed(eigs, op, args.k, method=method, v0=v0)
        _, t_bk_svd = timed(svds, op, args.k, method=method, v0=v0)
        rows += [
            (f"torch + ARPACK: eigs top-{args.k}", t_ar),
            (f"torch + ARPACK: svds top-{args.k} (vjp)", t_ar_svd),
            (f"torch + analysis.eigs ({method})", t_bk),
            (f"torch + analysis.svds ({method})", t_bk_svd),
            (
                "ratio ARPACK / analysis (eigs + svds)",
                (t_ar + t_ar_svd) / (t_bk + t_bk_svd),
            ),
        ]

    width = max(len(r[0]) for r in rows)
    print(f"{'step':<{width}}  seconds")
    for name, value in rows:
        unit = "x" if name.startswith("ratio") else ""
        print(f"{name:<{width}}  {value:8.2f}{unit}")
    print("top-10 eigenvalue moduli, max relative difference to LAPACK:")
    print(f"  toolkit eigs on to_sparse: {agreement(w_tk, w_ref):.2e}")
    if not args.skip_torch:
        print(f"  ARPACK on torch forward:   {agreement(w_ar, w_ref):.2e}")
        print(f"  analysis.eigs on torch:    {agreement(w_bk, w_ref):.2e}")
    print("SVD ablation (MSE after per-image min-max scaling):")
    print(abl)


if __name__ == "__main__":
    main()
