"""HDF5 round trips, atomic writes and clear errors on bad files."""

from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from threadpoolctl import threadpool_limits

import opextract
from analysis import io as aio
from analysis import models
from analysis.report import memorization_report


@pytest.fixture(autouse=True)
def _one_blas_thread():
    with threadpool_limits(1):
        yield


def test_operator_csr_and_dense_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    a = sp.random_array((30, 20), density=0.2, format="csr", rng=rng)
    path = tmp_path / "op.h5"
    aio.save_operator(path, a, input_shape=(1, 4, 5), layout="compact", note={"x": 1})
    back, attrs = aio.load_operator(path)
    assert isinstance(back, sp.csr_array)
    assert (back != a).nnz == 0 and back.indices.dtype == a.indices.dtype
    assert attrs["input_shape"] == (1, 4, 5) and attrs["layout"] == "compact"
    assert attrs["dtype"] == "float64" and attrs["note"] == {"x": 1}
    assert attrs["versions"]["numpy"] == np.__version__ and attrs["created"]

    dense = rng.standard_normal((4, 4)).astype(np.float32)
    aio.save_operator(path, dense)
    back, attrs = aio.load_operator(path)
    np.testing.assert_array_equal(back, dense)
    assert back.dtype == np.float32 and attrs["dtype"] == "float32"


def test_groups_accumulate_in_one_file(tmp_path):
    path = tmp_path / "r.h5"
    w = np.array([2.0, 1 + 1j, 1 - 1j])
    v = np.eye(3, dtype=complex)
    aio.save_spectrum(path, w, v, method="dense")
    aio.save_dataset(path, np.ones((2, 1, 2, 2), np.float32), source="test", seed=3)
    aio.save_operator(path, np.eye(3))
    w2, v2, attrs = aio.load_spectrum(path)
    np.testing.assert_array_equal(w2, w)
    np.testing.assert_array_equal(v2, v)
    images, dattrs = aio.load_dataset(path)
    assert images.shape == (2, 1, 2, 2) and dattrs == {"source": "test", "seed": 3}
    with h5py.File(path) as f:
        assert set(f) == {"spectrum", "dataset", "operator"}


def test_report_roundtrip(tmp_path):
    x = np.eye(4)[:2].reshape(2, 1, 2, 2)
    report = memorization_report(models.ds(init="identity"), x)
    path = tmp_path / "rep.h5"
    aio.save_report(path, report)
    back = aio.load_report(path)
    assert back.to_dict() == report.to_dict()
    np.testing.assert_array_equal(back.eigenvalues, report.eigenvalues)


def test_export_results_one_call(tmp_path):
    net = models.ds(init="identity")
    x = torch.eye(4).reshape(4, 1, 2, 2)
    path = tmp_path / "run" / "result.h5"
    path.parent.mkdir()
    history = {"losses": [1.0, 0.5], "stop_reason": "max_iter", "iterations": 2}
    report = aio.export_results(
        path, net, x, history=history, config={"lr": 1e-3}, save_factors=True
    )
    assert report.verdict == "holds"
    assert (report.part, report.downsampling) == ("a", True)
    a, attrs = aio.load_operator(path)
    np.testing.assert_array_equal(a.toarray(), np.eye(4))
    assert attrs["input_shape"] == (1, 2, 2) and attrs["layout"] == "compact"
    assert attrs["r_min"] == 4
    with h5py.File(path) as f:
        assert f["factors"].attrs["r_min"] == 4
    assert attrs["weights_sha256"] == aio.weights_hash(net)
    assert json.loads(attrs["model"])["config"]["init"] == "identity"
    factors = aio.load_factors(path)
    expected = opextract.factors(net, (1, 2, 2))
    assert [f.path for f in factors] == [f.path for f in expected]
    for got, want in zip(factors, expected):
        assert (got.matrix != want.matrix).nnz == 0
        assert got.in_shape == want.in_shape and got.out_shape == want.out_shape
    assert aio.load_report(path).to_dict() == report.to_dict()
    w, v, _ = aio.load_spectrum(path)
    np.testing.assert_array_equal(w, np.ones(4))
    assert v.shape == (4, 4)
    assert aio.load_history(path)["losses"] == [1.0, 0.5]
    assert aio.load_config(path) == {"lr": 1e-3}
    images, _ = aio.load_dataset(path)
    np.testing.assert_array_equal(images, x.numpy())
    assert [p.name for p in path.parent.iterdir()] == ["result.h5"]  # no temp left


