"""The baselines and variants: each trains, and the equivalences the algorithms promise hold."""

import math

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from easgd_local import rules
from easgd_local.center import SharedCenter
from easgd_local.config import TrainConfig
from easgd_local.data import load_split
from easgd_local.evaluate import Evaluator
from easgd_local.flat import flatten_
from easgd_local.launcher import train
from easgd_local.models import build_model
from easgd_local.rules_reference import reference_sync_easgd_step

from .helpers import assert_no_leftovers, leftovers_snapshot


def _train(tmp_path, name, **kw):
    before = leftovers_snapshot()
    config = TrainConfig(out=tmp_path / name, quiet=True, **kw)
    summary = train(config)
    assert_no_leftovers(before)
    return config, summary


def _center(config):
    sd = torch.load(config.out / "center.pt", weights_only=True)
    return torch.cat([t.reshape(-1) for t in sd.values() if t.is_floating_point()])


# --- the master side, in one process -------------------------------------------------------

def test_average_of_all_centers():
    center = SharedCenter(torch.zeros(3), average=True)
    seen = [center.data.clone()]
    for k in range(5):
        center.push_(torch.full((3,), float(k + 1)))
        seen.append(center.data.clone())
    torch.testing.assert_close(center.average, torch.stack(seen).mean(0))


def test_moving_average_rate():
    center = SharedCenter(torch.zeros(2), average=True)
    center.push_(torch.ones(2), average_rate=0.001)
    torch.testing.assert_close(center.average, torch.full((2,), 0.001))


def test_master_momentum_is_nesterov_on_pushed_updates():
    """One worker pushing u = -lr g every step through master momentum = MSGD on that worker."""
    center = SharedCenter(torch.tensor([2.0, -1.0]), momentum=0.9)
    y = center.data.clone()
    v = torch.zeros(2)
    for _ in range(20):
        g_master = torch.sin(center.data) + center.data  # gradient at the pulled center
        center.push_(-0.1 * g_master)
        g_local = torch.sin(y) + y
        rules.local_step_(y, g_local, 0.1, v=v, momentum=0.9)
        torch.testing.assert_close(center.data, y)  # both hold the look-ahead point
        torch.testing.assert_close(center.reported(), rules.current_x(y, v, 0.9))


# --- equivalences through the real trainer ---------------------------------------------------

@pytest.mark.slow
# mdownpour pushes u = (y - lr g) - y, which rounds differently from -lr g, and 30 steps of
# training amplify that to ~3e-4; plain sgd in its place differs by ~0.1.
@pytest.mark.parametrize("pair", [("downpour", "sgd", {}, 1e-6), ("mdownpour", "msgd", {"momentum": 0.9}, 2e-3)],
                         ids=["downpour=sgd", "mdownpour=msgd"])
def test_one_worker_tau_one_follows_the_reference(tmp_path, pair):
    algo, reference, extra, atol = pair
    common = dict(workers=1, tau=1, steps=30, lr=0.02, eval_every=100.0, **extra)
    a, _ = _train(tmp_path, algo, algo=algo, **common)
    b, _ = _train(tmp_path, reference, algo=reference, **common)
    torch.testing.assert_close(_center(a), _center(b), rtol=0, atol=atol)


@pytest.mark.slow
def test_sync_easgd_matches_the_equations(tmp_path):
    """Two spawned workers against a single-process run of the synchronous equations, with the
    same initial weights and the same per-worker mini-batches."""
    steps, tau, lr, workers = 12, 3, 0.05, 2
    config, s = _train(tmp_path, "sync", algo="sync-easgd", workers=workers, tau=tau, steps=steps,
                       lr=lr, eval_every=100.0)
    alpha = config.resolved_alpha

    torch.manual_seed(config.seed)  # as the launcher draws the initial weights
    init = Evaluator(config, 28, "cpu").state.flat.clone()
    data = load_split("mnist10k", config.data_dir, train=True, device="cpu", image_size=28)
    states = [flatten_(build_model("cnn", data.info)) for _ in range(workers)]
    batches = []
    for r, st in enumerate(states):
        st.flat.copy_(init)
        batches.append(data.batches(config.batch_size, generator=torch.Generator().manual_seed(config.seed + r)))
    center = init.clone()
    for t in range(steps):
        grads = []
        for st, it in zip(states, batches):
            x, y = next(it)
            st.grad.zero_()
            F.cross_entropy(st.module(x), y).backward()
            grads.append(st.grad.clone())
        if t % tau == 0:
            new_xs, center = reference_sync_easgd_step([st.flat.clone() for st in states], center,
                                                       grads, lr=lr, alpha=alpha)
            for st, nx in zip(states, new_xs):
                st.flat.copy_(nx)
        else:
            for st, g in zip(states, grads):
                st.flat.sub_(lr * g)
    assert s["exchanges"] == workers * math.ceil(steps / tau)
    torch.testing.assert_close(_center(config), center, rtol=1e-4, atol=1e-5)


# --- every new algorithm trains 2 CPU workers and improves the center --------------------------

NEW = [("downpour", {"tau": 1}), ("mdownpour", {"tau": 1, "lr": 0.01}), ("adownpour", {"tau": 1}),
       ("mvadownpour", {"tau": 1}), ("sync-easgd", {}), ("ddp", {})]


@pytest.mark.slow
@pytest.mark.parametrize("algo,kw", NEW, ids=[a for a, _ in NEW])
def test_new_algorithm_improves_the_center(tmp_path, algo, kw):
    config, s = _train(tmp_path, algo, algo=algo, workers=2, steps=100, eval_every=100.0, **kw)
    torch.manual_seed(config.seed)
    evaluator = Evaluator(config, 28, "cpu")
    init_loss, _ = evaluator.evaluate(evaluator.state.flat.clone())
    assert math.isfinite(s["final_test_loss"]) and s["final_test_loss"] < init_loss - 0.02, (init_loss, s)
    assert s["steps_per_worker"] == [100, 100]
    assert s["exchanges"] > 0 and s["bytes_exchanged"] > 0
