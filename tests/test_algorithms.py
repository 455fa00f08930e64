"""The baselines and variants: each trains, and the equivalences the algorithms promise hold."""

import math
import threading
import time

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from easgd_local import rules
from easgd_local.algorithms.base import Communicator
from easgd_local.algorithms.downpour import Downpour, Master
from easgd_local.center import CenterLink, Diverged, SharedCenter
from easgd_local.config import TrainConfig
from easgd_local.data import load_split
from easgd_local.evaluate import Evaluator
from easgd_local.flat import flatten_
from easgd_local.launcher import train
from easgd_local.models import build_model
from .rules_reference import reference_sync_easgd_step

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

def _master(init, momentum=0.0, average=False):
    state = Master.allocate(init, True, init.numel(), momentum=momentum, average=average)
    return Master(SharedCenter(state=state), momentum=momentum)


def test_average_of_all_centers():
    center = _master(torch.zeros(3), average=True)
    seen = [center.data.clone()]
    for k in range(5):
        center.push_(torch.full((3,), float(k + 1)))
        seen.append(center.data.clone())
    torch.testing.assert_close(center.average, torch.stack(seen).mean(0))
    torch.testing.assert_close(center.reported(), center.average)
    assert int(center.center.clock) == 5


def test_moving_average_rate():
    center = _master(torch.zeros(2), average=True)
    center.push_(torch.ones(2), average_rate=0.001)
    torch.testing.assert_close(center.average, torch.full((2,), 0.001))


def test_master_momentum_is_nesterov_on_pushed_updates():
    """One worker pushing u = -lr g every step through master momentum = MSGD on that worker."""
    center = _master(torch.tensor([2.0, -1.0]), momentum=0.9)
    y = center.data.clone()
    v = torch.zeros(2)
    for _ in range(20):
        g_master = torch.sin(center.data) + center.data  # gradient at the pulled center
        center.push_(-0.1 * g_master)
        g_local = torch.sin(y) + y
        rules.local_step_(y, g_local, 0.1, v=v, momentum=0.9)
        torch.testing.assert_close(center.data, y)  # both hold the look-ahead point
        torch.testing.assert_close(center.reported(), rules.current_x(y, v, 0.9))


# --- the communication period is the template's ------------------------------------------------

class _Counting(Communicator):
    def __init__(self, period):
        self.period, self.before, self.after = period, [], []

    def exchange(self, step, y, v):
        self.before.append(step)
        return True

    def exchange_after(self, step, y, v):
        self.after.append(step)


@pytest.mark.parametrize("period,before,after", [
    (3, [0, 3, 6, 9], [2, 5, 8]), (1, list(range(10)), list(range(10))), (0, [], []),
    (None, [], [])])
def test_the_hooks_come_on_the_period(period, before, after):
    """exchange before the local step of steps 0, tau, 2 tau...; exchange_after once each tau
    local steps are done; no period, no call."""
    comm, y = _Counting(period), torch.zeros(1)
    for step in range(10):
        assert comm.before_step(step, y, None) is True
        comm.after_step(step, y, None, torch.zeros(()))
    assert (comm.before, comm.after) == (before, after)


# --- synchronous EASGD's barriers, with threads in one process --------------------------------

class _SlowRead(CenterLink):
    """A link whose read of the center comes late: any addition let through before every
    worker has read shows as a different center read. Its own addition comes late too: the
    center's lock is a process's, so two threads of one process must not add at once."""

    def read(self):
        time.sleep(0.2)
        return super().read()

    def move_(self, *args, **kwargs):
        time.sleep(0.1)
        return super().move_(*args, **kwargs)


