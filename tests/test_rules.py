"""The fast flat-tensor rules against the literal reference, and the algorithm's invariants."""

import pytest
import torch

from easgd_local import rules
from .rules_reference import ReferenceAsyncEASGD

from .helpers import flat_of as _flat, pieces_of as _pieces

SHAPES = [(7, 3), (5,), (4, 2, 2)]  # parameter pieces
BUFFER_SHAPES = [(3,)]  # float buffers: exchanged, never stepped


class Oracle:
    """A deterministic stochastic gradient: g = A_{w,t} (point) + b_{w,t}, random per worker and step."""

    def __init__(self, n, seed=0):
        self.n, self.seed = n, seed

    def __call__(self, point_pieces, worker, step):
        gen = torch.Generator().manual_seed(self.seed * 100_003 + worker * 1009 + step)
        a = torch.rand(self.n, generator=gen) * 0.5 + 0.25  # a random diagonal, positive
        b = torch.randn(self.n, generator=gen)
        g = a * _flat(point_pieces) + b
        return _pieces(g, SHAPES)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("workers,tau", [(1, 1), (3, 2), (4, 10)])
def test_async_rules_match_reference_every_step(momentum, workers, tau):
    torch.manual_seed(1)
    n = sum(torch.Size(s).numel() for s in SHAPES)
    nb = sum(torch.Size(s).numel() for s in BUFFER_SHAPES)
    x0 = torch.randn(n + nb)
    lr, alpha, wd = 0.05, 0.9 / workers, 1e-3
    ref = ReferenceAsyncEASGD(_pieces(x0, SHAPES + BUFFER_SHAPES), workers, lr=lr, alpha=alpha,
                              tau=tau, momentum=momentum, weight_decay=wd, n_param_pieces=len(SHAPES))
    oracle = Oracle(n)
    center = x0.clone()
    ys = [x0.clone() for _ in range(workers)]
    vs = [torch.zeros(n) for _ in range(workers)]
    t = [0] * workers
    # Buffers drift on their own (as batch-norm statistics would); both sides see the same drift,
    # so a buffer left out of the exchange would leave the worker and the center apart.
    gen = torch.Generator().manual_seed(7)
    for turn in range(100):
        i = turn % workers
        drift = torch.randn(nb, generator=gen)
        ys[i][n:] += drift
        ref.workers[i].x[-1] += drift.double()
        # The gradient, weight decay included, at the point before the exchange.
        g = _flat(oracle(_pieces(ys[i][:n], SHAPES), i, t[i]))
        rules.add_weight_decay_(g, ys[i], wd)
        if t[i] % tau == 0:
            rules.elastic_exchange_(ys[i], center, alpha, v=vs[i], momentum=momentum)
        rules.local_step_(ys[i], g, lr, v=vs[i], momentum=momentum)
        ref.step(i, oracle)
        t[i] += 1
        x_fast = rules.current_x(ys[i], vs[i], momentum)
        torch.testing.assert_close(x_fast, _flat(ref.workers[i].x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(center, _flat(ref.center), rtol=1e-5, atol=1e-5)
    assert not torch.equal(center, x0)  # the center moved


def test_exchange_conserves_worker_plus_center():
    torch.manual_seed(0)
    y, c, v = torch.randn(50), torch.randn(50), torch.randn(40)
    for momentum in (0.0, 0.99):
        y1, c1 = y.clone(), c.clone()
        x_before = rules.current_x(y1, v, momentum).clone()
        d = rules.elastic_exchange_(y1, c1, 0.3, v=v, momentum=momentum)
        x_after = rules.current_x(y1, v, momentum)
        torch.testing.assert_close(x_after + c1, x_before + c, rtol=0, atol=1e-6)
        torch.testing.assert_close(d, 0.3 * (x_before - c))


def test_alpha_zero_leaves_workers_independent():
    """With alpha = 0 the center never moves and each worker follows plain SGD."""
    n = sum(torch.Size(s).numel() for s in SHAPES)
    oracle = Oracle(n, seed=3)
    shapes_flat = lambda t: _pieces(t, SHAPES)  # noqa: E731
    torch.manual_seed(2)
    x0 = torch.randn(n)
    center = x0.clone()
    y = x0.clone()
    alone = x0.clone()
    for t in range(30):
        g = _flat(oracle(shapes_flat(y), 0, t))
        if t % 2 == 0:
            rules.elastic_exchange_(y, center, 0.0)
        rules.local_step_(y, g, 0.1)
        alone -= 0.1 * _flat(oracle(shapes_flat(alone), 0, t))
    assert torch.equal(center, x0)
    torch.testing.assert_close(y, alone)


def test_eamsgd_with_zero_momentum_is_easgd():
    """The momentum path with delta = 0 against Algorithm 1 written out by hand."""
    torch.manual_seed(4)
    y, c = torch.randn(30), torch.randn(30)
    x, center = y.clone(), c.clone()  # the literal EASGD side
    v = torch.zeros(30)
    for t in range(20):
        g = torch.sin(y) + 0.01 * t
        rules.elastic_exchange_(y, c, 0.2, v=v, momentum=0.0)
        rules.local_step_(y, g, 0.1, v=v, momentum=0.0)
        g_x = torch.sin(x) + 0.01 * t  # gradient at the pre-exchange x
        d = 0.2 * (x - center)
        x, center = x - d - 0.1 * g_x, center + d
        torch.testing.assert_close(y, x, rtol=0, atol=1e-6)
        torch.testing.assert_close(c, center, rtol=0, atol=1e-6)
    assert torch.equal(v, torch.zeros(30))  # with delta = 0 the velocity is the step, never kept


def test_one_worker_alpha_one_tau_one_sets_center_to_worker():
    """alpha = 1: the exchange moves the worker fully onto the center and vice versa (a swap)."""
    y, c = torch.tensor([1.0, 2.0]), torch.tensor([5.0, -1.0])
    rules.elastic_exchange_(y, c, 1.0)
    assert torch.equal(y, torch.tensor([5.0, -1.0])) and torch.equal(c, torch.tensor([1.0, 2.0]))


def test_quadratic_stability_region():
    """Round-robin EASGD on f(x) = x^2/2 is stable inside the paper's region, unstable outside it."""

    def run(eta, alpha, p=3, steps=3000):
        xs = [torch.tensor([1.0], dtype=torch.float64) for _ in range(p)]
        c = torch.tensor([1.0], dtype=torch.float64)
        for t in range(steps):
            i = t % p
            g = xs[i].clone()  # gradient at the pre-exchange point
            rules.elastic_exchange_(xs[i], c, alpha)
            rules.local_step_(xs[i], g, eta)
        return max(abs(float(x)) for x in xs + [c])

    eta = 1.0
    bound = (4 - 2 * eta) / (4 - eta)  # 2/3
    assert run(eta, 0.9 * bound) < 1e-6
    assert run(eta, 1.1 * bound) > 1e3


# --- the family's rules -------------------------------------------------------------------------

@pytest.mark.parametrize("algo,momentum", [("downpour", 0.0), ("mdownpour", 0.9)])
def test_downpour_master_agrees_with_the_literal_reference_step_for_step(algo, momentum):
    """3 workers, tau 2, round-robin, through the real communicators and the shared center."""
    from .test_family import N, _communicators, _drive, _pieces as pieces, grad_oracle
    from .rules_reference import ReferenceDOWNPOUR

    config, algorithm, shared, comms, ys, x0 = _communicators(algo, 3, momentum=momentum or None)
    assert config.resolved_momentum == momentum
    ref = ReferenceDOWNPOUR(pieces(x0), 3, lr=config.lr, tau=2, momentum=momentum)

    def check(i):
        torch.testing.assert_close(ys[i], _flat(ref.workers[i].x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(shared["center"].data, _flat(ref.center), rtol=1e-5, atol=1e-5)

    _drive(comms, ys, config, 60, lambda i: ref.step(i, grad_oracle), check)
    assert not torch.equal(shared["center"].data, x0)


def test_elastic_round_is_easgd_with_a_persistent_parent():
    from .rules_reference import reference_elastic_round

    gen = torch.Generator().manual_seed(9)
    children = [torch.randn(20, generator=gen) for _ in range(3)]
    parent = torch.randn(20, generator=gen)
    alpha = 0.9 / 3
    want_children, want_parent = reference_elastic_round(children, parent, alpha)
    mean = sum(children) / 3
    for c, want in zip(children, want_children):
        d, new_parent = rules.elastic_round(c, parent, mean, alpha, 3)
        torch.testing.assert_close(c - d, want)
        torch.testing.assert_close(new_parent, want_parent)
    # The parent is not the children's mean (that would be a rate of 1, partial averaging).
    assert float((new_parent - mean).abs().max()) > 1e-2


def test_dynamic_rate_stays_in_zero_one():
    """--alpha 0.5 with 4 workers (beta = 2), and one live: beta / live would be 2 (the gap
    multiplied by -3 at each exchange); the rate is capped at max(alpha, 1/2)."""
    p, beta = 4, 2.0
    far = [1000, 1000, 1000]  # the other three not heard of for long: dead
    rate = rules.dynamic_rate(beta, 3, [3, 3, 3, 3], far, p)
    assert 0 < rate < 1 and rate == pytest.approx(0.5)
    assert rules.dynamic_rate(beta, 3, [3, 3, 3, 3], [1000, 1000, 2], p) == pytest.approx(0.5)
    # beta = 0.9: one live worker of four gets min(0.9, max(0.225, 0.5)) = 0.5; two get 0.45.
    assert rules.dynamic_rate(0.9, 3, [3, 3, 3, 3], far, p) == pytest.approx(0.5)
    assert rules.dynamic_rate(0.9, 3, [3, 3, 3, 3], [1, 1000, 1000], p) == pytest.approx(0.45)
    for live_ages in ([1, 2, 3], [1, 2, 1000], [1, 1000, 1000], far):
        for k in (1, 3, 30, 3000):
            assert 0 < rules.dynamic_rate(beta, k, [3, 3, 3, k], live_ages, p) < 1


def test_dynamic_weighting_refuses_a_rate_of_one():
    from easgd_local.config import ConfigError, TrainConfig

    with pytest.raises(ConfigError, match="below 1"):
        TrainConfig(algo="easgd", workers=4, alpha=1.0, options={"weighting": "dynamic"}).validate()
    TrainConfig(algo="easgd", workers=4, alpha=0.9, options={"weighting": "dynamic"}).validate()
