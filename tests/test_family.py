"""EASGD-Tree and LSGD: the real communicators against slow literal references, their
invariants across processes, faults, and the bad values they refuse."""

import json
import math
import types

import pytest
import torch
import torch.multiprocessing as mp

from easgd_local import rules
from easgd_local.algorithms import get
from easgd_local.algorithms.base import WorkerContext
from easgd_local.algorithms.leader import leader
from easgd_local.algorithms.tree import root_exchange_
from easgd_local.config import ConfigError, TrainConfig
from easgd_local.launcher import train
from .rules_reference import ReferenceAsyncEASGD, ReferenceEASGDTree, ReferenceLSGD
from easgd_local.shared import SharedState
from easgd_local.worker import FAULT_ENV

from .helpers import assert_no_leftovers, flat_of as _flat, leftovers_snapshot, pieces_of

SHAPES = [(6, 3), (4,), (2, 2, 3)]
N = sum(torch.Size(s).numel() for s in SHAPES)


def _pieces(flat):
    return pieces_of(flat, SHAPES)


def grad_oracle(point, worker, step):
    """A random positive diagonal and offset per worker and step: g = a * x + b."""
    gen = torch.Generator().manual_seed(worker * 7919 + step)
    a = torch.rand(N, generator=gen) * 0.5 + 0.25
    b = torch.randn(N, generator=gen)
    return _pieces(a * _flat(point) + b)


