"""Sweeps on a real Dask LocalCluster of two worker processes.

The jobs of most tests are the stand-ins of ``_sweep_jobs`` (milliseconds each)
so that the tests exercise the engine: one record per job, failures recorded,
resumption after SIGKILL. One test runs the real pipeline on tiny DS jobs.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from analysis.sweep import expand_grid, job_id, load_results, run_sweep

TESTS = Path(__file__).resolve().parent
GRID = {"data.dim": [1, 2, 3], "train.seed": [0, 1]}


@pytest.fixture
def job_env(tmp_path, monkeypatch):
    """Workers import the stand-in jobs from tests/ and log each run."""
    log = tmp_path / "job.log"
    path = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    monkeypatch.setenv("PYTHONPATH", path)
    monkeypatch.setenv("OPX_TEST_JOB_LOG", str(log))
    monkeypatch.syspath_prepend(str(TESTS))
    return log


def _runs(log: Path) -> list[tuple[int, int]]:
    if not log.exists():
        return []
    return [tuple(map(int, line.split()[:2])) for line in log.read_text().splitlines()]


def test_grid_and_ids_are_stable():
    cfg = {"grid": GRID, "train": {"max_iter": 5}}
    from analysis.config import validate_config

    jobs = expand_grid(validate_config(cfg, allow_grid=True))
    assert [p for p, _ in jobs] == [
        {"data.dim": d, "train.seed": s} for d in (1, 2, 3) for s in (0, 1)
    ]
    ids = [job_id(c) for _, c in jobs]
    assert len(set(ids)) == 6
    again = expand_grid(validate_config(cfg, allow_grid=True))
    assert ids == [job_id(c) for _, c in again]


def test_sweep_records_failures_and_skips_finished_jobs(tmp_path, job_env):
    cfg = {"grid": GRID, "sweep": {"n_workers": 2}}
    out = tmp_path / "sweep"
    result = run_sweep(cfg, out, job="_sweep_jobs:fake_job", progress=False)

    assert (result.n_run, result.n_skipped, result.n_failed) == (6, 0, 1)
    rows = load_results(out)
    assert len(rows) == 6 and len({r["job_id"] for r in rows}) == 6
    failed = [r for r in rows if r["status"] == "failed"]
    assert len(failed) == 1
    assert (failed[0]["data.dim"], failed[0]["train.seed"]) == (3, 1)
    assert "planted failure for dim 3, seed 1" in failed[0]["error"]
    record = json.loads((out / "jobs" / f"{failed[0]['job_id']}.json").read_text())
    assert "Traceback" in record["traceback"] and "fake_job" in record["traceback"]
    ok = [r for r in rows if r["status"] == "ok"]
    assert all(r["numerical_rank"] == r["span_dim"] == r["data.dim"] for r in ok)
    csv_rows = load_results(out / "results.csv")
    assert [r["job_id"] for r in csv_rows] == [r["job_id"] for r in rows]
    assert (out / "rank_vs_span.png").stat().st_size > 1000
    assert (out / "sweep.toml").is_file()
    assert sorted(_runs(job_env)) == sorted((d, s) for d in (1, 2, 3) for s in (0, 1))

    # Same sweep again: nothing to run, no cluster needed.
    again = run_sweep(cfg, out, job="_sweep_jobs:fake_job", progress=False)
    assert (again.n_run, again.n_skipped) == (0, 6)
    assert len(_runs(job_env)) == 6

    # Retrying reruns only the failed job (which fails again).
    retry = run_sweep(
        cfg, out, job="_sweep_jobs:fake_job", progress=False, retry_failed=True
    )
    assert (retry.n_run, retry.n_failed) == (1, 1)
    assert _runs(job_env)[6:] == [(3, 1)]
    assert len(load_results(out)) == 6


def test_sigkill_mid_sweep_then_resume_runs_each_job_once(tmp_path, job_env):
    grid = {"data.dim": [1, 2, 3, 4], "train.seed": [0, 1, 2]}
    config = tmp_path / "kill.toml"
    config.write_text(
        "[grid]\n"
        f"'data.dim' = {grid['data.dim']}\n"
        f"'train.seed' = {grid['train.seed']}\n"
        "[sweep]\nn_workers = 2\n"
    )
    out = tmp_path / "sweep"
    jobs = out / "jobs"
    env = dict(os.environ, OPX_TEST_JOB_SLEEP="0.4")
    cmd = [
        sys.executable, "-m", "analysis.cli", "sweep", str(config), "--out", str(out),
        "--job", "_sweep_jobs:fake_job", "--no-progress",
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if jobs.is_dir() and len(list(jobs.glob("*.json"))) >= 3:
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.02)
        else:
            pytest.fail("the sweep finished no job within 90 s")
        children = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    # The workers notice their parent is gone and exit; clean up stragglers.
    _, alive = psutil.wait_procs(children, timeout=15)
    for p in alive:
        p.kill()

    done_before = {p.stem for p in jobs.glob("*.json")}
    assert 3 <= len(done_before) < 12, "kill the sweep in the middle"
    runs_before = len(_runs(job_env))

    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr

    rows = load_results(out)
    ids = [r["job_id"] for r in rows]
    assert len(ids) == 12 and len(set(ids)) == 12
    assert {p.stem for p in jobs.glob("*.json")} == set(ids)
    assert not list(out.rglob(".tmp-*"))
    # Jobs finished before the kill were not run again.
    records = {i: json.loads((jobs / f"{i}.json").read_text()) for i in done_before}
    rerun = _runs(job_env)[runs_before:]
    for rec in records.values():
        point = (rec["grid"]["data.dim"], rec["grid"]["train.seed"])
        assert point not in rerun
    assert sum(r["status"] == "failed" for r in rows) == 1
    assert "1 failed" in resumed.stdout


def test_real_ds_sweep(tmp_path):
    """The bundled tiny sweep: DS trained, exported and analysed on two workers."""
    from analysis.config import bundled_configs

    config = next(p for p in bundled_configs() if p.stem == "ds_tiny_sweep")
    out = tmp_path / "tiny"
    result = run_sweep(config, out, progress=False)
    assert (result.n_run, result.n_failed) == (2, 0), [
        r["error"] for r in result.records
    ]
    rows = load_results(out)
    assert [r["data.dim"] for r in rows] == [1, 2]
    for row in rows:
        assert row["status"] == "ok"
        assert row["span_dim"] == row["data.dim"]
        assert row["n_near_one"] == row["span_dim"]
        assert row["numerical_rank"] == row["predicted_rank"] == row["span_dim"]
        assert row["r_min"] == 4
        assert row["verdict"] == "holds"
        assert row["train_loss"] < 1e-3
        assert row["train_seconds"] > 0 and row["analysis_seconds"] > 0
        run_dir = out / "runs" / row["job_id"]
        assert (run_dir / "result.h5").is_file() and (run_dir / "model.pt").is_file()
    assert result.plot is not None and result.plot.is_file()


def test_existing_scheduler_and_gpu_resource(tmp_path, job_env):
    """GPU jobs ask for a GPU resource; here a cluster whose workers declare one."""
    from dask.distributed import LocalCluster

    cfg = {"grid": {"data.dim": [1, 2]}, "sweep": {"gpu": True}}
    with LocalCluster(
        n_workers=1,
        threads_per_worker=1,
        resources={"GPU": 1},
        dashboard_address=None,
    ) as cluster:
        result = run_sweep(
            cfg,
            tmp_path / "gpu",
            scheduler=cluster.scheduler_address,
            job="_sweep_jobs:device_job",
            progress=False,
            plot=False,
        )
    assert result.n_failed == 0
    assert [r["row"]["device"] for r in result.records] == ["cuda", "cuda"]