def _sync_workers(xs, c0, alpha, agreed=None, slow=1):
    """Two SyncElastic workers (tau 1) on one center, each exchanging once in its own thread;
    worker ``slow`` reads the center late. Returns the center and each worker's outcome."""
    from easgd_local.algorithms.sync import SyncElastic

    center = SharedCenter(c0.clone())
    barrier = threading.Barrier(len(xs), timeout=20)
    agreed = torch.zeros(2, dtype=torch.int64) if agreed is None else agreed
    outcome = [None] * len(xs)

    def run(i):
        link = (_SlowRead if i == slow else CenterLink)(center, torch.device("cpu"))
        try:
            outcome[i] = SyncElastic(link, 1, alpha, barrier, agreed).before_step(0, xs[i], None)
        except Exception as e:  # noqa: BLE001 (reported to the test)
            outcome[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return center, outcome


def test_sync_exchange_reads_one_center_before_any_addition():
    """Every worker's difference is taken from the same center c_t, even the worker that reads
    late: the additions wait for the last read (barrier 2)."""
    gen = torch.Generator().manual_seed(5)
    xs = [torch.randn(6, generator=gen) for _ in range(2)]
    c0, alpha = torch.randn(6, generator=gen), 0.3
    ds = [alpha * (x - c0) for x in xs]
    want = [x - d for x, d in zip(xs, ds)]
    center, outcome = _sync_workers(xs, c0, alpha)
    assert outcome == [True, True]
    for x, w in zip(xs, want):
        torch.testing.assert_close(x, w)
    torch.testing.assert_close(center.data, c0 + ds[0] + ds[1])


def test_sync_stop_and_a_diverged_worker_leave_no_one_waiting():
    """The stop decision, taken at barrier 1, moves nothing; a worker whose difference is not
    finite still passes barrier 2 (the other is not left waiting) and adds nothing."""
    c0 = torch.zeros(4)
    stop = torch.tensor([1, 0])
    xs = [torch.ones(4), torch.full((4,), 2.0)]
    center, outcome = _sync_workers(xs, c0, 0.5, agreed=stop)
    assert outcome == [False, False] and torch.equal(center.data, c0)
    assert torch.equal(xs[0], torch.ones(4))
    xs = [torch.ones(4), torch.full((4,), float("nan"))]
    center, outcome = _sync_workers(xs, c0, 0.5, slow=0)
    assert outcome[0] is True and isinstance(outcome[1], Diverged), outcome
    torch.testing.assert_close(center.data, torch.full((4,), 0.5))
    torch.testing.assert_close(xs[0], torch.full((4,), 0.5))


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


# --- DOWNPOUR and batch-norm statistics ------------------------------------------------------

def _running_var_slices(state):
    base = state.flat.data_ptr()
    return [slice((b.data_ptr() - base) // 4, (b.data_ptr() - base) // 4 + b.numel())
            for name, b in state.module.named_buffers() if name.endswith("running_var")]


@pytest.mark.slow
@pytest.mark.parametrize("algo_momentum", [0.0, 0.9], ids=["downpour", "mdownpour"])
def test_downpour_keeps_batch_norm_statistics_sane(algo_momentum):
    """resnet18 on tiny inputs, 4 workers pushing every 5 steps in turn through the real
    Downpour communicator. Running statistics pushed as deltas (with master momentum on top)
    drift out of any worker's range and can turn a variance negative; the center must hold the
    pushing worker's own buffers, finite, every variance positive."""
    from easgd_local.data import DatasetInfo

    torch.manual_seed(0)
    info = DatasetInfo("tiny", 10, 3, 4)
    states = [flatten_(build_model("resnet18", info)) for _ in range(4)]
    n = states[0].n_params
    shared = Master.allocate(states[0].flat.clone(), True, n, momentum=algo_momentum)
    center = SharedCenter(state=shared, n_params=n)
    tau, rounds, pushes = 5, 6, 0
    comms = [Downpour(CenterLink(center, torch.device("cpu")), Master(center, algo_momentum),
                      tau, None) for _ in states]
    for st, comm in zip(states, comms):
        comm.start(st.flat)
        st.module.train()
    variances = _running_var_slices(states[0])
    assert variances and n < center.numel
    gen = torch.Generator().manual_seed(1)
    for step in range(tau * rounds):
        for w, st in enumerate(states):
            # Inputs of a different scale per worker, so the workers' statistics differ widely.
            x = torch.randn(4, 3, 4, 4, generator=gen) * (1 + 3 * w)
            y = torch.randint(0, 10, (4,), generator=gen)
            st.grad.zero_()
            F.cross_entropy(st.module(x), y).backward()
            rules.local_step_(st.flat, st.grad, 0.01)
            mine = st.flat[n:].clone()
            comms[w].after_step(step, st.flat, None, torch.zeros(()))
            assert comms[w].exchanges == (step + 1) // tau  # a push after each tau-th step
            if (step + 1) % tau == 0:
                pushes += 1
                torch.testing.assert_close(center.data[n:], mine, rtol=0, atol=0)
                assert torch.isfinite(center.data).all()
                assert all((center.data[s] > 0).all() for s in variances)
    assert pushes == 4 * rounds


# --- the real trainer against the literal reference, step for step --------------------------

def _replay_reference(config, steps, momentum):
    """Algorithms 1/2 of the paper on one worker, with the trainer's initial weights, data order
    and weight decay; returns (worker x, center) after ``steps`` local steps."""
    from .rules_reference import ReferenceAsyncEASGD

    torch.manual_seed(config.seed)
    init = Evaluator(config, 28, "cpu").state.flat.clone()
    data = load_split("mnist10k", config.data_dir, train=True, device="cpu", image_size=28)
    st = flatten_(build_model("cnn", data.info))
    shapes = [p.shape for p in st.module.parameters()]
    sizes = [p.numel() for p in st.module.parameters()]
    batches = list(data.batches(config.batch_size, generator=torch.Generator().manual_seed(config.seed)))

    def grad_fn(point, worker, t):
        st.flat.copy_(torch.cat([p.reshape(-1) for p in point]))
        st.grad.zero_()
        x, y = batches[t]
        F.cross_entropy(st.module(x), y).backward()
        return [g.view(s) for g, s in zip(st.grad.split(sizes), shapes)]

    ref = ReferenceAsyncEASGD([p.view(s) for p, s in zip(init.split(sizes), shapes)], 1,
                              lr=config.lr, alpha=config.resolved_alpha, tau=config.tau,
                              momentum=momentum, weight_decay=config.weight_decay)
    for _ in range(steps):
        ref.step(0, grad_fn)
    flat = lambda pieces: torch.cat([p.reshape(-1) for p in pieces]).float()  # noqa: E731
    return flat(ref.workers[0].x), flat(ref.center)


@pytest.mark.slow
@pytest.mark.parametrize("algo,extra", [("easgd", {}), ("eamsgd", {"momentum": 0.9})])
def test_one_worker_trainer_follows_the_reference(tmp_path, algo, extra):
    """The whole worker loop (gradient, weight decay, exchange, local step, in that order) of a
    spawned worker against a slow literal reference: an exchange moved before the gradient, a
    lost weight decay or a look-ahead in the wrong place shows here."""
    from easgd_local.checkpoint import Checkpointer, unpack_state

    steps = 14
    config, s = _train(tmp_path, algo, algo=algo, workers=1, tau=3, steps=steps, lr=0.05,
                       weight_decay=1e-3, eval_every=100.0, checkpoint_every=None, **extra)
    momentum = config.resolved_momentum
    x_ref, c_ref = _replay_reference(config, steps, momentum)
    final = unpack_state(Checkpointer(config.out).load()["workers"][0])
    x = rules.current_x(final["flat"], final["v"], momentum)
    torch.testing.assert_close(x, x_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(_center(config), c_ref, rtol=1e-4, atol=1e-5)
    assert s["exchanges"] == math.ceil(steps / 3)


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["adownpour", "mvadownpour"])
def test_averaged_downpour_reports_the_average(tmp_path, algo):
    """center.pt (and every evaluation) is the running average, not the center itself."""
    from easgd_local.checkpoint import Checkpointer

    config, _ = _train(tmp_path, algo, algo=algo, workers=2, tau=1, steps=40, eval_every=100.0)
    saved = Checkpointer(config.out).load()
    reported = _center(config)
    torch.testing.assert_close(reported, saved["algorithm"]["center.average"], rtol=0, atol=0)
    assert (reported - saved["algorithm"]["center"]).abs().max() > 1e-3
