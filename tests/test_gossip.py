"""Elastic Gossip and Gossiping SGD: the real communicators against a literal reference, the
pair exchange's conservation, independence without gossip, no deadlock across processes; and
the dynamic weighting rule."""

import json
import pytest
import torch

from easgd_local import rules
from easgd_local.algorithms.elastic import DynamicWeighting, add_weighting_entries
from easgd_local.config import ConfigError, TrainConfig
from easgd_local.launcher import train
from easgd_local.rules_reference import ReferenceGossip
from easgd_local.shared import SharedState
from easgd_local.worker import FAULT_ENV

from .helpers import assert_no_leftovers, leftovers_snapshot
from .test_family import N, _communicators, _drive, _flat, _pieces, grad_oracle


def _gossipers(algo, workers, **options):
    return _communicators(algo, workers, seed=5, **options)


def test_a_pair_exchange_conserves_the_pair():
    config, algorithm, shared, comms, ys, x0 = _gossipers("elastic-gossip", 2, gossip_prob=1.0)
    ys[1].add_(torch.randn(N))  # the pair apart
    before = ys[0].double() + ys[1].double()
    comms[0].before_step(0, ys[0], None)  # worker 0 picks worker 1 (the only peer)
    comms[0].after_step(0, ys[0], None, torch.tensor(0.0))
    comms[1].after_step(0, ys[1], None, torch.tensor(0.0))  # worker 1 takes in its share
    torch.testing.assert_close(ys[0].double() + ys[1].double(), before, rtol=0, atol=1e-6)
    assert comms[0].initiated == 1 and comms[1].received == 1
    assert torch.equal(shared["inbox1"].data, torch.zeros(N))


