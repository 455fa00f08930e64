"""A finished run read back: `evaluate` gives its summary's figures, `train` leaves curves.png and
metrics.csv, `plot` overlays runs; bad input is one line and exit code 2."""

import csv
import json
import shutil

import pytest

from easgd_local.cli import main
from easgd_local.finished import evaluate_run

from .helpers import assert_no_leftovers, leftovers_snapshot


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One short run of the command line (one worker, a few evaluations)."""
    before = leftovers_snapshot()
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", "--algo", "sgd", "--steps", "150", "--eval-every", "0.3", "--quiet",
                 "--out", str(out)]) == 0
    assert_no_leftovers(before)
    return out


def _one_line_error(capsys):
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error:") and "Traceback" not in err, err
    return err


@pytest.mark.slow
def test_evaluate_gives_the_summary_figures(run, capsys):
    summary = json.loads((run / "summary.json").read_text())
    result = evaluate_run(run)
    assert result.accuracy == summary["final_test_accuracy"]
    assert result.loss == pytest.approx(summary["final_test_loss"], rel=1e-6)
    assert main(["evaluate", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"test accuracy {summary['final_test_accuracy']:.4f}" in out, out


@pytest.mark.slow
def test_evaluate_refuses_what_is_no_finished_run(run, tmp_path, capsys):
    assert main(["evaluate", str(tmp_path)]) == 2
    assert "no config.json" in _one_line_error(capsys)
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    (broken / "center.pt").write_bytes(b"not a state dict")
    assert main(["evaluate", str(broken)]) == 2
    assert "center.pt is unreadable" in _one_line_error(capsys)


@pytest.mark.slow
def test_a_run_leaves_its_curves_and_csv(run):
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(records) >= 2
    assert list(rows[0]) == list(dict.fromkeys(k for r in records for k in r))
    assert [float(r["test_accuracy"]) for r in rows] == [r["test_accuracy"] for r in records]
    assert json.loads(rows[-1]["steps"]) == records[-1]["steps"]


@pytest.mark.slow
def test_plot_overlays_runs_and_a_bench_in_one_file(run, tmp_path, capsys):
    bench = tmp_path / "bench"
    shutil.copytree(run, bench / "runs" / "1-sgd-p1")  # a bench keeps its runs in runs/<name>/
    figure = tmp_path / "all.png"
    assert main(["plot", str(run), str(bench), "--out", str(figure)]) == 0
    assert figure.read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["all.png", "bench"]


def test_plot_of_a_missing_run_is_one_line(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "absent"), "--out", str(tmp_path / "x.png")]) == 2
    assert "does not exist" in _one_line_error(capsys)
    assert main(["plot", str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    assert "holds no run" in _one_line_error(capsys)
    assert not (tmp_path / "x.png").exists()


def test_csv_has_every_field_and_lists_as_json(tmp_path):
    from easgd_local.plot import write_csv

    records = [{"seconds": 0.5, "steps": [1, 2], "eval_error": None},
               {"seconds": 1.0, "steps": [3, 4], "test_accuracy": 0.5, "faults": {"1": "kill"}}]
    write_csv(records, tmp_path / "m.csv")
    with open(tmp_path / "m.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["seconds", "steps", "eval_error", "test_accuracy", "faults"]
    assert rows[0]["test_accuracy"] == "" and rows[0]["eval_error"] == ""
    assert json.loads(rows[1]["faults"]) == {"1": "kill"} and json.loads(rows[1]["steps"]) == [3, 4]
