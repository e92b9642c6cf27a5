"""The ``opx`` command: train, export, analyse, sweep, render and the demo.

Every subcommand has ``--help``. Options of ``[model]``, ``[data]``,
``[train]``, ``[analysis]`` and ``[output]`` (see :mod:`analysis.config`) are
flags too: ``train.max_iter`` is ``--train-max-iter``; flags override the
config file, which overrides the defaults.

Exit status: 0 on success; 2 for bad usage (an unknown flag, a flag value
that does not validate); 1 for errors at run time (a missing file, a config
file that does not validate, a CUDA device asked for but absent, a failure
while computing), each reported in one line on stderr, without a traceback
unless ``--debug`` is given; 130 when interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from analysis.config import (
    ConfigError,
    add_config_flags,
    config_from_flags,
    load_config,
    save_config,
)

__all__ = ["build_parser", "main"]

logger = logging.getLogger("analysis.cli")

_TRAIN_SECTIONS = ["model", "data", "train", "analysis", "output"]


class UsageError(Exception):
    """Bad command-line usage: exit status 2."""


def _version() -> str:
    from opextract import __version__

    return __version__


# -- parser ---------------------------------------------------------------------


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=34)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``opx`` with all subcommands.

    Examples
    --------
    >>> args = build_parser().parse_args(["demo", "--quick"])
    >>> args.command, args.quick, args.out
    ('demo', True, 'opx-demo')
    """
    parser = argparse.ArgumentParser(
        prog="opx",
        description=(
            "Exact sparse operators of convolutional autoencoders and the "
            "analysis of memorization.\n\nRun 'opx demo' for the study end to "
            "end, 'opx COMMAND --help' for one command."
        ),
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"opx {_version()}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="log progress (-vv: debug)"
    )
    parser.add_argument(
        "--debug", action="store_true", help="show tracebacks of errors"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def command(name: str, help: str, description: str) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name, help=help, description=description, formatter_class=_Formatter
        )
        p.set_defaults(func=globals()[f"cmd_{name}"])
        return p

    # train
    p = command(
        "train",
        "train a network from a config file or flags",
        "Train a network, export its operator and analyse it.\n\n"
        "Writes into the output folder: model.pt (weights), result.h5 "
        "(operator, report, provenance), config.toml (the effective config), "
        "history.json, report.json with figures and report.md/report.html.",
    )
    p.add_argument("config", nargs="?", help="TOML config file (or a bundled name)")
    p.add_argument("-o", "--out", help="output folder (default: output.dir/<name>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_config_flags(p, _TRAIN_SECTIONS)

    # export
    p = command(
        "export",
        "export a saved model's operator to HDF5",
        "Build the exact sparse operator of a saved model (model.pt or the "
        "folder of 'opx train') and write it to an HDF5 file.",
    )
    p.add_argument("model", help="model.pt or a folder written by 'opx train'")
    p.add_argument("-o", "--out", help="HDF5 file (default: operator.h5 beside it)")
    p.add_argument("--layout", choices=("compact", "padded"), default="compact")
    p.add_argument("--dtype", choices=("float64", "float32"), default="float64")

    # spectrum
    p = command(
        "spectrum",
        "eigenvalues of a saved model or operator",
        "Top-k eigenvalues (by modulus) of a saved model's operator or of an "
        "operator HDF5 file; prints them and optionally saves and plots them.",
    )
    p.add_argument("source", help="model.pt, a train folder, or an operator .h5")
    p.add_argument("-k", type=int, default=16, help="number of eigenvalues (16)")
    p.add_argument("--which", default="LM", choices=("LM", "LR", "SM"))
    p.add_argument("--method", default="auto", help="eigensolver (default auto)")
    p.add_argument("--layout", choices=("compact", "padded"), default="compact")
    p.add_argument("-o", "--out", help="HDF5 file for the spectrum")
    p.add_argument("--plot", help="PNG file for the plot of eigenvalue moduli")

    # report
    p = command(
        "report",
        "memorization report of a saved model",
        "The analysis report of a saved model on its training images: dim span "
        "X, r_min, ranks, eigenvalues near 1, alignment and the verdict. The "
        "training images are rebuilt from the model's saved [data] config "
        "unless a config or --data-* flags say otherwise.",
    )
    p.add_argument("model", help="model.pt or a folder written by 'opx train'")
    p.add_argument("--config", help="TOML config whose [data] and [analysis] to use")
    p.add_argument("-o", "--out", help="folder for report.json, figures, report.md")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    add_config_flags(p, ["data", "analysis"])

    # ablate
    p = command(
        "ablate",
        "SVD ablation table of a saved model",
        "Reconstruct the training images with the operator truncated to its "
        "top-k singular components, for each k and for all components (the "
        "literature's Table 1).",
    )
    p.add_argument("model", help="model.pt or a folder written by 'opx train'")
    p.add_argument(
        "--ks", required=True, help="comma-separated truncation ranks, e.g. 1,2,8,64"
    )
    p.add_argument("--config", help="TOML config whose [data] to use")
    p.add_argument("-o", "--out", help="JSON file for the table")
    add_config_flags(p, ["data"])

    # sweep
    p = command(
        "sweep",
        "run a grid of trainings on Dask",
        "Run every grid point of a sweep config (train, export, analyse) on a "
        "Dask cluster and collect results.csv, results.h5 and rank_vs_span.png "
        "in the output folder. Re-running into the same folder skips finished "
        "jobs.",
    )
    p.add_argument("config", nargs="?", help="sweep TOML config (with a [grid] table)")
    p.add_argument("-o", "--out", help="sweep folder (default: output.dir/<name>)")
    p.add_argument("--scheduler", help="address of a running Dask scheduler")
    p.add_argument("--workers", type=int, help="local worker processes (default 2)")
    p.add_argument("--retry-failed", action="store_true", help="rerun failed jobs")
    p.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2,...",
        help="a grid axis, e.g. data.dim=1,2,3 (repeatable; replaces that "
        "key of the config's [grid])",
    )
    p.add_argument(
        "--job", help="job function module:function (default: the DS/D pipeline)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_config_flags(p, [*_TRAIN_SECTIONS, "sweep"])

    # render
    p = command(
        "render",
        "render a report folder to HTML or Markdown",
        "Turn a report folder (report.json and its PNG figures, as written by "
        "'opx train', 'opx report' and 'opx demo') into report.md and/or a "
        "self-contained report.html (figures embedded).",
    )
    p.add_argument("folder", help="folder holding report.json")
    p.add_argument("--format", choices=("html", "md", "both"), default="both")

    # demo
    p = command(
        "demo",
        "the study end to end on embedded data",
        "DS with identity initialization is the identity; DS from the default "
        "initialization learns rank = dim span X on the 2x2 sets; a "
        "downsampling and a non-downsampling network trained on one 32x32 "
        "image compared on noise, white squares and held-out images. Prints a "
        "summary and writes a report folder.",
    )
    p.add_argument("-o", "--out", default="opx-demo", help="report folder (opx-demo)")
    p.add_argument("--quick", action="store_true", help="tiny version, for tests")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--seeds", type=int, help="DS seeds per training set (3)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


# -- helpers ----------------------------------------------------------------------


def _effective_config(args: argparse.Namespace, *, allow_grid: bool = False) -> dict:
    path = getattr(args, "config", None)
    base = load_config(path, allow_grid=allow_grid)  # errors here: exit 1
    try:
        return config_from_flags(args, base=base)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None


def _out_dir(args: argparse.Namespace, cfg: dict, default_name: str) -> Path:
    if getattr(args, "out", None):
        return Path(args.out)
    return Path(cfg["output"]["dir"]) / cfg.get("name", default_name)


def _print(text: str = "") -> None:
    print(text, flush=True)


# -- commands ---------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> int:
    from analysis import _pipeline as pipe
    from analysis import _report

    cfg = _effective_config(args)
    if args.no_progress:
        cfg["train"]["progress"] = False
    pipe.resolve_device(cfg["train"]["device"])
    out = _out_dir(args, cfg, cfg["model"]["name"])
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.toml")

    model, images, history, seconds = pipe.train_from_config(cfg)
    pipe.save_model(out / "model.pt", model, cfg)
    history_dict = history.to_dict() if hasattr(history, "to_dict") else {}
    from analysis._runfiles import write_json

    write_json(out / "history.json", history_dict)
    _print(
        f"trained {cfg['model']['name']} on {images.shape[0]} image(s): "
        f"{getattr(history, 'iterations', '?')} iterations in {seconds:.1f} s, "
        f"final loss {history.losses[-1]:.3g} ({history.stop_reason})"
    )
    report = _report.analyse_and_write(
        out, model, images, cfg, history=history, title=f"opx train: {out.name}"
    )
    _print(str(report))
    _print(f"results in {out}/")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import numpy as np

    import opextract
    from analysis import _pipeline as pipe

    model, _ = pipe.load_model(args.model)
    from analysis import io as aio

    model = model.double()
    dtype = np.dtype(args.dtype)
    A = opextract.to_sparse(
        model, tuple(model.input_shape), layout=args.layout, dtype=dtype
    )
    src = Path(args.model)
    out = (
        Path(args.out)
        if args.out
        else (src if src.is_dir() else src.parent) / "operator.h5"
    )
    aio.save_operator(
        out, A, input_shape=tuple(model.input_shape), layout=args.layout,
        model=json.dumps(dict(model.config)),
    )  # fmt: skip
    _print(
        f"operator {A.shape[0]} x {A.shape[1]} ({A.nnz} nonzeros, layout "
        f"{args.layout}) written to {out}"
    )
    return 0


def _operator_from(source: str, layout: str):
    """A model file/folder or an operator HDF5 file -> (operator, input_shape)."""
    import opextract
    from analysis import _pipeline as pipe

    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"file {source!r} does not exist")
    if path.suffix in (".h5", ".hdf5"):
        from analysis import io as aio

        loaded = aio.load_operator(path)
        if isinstance(loaded, tuple):
            A, attrs = loaded[0], (loaded[1] if len(loaded) > 1 else {})
        else:
            A, attrs = loaded, getattr(loaded, "attrs", {})
        shape = attrs.get("input_shape") if isinstance(attrs, dict) else None
        return A, (tuple(int(s) for s in shape) if shape is not None else None)
    model, _ = pipe.load_model(path)
    model = model.double()
    shape = tuple(model.input_shape)
    return opextract.to_sparse(model, shape, layout=layout), shape


