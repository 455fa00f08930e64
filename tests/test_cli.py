"""The command line: help, one-line errors with exit code 2, and a shortened default run."""

import json
import os
import subprocess
import sys

import pytest
import torch

from easgd_local import cli, data, models
from easgd_local.cli import main

from .helpers import assert_no_leftovers, leftovers_snapshot


def test_choices_agree_with_the_registries():
    assert cli.DATASET_CHOICES == data.DATASETS
    assert cli.MODEL_CHOICES == models.MODELS


def test_help_lists_every_option(capsys):
    assert main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--algo", "--lr", "--tau", "--beta", "--alpha", "--momentum", "--weight-decay",
                 "--batch-size", "--seed", "--steps", "--epochs", "--time-limit", "--target-accuracy", "--dataset",
                 "--data-dir", "--download", "--model", "--workers", "--devices", "--no-lock",
                 "--eval-every", "--out", "--quiet"):
        assert flag in text, flag


def test_no_arguments_prints_help_once(capsys):
    assert main([]) == 2  # as Typer's own no_args_is_help
    out = capsys.readouterr().out
    assert "train" in out and out.count("Usage:") == 1, out


def test_version(capsys):
    from easgd_local import __version__

    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"easgd-local {__version__}\n"


QUICK = [["--help"], ["--version"], ["train", "--help"], ["bench", "--help"],
         ["evaluate", "--help"], ["plot", "--help"], ["train", "--tau", "0"],
         ["train", "--algo", "nope"], ["train", "--lam", "2"]]


@pytest.mark.parametrize("args", QUICK, ids=" ".join)
def test_help_and_usage_errors_import_no_torch(args):
    """The app is built and the arguments parsed without PyTorch: --help answers at once."""
    code = ("import sys\nfrom easgd_local.cli import main\ncode = main(sys.argv[1:])\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\nsys.exit(code)")
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == (0 if "--help" in args or "--version" in args else 2), proc.stderr
    assert "torch was imported" not in proc.stderr and "Traceback" not in proc.stderr


def _help(command):
    proc = subprocess.run([sys.executable, "-m", "easgd_local", *command, "--help"],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "80"})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_help_reads_well_at_80_columns():
    from easgd_local.algorithms import ALGORITHMS

    train_help, bench_help = _help(["train"]), _help(["bench"])
    words = set(train_help.replace("|", " ").replace(";", " ").replace(":", " ").split())
    assert set(ALGORITHMS) <= words  # each choice whole, none split over two lines
    assert "<bool>" not in train_help + bench_help + _help([])  # switches take no value
    assert "[default: (" not in train_help + bench_help  # one style: [default: value]
    assert "[default: 32]" in train_help and "[default: --lock]" in train_help
    assert "median [min, max]" in " ".join(bench_help.replace("│", " ").split())
    assert "--install-completion" in _help([])


BAD = [
    (["--workers", "0"], "--workers"),
    (["--tau", "0"], "--tau"),
    (["--beta", "0"], "--beta"),
    (["--beta", "1.5"], "--beta"),
    (["--alpha", "0.1", "--beta", "0.5"], "not both"),
    (["--alpha", "0"], "--alpha"),
    (["--lr", "0"], "--lr"),
    (["--lr", "-0.1"], "--lr"),
    (["--batch-size", "0"], "--batch-size"),
    (["--steps", "0"], "--steps"),
    (["--time-limit", "-1"], "--time-limit"),
    (["--epochs", "0"], "--epochs"),
    (["--eval-every", "0"], "--eval-every"),
    (["--target-accuracy", "1.5"], "--target-accuracy"),
    (["--algo", "easgd", "--momentum", "0.9"], "--momentum"),  # easgd has no momentum
    (["--algo", "eamsgd", "--momentum", "1.0"], "--momentum"),
    (["--algo", "sgd", "--workers", "2"], "one worker"),
    (["--devices", "cuda:99"], "cuda:99"),
    (["--devices", "tpu"], "tpu"),
    (["--dataset", "nope"], "nope"),
    (["--model", "nope"], "nope"),
    (["--algo", "nope"], "nope"),
    (["--workers", "two"], "--workers"),
    # faults that could never fire: a value to a kind that takes none, a rank beyond --workers
    (["--fault", "1:5:kill:extra", "--steps", "1"], "fault kill takes no value"),
    (["--fault", "1:5:hang:5", "--steps", "1"], "fault hang takes no value"),
    (["--fault", "1:5:exit:3", "--steps", "1"], "fault exit takes no value"),
    (["--fault", "9:0:kill", "--workers", "2", "--steps", "1"], "rank 9 is beyond --workers 2"),
]


@pytest.mark.parametrize("args,needle", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_values_exit_2_with_one_line(args, needle, capsys, tmp_path):
    assert main(["train", "--out", str(tmp_path / "run"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error:"), err
    assert needle in err
    assert not (tmp_path / "run").exists()  # nothing started, nothing written


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_device_without_cuda(capsys, tmp_path):
    assert main(["train", "--devices", "cuda:0", "--out", str(tmp_path / "r")]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_missing_data_directory_without_download(capsys, tmp_path):
    args = ["train", "--dataset", "cifar10", "--data-dir", str(tmp_path / "absent"), "--out", str(tmp_path / "r")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--download" in err


def test_unwritable_out(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert main(["train", "--out", str(blocker / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--out" in err


def test_out_holding_a_run_is_not_overwritten(capsys, tmp_path):
    (tmp_path / "summary.json").write_text('{"keep": true}')
    assert main(["train", "--out", str(tmp_path)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert json.loads((tmp_path / "summary.json").read_text()) == {"keep": True}


def test_out_that_holds_no_run_and_is_not_empty_is_not_ours(capsys, tmp_path):
    """--out a project's folder, or a symlink to one (to /etc, as root): refused before anything
    is written into it; an empty directory, or one left by a run that never started (its
    config.json alone), is taken."""
    foreign = tmp_path / "etc"
    foreign.mkdir()
    (foreign / "passwd").write_text("root:x:0:0\n")
    link = tmp_path / "link"
    link.symlink_to(foreign)
    for out in (foreign, link):
        assert main(["train", "--out", str(out), "--steps", "1"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "is not empty and holds no run (it has passwd)" in err, err
    assert sorted(p.name for p in foreign.iterdir()) == ["passwd"]
    from easgd_local.output import RunDir

    never_started = tmp_path / "never"
    never_started.mkdir()
    (never_started / "config.json").write_text(json.dumps({"algo": "easgd", "model": "cnn",
                                                           "workers": 2}))
    (never_started / ".lock").write_text("")
    RunDir(never_started).create()  # taken


def test_console_entry_one_line_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "easgd_local", "train", "--tau", "0"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: --tau must be >= 1 (got 0)"
    assert "Traceback" not in proc.stdout + proc.stderr


@pytest.mark.slow
def test_shortened_default_run(tmp_path, capsys):
    """The default command, stopped after one epoch: output files and the summary table."""
    before = leftovers_snapshot()
    out = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert "center test accuracy" in printed.out
    assert "eamsgd: 2 worker(s) on cpu" in printed.err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["algo"] == "eamsgd" and summary["workers"] == 2 and summary["tau"] == 4
    assert summary["alpha"] == pytest.approx(0.45)
    assert summary["final_test_accuracy"] > 0.8
    config = json.loads((out / "config.json").read_text())
    assert config["algo"] == "eamsgd" and config["epochs"] == 1
    assert_no_leftovers(before)
