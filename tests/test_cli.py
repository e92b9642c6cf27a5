"""The ``opx`` command: help, version, exit statuses and one-line errors."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from analysis.cli import build_parser, main

COMMANDS = [
    "train",
    "export",
    "spectrum",
    "report",
    "ablate",
    "sweep",
    "render",
    "demo",
]


def run(argv, capsys):
    """main(argv) -> (status, stdout, stderr); SystemExit from argparse included."""
    try:
        status = main(argv)
    except SystemExit as exc:
        status = exc.code
    out, err = capsys.readouterr()
    return status, out, err


def test_help_at_every_level(capsys):
    status, out, _ = run(["--help"], capsys)
    assert status == 0
    for name in COMMANDS:
        assert name in out
    for name in COMMANDS:
        status, out, _ = run([name, "--help"], capsys)
        assert status == 0, name
        assert out.startswith(f"usage: opx {name}"), name


def test_every_subcommand_is_wired():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert sorted(sub.choices) == sorted(COMMANDS)


def test_version_from_console_script():
    import opextract

    # The script pip installed beside the interpreter (setup.cfg's entry point).
    script = Path(sys.executable).parent / "opx"
    done = subprocess.run(
        [str(script), "--version"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0
    assert done.stdout.strip() == f"opx {opextract.__version__}"


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        ([], "the following arguments are required: COMMAND"),
        (["fly"], "invalid choice: 'fly'"),
        (["train", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (
            ["train", "--train-lr", "fast"],
            r"'train\.lr' must be a number > 0; got 'fast'",
        ),
        (["train", "--model-name", "resnet"], r"'model\.name' must be a string one of"),
        (
            ["train", "--train-device", "gpu"],
            r"'train\.device' must be auto, cpu, cuda",
        ),
        (
            ["ablate", "model.pt", "--ks", "1,x"],
            "--ks must be comma-separated integers",
        ),
        (["demo", "--seeds", "0"], "--seeds must be >= 1; got 0"),
        (["sweep", "x.toml", "--workers", "0"], None),
        (["sweep", "--grid", "data.dim=1,9"], r"'grid\.data\.dim' must be an integer"),
        (["sweep", "--grid", "data.dim"], "flags must look like --grid KEY=V1,V2"),
    ],
    ids=[
        "no-command",
        "bad-command",
        "unknown-flag",
        "bad-flag-value",
        "bad-choice",
        "bad-device",
        "bad-ks",
        "bad-seeds",
        "bad-workers",
        "bad-grid-value",
        "bad-grid-flag",
    ],
)
def test_bad_usage_exits_2(argv, match, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if "--workers" in argv:
        (tmp_path / "x.toml").write_text("[grid]\n'data.dim' = [1]\n")
        match = "--workers must be >= 1; got 0"
    status, out, err = run(argv, capsys)
    assert status == 2
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) <= 3  # argparse adds its usage line
    assert re.search(match, err), err


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["train", "missing.toml"], "config file 'missing.toml' does not exist"),
        (["export", "missing.pt"], "model file 'missing.pt' does not exist"),
        (["spectrum", "missing.h5"], "file 'missing.h5' does not exist"),
        (["report", "missing.pt"], "model file 'missing.pt' does not exist"),
        (["render", "nowhere"], "report folder 'nowhere' does not exist"),
        (["sweep", "missing.toml"], "config file 'missing.toml' does not exist"),
    ],
)
def test_missing_files_exit_1_with_one_line(argv, match, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    status, out, err = run(argv, capsys)
    assert status == 1
    assert err.strip().splitlines() == [f"opx {argv[0]}: error: {match}"]


def test_config_that_does_not_validate(capsys, tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[train]\nlr = -0.5\n")
    status, _, err = run(["train", str(cfg)], capsys)
    assert status == 1
    assert err.strip() == (
        f"opx train: error: config key 'train.lr' must be a number > 0; "
        f"got -0.5 (in {cfg})"
    )
    cfg.write_text("[trian]\nlr = 1\n")
    status, _, err = run(["train", str(cfg)], capsys)
    assert status == 1 and "did you mean 'train'" in err
    cfg.write_text("[train\n")
    status, _, err = run(["train", str(cfg)], capsys)
    assert status == 1 and "must be valid TOML" in err and "Traceback" not in err


def test_sweep_config_without_grid(capsys, tmp_path):
    cfg = tmp_path / "nogrid.toml"
    cfg.write_text("[train]\nmax_iter = 5\n")
    status, _, err = run(["sweep", str(cfg), "--out", str(tmp_path / "s")], capsys)
    assert status == 1
    assert "config key 'grid' must be a table of dotted keys to lists" in err


def test_cuda_asked_for_but_absent(capsys, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "run"
    status, _, err = run(["train", "--train-device", "cuda", "--out", str(out)], capsys)
    assert status == 1
    assert err.strip() == (
        "opx train: error: train.device is 'cuda' but no CUDA device is available "
        "(torch.cuda.is_available() is False); use cpu or auto"
    )
    status, _, err = run(["demo", "--device", "cuda:0", "--out", str(out)], capsys)
    assert status == 1 and "no CUDA device is available" in err


def test_model_file_of_another_kind(capsys, tmp_path):
    bogus = tmp_path / "model.pt"
    bogus.write_bytes(b"not a torch file")
    status, _, err = run(["export", str(bogus)], capsys)
    assert status == 1
    assert "must be a model saved by opx train" in err
    assert len(err.strip().splitlines()) == 1


def test_unexpected_errors_are_one_line_unless_debug(capsys, monkeypatch):
    import analysis.cli as cli

    def boom(args):
        raise RuntimeError("something broke")

    monkeypatch.setattr(cli, "cmd_render", boom)
    status, _, err = run(["render", "x"], capsys)
    assert status == 1
    assert err.strip() == (
        "opx render: error: RuntimeError: something broke "
        "(run with --debug for the traceback)"
    )
    with pytest.raises(RuntimeError, match="something broke"):
        main(["--debug", "render", "x"])


def test_train_then_every_analysis_command(capsys, tmp_path):
    """DS end to end: train, export, spectrum, report, ablate, render."""
    import h5py
    import numpy as np

    from analysis.config import load_config

    run_dir = tmp_path / "ds"
    argv = [
        "train", "ds_default", "--out", str(run_dir), "--no-progress",
        "--train-lr", "0.01", "--train-max-iter", "400",
    ]  # fmt: skip
    status, out, err = run(argv, capsys)
    assert status == 0, err
    assert "Memorization report" in out and "verdict" in out
    for name in ("model.pt", "result.h5", "config.toml", "history.json",
                 "report.json", "report.md", "report.html", "moduli.png"):  # fmt: skip
        assert (run_dir / name).is_file(), name
    saved = load_config(run_dir / "config.toml")
    assert saved["train"]["lr"] == 0.01 and saved["model"]["name"] == "ds"
    assert saved["analysis"]["rtol"] == 0.05  # from the bundled file

    status, out, err = run(["export", str(run_dir), "--layout", "padded"], capsys)
    assert status == 0, err
    assert "operator 16 x 16" in out
    with h5py.File(run_dir / "operator.h5") as f:
        assert f.attrs or list(f)

    status, out, err = run(["spectrum", str(run_dir), "-k", "4"], capsys)
    assert status == 0, err
    moduli = [float(line.split()[1]) for line in out.splitlines()[2:6]]
    assert abs(moduli[0] - 1) < 0.05 and moduli[1] < 0.05  # rank-1 point map
    assert moduli == sorted(moduli, reverse=True)

    status, out, err = run(["report", str(run_dir), "--json"], capsys)
    assert status == 0, err
    report = __import__("json").loads(out)
    assert report["span_dim"] == 1 and report["n_near_one"] == 1
    assert (run_dir / "report-config.toml").is_file()

    status, out, err = run(["ablate", str(run_dir), "--ks", "1,2"], capsys)
    assert status == 0, err
    assert "top 1" in out

    (run_dir / "report.html").unlink()
    status, out, err = run(["render", str(run_dir), "--format", "html"], capsys)
    assert status == 0, err
    assert "data:image/png;base64" in (run_dir / "report.html").read_text()
    assert np.isfinite(report["alignment_max_residual"])
