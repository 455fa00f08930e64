"""Tests for easgd_local.models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from easgd_local import models
from easgd_local.data import DatasetInfo, load_split
from easgd_local.models import MODELS, build_model, model_input_size

MNIST_LIKE = DatasetInfo("mnist10k", 10, 1, 28)
CIFAR32 = DatasetInfo("cifar10", 10, 3, 32)
CIFAR28 = DatasetInfo("cifar100", 100, 3, 28)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("info", [MNIST_LIKE, CIFAR32, CIFAR28], ids=["1ch28", "3ch32", "3ch28"])
def test_logits_shape(name: str, info: DatasetInfo) -> None:
    torch.manual_seed(0)
    model = build_model(name, info)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    model.eval()
    x = torch.randn(3, info.in_channels, info.image_size, info.image_size)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (3, info.num_classes) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", MODELS)
def test_build_deterministic(name: str) -> None:
    torch.manual_seed(42)
    a = build_model(name, CIFAR28).state_dict()
    torch.manual_seed(42)
    b = build_model(name, CIFAR28).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    torch.manual_seed(43)
    c = build_model(name, CIFAR28).state_dict()
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def test_unknown_model() -> None:
    with pytest.raises(ValueError) as excinfo:
        build_model("vgg", MNIST_LIKE)
    assert "vgg" in str(excinfo.value) and "\n" not in str(excinfo.value)
    with pytest.raises(ValueError):
        model_input_size("vgg", 28)


def test_unknown_model_is_one_line_config_error() -> None:
    # The one check of a model's name: the launcher's --model error, wherever it is asked.
    from easgd_local.config import ConfigError

    for ask in (lambda: build_model("vgg", MNIST_LIKE), lambda: model_input_size("vgg", 28)):
        with pytest.raises(ConfigError, match=r"^unknown --model 'vgg'; choose one of cnn, .*module:factory$"):
            ask()
    model_input_size("mine:make", 28)  # a pattern, not a name of the table


def test_model_input_size() -> None:
    assert model_input_size("cifar-paper", 32) == 28
    assert model_input_size("cnn", 28) == 28 and model_input_size("cnn", 32) == 32
    assert model_input_size("resnet18", 224) == 224


def test_cnn_architecture() -> None:
    model = build_model("cnn", MNIST_LIKE)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (1, models.CNN_CONV1_CHANNELS, (5, 5), (2, 2)),
        (models.CNN_CONV1_CHANNELS, models.CNN_CONV2_CHANNELS, (5, 5), (2, 2)),
    ]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (models.CNN_CONV2_CHANNELS * 7 * 7, models.CNN_HIDDEN), (models.CNN_HIDDEN, 10)]
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.Dropout)) for m in model.modules())
    assert build_model("cnn", CIFAR32).classifier[1].in_features == models.CNN_CONV2_CHANNELS * 8 * 8


def test_cifar_paper_architecture() -> None:
    model = build_model("cifar-paper", CIFAR28)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size) for c in convs] == [(64, (5, 5)), (128, (5, 5)), (64, (3, 3))]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64 * 6 * 6, 256), (256, 100)]
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert len(dropouts) == 1 and dropouts[0].p == 0.5


def test_resnet18_channels() -> None:
    assert build_model("resnet18", MNIST_LIKE).conv1.in_channels == 1
    assert build_model("resnet18", CIFAR32).conv1.in_channels == 3


def test_cnn_learns_on_mnist10k() -> None:
    # A few dozen SGD steps must cut the loss clearly: catches wiring errors
    # (wrong normalisation, labels shuffled apart from images) the shape tests miss.
    torch.manual_seed(0)
    split = load_split("mnist10k", "unused", True, "cpu")
    model = build_model("cnn", split.info)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for step, (x, y) in enumerate(split.batches(64, torch.Generator().manual_seed(0))):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step == 59:
            break
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:5]) / 5