def loss_oracle(point, worker, step):
    """Well separated per worker, so that the leaders do not hinge on rounding; the order of the
    workers differs from their ranks' and changes every 3 steps (5 is invertible mod 7), so a
    leader chosen by rank, or never re-chosen, disagrees with the reference."""
    return float((_flat(point) ** 2).mean()) + 0.37 * ((5 * worker + 3 * (step // 3)) % 7) + 0.01 * step


def _communicators(algo, workers, seed=3, momentum=None, **options):
    """The real shared state and communicators of ``algo`` in this process, on CPU, each worker
    started (the round-robin tests drive them)."""
    config = TrainConfig(algo=algo, workers=workers, options=options, lr=0.05, tau=2,
                         momentum=momentum).validate()
    x0 = torch.randn(N, generator=torch.Generator().manual_seed(seed))
    algorithm = get(algo)
    shared = algorithm.shared_state(config, x0, N)
    channels = types.SimpleNamespace(shared=shared)
    comms = [algorithm.communicator(WorkerContext(r, config, channels, torch.device("cpu"), N, 0))
             for r in range(workers)]
    ys = []
    for c in comms:
        y = torch.empty(N)
        c.start(y)
        ys.append(y)
    return config, algorithm, shared, comms, ys, x0


def _drive(comms, ys, config, steps, ref_step, check, vs=None, momentum=0.0):
    """Round-robin turns of the real communicators around real local steps (with Nesterov
    momentum ``momentum`` on the velocities ``vs``)."""
    t = [0] * len(comms)
    for turn in range(steps):
        i = turn % len(comms)
        v = None if vs is None else vs[i]
        point = _pieces(ys[i].clone())
        g = _flat(grad_oracle(point, i, t[i]))
        loss = torch.tensor(loss_oracle(point, i, t[i]))
        comms[i].before_step(t[i], ys[i], v)
        rules.local_step_(ys[i], g, config.lr, v=v, momentum=momentum)
        comms[i].after_step(t[i], ys[i], v, loss)
        ref_step(i)
        t[i] += 1
        check(i)


# --- EASGD-Tree --------------------------------------------------------------------------------

def test_tree_agrees_with_the_literal_reference_step_for_step():
    """6 workers in 2 groups of 3 (groups != group size, so a rate divided by the wrong one
    disagrees): alpha = beta / 3 = 0.3, alpha_root = beta_root / 2 = 0.4, pinned."""
    config, algorithm, shared, comms, ys, x0 = _communicators(
        "easgd-tree", 6, group_size=3, tau_root=3, beta_root=0.8)
    assert config.resolved_alpha == pytest.approx(0.3)
    assert config.resolved_options["alpha_root"] == pytest.approx(0.4)
    ref = ReferenceEASGDTree(_pieces(x0), 6, 3, lr=config.lr, alpha=0.3, tau=config.tau,
                             tau_root=3, alpha_root=0.4)

    def check(i):
        torch.testing.assert_close(ys[i], _flat(ref.workers[i].x), rtol=1e-5, atol=1e-5)
        for g in range(2):
            torch.testing.assert_close(shared[f"group{g}"].data, _flat(ref.groups[g]), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(shared["root"].data, _flat(ref.root), rtol=1e-5, atol=1e-5)

    _drive(comms, ys, config, 300, lambda i: ref.step(i, grad_oracle), check)
    assert sum(ref.counts) >= 6 * 3  # several root exchanges happened
    assert not torch.equal(shared["root"].data, x0)
    assert sum(c.bytes for c in comms) == sum(c.root_exchanges for c in comms) * 2 * N * 4


def test_tree_with_one_group_is_easgd_plus_a_trailing_root():
    """One group: between root exchanges the workers and the group center are EASGD exactly
    (the paper's reference); each root exchange moves the root alpha_root of the way to the
    center and the center as much back."""
    config, algorithm, shared, comms, ys, x0 = _communicators(
        "easgd-tree", 3, group_size=3, tau_root=1_000_000)
    ref = ReferenceAsyncEASGD(_pieces(x0), 3, lr=config.lr, alpha=config.resolved_alpha, tau=config.tau)

    def check(i):
        torch.testing.assert_close(ys[i], _flat(ref.workers[i].x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(shared["group0"].data, _flat(ref.center), rtol=1e-5, atol=1e-5)

    _drive(comms, ys, config, 90, lambda i: ref.step(i, grad_oracle), check)
    assert torch.equal(shared["root"].data, x0)  # no root exchange yet: the root is the start
    center, root = shared["group0"].data.clone(), shared["root"].data.clone()
    alpha_root = config.resolved_options["alpha_root"]
    d = root_exchange_(shared["group0"], shared["root"], alpha_root)
    torch.testing.assert_close(d, alpha_root * (center - root))
    torch.testing.assert_close(shared["root"].data, root + d)
    torch.testing.assert_close(shared["group0"].data, center - d)


def _crash_in_root_exchange(group, root, alpha_root):
    root.crash_in_lock = True
    root_exchange_(group, root, alpha_root)


def test_worker_killed_inside_the_root_exchange_leaves_no_lock_and_a_partial_step():
    state = SharedState()
    g0, r0 = torch.full((1000,), 2.0), torch.zeros(1000)
    group, root = state.add("group0", g0), state.add("root", r0)
    proc = mp.get_context("spawn").Process(target=_crash_in_root_exchange, args=(group, root, 0.5))
    proc.start()
    proc.join(60)
    assert proc.exitcode == -9
    assert group.lock.acquire(timeout=5) and root.lock.acquire(timeout=5)  # nothing left held
    group.lock.__exit__(None, None, None)
    root.lock.__exit__(None, None, None)
    # As documented: part of d reached the root, none was taken from the group center.
    assert torch.equal(root.data[:500], torch.full((500,), 1.0))
    assert torch.equal(root.data[500:], torch.zeros(500))
    assert torch.equal(group.data, g0)
    state.close()


@pytest.mark.slow
def test_tree_sum_is_invariant_across_processes(tmp_path, monkeypatch):
    """Local steps replaced by known drifts, 4 spawned workers in 2 groups, locks in place: every
    exchange only moves mass between workers, group centers and root, so their sum is exact in
    every checkpoint (each taken at one instant)."""
    from easgd_local.checkpoint import Checkpointer, unpack_state
    from easgd_local.evaluate import Evaluator

    drifts = [0.01, -0.01, 0.02, 0.0]
    monkeypatch.setenv(FAULT_ENV, ",".join(f"{r}:0:drift:{d}" for r, d in enumerate(drifts)))
    saved = []
    real_save = Checkpointer.save
    monkeypatch.setattr(Checkpointer, "save", lambda self, p: (saved.append(p), real_save(self, p)))
    config = TrainConfig(algo="easgd-tree", out=tmp_path / "run", quiet=True, workers=4, tau=2,
                         steps=300, eval_every=100.0, checkpoint_every=0.2,
                         options={"group_size": 2, "tau_root": 2})
    before = leftovers_snapshot()
    train(config)
    assert_no_leftovers(before)
    torch.manual_seed(config.seed)
    c0 = Evaluator(config, 28, "cpu").state.flat.clone().double()
    assert len(saved) >= 2
    for payload in saved:
        shared = payload["algorithm"]
        workers = [unpack_state(payload["workers"][r]) for r in range(4)]
        drift = sum(d * int(w["step"]) for d, w in zip(drifts, workers))
        total = (sum(w["flat"].double() for w in workers) + shared["root"].double()
                 + shared["group0"].double() + shared["group1"].double())
        assert (total - 7 * c0 - drift).abs().max() < 2e-3


# --- LSGD ---------------------------------------------------------------------------------------

def test_leader_is_the_argmin_of_the_published_losses():
    losses = [0.5, math.inf, 0.2, 0.2, float("nan"), 0.9]
    assert leader(losses, range(6)) == 2  # the lowest; the first of a tie
    assert leader(losses, range(0, 2)) == 0  # inf (never published) is never a leader
    assert leader(losses, [4, 5]) == 5  # nor is NaN
    assert leader([math.inf, math.inf], range(2)) is None


@pytest.mark.parametrize("workers,group_size,momentum", [(6, 3, 0.9), (4, 2, 0.0), (3, 3, 0.9)])
def test_lsgd_agrees_with_the_literal_reference_step_for_step(workers, group_size, momentum):
    config, algorithm, shared, comms, ys, x0 = _communicators(
        "lsgd", workers, group_size=group_size, lam=0.2, lam_global=0.3, tau_global=4,
        leader_window=3)
    for c in comms:
        c.momentum = momentum
    ref = ReferenceLSGD(_pieces(x0), workers, group_size, lr=config.lr, lam=0.2, lam_global=0.3,
                        tau=2, tau_global=4, window=3, momentum=momentum)
    vs = [torch.zeros(N) for _ in range(workers)]
    leaders = set()

    def check(i):
        x = rules.current_x(ys[i], vs[i], momentum)
        torch.testing.assert_close(x, _flat(ref.workers[i].x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(shared[f"slot{i}"].data, _flat(ref.slots[i]), rtol=1e-5, atol=1e-5)
        leaders.add(ref._leader(range(workers)))

    _drive(comms, ys, config, 40 * workers, lambda i: ref.step(i, grad_oracle, loss_oracle), check,
           vs=vs, momentum=momentum)
    assert sum(c.reads for c in comms) > 5  # workers were pulled
    assert len(leaders - {None}) >= 3  # the lead changed hands, not by rank
    reported = algorithm.reported(shared, config)
    best = min(range(workers), key=lambda r: ref.losses[r])
    torch.testing.assert_close(reported, _flat(ref.slots[best]), rtol=1e-5, atol=1e-5)
    average = torch.stack([_flat(s) for s in ref.slots]).mean(0)
    torch.testing.assert_close(algorithm.also_reported(shared, config)["average"], average.float(),
                               rtol=1e-5, atol=1e-5)


def test_lsgd_one_bad_loss_costs_one_reset():
    """tau = window = 4 and one NaN loss at step 3, not a publication step: the publication at
    step 4 finds it and the worker starts again from its last publication, once. A loss window
    kept across the reset would throw it back again at step 8."""
    from easgd_local.center import Diverged

    config, algorithm, shared, comms, ys, x0 = _communicators(
        "lsgd", 2, group_size=2, leader_window=4, tau_global=4)
    comm, y = comms[0], ys[0]
    comm.period = 4
    resets = []
    for step in range(16):
        loss = torch.tensor(float("nan") if step == 3 else 1.0 / (step + 1))
        try:
            comm.before_step(step, y, None)
            y.add_(0.01)  # a local step
            comm.after_step(step, y, None, loss)
        except Diverged:
            comm.reset(y)  # as the worker does
            resets.append(step)
    assert resets == [4]
    torch.testing.assert_close(y, shared["slot0"].data + 0.01 * 4)  # steps 12-15 since step 12's publication
    assert float(shared["slot0.loss"].data[0]) == pytest.approx(sum(1 / (s + 1) for s in range(8, 12)) / 4)


def _publisher(shared, config, rank, rounds):
    from easgd_local.algorithms.leader import LeaderPull

    ctx = WorkerContext(rank, config, types.SimpleNamespace(shared=shared), torch.device("cpu"), N, 0)
    comm = LeaderPull(ctx)
    y = torch.empty(shared["slot0"].numel)
    for k in range(rounds):
        y.fill_(rank * 1000 + k)
        comm.after_step(k, y, None, torch.tensor(float(k)))
        comm.before_step(0, y, None)  # step 0: publish (lam = 0: no pull)


def _reader(shared, rounds, bad):
    from easgd_local.center import Link

    links = [Link(shared[f"slot{r}"], torch.device("cpu")) for r in range(2)]
    for _ in range(rounds):
        for link in links:
            x = link.read_whole()
            if not torch.all(x == x[0]):
                bad.value += 1


def test_lsgd_slots_are_never_read_half_written():
    """Two workers publish constant-filled slots as fast as they can while two others read them
    whole: every read holds one publication, never parts of two."""
    config = TrainConfig(algo="lsgd", workers=2, tau=1, options={"lam": 0.0, "lam_global": 0.0}).validate()
    shared = get("lsgd").shared_state(config, torch.zeros(1 << 18), 1 << 18)
    ctx = mp.get_context("spawn")
    bad = ctx.Value("i", 0)
    procs = [ctx.Process(target=_publisher, args=(shared, config, r, 300)) for r in range(2)]
    procs += [ctx.Process(target=_reader, args=(shared, 300, bad)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * 4
    assert bad.value == 0
    shared.close()


@pytest.mark.slow
def test_lsgd_without_pulls_is_independent_sgd(tmp_path):
    """lam = lam_G = 0 and no momentum: worker 0 follows sgd with the same seed and data order,
    exactly."""
    from easgd_local.checkpoint import Checkpointer, unpack_state

    common = dict(quiet=True, steps=40, lr=0.05, threads=1, eval_every=100.0, checkpoint_every=None)
    train(TrainConfig(algo="lsgd", workers=2, out=tmp_path / "lsgd", momentum=0.0,
                      options={"lam": 0.0, "lam_global": 0.0}, **common))
    train(TrainConfig(algo="sgd", out=tmp_path / "sgd", **common))
    worker0 = unpack_state(Checkpointer(tmp_path / "lsgd").load()["workers"][0])["flat"]
    sgd = Checkpointer(tmp_path / "sgd").load()["algorithm"]["model"]
    torch.testing.assert_close(worker0, sgd, rtol=0, atol=1e-6)


# --- both, through the real trainer -----------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("algo", ["easgd-tree", "lsgd", "elastic-gossip", "gossip-sgd"])
def test_trains_and_survives_a_dead_worker_and_a_nan(tmp_path, monkeypatch, algo):
    monkeypatch.setenv(FAULT_ENV, "1:40:kill,2:63:nan")  # the NaN between two exchanges
    before = leftovers_snapshot()
    config = TrainConfig(algo=algo, out=tmp_path / "run", quiet=True, workers=4, steps=250,
                         eval_every=100.0)
    s = train(config)
    assert_no_leftovers(before)
    assert s["worker_restarts"] == 1 and s["divergences"] == 1
    assert s["steps_per_worker"] == [250] * 4
    assert s["final_test_accuracy"] > 0.8, s
    assert s["bytes_exchanged"] > 0
    sd = torch.load(config.out / "center.pt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in sd.values())
    if algo in ("easgd-tree", "lsgd"):
        assert json.loads((config.out / "summary.json").read_text())["options"]["group_size"] == 2


BAD = [
    ("easgd-tree", {"group_size": 3}, "--group-size 3 does not divide"),
    ("easgd-tree", {"group_size": 0}, "--group-size"),
    ("easgd-tree", {"tau_root": 0}, "--tau-root"),
    ("easgd-tree", {"beta_root": 1.5}, "--beta-root"),
    ("lsgd", {"lam": 1.0}, "--lam"),
    ("lsgd", {"lam_global": -0.1}, "--lam-global"),
    ("lsgd", {"tau_global": 0}, "--tau-global"),
    ("easgd", {"tau_root": 2}, "--tau-root applies to easgd-tree"),
    ("lsgd", {"beta_root": 0.5}, "--beta-root applies to easgd-tree"),
]


@pytest.mark.parametrize("algo,options,needle", BAD, ids=[f"{a}-{list(o)[0]}" for a, o, _ in BAD])
def test_bad_values_are_refused_in_one_line(algo, options, needle):
    with pytest.raises(ConfigError) as err:
        TrainConfig(algo=algo, workers=4, options=options).validate()
    assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("args,needle", [
    (["--algo", "easgd-tree", "--workers", "4", "--group-size", "3"], "--group-size"),
    (["--algo", "easgd-tree", "--tau-root", "0"], "--tau-root"),
    (["--algo", "lsgd", "--lam", "1"], "--lam"),
    (["--algo", "easgd", "--lam", "0.1"], "--lam applies to lsgd"),
])
def test_cli_refuses_bad_family_options(args, needle, capsys, tmp_path):
    from easgd_local.cli import main

    assert main(["train", "--out", str(tmp_path / "r"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and needle in err
    assert not (tmp_path / "r").exists()


def test_help_lists_the_family_options(capsys, monkeypatch):
    from easgd_local.cli import main

    monkeypatch.setenv("COLUMNS", "200")  # no flag cut short by a narrow terminal
    assert main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--group-size", "--tau-root", "--beta-root", "--lam", "--lam-global",
                 "--tau-global", "--leader-window", "easgd-tree", "lsgd"):
        assert flag in text, flag


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["easgd-tree", "lsgd"])
def test_checkpoint_and_resume(tmp_path, algo):
    """A finished run resumed for more steps continues every worker and the shared state (the
    root and group centers; the slots and published losses) from the checkpoint."""
    from easgd_local.checkpoint import Checkpointer

    out = tmp_path / "run"
    before = leftovers_snapshot()
    first = train(TrainConfig(algo=algo, out=out, quiet=True, workers=4, steps=60, eval_every=100.0))
    saved = Checkpointer(out).load()
    resumed = TrainConfig.from_dict(json.loads((out / "config.json").read_text()))
    resumed.steps = 120
    second = train(resumed, resume=saved)
    assert_no_leftovers(before)
    assert first["steps_per_worker"] == [60] * 4 and second["steps_per_worker"] == [120] * 4
    assert second["exchanges"] > first["exchanges"]
    assert second["final_test_loss"] < first["final_test_loss"] + 0.05
    assert set(saved["algorithm"]) == set(Checkpointer(out).load()["algorithm"])
