"""Batch rank-against-span studies: a grid of training runs on a Dask cluster.

A sweep configuration is a training configuration (see :mod:`analysis.config`)
plus a ``[grid]`` table mapping dotted keys to lists of values and a
``[sweep]`` section with runtime options. Every combination of grid values is
a *job*: it trains the network, exports its operator, analyses it and returns
one row of the results table.

Jobs run on Dask: by default a ``LocalCluster`` of worker processes on this
machine, or any running cluster given by its scheduler address (for example
one started by dask-jobqueue on SLURM). When ``sweep.gpu`` is true each job
asks the scheduler for one ``GPU`` resource, so start GPU workers with
``--resources GPU=1``.

Results are loss-free and resumable. Each job is identified by a stable hash
of its effective configuration; its record (the row, or the error and
traceback of a failed job) is written atomically to ``jobs/<id>.json`` when it
finishes. The results table (``results.csv`` and ``results.h5``) is rebuilt
from those records, so a sweep killed at any moment and started again ends
with every job in the table exactly once, and the jobs that had finished are
not run again.
"""

from __future__ import annotations

import csv
import hashlib
import importlib
import io
import itertools
import json
import logging
import math
import os
import socket
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from analysis._runfiles import atomic_path, remove_stale_temporaries, write_json
from analysis.config import (
    ConfigError,
    load_config,
    merge_overrides,
    save_config,
    validate_config,
)

__all__ = [
    "SweepResult",
    "expand_grid",
    "job_id",
    "load_results",
    "plot_rank_vs_span",
    "run_sweep",
]

logger = logging.getLogger(__name__)

JobFunction = Callable[[dict, str], dict]

# Options that change how a job runs but not what it computes: left out of
# the job's identity so that, say, switching progress bars off does not rerun it.
_NOT_IDENTITY = {
    ("train", "progress"),
    ("train", "threads"),
    ("output", "dir"),
    ("output", "figures"),
}

_FIRST_COLUMNS = ["job_id", "status"]
# Result columns in this order when present, the others after them by name.
_PREFERRED = [
    "network", "n_images", "train_loss", "iterations", "stop_reason", "span_dim",
    "r_min", "predicted_rank", "numerical_rank", "numpy_rank", "effective_rank",
    "energy_rank", "n_near_one", "n_near_one_complex", "top_moduli",
    "alignment_max_residual", "alignment_max_angle", "verdict", "reason",
    "train_seconds", "analysis_seconds",
]  # fmt: skip
_LAST_COLUMNS = ["host", "seconds", "error"]


@dataclass
class SweepResult:
    """What :func:`run_sweep` did.

    Attributes
    ----------
    out_dir : pathlib.Path
        Folder of the sweep.
    records : list of dict
        One record per job of the grid, in grid order: ``job_id``, ``status``
        (``"ok"`` or ``"failed"``), ``grid`` (the grid point), ``row`` (the
        job's results), ``error`` and ``traceback`` for failed jobs.
    n_run : int
        Jobs run by this call.
    n_skipped : int
        Jobs found finished from an earlier call and not run again.
    table_csv, table_h5 : pathlib.Path
        The results table.
    plot : pathlib.Path or None
        Rank against span dimension, when the rows have both.
    """

    out_dir: Path
    records: list[dict] = field(default_factory=list)
    n_run: int = 0
    n_skipped: int = 0
    table_csv: Path | None = None
    table_h5: Path | None = None
    plot: Path | None = None

    @property
    def n_failed(self) -> int:
        """Number of jobs whose record says failed."""
        return sum(r["status"] == "failed" for r in self.records)


def expand_grid(config: Mapping[str, Any]) -> list[tuple[dict, dict]]:
    """Return the jobs of a sweep configuration.

    Parameters
    ----------
    config : mapping
        Validated sweep configuration (``validate_config(..., allow_grid=True)``).

    Returns
    -------
    list of (dict, dict)
        ``(grid_point, job_config)`` pairs in row-major order of the grid (the
        last grid key varies fastest). ``grid_point`` maps dotted keys to
        values; ``job_config`` is the training configuration of the job
        (without the ``sweep`` and ``grid`` sections).

    Examples
    --------
    >>> from analysis.config import validate_config
    >>> cfg = validate_config(
    ...     {"grid": {"data.dim": [1, 2], "train.seed": [0, 1]}}, allow_grid=True
    ... )
    >>> [point for point, _ in expand_grid(cfg)][:2]
    [{'data.dim': 1, 'train.seed': 0}, {'data.dim': 1, 'train.seed': 1}]
    """
    grid = dict(config.get("grid", {}))
    base = {k: v for k, v in config.items() if k not in ("grid", "sweep")}
    keys = list(grid)
    jobs = []
    for values in itertools.product(*(grid[k] for k in keys)):
        point = dict(zip(keys, values))
        jobs.append((point, merge_overrides(base, point)))
    return jobs


