"""The demo in quick mode: every step runs, the report folder is complete."""

import re

import pytest

from analysis.demo import run_demo


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "opx-demo"
    return run_demo(out, quick=True, device="cpu", progress=False)


def test_identity_initialization_is_the_identity(demo):
    assert demo.identity_error == 0.0


def test_ds_learns_rank_equal_to_span_dimension(demo):
    assert [r["span_dim"] for r in demo.ds_rows] == [1, 2]
    for row in demo.ds_rows:
        assert row["near_one"] == row["rank_5pct"] == row["span_dim"], row
        assert row["loss"] < 1e-3
    assert demo.ds_agrees


def test_pair_probes_and_reports(demo):
    kinds = {"Gaussian noise", "white squares", "held-out images"}
    assert {(r["network"], r["probe"]) for r in demo.pair_rows} == {
        (n, k) for n in ("D", "ND") for k in kinds
    }
    for row in demo.pair_rows:
        assert 0.0 <= row["to_train"] <= 1.0
        assert -1.0 <= row["to_input"] <= 1.0
    assert set(demo.reports) == {"D", "ND"}
    for report in demo.reports.values():
        assert report.verdict in ("holds", "does not hold")
    # D has a bottleneck: its rank cannot exceed the structural bound r_min
    assert demo.reports["D"].numerical_rank <= demo.reports["D"].r_min


def test_report_folder_is_self_contained(demo):
    out = demo.out_dir
    html = (out / "report.html").read_text()
    md = (out / "report.md").read_text()
    assert html.count("data:image/png;base64,") >= 5
    assert 'src="d/' not in html  # no links to files: everything embedded
    pngs = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", md)
    assert {"probes.png", "d/moduli.png", "nd/eigenvectors.png"} <= set(pngs)
    for name in pngs:
        assert (out / name).stat().st_size > 500, name
    for name in ("d/result.h5", "nd/result.h5", "report.json"):
        assert (out / name).is_file()
    assert "Summary" in md and "rank = dim span X" in md


def test_rerun_into_the_same_folder(demo, capsys):
    again = run_demo(demo.out_dir, quick=True, device="cpu", progress=False)
    assert again.ds_agrees
    out = capsys.readouterr().out
    assert f"Report written to {demo.out_dir}/" in out
    assert not list(demo.out_dir.rglob(".tmp-*"))