def cmd_spectrum(args: argparse.Namespace) -> int:
    import numpy as np

    if args.k < 1:
        raise UsageError(f"-k must be >= 1; got {args.k}")
    A, _ = _operator_from(args.source, args.layout)
    import analysis

    k = min(args.k, A.shape[0])
    w, v = analysis.eigs(A, k, which=args.which, method=args.method)
    _print(f"top {len(w)} eigenvalues of a {A.shape[0]} x {A.shape[1]} operator")
    _print(f"{'#':>4}  {'|lambda|':>10}  {'real':>11}  {'imag':>11}")
    for i, lam in enumerate(w):
        _print(f"{i:>4}  {abs(lam):>10.6f}  {lam.real:>11.6f}  {lam.imag:>11.6f}")
    if args.out:
        from analysis import io as aio

        aio.save_spectrum(args.out, w, v)
        _print(f"spectrum written to {args.out}")
    if args.plot:
        from analysis import plots

        fig = plots.plot_eigenvalue_moduli(np.asarray(w))
        fig.savefig(args.plot, dpi=100)
        _print(f"plot written to {args.plot}")
    return 0


def _model_and_images(args: argparse.Namespace, sections: Sequence[str]):
    from analysis import _pipeline as pipe

    model, saved = pipe.load_model(args.model)
    if args.config:
        base = load_config(args.config)
    elif saved:
        base = load_config(overrides={})
        for section in sections:
            if section in saved:
                base[section] = {**base[section], **saved[section]}
    else:
        base = load_config()
    try:
        cfg = config_from_flags(args, base=base)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    images = pipe.load_images(cfg["data"])
    pipe.check_fits(model, images)
    return model.double(), images, cfg