def test_export_results_factors_opt_in_and_r_min_not_recomputed(tmp_path, monkeypatch):
    import analysis.report

    def no_rank_bound(*args, **kwargs):
        raise AssertionError("rank_bound must not run when r_min is given")

    monkeypatch.setattr(analysis.report, "rank_bound", no_rank_bound)
    net = models.nd(channels=2, depth=2, input_size=4, seed=0).double()
    x = np.random.default_rng(0).random((1, 3, 4, 4))
    path = tmp_path / "nd.h5"
    report = aio.export_results(path, net, x, r_min=48)
    assert report.r_min == 48 and report.factor_methods is None
    assert (report.part, report.downsampling, report.downsampling_source) == (
        "b",
        False,
        "argument",
    )
    with h5py.File(path) as f:
        assert "factors" not in f and f["operator"].attrs["r_min"] == 48
    with pytest.raises(aio.ResultsFileError, match=r"has no 'factors' group"):
        aio.load_factors(path)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_write_applies_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        target = tmp_path / "new.txt"
        with aio.atomic_write(target) as tmp:
            tmp.write_text("x")
        assert target.stat().st_mode & 0o777 == 0o666 & ~umask
        # Rewriting keeps the mode of the file it replaces, like open(path, "w").
        target.chmod(0o640)
        with aio.atomic_write(target) as tmp:
            tmp.write_text("y")
        assert target.stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)


def test_weights_hash_changes_with_weights():
    a = models.ds(init="identity")
    b = models.ds(init="identity")
    assert aio.weights_hash(a) == aio.weights_hash(b)
    with torch.no_grad():
        b[0].weight[0, 0, 0, 0] += 1e-7
    assert aio.weights_hash(a) != aio.weights_hash(b)


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "op.h5"
    aio.save_operator(path, np.eye(2))
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="interrupted"):
        with aio.atomic_write(path) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("interrupted")
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["op.h5"]
    with pytest.raises(ValueError, match=r"operator must be 2-D; got shape \(3,\)"):
        aio.save_operator(path, np.ones(3))
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["op.h5"]


def test_truncated_foreign_and_missing_files(tmp_path):
    path = tmp_path / "op.h5"
    aio.save_operator(path, sp.random_array((200, 200), density=0.1, rng=0))
    data = path.read_bytes()
    truncated = tmp_path / "cut.h5"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(aio.ResultsFileError, match="not a readable HDF5 results file"):
        aio.load_operator(truncated)
    text = tmp_path / "notes.h5"
    text.write_text("hello")
    with pytest.raises(aio.ResultsFileError, match="not a readable HDF5"):
        aio.load_operator(text)
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.ones(3)
    with pytest.raises(aio.ResultsFileError, match="not an opextract results file"):
        aio.load_operator(foreign)
    with pytest.raises(aio.ResultsFileError, match="not an opextract results file"):
        aio.save_report(foreign, memorization_report(np.eye(1), np.ones((1, 1))))
    with pytest.raises(aio.ResultsFileError, match=r"has no 'report' group; it holds"):
        aio.load_report(path)
    with pytest.raises(FileNotFoundError, match="existing results file"):
        aio.load_operator(tmp_path / "absent.h5")
    with pytest.raises(FileNotFoundError, match="existing folder"):
        aio.save_operator(tmp_path / "no" / "op.h5", np.eye(2))
