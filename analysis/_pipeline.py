"""From a validated configuration to a trained, exported and analysed network.

The command line, the sweeps and the demo share these steps: build the
network of ``[model]``, load the images of ``[data]``, train by ``[train]``,
export the operator and analyse it by ``[analysis]``.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from analysis.config import ConfigError

logger = logging.getLogger(__name__)

MODEL_FORMAT = "opextract-model/1"


class DeviceError(RuntimeError):
    """A device was asked for that this machine does not have."""


def resolve_device(name: str):
    """``"auto"`` -> CUDA when available, else CPU; check explicit CUDA requests."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(
                f"train.device is {name!r} but no CUDA device is available "
                "(torch.cuda.is_available() is False); use cpu or auto"
            )
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise DeviceError(
                f"train.device {name!r} must name one of the "
                f"{torch.cuda.device_count()} CUDA devices; got index {index}"
            )
    return torch.device(name)


def build_model(model_cfg: Mapping[str, Any]):
    """Build the network of a ``[model]`` section."""
    from analysis import models

    name = model_cfg["name"]
    options = {k: v for k, v in model_cfg.items() if k != "name" and v is not None}
    builder = getattr(models, name)
    params = inspect.signature(builder).parameters
    for key, value in options.items():
        if key not in params:
            accepted = ", ".join(p for p in params if p != "bias")
            raise ConfigError(
                f"model.{key}",
                f"is not an option of network {name!r} (its options: {accepted})",
                value,
            )
    for pname, p in params.items():
        if p.default is inspect.Parameter.empty and pname not in options:
            raise ConfigError(
                f"model.{pname}", f"must be set for network {name!r}", None
            )
    return models.build(name, **options)


def load_images(data_cfg: Mapping[str, Any]) -> np.ndarray:
    """Load the training images of a ``[data]`` section, shape (n, C, H, W)."""
    from analysis import data

    source = data_cfg["source"]
    n = data_cfg.get("n")
    if source == "basis_2x2":
        return data.basis_2x2(data_cfg["indices"])
    if source == "span_2x2":
        return data.span_set_2x2(data_cfg["dim"], n=n)
    if source == "sample_images":
        return data.sample_images(n or 1, size=data_cfg["size"], seed=data_cfg["seed"])
    if source == "digits":
        return data.digits(n, digit=data_cfg.get("digit"), seed=data_cfg["seed"])
    if source == "cifar10":
        root = data_cfg.get("root")
        if root is None:
            raise ConfigError(
                "data.root",
                "must be set for source cifar10 (the folder that "
                "holds cifar-10-batches-py)",
                None,
            )
        return data.load_cifar10(
            root,
            classes=data_cfg.get("classes"),
            n=n,
            seed=data_cfg["seed"],
            split=data_cfg["split"],
        )
    if source == "folder":
        path = data_cfg.get("path")
        if path is None:
            raise ConfigError("data.path", "must be set for source folder", None)
        return data.load_image_folder(
            path, size=data_cfg["size"], mode=data_cfg["mode"], n=n
        )
    raise ConfigError("data.source", "is not a known source", source)


def check_fits(model, images: np.ndarray) -> None:
    """Refuse images whose shape is not the network's input shape."""
    shape = tuple(model.input_shape)
    if tuple(images.shape[1:]) != shape:
        raise ConfigError(
            "data",
            f"must give images of the network's input shape {shape}",
            f"images of shape {tuple(images.shape[1:])}",
        )


def train_from_config(cfg: Mapping[str, Any], *, progress: bool | None = None):
    """Build, load and train; return ``(model, images, history, seconds)``."""
    import torch

    import analysis

    t = cfg["train"]
    device = resolve_device(t["device"])
    model = build_model(cfg["model"])
    images = load_images(cfg["data"])
    check_fits(model, images)
    options = {
        "lr": t["lr"],
        "optimizer": t["optimizer"],
        "max_iter": t["max_iter"],
        "tol": t["tol"],
        "device": device,
        "seed": t["seed"],
        "dtype": getattr(torch, t["dtype"]),
        "progress": t["progress"] if progress is None else progress,
    }
    for key in ("batch_size", "target_loss", "momentum"):
        if t.get(key) is not None:
            options[key] = t[key]
    started = time.perf_counter()
    before = torch.get_num_threads()
    if t.get("threads") is not None:
        torch.set_num_threads(t["threads"])
    try:
        model, history = analysis.train(model, images, **options)
    finally:
        torch.set_num_threads(before)
    return model, images, history, time.perf_counter() - started


def save_model(path: str | Path, model, cfg: Mapping[str, Any] | None = None) -> Path:
    """Save weights and architecture so :func:`load_model` rebuilds the network."""
    import torch

    from analysis._runfiles import atomic_path

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {
        "format": MODEL_FORMAT,
        "architecture": dict(model.config),
        "state_dict": state,
        "config": dict(cfg) if cfg is not None else {},
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_model(path: str | Path):
    """Load a model saved by :func:`save_model`; return ``(model, config)``."""
    import torch

    from analysis import models

    path = Path(path)
    if path.is_dir():
        path = path / "model.pt"
    if not path.is_file():
        raise FileNotFoundError(f"model file {str(path)!r} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(
            f"model file {str(path)!r} must be a model saved by opx train "
            f"({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise ValueError(
            f"model file {str(path)!r} must be a model saved by opx train "
            f"(format {MODEL_FORMAT}); got another file"
        )
    arch = dict(payload["architecture"])
    model = models.build(arch.pop("name"), **arch)
    model.load_state_dict(payload["state_dict"])
    model.eval()
    return model, payload.get("config", {})


def analysis_options(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword options of the memorization report from ``[analysis]``."""
    a = cfg["analysis"]
    options = {"layout": a["layout"], "delta": a["delta"]}
    for key in ("k", "rtol"):
        if a.get(key) is not None:
            options[key] = a[key]
    return options


def report_row(report: Any) -> dict[str, Any]:
    """The numbers of a memorization report that go into a sweep table row."""
    d = report.to_dict() if hasattr(report, "to_dict") else dict(report)
    row: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, bool | int | float | str) or value is None:
            row["report_seconds" if key == "seconds" else key] = value
    w = getattr(report, "eigenvalues", None)
    if w is not None:
        row["top_moduli"] = [round(float(abs(x)), 6) for x in np.asarray(w)[:8]]
    return row


def run_job(config: Mapping[str, Any], run_dir: str) -> dict[str, Any]:
    """One sweep job: train, export and analyse; return the table row.

    Writes ``model.pt``, ``result.h5`` (operator, report and provenance) and
    ``config.toml`` into ``run_dir``.
    """
    from analysis import io as aio
    from analysis.config import save_config

    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    save_config(config, run / "config.toml")
    model, images, history, train_seconds = train_from_config(config, progress=False)
    model = model.cpu().double()
    save_model(run / "model.pt", model, config)

    started = time.perf_counter()
    report = aio.export_results(
        run / "result.h5",
        model,
        images,
        history=history,
        config=dict(config),
        **analysis_options(config),
    )
    analysis_seconds = time.perf_counter() - started

    losses = list(getattr(history, "losses", []))
    row = {
        "network": config["model"]["name"],
        "n_images": int(images.shape[0]),
        "train_loss": float(losses[-1]) if losses else float("nan"),
        "iterations": int(getattr(history, "iterations", len(losses))),
        "stop_reason": str(getattr(history, "stop_reason", "")),
    }
    row.update(report_row(report))
    row.update(train_seconds=train_seconds, analysis_seconds=analysis_seconds)
    return row
