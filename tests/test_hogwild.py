"""Hogwild: every worker's model is the one shared model, stepped in place without a lock."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from easgd_local import rules
from easgd_local.algorithms import get
from easgd_local.algorithms.hogwild import ENTRY, SharedModel, pushing
from easgd_local.config import TrainConfig
from easgd_local.evaluate import Evaluator
from easgd_local.flat import detached, flatten_
from easgd_local.launcher import train
from easgd_local.worker import FAULT_ENV

from .helpers import assert_no_leftovers, leftovers_snapshot


def _model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def _workers(momentum=0.0, count=2):
    """The shared state of hogwild and ``count`` in-process workers whose models are it."""
    algorithm = get("hogwild")
    init = flatten_(_model(0))
    shared = algorithm.shared_state(SimpleNamespace(lock=True), init.flat, init.n_params)
    workers = []
    for rank in range(count):
        state = flatten_(_model(1 + rank))  # other weights: start must make them the shared ones
        comm = algorithm.communicator(SimpleNamespace(
            device=torch.device("cpu"), shared=shared, n_params=state.n_params))
        assert isinstance(comm, SharedModel)
        comm.wrap(state.module)
        comm.start(state.flat)
        v = torch.zeros(state.n_params) if momentum else None
        workers.append((state, v))
    return algorithm, shared, init, workers


def test_every_worker_computes_on_the_shared_model():
    algorithm, shared, init, workers = _workers()
    center = shared[ENTRY].data
    assert shared[ENTRY].lock is None  # never locked, whatever --lock says
    for state, _ in workers:
        assert state.flat.data_ptr() == center.data_ptr() and detached(state) is None
        torch.testing.assert_close(state.flat, init.flat)  # the shared weights, not its own
        first = next(state.module.parameters())
        assert first.data_ptr() == center.data_ptr()
        bn = state.module[1]
        assert center.data_ptr() <= bn.running_mean.data_ptr() < center.data_ptr() + 4 * center.numel()
    # A forward of worker 0 updates the batch-norm statistics that worker 1 uses.
    workers[0][0].module.train()(torch.randn(8, 3))
    torch.testing.assert_close(workers[1][0].module[1].running_mean,
                               workers[0][0].module[1].running_mean)


@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_the_shared_model_moves_by_the_sum_of_both_workers_steps(momentum):
    algorithm, shared, init, workers = _workers(momentum)
    lr, n = 0.1, init.n_params
    expected = init.flat.clone()
    velocities = [torch.zeros(n) for _ in workers]
    for step in range(3):
        for rank, (state, v) in enumerate(workers):
            g = torch.full((n,), float(rank + 1)) * (step + 1)
            rules.local_step_(state.flat, g, lr, v=v, momentum=momentum)
            # Each worker's own velocity: its move is (1 + delta) v' - delta v, added in place.
            old = velocities[rank].clone()
            velocities[rank].mul_(momentum).add_(g, alpha=-lr)
            expected[:n] += (1 + momentum) * velocities[rank] - momentum * old
    torch.testing.assert_close(algorithm.reported(shared, None), expected)
    assert not torch.equal(expected, init.flat)
    for state, _ in workers:
        torch.testing.assert_close(state.flat, expected)


def test_a_worker_on_a_copy_pushes_every_step():
    """The GPU workers' way (here on the CPU): a copy, each step's move added to the shared
    model and read back, so the shared model still moves by the sum of the steps."""
    algorithm = get("hogwild")
    init = flatten_(_model(0))
    shared = algorithm.shared_state(SimpleNamespace(lock=True), init.flat, init.n_params)
    n, lr = init.n_params, 0.1
    comms, ys = [], []
    for rank in range(2):
        comm = pushing(shared, n, "cpu")
        y = torch.zeros(init.numel)
        comm.start(y)
        comms.append(comm)
        ys.append(y)
    torch.testing.assert_close(ys[1], init.flat)
    expected = init.flat.clone()
    for step in range(3):
        for rank, (comm, y) in enumerate(zip(comms, ys)):
            g = torch.full((n,), float(rank + 1))
            rules.local_step_(y, g, lr)
            comm.after_step(step, y, None, torch.zeros(()))
            expected[:n] -= lr * g
            torch.testing.assert_close(y, expected)  # the shared model, read back
    torch.testing.assert_close(algorithm.reported(shared, None), expected)


def test_a_reset_keeps_the_shared_model():
    _, shared, _, workers = _workers()
    state, _ = workers[0]
    before = shared[ENTRY].data.clone()
    comm = SharedModel(shared[ENTRY].data)
    comm.reset(state.flat)
    assert torch.equal(shared[ENTRY].data, before)


@pytest.mark.slow
def test_two_spawned_workers_step_one_model(tmp_path, monkeypatch):
    """Local steps replaced by a known drift: the shared model moves by both workers' drifts
    (no lock, so an add that races another may be lost: in CI 7% of them were; never counted twice)."""
    drift, steps = 1e-3, 40
    monkeypatch.setenv(FAULT_ENV, f"0:0:drift:{drift},1:0:drift:{drift}")
    config = TrainConfig(algo="hogwild", out=tmp_path / "run", quiet=True, workers=2,
                         steps=steps, eval_every=100.0, momentum=0.0)
    before = leftovers_snapshot()
    summary = train(config)
    assert_no_leftovers(before)
    torch.manual_seed(config.seed)
    evaluator = Evaluator(config, 28, "cpu")
    c0, n = evaluator.state.flat.clone(), evaluator.state.n_params
    sd = torch.load(config.out / "center.pt", weights_only=True)
    final = torch.cat([t.reshape(-1) for t in sd.values() if t.is_floating_point()])
    moved = (final[:n] - c0[:n]).double().mean().item()
    assert summary["steps_per_worker"] == [steps, steps]
    assert moved > 1.25 * steps * drift  # well past one worker's moves: both land on one model
    assert moved <= 2 * steps * drift * (1 + 1e-4)  # no add lands twice
    assert summary["exchanges"] == 0 and summary["bytes_exchanged"] == 0


@pytest.mark.slow
def test_two_workers_of_hogwild_train(tmp_path):
    before = leftovers_snapshot()
    config = TrainConfig(algo="hogwild", out=tmp_path / "run", quiet=True, workers=2, steps=80,
                         lr=0.01, momentum=0.9, eval_every=100.0)
    s = train(config)
    assert_no_leftovers(before)
    assert math.isfinite(s["final_test_loss"]) and s["final_test_accuracy"] > 0.85, s
    assert s["steps_per_worker"] == [80, 80]
