"""The trainer: the literature's result on DS, stopping rules, determinism,
checkpoints and resuming."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _helpers import assert_close

import opextract
from analysis import data, models, train
from analysis.training import TrainHistory, load_checkpoint, resolve_device
from opextract import OpextractWarning


def _ds_operator(net) -> np.ndarray:
    """The 4x4 operator of a DS network, exported by opextract and checked
    against the float64 forward of the identity basis."""
    A = opextract.to_sparse(net, (1, 2, 2)).toarray()
    clone = models.ds()
    clone.load_state_dict(net.state_dict())
    basis = torch.eye(4, dtype=torch.float64).reshape(4, 1, 2, 2)
    with torch.no_grad():
        reference = clone.double()(basis).reshape(4, 4).T.numpy()
    assert_close(A, reference, dtype=np.float64)
    return A


def _small_net(seed=0):
    return models.d_ab(2, 3, in_channels=1, input_size=8, seed=seed)


FAST = dict(device="cpu", progress=False)


@pytest.fixture(autouse=True)
def one_thread():
    # These networks are tiny: one thread is several times faster than two on
    # a shared machine. Restored after each test.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ds_from_default_init_learns_one_eigenvalue_near_one(seed):
    # The literature's Figure 4c: DS from PyTorch's default initialization,
    # trained on one 2x2 image, learns a rank-one map with eigenvalue 1.
    net = models.ds(seed=seed)
    image = data.basis_2x2([0])
    net, history = train(net, image, lr=1e-3, max_iter=2000, tol=0, **FAST)
    assert history.iterations == 2000 and history.stop_reason == "max_iter"
    moduli = np.abs(np.linalg.eigvals(_ds_operator(net)))
    assert int(np.sum(np.abs(moduli - 1) < 0.05)) == 1, moduli
    assert history.final_loss < 1e-6


def test_identity_init_stays_at_zero_loss():
    net, history = train(
        models.ds("identity"), data.basis_2x2([1]), max_iter=5, tol=0, **FAST
    )
    assert history.losses == [0.0] * 5
    np.testing.assert_array_equal(_ds_operator(net), np.eye(4))


def test_deterministic_and_leaves_global_rng_alone():
    images = data.digits(6, digit=3)
    state = torch.random.get_rng_state()
    _, h1 = train(_small_net(), images, max_iter=15, batch_size=4, **FAST)
    _, h2 = train(_small_net(), images, max_iter=15, batch_size=4, **FAST)
    _, h3 = train(_small_net(), images, max_iter=15, batch_size=4, seed=1, **FAST)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert h1.losses == h2.losses
    assert h1.losses != h3.losses  # another batch order


@pytest.mark.parametrize(
    "options",
    [
        dict(optimizer="adam", lr=1e-3),
        dict(optimizer="sgd", lr=0.05, momentum=0.9, batch_size=4),
        dict(optimizer="adam", lr=1e-3, batch_size=5, dtype=torch.float64),
    ],
    ids=["adam-full", "sgd-minibatch", "adam-minibatch-float64"],
)
def test_resume_after_interruption_matches_uninterrupted(tmp_path, options):
    images = data.digits(7, digit=2, seed=3)
    reference_net, reference = train(
        _small_net(), images, max_iter=40, tol=0, **options, **FAST
    )

    ckpt = tmp_path / "run" / "ckpt.pt"

    def crash(iteration, loss):
        if iteration == 23:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(
            _small_net(),
            images,
            max_iter=40,
            tol=0,
            checkpoint=ckpt,
            checkpoint_every=10,
            callback=crash,
            **options,
            **FAST,
        )
    assert load_checkpoint(ckpt)["history"]["iterations"] == 20

    # A fresh process would rebuild the model from scratch: do the same.
    resumed_net, resumed = train(
        _small_net(seed=99),
        images,
        max_iter=40,
        tol=0,
        checkpoint=ckpt,
        checkpoint_every=10,
        **options,
        **FAST,
    )
    assert resumed.iterations == 40
    assert resumed.losses == reference.losses
    for p, q in zip(resumed_net.parameters(), reference_net.parameters()):
        assert torch.equal(p, q)
    assert [p.name for p in ckpt.parent.iterdir()] == ["ckpt.pt"]  # no temp files


def test_extend_a_finished_run(tmp_path):
    images = data.basis_2x2([0, 3])
    ckpt = tmp_path / "ckpt.pt"
    _, first = train(
        models.ds(seed=4), images, lr=1e-3, max_iter=30, tol=0, checkpoint=ckpt, **FAST
    )
    assert first.stop_reason == "max_iter"
    # Same criteria: nothing left to do.
    _, again = train(
        models.ds(seed=5), images, lr=1e-3, max_iter=30, tol=0, checkpoint=ckpt, **FAST
    )
    assert again.losses == first.losses and again.iterations == 30
    _, longer = train(
        models.ds(seed=5), images, lr=1e-3, max_iter=60, tol=0, checkpoint=ckpt, **FAST
    )
    _, straight = train(models.ds(seed=4), images, lr=1e-3, max_iter=60, tol=0, **FAST)
    assert longer.losses == straight.losses


def test_checkpoint_contents(tmp_path):
    ckpt = tmp_path / "c.pt"
    net, history = train(
        models.ds(seed=0),
        data.basis_2x2([2]),
        max_iter=12,
        tol=0,
        checkpoint=ckpt,
        checkpoint_every=5,
        **FAST,
    )
    saved = load_checkpoint(ckpt)
    assert set(saved) >= {"model_state", "optimizer_state", "config", "history"}
    assert saved["history"]["losses"] == history.losses
    assert saved["config"]["lr"] == 1e-4 and saved["config"]["optimizer"] == "adam"
    assert saved["model_config"]["name"] == "ds"
    for key, value in net.state_dict().items():
        assert torch.equal(saved["model_state"][key], value)
    assert TrainHistory.from_dict(saved["history"]).losses == history.losses


def test_ctrl_c_writes_a_checkpoint_and_resumes_exactly(tmp_path):
    import signal

    images = data.digits(7, digit=2, seed=3)
    options = dict(max_iter=30, tol=0, lr=1e-3, **FAST)
    _, reference = train(_small_net(), images, **options)
    ckpt = tmp_path / "ckpt.pt"
    before = signal.getsignal(signal.SIGINT)

    def ctrl_c(iteration, loss):
        if iteration == 17:
            signal.raise_signal(signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        train(
            _small_net(),
            images,
            checkpoint=ckpt,
            checkpoint_every=100,
            callback=ctrl_c,
            **options,
        )
    # The iteration in progress finished and was saved; the handler is back.
    assert signal.getsignal(signal.SIGINT) is before
    saved = load_checkpoint(ckpt)["history"]
    assert saved["iterations"] == 17 and saved["losses"] == reference.losses[:17]
    _, resumed = train(_small_net(seed=5), images, checkpoint=ckpt, **options)
    assert resumed.losses == reference.losses


def test_resume_refuses_other_options(tmp_path):
    ckpt = tmp_path / "c.pt"
    images = data.basis_2x2([0])
    train(models.ds(seed=0), images, max_iter=3, checkpoint=ckpt, **FAST)
    with pytest.raises(ValueError, match="written with lr=0.0001; got lr=0.001"):
        train(models.ds(seed=0), images, lr=1e-3, max_iter=6, checkpoint=ckpt, **FAST)
    with pytest.raises(ValueError, match="written with images_sha256="):
        train(
            models.ds(seed=0), data.basis_2x2([1]), max_iter=6, checkpoint=ckpt, **FAST
        )
    _, fresh = train(
        models.ds(seed=0),
        images,
        lr=1e-3,
        max_iter=4,
        checkpoint=ckpt,
        resume=False,
        **FAST,
    )
    assert fresh.iterations == 4
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(ValueError, match="another kind of file"):
        train(models.ds(), images, checkpoint=foreign, **FAST)


def test_improvement_rule_stops_with_tol():
    net, history = train(
        models.ds(seed=0),
        data.basis_2x2([0]),
        lr=1e-3,
        max_iter=5000,
        tol=1e-4,
        window=20,
        **FAST,
    )
    assert history.stop_reason == "tol"
    done, w, losses = history.iterations, 20, history.losses
    assert done % w == 0 and done < 5000

    def improvement(end):
        return np.mean(losses[end - 2 * w : end - w]) - np.mean(losses[end - w : end])

    assert improvement(done) < 1e-4
    assert all(improvement(end) >= 1e-4 for end in range(2 * w, done, w))


def test_target_loss_and_epoch_limit():
    images = data.basis_2x2([0])
    _, history = train(
        models.ds(seed=1), images, lr=1e-3, target_loss=1e-3, tol=0, **FAST
    )
    assert history.stop_reason == "target_loss"
    assert history.losses[-1] <= 1e-3 < history.losses[-2]

    _, history = train(
        _small_net(),
        data.digits(10, digit=1),
        batch_size=3,
        max_epochs=2,
        max_iter=100,
        tol=0,
        **FAST,
    )
    assert history.stop_reason == "max_epochs"
    assert history.iterations == 8 and history.epochs == 2.0


def test_callback_stop_and_float64():
    seen = []

    def cb(iteration, loss):
        seen.append(iteration)
        return iteration == 7

    net, history = train(
        models.ds(seed=0),
        data.basis_2x2([0]),
        max_iter=50,
        dtype=torch.float64,
        callback=cb,
        **FAST,
    )
    assert history.stop_reason == "callback" and seen == list(range(1, 8))
    assert all(p.dtype == torch.float64 for p in net.parameters())
    assert history.config["dtype"] == "float64"
    assert math.isfinite(history.final_loss)


def test_nonfinite_loss_stops_with_warning():
    with pytest.warns(OpextractWarning, match="the loss is (inf|nan)") as record:
        _, history = train(
            models.ds(scale=20.0, seed=0),
            data.basis_2x2([0]),
            optimizer="sgd",
            lr=10.0,
            max_iter=200,
            **FAST,
        )
    assert history.stop_reason == "nonfinite_loss"
    assert record[0].filename == __file__
    assert history.iterations < 200


def test_progress_bar_shows_loss(capsys):
    train(
        models.ds(seed=0),
        data.basis_2x2([0]),
        max_iter=30,
        tol=0,
        device="cpu",
        progress=True,
    )
    assert "loss=" in capsys.readouterr().err
    train(models.ds(seed=0), data.basis_2x2([0]), max_iter=30, tol=0, **FAST)
    assert capsys.readouterr().err == ""


def test_history_to_dict_is_json():
    import json

    _, history = train(models.ds(seed=0), data.basis_2x2([0]), max_iter=3, **FAST)
    back = TrainHistory.from_dict(json.loads(json.dumps(history.to_dict())))
    assert back == history
    assert "stop_reason='max_iter'" in repr(history)


def test_device_choice(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == torch.device("cpu")
    with pytest.raises(ValueError, match="'cuda' was asked for but CUDA is not"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="'cuda:0' was asked for"):
        train(models.ds(), data.basis_2x2([0]), device="cuda:0", progress=False)
    with pytest.raises(ValueError, match="device must be a torch device name"):
        resolve_device("tpu-7")


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(lr=0), "lr must be a positive number; got 0"),
        (dict(optimizer="rmsprop"), "optimizer must be 'adam' or 'sgd'; got 'rmsprop'"),
        (dict(max_iter=0), "max_iter must be a positive integer or None; got 0"),
        (dict(max_iter=None), "max_iter and max_epochs must not both be None"),
        (dict(tol=-1), "tol must be a non-negative number; got -1"),
        (dict(dtype=torch.float16), "dtype must be torch.float32 or torch.float64"),
        (dict(momentum=1.5), r"momentum must be in \[0, 1\); got 1.5"),
        (dict(window=0), "window must be a positive integer; got 0"),
    ],
    ids=[
        "lr",
        "optimizer",
        "max_iter",
        "no-limit",
        "tol",
        "dtype",
        "momentum",
        "window",
    ],
)
def test_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        train(models.ds(), data.basis_2x2([0]), **FAST, **options)


def test_num_threads_is_restored():
    before = torch.get_num_threads()
    train(models.ds(), data.basis_2x2([0]), max_iter=2, num_threads=2, **FAST)
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="num_threads must be a positive integer"):
        train(models.ds(), data.basis_2x2([0]), num_threads=0, **FAST)


def test_export_after_training(tmp_path):
    # The one call after training: operator, report and history in one file.
    from analysis import io as aio

    images = data.span_set_2x2(2, n=3)
    net, history = train(
        models.ds(seed=1), images, lr=1e-3, max_iter=2000, tol=0, **FAST
    )
    report = aio.export_results(tmp_path / "ds.h5", net, images, history=history)
    assert report.verdict == "holds"
    assert (tmp_path / "ds.h5").is_file()


def test_model_must_preserve_shape():
    with pytest.raises(ValueError, match="same shape; got"):
        train(torch.nn.Conv2d(1, 2, 3, padding=1), data.basis_2x2([0]), **FAST)


def test_bad_images():
    with pytest.raises(ValueError, match=r"shape \(n, 1, 2, 2\) for this network"):
        train(models.ds(), np.zeros((1, 3, 2, 2)), **FAST)
    bad = data.basis_2x2([0])
    bad[0, 0, 0, 1] = np.inf
    with pytest.raises(ValueError, match="images must be finite"):
        train(models.ds(), bad, **FAST)
    with pytest.warns(OpextractWarning, match=r"values in \[0, 1\]") as record:
        train(models.ds(), 2 * data.basis_2x2([0]), max_iter=1, **FAST)
    assert record[0].filename == __file__  # points at the caller