def cmd_report(args: argparse.Namespace) -> int:
    from analysis import _report

    model, images, cfg = _model_and_images(args, ["data", "analysis"])
    src = Path(args.model)
    out = Path(args.out) if args.out else (src if src.is_dir() else src.parent)
    report = _report.analyse_and_write(
        out, model, images, cfg, title=f"opx report: {src}"
    )
    # Beside the result, without replacing the training run's config.toml.
    save_config(cfg, out / "report-config.toml")
    if args.json:
        _print(json.dumps(report.to_dict(), indent=1, default=str))
    else:
        _print(str(report))
        _print(f"report in {out}/")
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    try:
        ks = [int(k) for k in args.ks.split(",") if k.strip()]
    except ValueError:
        raise UsageError(
            f"--ks must be comma-separated integers; got {args.ks!r}"
        ) from None
    if not ks or min(ks) < 1:
        raise UsageError(f"--ks must list integers >= 1; got {args.ks!r}")
    import opextract
    from analysis import svd_ablation

    model, images, _ = _model_and_images(args, ["data"])
    A = opextract.to_sparse(model, tuple(model.input_shape))
    result = svd_ablation(A, images, ks)
    _print(str(result))
    if args.out:
        from analysis._runfiles import write_json

        d = result.to_dict() if hasattr(result, "to_dict") else vars(result)
        write_json(args.out, d)
        _print(f"table written to {args.out}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from analysis.config import parse_grid_flags
    from analysis.sweep import run_sweep

    cfg = _effective_config(args, allow_grid=True)
    try:
        cfg.setdefault("grid", {}).update(parse_grid_flags(args.grid))
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    if not cfg.get("grid"):
        raise ConfigError(
            "grid", "must be a table of dotted keys to lists", None, args.config
        )
    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers must be >= 1; got {args.workers}")
    name = cfg.get("name") or cfg["sweep"]["name"]
    out = _out_dir(args, cfg, name)
    result = run_sweep(
        cfg,
        out,
        scheduler=args.scheduler,
        n_workers=args.workers,
        job=args.job,
        retry_failed=True if args.retry_failed else None,
        progress=not args.no_progress,
    )
    n = len(result.records)
    _print(
        f"sweep {name}: {n} jobs ({result.n_run} run now, "
        f"{result.n_skipped} done before), {result.n_failed} failed"
    )
    for r in result.records:
        if r["status"] == "failed":
            _print(f"  failed {r['job_id']} {r['grid']}: {r['error']}")
    _print(f"results: {result.table_csv}, {result.table_h5}")
    if result.plot:
        _print(f"plot: {result.plot}")
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    from analysis import _report

    written = _report.render(args.folder, fmt=args.format)
    for p in written:
        _print(f"wrote {p}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from analysis import demo

    if args.seeds is not None and args.seeds < 1:
        raise UsageError(f"--seeds must be >= 1; got {args.seeds}")
    try:
        load_config(overrides={"train.device": args.device})
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    demo.run_demo(
        args.out,
        quick=args.quick,
        device=args.device,
        seeds=args.seeds,
        progress=not args.no_progress,
    )
    return 0


# -- entry point ------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``opx`` with the given arguments; return the exit status.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments without the program name; ``sys.argv[1:]`` when None.

    Returns
    -------
    int
        0 on success, 1 for errors at run time, 2 for bad usage, 130 when
        interrupted.

    Examples
    --------
    >>> main(["render", "no-such-folder"])
    1
    """
    parser = build_parser()
    args = parser.parse_args(argv)  # exits with status 2 on bad usage
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    if args.verbose:
        logging.basicConfig(level=level, format="%(name)s: %(message)s")
    prog = f"opx {args.command}"
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (``opx report --json | head``): not an error of
        # ours; silence the flush at exit and report it the shell's way.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        print(f"{prog}: error: {_one_line(exc)}", file=sys.stderr)
        return 1


def _one_line(exc: BaseException) -> str:
    from analysis._pipeline import DeviceError

    text = " ".join(str(exc).split()) or type(exc).__name__
    # Errors about the user's input carry a complete message; anything else
    # is unexpected, so name its type and say how to see where it came from.
    if isinstance(exc, ConfigError | OSError | DeviceError | ValueError | TypeError):
        return text
    return f"{type(exc).__name__}: {text} (run with --debug for the traceback)"


def _entry() -> None:  # pragma: no cover - console script wrapper
    sys.exit(main())


if __name__ == "__main__":
    sys.exit(main())
