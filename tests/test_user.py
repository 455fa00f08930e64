"""Your own model and data: module:attr on the command line and in Python, torchvision models,
images at their own size, models as they come, and the bad input that must get one line."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from easgd_local import ConfigError, TrainConfig, train
from easgd_local.flat import flatten_

from .helpers import assert_no_leftovers, leftovers_snapshot

ROOT = Path(__file__).resolve().parent.parent

USER_CODE = '''
import sys

import torch
from torch import nn


def make_net(num_classes, in_channels, image_size):
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size * image_size, num_classes))


def make_mlp(num_classes):  # takes only what it needs
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, num_classes))


class Frozen(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.full((1,), 2.0), requires_grad=False)
        self.fc = nn.Linear(784, 10)
        self.register_buffer("seen", torch.zeros((), dtype=torch.int64))  # not averaged

    def forward(self, x):
        self.seen += 1
        return self.fc(x.flatten(1)) * self.scale


def make_frozen():
    return Frozen()


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 16)
        self.b.weight = self.a.weight  # one parameter, used twice

    def forward(self, x):
        return self.b(self.a(x))


def make_complex():
    net = nn.Linear(784, 10)
    net.phase = nn.Parameter(torch.zeros(3, dtype=torch.complex64))
    return net


def make_raises():
    raise RuntimeError("out of ideas")


def make_not_module():
    return 42


def make_exits():  # sys.exit(0) in a factory: the run must not end as if it succeeded
    sys.exit(0)


def make_exits_3():
    sys.exit(3)


def data_exits():
    sys.exit(0)


def make_all_frozen():  # nothing to train: every parameter frozen
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def huge_label():  # one label of 10,000,000 among digits: a model of 10,000,001 classes
    g = torch.Generator().manual_seed(0)
    x = torch.randn(80, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (80,), generator=g)
    y[7] = 10_000_000
    return x[:64], y[:64], x[64:], y[64:]


def make_three_classes():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 3))


def make_wrong_shape():
    return nn.Linear(5, 10)  # takes 5 features, gets 28x28 images


NOT_CALLABLE = 7


def digits_tensors():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 1, 28, 28, generator=g)
    y = (x.mean((1, 2, 3)) > 0).long()  # learnable: the sign of the mean
    return x[:500], y[:500], x[500:], y[500:]


class Pairs(torch.utils.data.Dataset):
    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 8, generator=g)
        self.targets = (self.x[:, 0] > 0).long()

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.x[i], self.targets[i]


def vectors():
    return Pairs(400, 0), Pairs(100, 1)


def vector_net(num_classes):
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, num_classes))


def negative_labels():
    x = torch.randn(10, 4)
    return x, -torch.ones(10, dtype=torch.long), x, torch.zeros(10, dtype=torch.long)


def l1_loss(out, y):
    return torch.nn.functional.cross_entropy(out, y) + 0.0 * out.abs().mean()


def top2(out, y):
    return (out.topk(2, dim=1).indices == y[:, None]).any(1).float().mean()
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A module of the user's, importable as `usernets` from the current directory."""
    (tmp_path / "usernets.py").write_text(textwrap.dedent(USER_CODE))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("usernets", None)
    return tmp_path


def _cli(args, cwd, timeout=300):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "easgd_local", "train", "--quiet", *args],
                          cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


BAD = [
    (["--model", "nothere:make"], "module nothere not found"),
    (["--model", "usernets:absent"], "usernets has no attribute absent"),
    (["--model", "usernets:NOT_CALLABLE"], "not callable"),
    (["--model", "usernets:make_raises"], "make_raises raised RuntimeError: out of ideas"),
    (["--model", "usernets:make_not_module"], "returned a int, not a torch.nn.Module"),
    (["--model", "usernets:make_exits"], "make_exits called sys.exit(0)"),
    (["--model", "usernets:make_exits_3"], "make_exits_3 called sys.exit(3)"),
    (["--dataset", "usernets:data_exits", "--model", "usernets:vector_net"], "data_exits called sys.exit(0)"),
    (["--model", "usernets:make_all_frozen"], "has no trainable parameter"),
    (["--model", "usernets:make_three_classes"], "gives 3 scores, but the labels of mnist10k go up to 9"),
    (["--model", "usernets:make_wrong_shape"], "cannot take the inputs of mnist10k"),
    (["--model", "usernets:make_complex"], "parameter phase is torch.complex64"),
    (["--dataset", "usernets:negative_labels", "--model", "usernets:vector_net"], "labels must be integers >= 0"),
    (["--dataset", "usernets:make_not_module"], "returned int"),
    (["--model", "torchvision:not_a_model"], "not a classification model of torchvision"),
    (["--model", "not a spec"], "unknown --model"),
]


