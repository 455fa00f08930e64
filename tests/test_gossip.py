"""Elastic Gossip and Gossiping SGD: the real communicators against a literal reference, the
pair exchange's conservation, independence without gossip, no deadlock across processes; and
the dynamic weighting rule."""

import json
import pytest
import torch

from easgd_local import rules
from easgd_local.algorithms.elastic import DynamicWeighting, add_weighting_entries
from easgd_local.center import Diverged
from easgd_local.config import ConfigError, TrainConfig
from easgd_local.launcher import train
from .rules_reference import ReferenceGossip
from easgd_local.shared import SharedState
from easgd_local.worker import FAULT_ENV

from .helpers import assert_no_leftovers, leftovers_snapshot
from .test_family import N, _communicators, _drive, _flat, _pieces, grad_oracle


def _gossipers(algo, workers, **options):
    return _communicators(algo, workers, seed=5, **options)


def _values(shared, ys):
    """Each worker's whole value: its parameters plus the moves waiting in its inbox."""
    return [y.double() + shared[f"inbox{r}"].data.double() for r, y in enumerate(ys)]


def _spread(values):
    mean = sum(values) / len(values)
    return float(sum(((v - mean) ** 2).sum() for v in values))


def test_a_mutual_pick_meets_at_the_mean_once():
    """Two workers pick each other in the same period: the first exchange brings both to their
    mean, the second finds them there and moves nothing (counting the pair twice, or reading a
    peer's value without its inbox, swaps them instead)."""
    config, algorithm, shared, comms, ys, x0 = _gossipers("elastic-gossip", 2, gossip_prob=1.0)
    ys[1].add_(torch.randn(N, generator=torch.Generator().manual_seed(1)))
    comms[1].before_step(0, ys[1], None)  # worker 1 publishes its value (and picks worker 0)
    ys[0].copy_(x0)
    shared["inbox0"].data.zero_()
    shared["inbox0.count"].data.zero_()  # ... so that worker 0 starts from x0, worker 1 apart
    comms[1].initiated = 0
    published = shared["slot1"].data.clone()
    total = ys[0].double() + published.double()
    comms[0].before_step(0, ys[0], None)  # 0 picks 1
    comms[1].before_step(1, ys[1], None)  # 1 picks 0 in the same period
    values = _values(shared, ys)
    torch.testing.assert_close(values[0], total / 2, rtol=0, atol=1e-5)
    torch.testing.assert_close(values[1], total / 2, rtol=0, atol=1e-5)
    assert comms[0].initiated == 1 and comms[1].initiated == 1 and comms[1].received == 1


@pytest.mark.parametrize("schedule", ["round-robin", "random"])
@pytest.mark.parametrize("prob", [1.0, 1 / 8])
@pytest.mark.parametrize("workers", [2, 4, 8, 16])
def test_gossip_alone_reaches_consensus(workers, prob, schedule):
    """No gradients: only gossip acts, through the real communicators and shared state. The sum
    of the workers and their inboxes never changes, the spread between the workers never grows,
    and it falls below 1e-3 of its start (1e-6 in squares) within a bounded number of turns."""
    config, algorithm, shared, comms, ys, x0 = _gossipers(
        "elastic-gossip", workers, gossip_prob=prob)
    gen = torch.Generator().manual_seed(workers)
    for r in range(workers):  # the workers far apart, each from its own publication
        ys[r].add_(torch.randn(N, generator=gen) * (1 + r))
        shared[f"slot{r}"].data.copy_(ys[r])
    total = sum(_values(shared, ys))
    start = last = _spread(_values(shared, ys))
    steps = [0] * workers
    for turn in range(4000 * workers if prob < 1 else 400 * workers):
        i = turn % workers if schedule == "round-robin" else int(torch.randint(0, workers, (), generator=gen))
        comms[i].before_step(steps[i], ys[i], None)
        comms[i].after_step(steps[i], ys[i], None, torch.tensor(0.0))
        steps[i] += 1
        values = _values(shared, ys)
        spread = _spread(values)
        assert spread <= last * (1 + 1e-5) + 1e-9, (turn, spread, last)  # float32 rounding
        last = spread
        if spread < 1e-6 * start:
            break
    assert last < 1e-6 * start, (last / start, sum(c.initiated for c in comms))
    torch.testing.assert_close(sum(values), total, rtol=0, atol=1e-4)


