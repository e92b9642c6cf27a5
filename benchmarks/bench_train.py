"""Overhead of ``analysis.train`` over a plain hand-written torch loop.

Workload: D_{64,192} on one 3x32x32 image, float32, full batch, Adam at lr
1e-4, on CPU with a fixed number of torch threads (2 by default). The two
loops run in alternating rounds from the same weights so that machine load
hits both alike; each round's time includes everything the call does
(validation, optimizer construction, the final loss evaluation), divided by
the iterations; the best round is reported. Target: the trainer at most 5%
slower than the plain loop.

Run: ``python benchmarks/bench_train.py [--iters 20] [--rounds 15] [--threads 2]``
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


def bookkeeping(threads: int = 1, iters: int = 300, rounds: int = 5) -> str:
    """Absolute cost per iteration of the trainer's bookkeeping.

    On the tiny DS network one step is almost all Python and dispatch
    overhead, so the difference between the two loops is the trainer's own
    per-iteration cost (loss.item, history, stopping checks, progress), in
    microseconds, independent of the size of the network. One thread: the
    tiny network gains nothing from more.
    """
    image = data.basis_2x2([0])
    x = torch.as_tensor(image)
    initial = models.ds(seed=0).state_dict()

    def fresh():
        net = models.ds()
        net.load_state_dict(initial)
        return net

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        plain, quiet = [], []
        for _ in range(rounds):
            net = fresh()
            t0 = time.perf_counter()
            plain_loop(net, x, iters, 1e-3)
            plain.append((time.perf_counter() - t0) / iters)
            net = fresh()
            t0 = time.perf_counter()
            train(
                net, image, lr=1e-3, max_iter=iters, tol=0, device="cpu", progress=False
            )
            quiet.append((time.perf_counter() - t0) / iters)
    finally:
        torch.set_num_threads(previous)
    p, q = min(plain) * 1e6, min(quiet) * 1e6
    return (
        f"DS, {iters} iterations, best of {rounds}: plain {p:.0f} us/iter, "
        f"analysis.train {q:.0f} us/iter: bookkeeping {q - p:.0f} us/iter"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=20, help="iterations per round")
    parser.add_argument("--rounds", type=int, default=15, help="rounds per loop")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument(
        "--bookkeeping",
        action="store_true",
        help="also time the per-iteration cost of the trainer on DS, where the "
        "network's own work is negligible",
    )
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
            t0, c0 = time.perf_counter(), time.process_time()
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
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            return wall / args.iters, cpu / args.iters

        def run_plain():
            net = fresh()
            t0, c0 = time.perf_counter(), time.process_time()
            plain_loop(net, x, args.iters, 1e-4)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            return wall / args.iters, cpu / args.iters

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

    # The minimum over rounds is the time on the quietest stretch of a shared
    # machine (as timeit reports); medians are printed for reference.
    def med(runs, k):
        return min(r[k] for r in runs) * 1e3

    def median(runs):
        return statistics.median(r[0] for r in runs) * 1e3

    print(
        f"D_64,192, one 3x32x32 image, float32, {args.threads} threads, "
        f"{args.iters} iterations x {args.rounds} rounds; best round "
        "(wall clock; CPU time of the process in brackets; median wall clock "
        "after)"
    )
    p, pc = med(plain, 0), med(plain, 1)
    for label, runs in (
        ("plain torch loop            ", plain),
        ("analysis.train, progress off", quiet),
        ("analysis.train, progress bar", bar),
    ):
        w, c = med(runs, 0), med(runs, 1)
        print(
            f"{label}: {w:7.2f} ms/iter  ratio {w / p:.3f}   "
            f"[cpu {c:7.2f} ms/iter  ratio {c / pc:.3f}]   "
            f"median {median(runs):7.2f} ms/iter"
        )
    print(f"per-round wall ms/iter, plain: {[round(r[0] * 1e3, 2) for r in plain]}")
    print(f"per-round wall ms/iter, train: {[round(r[0] * 1e3, 2) for r in quiet]}")
    print("target: ratio <= 1.05")
    if args.bookkeeping:
        print(bookkeeping())


if __name__ == "__main__":
    main()
