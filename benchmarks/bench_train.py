"""Overhead of ``analysis.train`` over a plain hand-written torch loop.

Workload: D_{64,192} on one 3x32x32 image, float32, full batch, Adam at lr
1e-4, on CPU with a fixed number of torch threads (2 by default). The two
loops run in alternating rounds from the same weights so that machine load
hits both alike; each round's time includes everything the call does
(validation, optimizer construction, the final loss evaluation), divided by
the iterations. Target: the trainer at most 5% slower than the plain loop.

Run: ``python benchmarks/bench_train.py [--iters 100] [--rounds 7] [--threads 2]``
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import time

import torch
import torch.nn.functional as F

from analysis import data, models, train


def plain_loop(model, x, iters, lr):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(iters):
        opt.zero_grad(set_to_none=True)
        loss = F.mse_loss(model(x), x)
        loss.backward()
        opt.step()
    return loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=100, help="iterations per round")
    parser.add_argument("--rounds", type=int, default=7, help="rounds per loop")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        image = data.sample_images(1, size=32, seed=0)
        x = torch.as_tensor(image)
        initial = models.d_ab(64, 192, seed=0).state_dict()

        def fresh():
            net = models.d_ab(64, 192)
            net.load_state_dict(initial)
            return net

        def run_trainer(progress):
            net = fresh()
            sink = io.StringIO()
            t0 = time.perf_counter()
            with contextlib.redirect_stderr(sink):
                train(
                    net,
                    image,
                    lr=1e-4,
                    max_iter=args.iters,
                    tol=0,
                    device="cpu",
                    progress=progress,
                )
            return (time.perf_counter() - t0) / args.iters

        def run_plain():
            net = fresh()
            t0 = time.perf_counter()
            plain_loop(net, x, args.iters, 1e-4)
            return (time.perf_counter() - t0) / args.iters

        # Warm-up: allocator, oneDNN primitive caches, tqdm import.
        plain_loop(fresh(), x, 10, 1e-4)
        train(fresh(), image, max_iter=10, tol=0, device="cpu", progress=False)

        plain, quiet, bar = [], [], []
        for _ in range(args.rounds):
            plain.append(run_plain())
            quiet.append(run_trainer(False))
            bar.append(run_trainer(True))
    finally:
        torch.set_num_threads(previous_threads)

    p = statistics.median(plain) * 1e3
    q = statistics.median(quiet) * 1e3
    b = statistics.median(bar) * 1e3
    print(
        f"D_64,192, one 3x32x32 image, float32, {args.threads} threads, "
        f"{args.iters} iterations x {args.rounds} rounds (medians)"
    )
    print(f"plain torch loop              : {p:7.2f} ms/iter")
    print(f"analysis.train, progress off  : {q:7.2f} ms/iter  ratio {q / p:.3f}")
    print(f"analysis.train, progress bar  : {b:7.2f} ms/iter  ratio {b / p:.3f}")
    print(f"per-round ms/iter, plain: {[round(v * 1e3, 2) for v in plain]}")
    print(f"per-round ms/iter, train: {[round(v * 1e3, 2) for v in quiet]}")
    print("target: ratio <= 1.05")


if __name__ == "__main__":
    main()