def test_a_reset_after_divergence_keeps_the_sum():
    """A worker whose parameters turn non-finite starts again from its slot plus its inbox: what
    its peers sent it stays, so the sum of the workers and inboxes is unchanged."""
    config, algorithm, shared, comms, ys, x0 = _gossipers("elastic-gossip", 4, gossip_prob=1.0)
    gen = torch.Generator().manual_seed(3)
    for r in range(4):
        ys[r].add_(torch.randn(N, generator=gen))
        shared[f"slot{r}"].data.copy_(ys[r])
    for turn in range(6):  # exchanges leave moves in some inboxes
        comms[turn % 4].before_step(turn // 4, ys[turn % 4], None)
    total = sum(_values(shared, ys))
    assert any(float(shared[f"inbox{r}"].data.abs().sum()) > 0 for r in range(4))
    victim = next(r for r in range(4) if float(shared[f"inbox{r}"].data.abs().sum()) > 0)
    ys[victim].fill_(float("nan"))
    with pytest.raises(Diverged):
        comms[victim].before_step(2, ys[victim], None)
    comms[victim].reset(ys[victim])
    torch.testing.assert_close(sum(_values(shared, ys)), total, rtol=0, atol=1e-5)


@pytest.mark.parametrize("algo,momentum", [("elastic-gossip", 0.0), ("elastic-gossip", 0.9),
                                           ("gossip-sgd", 0.9)])
def test_gossip_agrees_with_the_literal_reference_step_for_step(algo, momentum):
    config, algorithm, shared, comms, ys, x0 = _gossipers(algo, 4, gossip_prob=0.5, gossip_period=2)
    mirror = [torch.Generator().manual_seed(config.seed * 7919 + r) for r in range(4)]

    def choose(i):  # the same draws as the real communicator's
        if float(torch.rand((), generator=mirror[i])) >= 0.5:
            return None
        pick = int(torch.randint(0, 3, (), generator=mirror[i]))
        return pick + (pick >= i)

    for c in comms:
        c.momentum = momentum
    ref = ReferenceGossip(_pieces(x0), 4, lr=config.lr,
                          alpha=config.resolved_alpha if algo == "elastic-gossip" else 0.5,
                          period=2, symmetric=algo == "elastic-gossip", choose=choose,
                          momentum=momentum)
    vs = [torch.zeros(N) for _ in range(4)]

    def check(i):
        x = rules.current_x(ys[i], vs[i], momentum)
        torch.testing.assert_close(x, _flat(ref.workers[i].x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(shared[f"slot{i}"].data, _flat(ref.slots[i]), rtol=1e-5, atol=1e-5)

    _drive(comms, ys, config, 160, lambda i: ref.step(i, grad_oracle), check, vs=vs, momentum=momentum)
    assert sum(c.initiated for c in comms) > 20
    # The aggregate: the workers as last published, with what their inboxes hold.
    slots = torch.stack([_flat(s) for s in ref.slots]).mean(0)
    inbox = torch.stack([_flat(b) for b in ref.inbox]).mean(0)
    torch.testing.assert_close(algorithm.reported(shared, config), slots + inbox, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_without_gossip_the_workers_are_independent_runs(tmp_path):
    """Probability 0: worker 0 is Nesterov SGD (msgd) with the same seed, data order and
    momentum, exactly."""
    from easgd_local.checkpoint import Checkpointer, unpack_state

    common = dict(quiet=True, steps=40, lr=0.01, momentum=0.9, threads=1, eval_every=100.0,
                  checkpoint_every=None)
    s = train(TrainConfig(algo="elastic-gossip", workers=2, out=tmp_path / "g",
                          options={"gossip_prob": 0.0}, **common))
    train(TrainConfig(algo="msgd", out=tmp_path / "msgd", **common))
    worker0 = unpack_state(Checkpointer(tmp_path / "g").load()["workers"][0])
    x0 = rules.current_x(worker0["flat"], worker0["v"], 0.9)
    msgd = Checkpointer(tmp_path / "msgd").load()["algorithm"]["model"]
    torch.testing.assert_close(x0, msgd, rtol=0, atol=1e-6)
    assert s["exchanges"] == 0
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


@pytest.mark.slow
def test_a_worker_killed_mid_run_loses_nothing(tmp_path, monkeypatch):
    """Worker 2 killed with kill -9 at its step 150 while every worker gossips at every step:
    its new process starts from its slot plus its inbox, so the moves its peers sent it stay,
    and the sum of the workers and inboxes is exact in every checkpoint, before the death and
    after the restart. (Known drifts replace the others' local steps; worker 2 takes no step of
    its own: its drift is 0 and, after the restart, its learning rate ~0.)"""
    from easgd_local.checkpoint import Checkpointer, unpack_state
    from easgd_local.evaluate import Evaluator

    drifts = [0.01, -0.02, 0.0, 0.005]
    monkeypatch.setenv(FAULT_ENV, "0:0:drift:0.01,1:0:drift:-0.02,3:0:drift:0.005,2:150:kill")
    saved = []
    real_save = Checkpointer.save
    monkeypatch.setattr(Checkpointer, "save", lambda self, p: (saved.append(p), real_save(self, p)))
    config = TrainConfig(algo="elastic-gossip", out=tmp_path / "run", quiet=True, workers=4,
                         lr=1e-12, steps=400, eval_every=100.0, checkpoint_every=0.5,
                         options={"gossip_prob": 1.0})
    before = leftovers_snapshot()
    s = train(config)
    assert_no_leftovers(before)
    assert s["worker_restarts"] == 1 and s["divergences"] == 0
    torch.manual_seed(config.seed)
    c0 = Evaluator(config, 28, "cpu").state.flat.clone().double()
    assert len(saved) >= 2
    for payload in saved:
        shared = payload["algorithm"]
        # A rank that died and has not answered since has no state: it restarts (and would
        # resume) from its slot plus its inbox.
        flats = [unpack_state(payload["workers"][r])["flat"] if r in payload["workers"]
                 else shared[f"slot{r}"] for r in range(4)]
        total = sum(f.double() for f in flats) + sum(shared[f"inbox{r}"].double() for r in range(4))
        drift = sum(d * int(n) for d, n in zip(drifts, payload["steps"].tolist()))
        assert (total - 4 * c0 - drift).abs().max() < 5e-3
    spread = max(float((unpack_state(saved[-1]["workers"][r])["flat"]
                        - unpack_state(saved[-1]["workers"][0])["flat"]).abs().max()) for r in range(4))
    assert spread < 0.5  # gossip kept them together across the death


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
