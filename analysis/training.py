"""Training an autoencoder on its images, following the literature's protocol.

The public entry point is :func:`train` (``from analysis import train``); it
returns the trained model and a :class:`TrainHistory`. The module is named
``training`` so that ``analysis.train`` is the function, not a module.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import signal
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from analysis.data import check_images
from opextract import OpextractWarning

__all__ = ["TrainHistory", "load_checkpoint", "resolve_device", "train"]

logger = logging.getLogger(__name__)

_CHECKPOINT_FORMAT = "opextract-train-checkpoint"
_CHECKPOINT_VERSION = 1
# Options that change the trajectory: a checkpoint only resumes under the same
# values. The stopping criteria (tol, target_loss, max_iter, max_epochs) may
# change between runs, so a finished run can be extended.
_TRAJECTORY_KEYS = (
    "optimizer",
    "lr",
    "momentum",
    "weight_decay",
    "batch_size",
    "dtype",
    "seed",
    "window",
    "n_images",
    "images_sha256",
)
_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_PROGRESS_EVERY = 25


@dataclasses.dataclass
class TrainHistory:
    """What happened during :func:`train`.

    Attributes
    ----------
    losses : list of float
        The MSE of every iteration, computed on its batch before the
        optimizer step (the loss of the weights going into that step).
    stop_reason : str
        ``"tol"`` (the improvement rule), ``"target_loss"``, ``"max_iter"``,
        ``"max_epochs"``, ``"nonfinite_loss"`` or ``"callback"``.
    iterations : int
        Optimizer steps taken, over all resumed runs.
    epochs : float
        ``iterations`` divided by the steps per epoch.
    seconds : float
        Wall-clock training time, summed over resumed runs.
    final_loss : float
        Full-data MSE of the returned model (after the last step), NaN if
        not computed.
    device : str
        Device the last run trained on.
    config : dict
        The options of the run (lr, optimizer, dtype, ... and the stopping
        criteria); JSON-serializable.
    """

    losses: list[float] = dataclasses.field(default_factory=list)
    stop_reason: str = ""
    iterations: int = 0
    epochs: float = 0.0
    seconds: float = 0.0
    final_loss: float = float("nan")
    device: str = ""
    config: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serializable dictionary of every field.

        Examples
        --------
        >>> TrainHistory(losses=[0.5, 0.25], stop_reason="max_iter").to_dict()[
        ...     "losses"]
        [0.5, 0.25]
        """
        out = dataclasses.asdict(self)
        out["losses"] = [float(v) for v in self.losses]
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainHistory:
        """Inverse of :meth:`to_dict` (unknown keys are ignored).

        Examples
        --------
        >>> h = TrainHistory(losses=[1.0], iterations=1)
        >>> TrainHistory.from_dict(h.to_dict()) == h
        True
        """
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    def __repr__(self) -> str:
        last = f"{self.losses[-1]:.4g}" if self.losses else "n/a"
        return (
            f"TrainHistory(iterations={self.iterations}, last_loss={last}, "
            f"final_loss={self.final_loss:.4g}, stop_reason={self.stop_reason!r}, "
            f"seconds={self.seconds:.1f})"
        )


# ---------------------------------------------------------------------------
# Validation


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The device to train on: CUDA when available, else CPU, or ``device``.

    Parameters
    ----------
    device : str, torch.device or None
        ``None`` picks ``"cuda"`` if :func:`torch.cuda.is_available`, else
        ``"cpu"``.

    Returns
    -------
    torch.device

    Raises
    ------
    ValueError
        A CUDA device is asked for but none is available, or the index is
        out of range.

    Examples
    --------
    >>> resolve_device("cpu")
    device(type='cpu')
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be a torch device name; got {device!r}") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {str(dev)!r} was asked for but CUDA is not available here "
                "(torch.cuda.is_available() is False: no GPU, no driver, or a "
                f"CPU-only torch build, torch {torch.__version__}); use device='cpu'"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device index must be below {torch.cuda.device_count()} (the CUDA "
                f"devices present); got {str(dev)!r}"
            )
    return dev


def _dtype_name(dtype: Any) -> str:
    for name, value in _DTYPES.items():
        if dtype in (value, name):
            return name
    raise ValueError(f"dtype must be torch.float32 or torch.float64; got {dtype!r}")


