"""Every setting declared once (settings.py): the checks, the flags, the sets of resumable and
per-box fields and the README's option tables all come from the declarations."""

import dataclasses
import math
from pathlib import Path

import pytest

from easgd_local import bench as bench_module
from easgd_local import cli, readme, settings
from easgd_local.algorithms import ALGORITHMS, Algorithm, Option
from easgd_local.cli import main
from easgd_local.config import ConfigError, TrainConfig
from easgd_local.multinode import PER_BOX_FIELDS
from easgd_local.settings import Setting, problem

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = {path.relative_to(ROOT).as_posix(): path.read_text() for path in readme.documents(ROOT)}


@pytest.mark.parametrize("bounds,value,message", [
    ("(0, 1]", 0, "--x must be in (0, 1] (got 0)"),
    ("(0, 1]", 1.5, "--x must be in (0, 1] (got 1.5)"),
    ("[0, 1)", 1.0, "--x must be in [0, 1) (got 1.0)"),
    (">= 1", 0, "--x must be >= 1 (got 0)"),
    ("> 0", -1, "--x must be > 0 (got -1)"),
    ("[0, 2^32)", 2**32, f"--x must be in [0, 2^32) (got {2**32})"),
])
def test_a_value_out_of_range_gets_one_line(bounds, value, message):
    assert problem(Setting("--x", kind=float, bounds=bounds), value) == message
    for inside in (0.5, 1) if bounds.startswith("(0") else ():
        assert problem(Setting("--x", kind=float, bounds=bounds), inside) is None


def test_kinds_and_finiteness_are_checked():
    assert problem(Setting("--n", kind=int), "two") == "--n must be an integer (got 'two')"
    assert problem(Setting("--n", kind=int), True) == "--n must be an integer (got True)"
    assert problem(Setting("--f", kind=float), math.nan) == "--f must be a finite number (got nan)"
    assert problem(Setting("--s", choices=("a", "b")), "c") == "--s must be one of a, b (got 'c')"
    assert problem(Setting("--t", kind=float, bounds="> 0", unit="seconds"), 0.0) == \
        "--t must be > 0 seconds (got 0.0)"
    assert problem(Setting("--n", kind=int, bounds=">= 1"), None) is None  # not given


def test_a_malformed_declaration_fails_at_once():
    with pytest.raises(ValueError, match="malformed range"):
        Setting("--x", bounds="0..1")
    with pytest.raises(ValueError, match="unknown concern"):
        Setting("--x", concern="misc")
    with pytest.raises(TypeError, match="default_text"):
        Option("x", int, "X.", default=lambda config: 1)


def test_resumable_and_per_box_fields_are_those_declared():
    assert set(cli.RESUMABLE_FIELDS) == {
        "steps", "epochs", "time_limit", "target_accuracy", "target_hold", "data_dir", "download",
        "max_restarts", "stall_timeout", "eval_every", "eval_budget", "eval_samples",
        "eval_deferred", "checkpoint_every", "threads", "quiet", "precision"}
    assert cli.STOP_FIELDS == ("steps", "epochs", "time_limit", "target_accuracy", "target_hold")
    assert PER_BOX_FIELDS == {
        "data_dir", "download", "out", "quiet", "threads", "devices", "loader_workers",
        "eval_every", "eval_budget", "eval_samples", "eval_deferred", "checkpoint_every",
        "stall_timeout", "max_restarts", "faults", "multi_node", "root_timeout", "rank_offset"}


def test_every_field_of_a_run_is_declared_or_resolved():
    declared = settings.declarations(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        assert f.name in declared or f.name == "options" or not f.init, f.name
        if f.name in declared:
            assert declared[f.name].default == f.default or f.default is dataclasses.MISSING


def test_bench_shares_train_declarations_with_its_own_defaults():
    bench = settings.declarations(bench_module.BenchOptions)
    train = settings.declarations(TrainConfig)
    for name in ("batch_size", "seed", "dataset", "data_dir", "model", "workers", "devices",
                 "eval_every", "faults"):
        assert bench[name] is train[name], name
    assert (bench["eval_budget"].default, train["eval_budget"].default) == (0.25, 0.1)
    assert bench["eval_budget"].help != train["eval_budget"].help
    assert bench["eval_budget"].bounds == train["eval_budget"].bounds


@pytest.mark.parametrize("name", sorted(readme.tables()))
def test_readme_tables_are_generated_from_the_declarations(name):
    generated = readme.tables()[name]
    where = readme.placed(DOCUMENTS)[name]
    assert len(where) == 1, f"the {name} table belongs in one document, found in {where}"
    found = readme.blocks(DOCUMENTS[where[0]]).get(name)
    assert found == generated, (
        f"{where[0]}'s <!-- options:{name} --> table differs from the declarations; run "
        f".venv/bin/python scripts/readme_tables.py, or paste:\n\n{generated}")


class Toy(Algorithm):
    """A made-up algorithm: its module would hold this class, the registry one line."""

    name = "toy"
    summary = "a made-up algorithm with one option"
    options = (Option("toy_rate", float, "How much of a toy it is.", default=0.375,
                      bounds="(0, 1)"),)


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(ALGORITHMS, "toy", Toy())
    monkeypatch.setenv("COLUMNS", "200")  # no flag cut short by a narrow terminal


@pytest.mark.parametrize("command", ["train", "bench"])
def test_a_new_algorithm_option_needs_only_its_declaration(toy, command, capsys):
    assert main([command, "--help"]) == 0
    text = capsys.readouterr().out
    assert "--toy-rate" in text and "How much of a toy it is. Must be in (0, 1)." in text
    assert "[default: 0.375]" in text  # resolved with the run; shown as every default is


def test_a_new_algorithm_option_is_checked_and_defaulted(toy, capsys, tmp_path):
    config = TrainConfig(algo="toy", workers=2).validate()
    assert config.resolved_options == {"toy_rate": 0.375}
    assert main(["train", "--algo", "toy", "--toy-rate", "5", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --toy-rate must be in (0, 1) (got 5.0)"
    with pytest.raises(ConfigError, match="--toy-rate applies to toy, not easgd"):
        TrainConfig(algo="easgd", options={"toy_rate": 0.5}).validate()
