"""The Python API: train your own model on your own data, as the command line does.

    from easgd_local import TrainConfig, train
    summary = train(TrainConfig(algo="eamsgd", workers=4, epochs=3),
                    model="mypkg.nets:make_net", data="mypkg.data:make_data")

``model``, ``data``, ``loss`` and ``metric`` are ``module:attr`` names or the callables
themselves; either way the spawned workers import them by name, so a callable must be defined
at the top level of a module (not a lambda, not a closure, not in ``__main__``). The factories'
contract is in the README ("Your own model and data"). The run directory is the same as the
command line's (with its curves.png and metrics.csv), and the summary is returned.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import TrainConfig
from .user import spec_of

Spec = str | Callable[..., Any]


def train(config: TrainConfig | None = None, *, model: Spec | None = None,
          data: Spec | None = None, loss: Spec | None = None, metric: Spec | None = None,
          reporter: Any = None) -> dict[str, Any]:
    """Run one training job; returns its summary (also written to summary.json).

    model: a factory returning an ``nn.Module`` (given ``num_classes``, ``in_channels``,
    ``image_size`` where it takes them), a built-in name, or ``"torchvision:NAME"``.
    data: a factory returning (train, test) Datasets of (input, label) or tensors
    (X_train, y_train, X_test, y_test), or a built-in data set's name.
    loss: (outputs, targets) -> mean loss; metric: (outputs, targets) -> mean score in [0, 1]
    (defaults: cross-entropy and accuracy). Raises TypeError when ``config`` is not a
    TrainConfig, ConfigError (one line) on bad input, before any process starts; TrainError if
    the run cannot finish.
    """
    from .launcher import expect_config, train as run
    from .plot import write_run_files

    config = dataclasses.replace(expect_config(config)) if config is not None else TrainConfig()
    if model is not None:
        config.model = spec_of(model, "model")
    if data is not None:
        config.dataset = spec_of(data, "data")
    if loss is not None:
        config.loss = spec_of(loss, "loss")
    if metric is not None:
        config.metric = spec_of(metric, "metric")
    summary = run(config, reporter)
    if config.out is not None:  # set by the run where it was not given
        write_run_files(Path(config.out))
    return summary