def _check_options(
    lr,
    optimizer,
    momentum,
    weight_decay,
    max_iter,
    max_epochs,
    tol,
    window,
    target_loss,
    batch_size,
    checkpoint_every,
) -> None:
    # The caller converts nothing; every rule is checked here, in one place.
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number; got {lr!r}")
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"optimizer must be 'adam' or 'sgd'; got {optimizer!r}")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1); got {momentum!r}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be non-negative; got {weight_decay!r}")
    for name, value in (
        ("max_iter", max_iter),
        ("max_epochs", max_epochs),
        ("batch_size", batch_size),
    ):
        if value is not None and (
            isinstance(value, bool) or int(value) != value or value < 1
        ):
            raise ValueError(
                f"{name} must be a positive integer or None; got {value!r}"
            )
    if max_iter is None and max_epochs is None:
        raise ValueError(
            "max_iter and max_epochs must not both be None; got None, None"
        )
    if not (isinstance(window, int) and window >= 1):
        raise ValueError(f"window must be a positive integer; got {window!r}")
    if not (isinstance(checkpoint_every, int) and checkpoint_every >= 1):
        raise ValueError(
            f"checkpoint_every must be a positive integer; got {checkpoint_every!r}"
        )
    if not (tol >= 0 and math.isfinite(tol)):
        raise ValueError(f"tol must be a non-negative number; got {tol!r}")
    if target_loss is not None and not target_loss >= 0:
        raise ValueError(
            f"target_loss must be non-negative or None; got {target_loss!r}"
        )


# ---------------------------------------------------------------------------
# Checkpoints