@pytest.mark.parametrize("args,needle", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_user_input_gets_one_line_before_any_process(user_module, args, needle, capsys):
    from easgd_local.cli import main

    before = leftovers_snapshot()
    assert main(["train", "--out", str(user_module / "run"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error:") and needle in err, err
    assert not (user_module / "run" / "checkpoint").exists()
    assert_no_leftovers(before)


def test_a_model_too_large_for_the_memory_is_refused_before_anything(user_module, capsys,
                                                                     caplog, monkeypatch):
    """A label of 10,000,000 makes a model of 10,000,001 classes: its copies (each worker's,
    the evaluator's, the shared state's) are counted before any is made, and the labels far
    fewer than the classes are named in a warning."""
    from easgd_local import config as config_module
    from easgd_local.cli import main

    monkeypatch.setattr(config_module.resources, "available_memory", lambda: 16 * 2**30)
    before = leftovers_snapshot()
    out = user_module / "run"
    assert main(["train", "--out", str(out), "--dataset", "usernets:huge_label", "--model",
                 "usernets:make_net"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error:"), err
    assert "7,850,000,785 values" in err and "16.0 GB available" in err, err
    assert any("only 11 distinct labels occur" in r.getMessage() for r in caplog.records)
    assert not out.exists()
    assert_no_leftovers(before)


def test_the_api_refuses_what_workers_cannot_import(user_module):
    def closure():
        return torch.nn.Linear(784, 10)

    def in_main():
        return torch.nn.Linear(784, 10)

    in_main.__module__ = "__main__"
    in_main.__qualname__ = "in_main"
    for bad, needle in ((lambda: None, "a lambda"), (closure, "inside another function"),
                        (in_main, "defined in __main__")):
        with pytest.raises(ConfigError, match=needle):
            train(TrainConfig(out=user_module / "run"), model=bad)
    assert not (user_module / "run").exists()


def test_tied_weights_are_one_entry(user_module):
    import usernets

    net = usernets.Tied()
    state = flatten_(net)
    assert state.n_params == 16 * 16 + 16 + 16  # one weight, two biases
    assert net.b.weight.data_ptr() == net.a.weight.data_ptr()
    x = torch.randn(2, 16)
    net(x).sum().backward()
    assert state.grad.abs().sum() > 0  # both uses of the weight land in its one gradient


@pytest.mark.slow
def test_api_with_tensors_a_callable_factory_and_a_custom_loss_and_metric(user_module):
    import usernets

    before = leftovers_snapshot()
    s = train(TrainConfig(workers=2, steps=60, eval_every=100.0, out=user_module / "run", lr=0.05),
              model=usernets.make_net, data="usernets:digits_tensors", loss=usernets.l1_loss,
              metric="usernets:top2")
    assert_no_leftovers(before)
    assert s["model"] == "usernets:make_net" and s["dataset"] == "usernets:digits_tensors"
    assert s["final_test_accuracy"] == 1.0  # two classes: the top two always hold the label
    config = json.loads((user_module / "run" / "config.json").read_text())
    assert config["loss"] == "usernets:l1_loss" and config["metric"] == "usernets:top2"


@pytest.mark.slow
def test_api_with_datasets_of_vectors(user_module):
    s = train(TrainConfig(workers=2, steps=80, eval_every=100.0, out=user_module / "run", lr=0.1,
                          loader_workers=0),
              model="usernets:vector_net", data="usernets:vectors")
    assert s["final_test_accuracy"] > 0.8


@pytest.mark.slow
def test_frozen_parameters_are_carried_never_stepped(user_module):
    s = train(TrainConfig(workers=2, steps=40, eval_every=100.0, out=user_module / "run",
                          weight_decay=0.1), model="usernets:make_frozen")
    center = torch.load(user_module / "run" / "center.pt", weights_only=True)
    assert torch.equal(center["scale"], torch.full((1,), 2.0))  # weight decay did not touch it
    assert "seen" in center and s["final_test_accuracy"] > 0.5


@pytest.mark.slow
def test_cli_user_model_on_an_image_folder_at_its_own_size(tmp_path):
    """The README's example: examples/make_image_folder.py, then the CLI with the model of
    examples/my_model.py, then the same from Python."""
    folder = tmp_path / "digits"
    made = subprocess.run([sys.executable, "examples/make_image_folder.py", str(folder),
                           "--per-class", "20"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    out = tmp_path / "run"
    proc = _cli(["--dataset", "imagefolder", "--data-dir", str(folder), "--model",
                 "examples.my_model:make_net", "--epochs", "2", "--out", str(out)], cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["image_size"] == 28  # the images' own size, not 224
    api = subprocess.run([sys.executable, "-m", "examples.train_from_python", str(folder),
                          str(tmp_path / "api")], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert api.returncode == 0, api.stderr
    assert "center test accuracy" in api.stdout


@pytest.mark.slow
def test_torchvision_model_by_name(tmp_path):
    proc = _cli(["--model", "torchvision:mobilenet_v3_small", "--steps", "5", "--workers", "2",
                 "--eval-samples", "200", "--out", str(tmp_path / "run")], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["model"] == "torchvision:mobilenet_v3_small"
    assert summary["steps_per_worker"] == [5, 5]