def job_id(job_config: Mapping[str, Any]) -> str:
    """Stable identifier of a job: a hash of what it computes.

    Parameters
    ----------
    job_config : mapping
        The job's training configuration.

    Returns
    -------
    str
        16 hexadecimal digits of the SHA-256 of the configuration's canonical
        JSON (sorted keys), leaving out names, descriptions and options that do
        not change the result (progress bars, output folders).

    Examples
    --------
    >>> from analysis.config import validate_config
    >>> a = validate_config({"train": {"lr": 0.01}})
    >>> b = validate_config({"train": {"lr": 0.01, "progress": False}})
    >>> job_id(a) == job_id(b), len(job_id(a))
    (True, 16)
    """
    ident = {}
    for section, options in job_config.items():
        if section in ("name", "description", "sweep", "grid", "output"):
            continue
        ident[section] = {
            k: v for k, v in options.items() if (section, k) not in _NOT_IDENTITY
        }
    text = json.dumps(ident, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _resolve_job(job: JobFunction | str | None) -> JobFunction | str:
    if job is None:
        return "analysis._pipeline:run_job"
    if isinstance(job, str):
        module, sep, name = job.partition(":")
        if not sep or not module or not name:
            raise ValueError(f"job must be 'module:function'; got {job!r}")
        return job
    if not callable(job):
        raise TypeError(f"job must be callable or 'module:function'; got {job!r}")
    return job


def _execute(job: JobFunction | str, config: dict, run_dir: str, threads: int) -> dict:
    """Run one job on a worker; never raise (failures become records)."""
    started = time.perf_counter()
    record: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid()}
    try:
        import torch

        torch.set_num_threads(threads)
        config = _place_on_gpu(config)
        if isinstance(job, str):
            module, _, name = job.partition(":")
            job = getattr(importlib.import_module(module), name)
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        row = job(config, run_dir)
        if not isinstance(row, Mapping):
            raise TypeError(f"a job must return a mapping; got {type(row).__name__}")
        record.update(status="ok", row=dict(row), error="", traceback="")
    except Exception as exc:  # a failing job must not stop the others
        record.update(
            status="failed",
            row={},
            error=f"{type(exc).__name__}: {exc}",
            traceback=traceback.format_exc(),
        )
    record["seconds"] = time.perf_counter() - started
    return record


def _place_on_gpu(config: dict) -> dict:
    """Spread plain "cuda" jobs over the GPUs a worker sees, by worker name.

    Workers of a local cluster are named 0, 1, ...; worker i uses GPU
    i mod (number of GPUs). A worker that sees one GPU (CUDA_VISIBLE_DEVICES
    set per worker, as on SLURM) always uses it.
    """
    if config["train"]["device"] != "cuda":
        return config
    import torch

    try:
        from distributed import get_worker

        name = get_worker().name
    except (ImportError, ValueError):
        return config
    n = torch.cuda.device_count()
    if n > 1 and isinstance(name, int):
        config = merge_overrides(config, {"train.device": f"cuda:{name % n}"})
    return config


def _open_client(scheduler: str | None, n_workers: int, gpu: bool):
    from dask.distributed import Client, LocalCluster

    if scheduler:
        try:
            return Client(scheduler, timeout="20s"), None
        except (OSError, TimeoutError) as exc:
            raise ConnectionError(
                f"scheduler must be the address of a running Dask scheduler; "
                f"got {scheduler!r} ({exc})"
            ) from None
    resources = None
    if gpu:
        import torch

        n_gpus = torch.cuda.device_count()
        if n_gpus == 0:
            raise RuntimeError(
                "sweep.gpu is true but this machine has no CUDA device "
                "(torch.cuda.is_available() is False)"
            )
        n_workers = min(n_workers, n_gpus)
        resources = {"GPU": 1}
    cluster = LocalCluster(
        n_workers=n_workers,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        resources=resources,
        silence_logs=logging.ERROR,
    )
    return Client(cluster), cluster