def _atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class _DeferredInterrupt:
    """Turns the first SIGINT into a request checked between iterations.

    Only installed in the main thread (where Python delivers signals) and
    when there is a checkpoint to write; the previous handler comes back on
    the first signal, so a second Ctrl-C interrupts at once.
    """

    def __init__(self, enabled: bool) -> None:
        self.requested = False
        self._previous = None
        if enabled and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True
        self.restore()

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`train`.

    Parameters
    ----------
    path : str or Path
        The ``checkpoint=`` file of a run.

    Returns
    -------
    dict
        ``model_state`` and ``optimizer_state`` (state dicts), ``config``
        (the run's options), ``history`` (:meth:`TrainHistory.to_dict`),
        ``model_config`` (``model.config`` when the model has one, so
        ``analysis.models.build(**ckpt["model_config"])`` rebuilds it).

    Raises
    ------
    ValueError
        The file is not a checkpoint of this toolkit.

    Examples
    --------
    >>> load_checkpoint("missing.pt")
    Traceback (most recent call last):
    ...
    FileNotFoundError: checkpoint file does not exist: 'missing.pt'
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file does not exist: {str(path)!r}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(
            f"checkpoint must be a file written by analysis.train; could not read "
            f"{str(path)!r}: {exc}"
        ) from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != _CHECKPOINT_FORMAT:
        raise ValueError(
            f"checkpoint must be a file written by analysis.train; {str(path)!r} "
            "is another kind of file"
        )
    return ckpt


def _images_digest(x: torch.Tensor) -> str:
    return hashlib.sha256(x.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


# ---------------------------------------------------------------------------
# Training


def _stop_reason(losses: list[float], done: int, crit: dict[str, Any]) -> str | None:
    """Why to stop after ``done`` iterations, or None; order = precedence."""
    last = losses[-1]
    if not math.isfinite(last):
        return "nonfinite_loss"
    target = crit["target_loss"]
    if target is not None and last <= target:
        return "target_loss"
    window, tol = crit["window"], crit["tol"]
    if tol > 0 and done % window == 0 and done >= 2 * window:
        previous = math.fsum(losses[done - 2 * window : done - window])
        current = math.fsum(losses[done - window : done])
        if (previous - current) / window < tol:
            return "tol"
    if done >= crit["iter_limit"]:
        return crit["limit_reason"]
    return None


def train(
    model: nn.Module,
    images: Any,
    *,
    lr: float = 1e-4,
    optimizer: str = "adam",
    max_iter: int | None = 20_000,
    tol: float = 1e-4,
    device: str | torch.device | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    dtype: torch.dtype = torch.float32,
    target_loss: float | None = None,
    checkpoint: str | Path | None = None,
    progress: bool = True,
    max_epochs: int | None = None,
    window: int = 100,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    checkpoint_every: int = 1000,
    resume: bool = True,
    callback: Callable[[int, float], bool | None] | None = None,
    on_range: str = "warn",
    num_threads: int | None = None,
) -> tuple[nn.Module, TrainHistory]:
    """Train an autoencoder to reproduce its images with the MSE loss.

    The defaults are the literature's protocol: full batch, Adam with
    learning rate 1e-4, PyTorch's default initialization (set when the model
    is built), training until the loss improves by less than 1e-4.

    Parameters
    ----------
    model : torch.nn.Module
        Maps ``(n, C, H, W)`` to ``(n, C, H, W)``. Trained in place, moved to
        ``device`` and ``dtype``. When it has an ``input_shape`` attribute
        (every network of :mod:`analysis.models`), ``images`` must match it.
    images : array_like or torch.Tensor of shape (n, C, H, W) or (C, H, W)
        Training images, finite; values outside [0, 1] are treated as
        ``on_range`` says.
    lr : float, default 1e-4
        Learning rate.
    optimizer : {"adam", "sgd"}, default "adam"
        :class:`torch.optim.Adam` (default betas) or :class:`torch.optim.SGD`
        with ``momentum``.
    max_iter : int or None, default 20000
        Most optimizer steps (over all resumed runs).
    tol : float, default 1e-4
        The improvement rule: every ``window`` iterations, stop when the mean
        loss of the last ``window`` iterations is less than ``tol`` below the
        mean of the ``window`` before (see Notes). ``tol=0`` disables it.
    device : str, torch.device or None
        ``None``: CUDA when available, else CPU (see :func:`resolve_device`).
    seed : int, default 0
        Seed of the mini-batch order (the only randomness of training; the
        initialization is seeded by the model's constructor). Global RNG
        state is not touched.
    batch_size : int or None, default None
        ``None`` trains full batch (one iteration = one epoch); otherwise
        each epoch visits every image once in a seeded random order, in
        batches of ``batch_size`` (the last one may be smaller).
    dtype : torch.float32 or torch.float64, default torch.float32
        Precision of the weights and images during training.
    target_loss : float or None
        Stop as soon as an iteration's loss is at most this.
    checkpoint : str, Path or None
        File to write checkpoints to (weights, optimizer state, options,
        history; written atomically: a temporary file in the same folder,
        then renamed) every ``checkpoint_every`` iterations and at the end.
        With ``resume=True`` and an existing file, training continues from it.
        A Ctrl-C (SIGINT, in the main thread) lets the current iteration
        finish, writes the checkpoint and then raises ``KeyboardInterrupt``;
        a second Ctrl-C interrupts at once. A run killed otherwise loses at
        most the iterations since the last checkpoint.
    progress : bool, default True
        Show a tqdm progress bar with the loss on stderr.
    max_epochs : int or None
        Most epochs; with ``max_iter`` whichever is reached first.
    window : int, default 100
        Iterations per check of the improvement rule.
    momentum : float, default 0.9
        Momentum of SGD (unused by Adam).
    weight_decay : float, default 0
        L2 penalty of the optimizer.
    checkpoint_every : int, default 1000
        Iterations between checkpoints.
    resume : bool, default True
        Continue from ``checkpoint`` when it exists. The checkpoint must have
        been written with the same optimizer, lr, momentum, weight decay,
        batch size, dtype, seed, window and images; the stopping criteria
        may differ (to extend a run).
    callback : callable or None
        ``callback(iteration, loss)`` after every step (``iteration`` counts
        from 1); returning True stops training with reason ``"callback"``.
    on_range : {"warn", "rescale", "error", "ignore"}, default "warn"
        Handling of image values outside [0, 1] (see
        :func:`analysis.data.check_images`).
    num_threads : int or None
        CPU threads of torch during this call (restored afterwards); ``None``
        leaves torch's setting. Small networks train faster on one thread,
        above all on a busy machine.

    Returns
    -------
    model : torch.nn.Module
        The same module, trained, on ``device`` in ``dtype``.
    history : TrainHistory
        Losses, the stop reason, iterations, time, options.

    Raises
    ------
    ValueError
        An option breaks its rule, the images do not fit the model or are not
        finite, CUDA is asked for but absent, or the checkpoint was written
        by a run with other trajectory options.

    See Also
    --------
    analysis.io.export_results : the one call after training that writes the
        operator, the analysis report and this history into one HDF5 file.

    Notes
    -----
    The literature trains "until the loss decreased by less than 1e-4". Here
    the check is made over windows, because a single step of Adam at lr 1e-4
    changes the loss by much less than 1e-4 from the start: after iterations
    ``2w, 3w, ...`` (``w = window``) training stops if
    ``mean(losses[-2w:-w]) - mean(losses[-w:]) < tol``. ``window=1`` is the
    literal iteration-by-iteration reading. The checks, in order after every
    step: a non-finite loss (warning), ``target_loss``, the improvement
    rule, ``max_iter``/``max_epochs``; the first that holds is the
    ``stop_reason``, and ``"callback"`` only when none does.

    On CPU a run is deterministic: the same arguments give the same losses
    bit for bit, and a run resumed from a checkpoint gives the same losses
    as one that was never interrupted. On CUDA, cuDNN may pick
    non-deterministic kernels.

    Examples
    --------
    >>> from analysis import models, data
    >>> net = models.ds(seed=0)
    >>> net, history = train(net, data.basis_2x2([0]), lr=1e-3, max_iter=50,
    ...                      tol=0, device="cpu", progress=False)
    >>> history.iterations, history.stop_reason
    (50, 'max_iter')
    >>> history.losses[-1] < history.losses[0]
    True
    """
    if num_threads is not None and (
        isinstance(num_threads, bool)
        or int(num_threads) != num_threads
        or num_threads < 1
    ):
        raise ValueError(
            f"num_threads must be a positive integer or None; got {num_threads!r}"
        )
    previous_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(int(num_threads))
    try:
        model, history = _train(
            model,
            images,
            lr=lr,
            optimizer=optimizer,
            max_iter=max_iter,
            tol=tol,
            device=device,
            seed=seed,
            batch_size=batch_size,
            dtype=dtype,
            target_loss=target_loss,
            checkpoint=checkpoint,
            progress=progress,
            max_epochs=max_epochs,
            window=window,
            momentum=momentum,
            weight_decay=weight_decay,
            checkpoint_every=checkpoint_every,
            resume=resume,
            callback=callback,
            on_range=on_range,
        )
    finally:
        torch.set_num_threads(previous_threads)
    if history.stop_reason == "nonfinite_loss":
        warnings.warn(
            f"training stopped at iteration {history.iterations}: the loss is "
            f"{history.losses[-1]}; lower lr (got {lr}) or the initialization scale",
            OpextractWarning,
            stacklevel=2,
        )
    return model, history


def _train(
    model,
    images,
    *,
    lr,
    optimizer,
    max_iter,
    tol,
    device,
    seed,
    batch_size,
    dtype,
    target_loss,
    checkpoint,
    progress,
    max_epochs,
    window,
    momentum,
    weight_decay,
    checkpoint_every,
    resume,
    callback,
    on_range,
):
    """:func:`train` without the thread setting and the warning."""
    _check_options(
        lr,
        optimizer,
        momentum,
        weight_decay,
        max_iter,
        max_epochs,
        tol,
        window,
        target_loss,
        batch_size,
        checkpoint_every,
    )
    dtype_name = _dtype_name(dtype)
    dev = resolve_device(device)
    input_shape = getattr(model, "input_shape", None)
    # stacklevel: check_images <- _train <- train <- the user's call.
    x_np = check_images(
        images, input_shape=input_shape, on_range=on_range, stacklevel=4
    )
    x = torch.as_tensor(x_np).to(device=dev, dtype=_DTYPES[dtype_name])
    n = x.shape[0]
    if batch_size is not None and batch_size > n:
        batch_size = None  # one batch holds every image: that is full batch
    steps_per_epoch = 1 if batch_size is None else -(-n // batch_size)

    limits = []
    if max_iter is not None:
        limits.append((int(max_iter), "max_iter"))
    if max_epochs is not None:
        limits.append((int(max_epochs) * steps_per_epoch, "max_epochs"))
    iter_limit, limit_reason = min(limits)
    crit = {
        "tol": float(tol),
        "window": window,
        "target_loss": None if target_loss is None else float(target_loss),
        "iter_limit": iter_limit,
        "limit_reason": limit_reason,
    }
    config = {
        "optimizer": optimizer,
        "lr": float(lr),
        "momentum": float(momentum),
        "weight_decay": float(weight_decay),
        "batch_size": batch_size,
        "dtype": dtype_name,
        "seed": int(seed),
        "window": window,
        "n_images": int(n),
        "images_sha256": _images_digest(x),
        "tol": float(tol),
        "target_loss": crit["target_loss"],
        "max_iter": None if max_iter is None else int(max_iter),
        "max_epochs": None if max_epochs is None else int(max_epochs),
    }

    model.to(device=dev, dtype=_DTYPES[dtype_name])
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model must have trainable parameters; got none")
    if optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.SGD(
            params, lr=lr, momentum=momentum, weight_decay=weight_decay
        )

    history = TrainHistory(config=config, device=str(dev))
    ckpt_path = None if checkpoint is None else Path(checkpoint)
    if ckpt_path is not None and resume and ckpt_path.exists():
        history = _resume(ckpt_path, model, opt, config, dev)
    start = history.iterations

    def save() -> None:
        if ckpt_path is None:
            return
        state = {
            "format": _CHECKPOINT_FORMAT,
            "version": _CHECKPOINT_VERSION,
            "model_state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "optimizer_state": opt.state_dict(),
            "config": config,
            "history": history.to_dict(),
            "model_config": getattr(model, "config", None),
        }
        _atomic_torch_save(state, ckpt_path)

    reason = _stop_reason(history.losses, start, crit) if start > 0 else None
    was_training = model.training
    model.train()
    logger.info(
        "training %s on %d images, %s on %s, from iteration %d",
        type(model).__name__,
        n,
        dtype_name,
        dev,
        start,
    )

    from tqdm.auto import tqdm

    bar = tqdm(
        total=iter_limit,
        initial=start,
        disable=not progress,
        desc="train",
        unit="it",
        dynamic_ncols=True,
    )
    losses = history.losses
    t0 = time.perf_counter()
    elapsed_before = history.seconds

    def stamp(iterations: int, reason) -> None:
        # The history as of ``iterations``, for a checkpoint or the result.
        history.iterations = iterations
        history.epochs = iterations / steps_per_epoch
        history.seconds = elapsed_before + time.perf_counter() - t0
        history.stop_reason = reason

    order = None
    it = start
    interrupted = _DeferredInterrupt(enabled=ckpt_path is not None)
    try:
        while reason is None:
            if batch_size is None:
                xb = x
            else:
                epoch, pos = divmod(it, steps_per_epoch)
                if pos == 0 or order is None:
                    rng = np.random.default_rng([int(seed), epoch])
                    order = torch.as_tensor(rng.permutation(n), device=dev)
                xb = x[order[pos * batch_size : (pos + 1) * batch_size]]

            opt.zero_grad(set_to_none=True)
            out = model(xb)
            if it == start and out.shape != xb.shape:
                raise ValueError(
                    "model must map images to images of the same shape; got "
                    f"{tuple(out.shape)} for input {tuple(xb.shape)}"
                )
            loss = F.mse_loss(out, xb)
            loss.backward()
            opt.step()
            value = loss.item()
            losses.append(value)
            it += 1

            reason = _stop_reason(losses, it, crit)
            if callback is not None and callback(it, value) and reason is None:
                reason = "callback"
            if it % _PROGRESS_EVERY == 0 or reason is not None:
                bar.set_postfix(loss=f"{value:.4g}", refresh=False)
                bar.update(it - bar.n)
            if ckpt_path is not None and (it % checkpoint_every == 0 or reason):
                stamp(it, reason or "")
                save()
            if interrupted.requested:
                stamp(it, "")
                save()
                logger.info("interrupted after %d iterations; checkpoint written", it)
                raise KeyboardInterrupt
    finally:
        interrupted.restore()
        bar.close()
        model.train(was_training)

    stamp(it, reason)
    history.device = str(dev)
    with torch.no_grad():
        history.final_loss = float(F.mse_loss(model(x), x))
    if ckpt_path is not None:
        save()
    logger.info("stopped after %d iterations: %s", it, reason)
    return model, history


def _resume(path: Path, model: nn.Module, opt, config: dict, dev) -> TrainHistory:
    ckpt = load_checkpoint(path)
    saved = ckpt["config"]
    for key in _TRAJECTORY_KEYS:
        if saved.get(key) != config[key]:
            raise ValueError(
                f"checkpoint {str(path)!r} was written with {key}="
                f"{saved.get(key)!r}; got {key}={config[key]!r} (pass resume=False "
                "or another checkpoint path to start over)"
            )
    try:
        model.load_state_dict(ckpt["model_state"])
    except RuntimeError as exc:
        raise ValueError(
            f"checkpoint {str(path)!r} holds the weights of another architecture: {exc}"
        ) from exc
    opt.load_state_dict(ckpt["optimizer_state"])
    history = TrainHistory.from_dict(ckpt["history"])
    history.config = config
    logger.info("resuming from %s at iteration %d", path, history.iterations)
    return history