@pytest.mark.parametrize("algo", ["elastic-gossip", "gossip-sgd"])
def test_gossip_agrees_with_the_literal_reference_step_for_step(algo):
    config, algorithm, shared, comms, ys, x0 = _gossipers(algo, 4, gossip_prob=0.5, gossip_period=2)
    mirror = [torch.Generator().manual_seed(config.seed * 7919 + r) for r in range(4)]

    def choose(i):  # the same draws as the real communicator's
        if float(torch.rand((), generator=mirror[i])) >= 0.5:
            return None
        pick = int(torch.randint(0, 3, (), generator=mirror[i]))
        return pick + (pick >= i)

    ref = ReferenceGossip(_pieces(x0), 4, lr=config.lr,
                          alpha=config.resolved_alpha if algo == "elastic-gossip" else 0.5,
                          period=2, symmetric=algo == "elastic-gossip", choose=choose)

    def check(i):
        torch.testing.assert_close(ys[i], _flat(ref.workers[i].x), rtol=1e-5, atol=1e-5)

    _drive(comms, ys, config, 160, lambda i: ref.step(i, grad_oracle), check)
    assert sum(c.initiated for c in comms) > 20
    if algo == "elastic-gossip":
        # The aggregate: the workers as last published, with what their inboxes hold.
        slots = torch.stack([_flat(s) for s in ref.slots]).mean(0)
        inbox = torch.stack([_flat(b) for b in ref.inbox]).mean(0)
        torch.testing.assert_close(algorithm.reported(shared, config), slots + inbox, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_without_gossip_the_workers_are_independent_runs(tmp_path):
    from easgd_local.checkpoint import Checkpointer, unpack_state

    common = dict(quiet=True, steps=40, lr=0.05, threads=1, eval_every=100.0, checkpoint_every=None)
    s = train(TrainConfig(algo="elastic-gossip", workers=2, out=tmp_path / "g",
                          options={"gossip_prob": 0.0}, **common))
    train(TrainConfig(algo="sgd", out=tmp_path / "sgd", **common))
    worker0 = unpack_state(Checkpointer(tmp_path / "g").load()["workers"][0])["flat"]
    sgd = Checkpointer(tmp_path / "sgd").load()["algorithm"]["model"]
    torch.testing.assert_close(worker0, sgd, rtol=0, atol=1e-6)
    assert s["exchanges"] == 0 and s["bytes_exchanged"] == 0
    records = [json.loads(line) for line in (tmp_path / "g" / "metrics.jsonl").read_text().splitlines()]
    assert "worker0_test_accuracy" in records[-1]


@pytest.mark.slow
def test_four_workers_gossiping_at_every_step_lose_nothing(tmp_path, monkeypatch):
    """Probability 1: every worker initiates at every step, with the locks in place, for
    10 s. No deadlock, and with known drifts for local steps, the sum of all workers and all
    inboxes is exact in every checkpoint."""
    from easgd_local.checkpoint import Checkpointer, unpack_state
    from easgd_local.evaluate import Evaluator

    drifts = [0.01, -0.02, 0.0, 0.005]
    monkeypatch.setenv(FAULT_ENV, ",".join(f"{r}:0:drift:{d}" for r, d in enumerate(drifts)))
    saved = []
    real_save = Checkpointer.save
    monkeypatch.setattr(Checkpointer, "save", lambda self, p: (saved.append(p), real_save(self, p)))
    config = TrainConfig(algo="elastic-gossip", out=tmp_path / "run", quiet=True, workers=4,
                         time_limit=10.0, eval_every=100.0, checkpoint_every=1.0,
                         options={"gossip_prob": 1.0})
    before = leftovers_snapshot()
    s = train(config)
    assert_no_leftovers(before)
    assert s["exchanges"] > 100 * 4
    torch.manual_seed(config.seed)
    c0 = Evaluator(config, 28, "cpu").state.flat.clone().double()
    for payload in saved:
        shared = payload["algorithm"]
        workers = [unpack_state(payload["workers"][r]) for r in range(4)]
        total = sum(w["flat"].double() for w in workers) + sum(shared[f"inbox{r}"].double() for r in range(4))
        drift = sum(d * int(w["step"]) for d, w in zip(drifts, workers))
        assert (total - 4 * c0 - drift).abs().max() < 5e-3


def test_gossip_refuses_what_does_not_apply():
    with pytest.raises(ConfigError, match="--beta does not apply"):
        TrainConfig(algo="elastic-gossip", workers=4, beta=0.9).validate()
    with pytest.raises(ConfigError, match="--gossip-prob"):
        TrainConfig(algo="elastic-gossip", workers=4, options={"gossip_prob": 1.5}).validate()
    with pytest.raises(ConfigError, match="at least 2 workers"):
        TrainConfig(algo="gossip-sgd", workers=1).validate()


# --- dynamic weighting ------------------------------------------------------------------------

def test_rate_weights_a_straggler_down_by_its_staleness():
    p, beta = 4, 0.9
    # All as fast as the median: each saw the other 3 between two of its exchanges.
    assert rules.dynamic_rate(beta, 3, [3, 3, 3, 3], [1, 2, 3], p) == pytest.approx(beta / 4)
    # Five times the median's staleness: a fifth of the rate.
    assert rules.dynamic_rate(beta, 15, [3, 3, 3, 15], [1, 2, 3], p) == pytest.approx(beta / 4 / 5)


def test_rate_keeps_beta_over_the_live_workers():
    p, beta = 4, 0.9
    # Worker 3 has not exchanged for 100 updates (dead, hung): 3 live workers share beta.
    assert rules.dynamic_rate(beta, 3, [3, 3, 3, 3], [1, 2, 100], p) == pytest.approx(beta / 3)


def test_a_returning_worker_rejoins_at_full_weight():
    state = SharedState()
    state.add("center", torch.zeros(4))
    state.add("center.clock", torch.zeros(1), lock="center", dtype=torch.int64)
    add_weighting_entries(state, "center", 3)
    ws = [DynamicWeighting(state, "center", i, beta=0.9) for i in range(3)]
    for _ in range(40):  # workers 0 and 1 exchange in turn; worker 2 is away
        for w in ws[:2]:
            w.record()
    assert ws[0].rate() == pytest.approx(0.9 / 2)  # beta over the two live workers
    assert ws[2].rate() < 0.9 / 3 / 10  # its pull, were it to exchange now, is stale
    ws[2].rejoin()  # restarted from the center
    assert ws[2].rate() == pytest.approx(0.9 / 3)