def run_sweep(
    config: Mapping[str, Any] | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    scheduler: str | None = None,
    n_workers: int | None = None,
    job: JobFunction | str | None = None,
    retry_failed: bool | None = None,
    progress: bool = True,
    plot: bool = True,
) -> SweepResult:
    """Run every job of a sweep's grid on Dask and collect the results table.

    Parameters
    ----------
    config : mapping or path-like
        Sweep configuration, or the TOML file holding it.
    out_dir : path-like
        Folder of the sweep; created if needed. Running the same sweep into
        the same folder again skips the jobs already finished there.
    scheduler : str, optional
        Address of a running Dask scheduler (``"tcp://host:8786"``); when None
        (and ``sweep.scheduler`` is unset) a ``LocalCluster`` of worker
        processes is started and closed at the end.
    n_workers : int, optional
        Worker processes of the local cluster; ``sweep.n_workers`` (2) when
        None.
    job : callable or str, optional
        ``job(config, run_dir) -> dict`` run for each grid point, or its name
        ``"module:function"``. Default: train, export and analyse
        (``analysis._pipeline:run_job``). It must be importable on the
        workers.
    retry_failed : bool, optional
        Run jobs again whose earlier record says failed;
        ``sweep.retry_failed`` (False) when None.
    progress : bool, default True
        A tqdm progress bar over jobs.
    plot : bool, default True
        Write ``rank_vs_span.png`` at the end.

    Returns
    -------
    SweepResult

    Raises
    ------
    ConfigError
        If the configuration does not validate or has no grid.
    ConnectionError
        If ``scheduler`` cannot be reached.

    Notes
    -----
    The folder holds ``sweep.toml`` (the effective configuration),
    ``jobs/<id>.json`` (one record per finished job), ``runs/<id>/`` (what
    each job wrote, such as its HDF5 result), ``results.csv``,
    ``results.h5`` and the plot. A job whose worker dies is retried by Dask
    on another worker, and recorded as failed after Dask gives up.

    Examples
    --------
    >>> import tempfile
    >>> cfg = {"grid": {"data.dim": [1, 2]}, "train": {"max_iter": 50}}
    >>> result = run_sweep(cfg, tempfile.mkdtemp(), progress=False)  # doctest: +SKIP
    """
    if isinstance(config, str | os.PathLike):
        cfg = load_config(config, allow_grid=True)
    else:
        cfg = validate_config(config, allow_grid=True)
    if not cfg.get("grid"):
        raise ConfigError("grid", "must be a table of dotted keys to lists", None)
    options = cfg["sweep"]
    scheduler = scheduler or options.get("scheduler")
    n_workers = int(n_workers if n_workers is not None else options["n_workers"])
    if n_workers < 1:
        raise ValueError(f"n_workers must be >= 1; got {n_workers}")
    retry = options["retry_failed"] if retry_failed is None else bool(retry_failed)
    job_ref = _resolve_job(job)

    out = Path(out_dir)
    jobs_dir = out / "jobs"
    jobs_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(jobs_dir)
    remove_stale_temporaries(out)
    save_config(cfg, out / "sweep.toml")

    jobs = expand_grid(cfg)
    ids = [job_id(c) for _, c in jobs]
    if len(set(ids)) != len(ids):
        raise ConfigError(
            "grid", "must not list the same grid point twice", cfg["grid"]
        )
    records = {i: _read_record(jobs_dir / f"{i}.json") for i in ids}
    todo = [
        (i, point, c)
        for i, (point, c) in zip(ids, jobs)
        if records[i] is None or (retry and records[i]["status"] == "failed")
    ]
    result = SweepResult(out_dir=out, n_skipped=len(ids) - len(todo))
    logger.info("sweep: %d jobs, %d to run", len(ids), len(todo))

    if todo:
        _run_jobs(
            todo,
            records,
            jobs_dir,
            out,
            job_ref,
            scheduler,
            n_workers,
            options,
            progress,
            lambda: _write_tables(out, ids, records, cfg),
        )
        result.n_run = len(todo)

    result.records = [records[i] for i in ids if records[i] is not None]
    result.table_csv, result.table_h5 = _write_tables(out, ids, records, cfg)
    if plot:
        result.plot = plot_rank_vs_span(result.records, out / "rank_vs_span.png")
    return result


def _run_jobs(
    todo,
    records,
    jobs_dir,
    out,
    job_ref,
    scheduler,
    n_workers,
    options,
    progress,
    write_tables,
) -> None:
    from dask.distributed import as_completed
    from tqdm.auto import tqdm

    threads = int(options["threads"])
    gpu = bool(options["gpu"])
    client, cluster = _open_client(scheduler, n_workers, gpu)
    try:
        futures = {}
        for i, point, c in todo:
            wants_gpu = gpu or str(c["train"]["device"]).startswith("cuda")
            if gpu and c["train"]["device"] == "auto":
                c = merge_overrides(c, {"train.device": "cuda"})
            c = merge_overrides(c, {"train.progress": False})
            fut = client.submit(
                _execute,
                job_ref,
                c,
                str(out / "runs" / i),
                threads,
                key=f"opx-job-{i}",
                pure=False,
                resources={"GPU": 1} if wants_gpu else None,
            )
            futures[fut] = (i, point)
        last_write = 0.0
        bar = tqdm(total=len(todo), desc="sweep", unit="job", disable=not progress)
        with bar:
            for fut in as_completed(futures):
                i, point = futures[fut]
                try:
                    record = fut.result()
                except Exception as exc:  # worker died repeatedly, or cancelled
                    record = {
                        "status": "failed",
                        "row": {},
                        "error": f"{type(exc).__name__}: {exc}",
                        "traceback": traceback.format_exc(),
                        "host": "",
                        "seconds": math.nan,
                    }
                record.update(job_id=i, grid=point)
                write_json(jobs_dir / f"{i}.json", record)
                records[i] = record
                if record["status"] == "failed":
                    logger.warning("job %s failed: %s", i, record["error"])
                bar.update(1)
                bar.set_postfix(
                    failed=sum(
                        r is not None and r["status"] == "failed"
                        for r in records.values()
                    )
                )
                # Rewriting the table on every job would be quadratic in large
                # sweeps; the job records are the ground truth in between.
                if time.monotonic() - last_write > 5.0:
                    write_tables()
                    last_write = time.monotonic()
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _read_record(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        # Records are written atomically, so a broken one was not written by
        # a sweep; treat its job as not done.
        logger.warning("ignoring unreadable job record %s", path)
        return None
    if not isinstance(record, dict) or record.get("status") not in ("ok", "failed"):
        return None
    return record


def _rows(ids: list[str], records: Mapping[str, dict | None]) -> tuple[list, list]:
    rows = []
    grid_keys: list[str] = []
    result_keys: list[str] = []
    for i in ids:
        r = records.get(i)
        if r is None:
            continue
        for k in r.get("grid", {}):
            if k not in grid_keys:
                grid_keys.append(k)
        for k in r.get("row", {}):
            if k not in result_keys and k not in _FIRST_COLUMNS + _LAST_COLUMNS:
                result_keys.append(k)
        row = {"job_id": i, "status": r["status"], **r.get("grid", {})}
        row.update(r.get("row", {}))
        row.update(
            host=r.get("host", ""), seconds=r.get("seconds"), error=r.get("error", "")
        )
        rows.append(row)
    rank = {k: i for i, k in enumerate(_PREFERRED)}
    result_keys.sort(key=lambda k: (rank.get(k, len(rank)), k))
    columns = _FIRST_COLUMNS + grid_keys + result_keys + _LAST_COLUMNS
    return columns, rows


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, list | tuple | dict):
        return json.dumps(value)
    return value


def _write_tables(out: Path, ids, records, cfg) -> tuple[Path, Path]:
    columns, rows = _rows(ids, records)
    csv_path = out / "results.csv"
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(row.get(k)) for k in columns})
    with atomic_path(csv_path) as tmp:
        tmp.write_text(buf.getvalue(), encoding="utf-8")

    h5_path = out / "results.h5"
    _write_h5(h5_path, columns, rows, cfg)
    return csv_path, h5_path


def _write_h5(path: Path, columns: list[str], rows: list[dict], cfg) -> None:
    import h5py
    import numpy as np
    import tomli_w

    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = "opextract-sweep-results"
            f.attrs["config_toml"] = tomli_w.dumps(_toml_clean(cfg))
            f.attrs["columns"] = json.dumps(columns)
            g = f.create_group("results")
            for col in columns:
                values = [row.get(col) for row in rows]
                numeric = all(
                    isinstance(v, int | float) and not isinstance(v, bool) or v is None
                    for v in values
                ) and any(v is not None for v in values)
                if numeric:
                    data = np.array(
                        [math.nan if v is None else v for v in values], dtype=np.float64
                    )
                    g.create_dataset(col, data=data)
                else:
                    text = [str(_cell(v)) for v in values]
                    g.create_dataset(col, data=text, dtype=h5py.string_dtype())


def _toml_clean(v: Any) -> Any:
    if isinstance(v, Mapping):
        return {str(k): _toml_clean(x) for k, x in v.items() if x is not None}
    if isinstance(v, list | tuple):
        return [_toml_clean(x) for x in v]
    return v


def load_results(path: str | os.PathLike) -> list[dict]:
    """Read a sweep's results table back as a list of rows.

    Parameters
    ----------
    path : path-like
        The sweep folder, its ``results.csv`` or its ``results.h5``.

    Returns
    -------
    list of dict
        One dict per job, column -> value (numbers as float, the rest as
        str; lists and tables as their JSON text).

    Examples
    --------
    >>> load_results("no-such-sweep")
    Traceback (most recent call last):
    ...
    FileNotFoundError: sweep results file 'no-such-sweep' does not exist
    >>> rows = load_results("sweeps/span")  # doctest: +SKIP
    >>> [(r["data.dim"], r["numerical_rank"]) for r in rows]  # doctest: +SKIP
    [(1.0, 1.0), (2.0, 2.0), (3.0, 3.0), (4.0, 4.0)]
    """
    import h5py

    p = Path(path)
    if p.is_dir():
        p = p / "results.h5"
    if not p.is_file():
        raise FileNotFoundError(f"sweep results file {str(p)!r} does not exist")
    if p.suffix == ".csv":
        with open(p, newline="", encoding="utf-8") as fh:
            return list(csv.DictReader(fh))
    try:
        with h5py.File(p, "r") as f:
            if f.attrs.get("format") != "opextract-sweep-results":
                raise ValueError(f"{str(p)!r} is not a sweep results file")
            columns = json.loads(f.attrs["columns"])
            data = {}
            for c in columns:
                arr = f["results"][c][()]
                data[c] = [
                    x.decode() if isinstance(x, bytes) else x.item() for x in arr
                ]
    except OSError as exc:
        raise ValueError(f"{str(p)!r} is not a readable HDF5 file ({exc})") from None
    n = len(next(iter(data.values()), []))
    return [{c: data[c][k] for c in columns} for k in range(n)]


def plot_rank_vs_span(records: list[dict], path: str | os.PathLike) -> Path | None:
    """Scatter the learned rank against dim span X, one colour per network.

    Parameters
    ----------
    records : list of dict
        Job records as in :attr:`SweepResult.records`.
    path : path-like
        PNG file to write.

    Returns
    -------
    pathlib.Path or None
        The PNG written, or None when no row has both numbers.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> rec = {"status": "ok", "row": {"span_dim": 2, "numerical_rank": 2}}
    >>> plot_rank_vs_span([rec], pathlib.Path(tempfile.mkdtemp(), "r.png")).name
    'r.png'
    >>> plot_rank_vs_span([], "unused.png") is None
    True
    """
    pts = []
    for r in records:
        row = r.get("row", {})
        span, rank = row.get("span_dim"), row.get("numerical_rank")
        if r.get("status") == "ok" and span is not None and rank is not None:
            pts.append((row.get("network", "?"), span, rank, row.get("r_min")))
    if not pts:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4), layout="constrained")
    nets = sorted({p[0] for p in pts})
    for net in nets:
        xs = [p[1] for p in pts if p[0] == net]
        ys = [p[2] for p in pts if p[0] == net]
        # Jitter-free offsets would hide repeated seeds; draw them translucent.
        ax.scatter(xs, ys, alpha=0.5, label=net)
    top = max(max(p[1] for p in pts), max(p[2] for p in pts))
    ax.plot([0, top], [0, top], "k--", lw=1, label="rank = dim span X")
    r_mins = sorted({p[3] for p in pts if p[3] is not None})
    for r_min in r_mins:
        if r_min <= top * 1.5:
            ax.axhline(r_min, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("dim span X")
    ax.set_ylabel("numerical rank of the operator")
    ax.set_title("Learned rank against span dimension")
    ax.legend(fontsize="small")
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path
