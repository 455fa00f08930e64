"""Slow, literal reference of the EASGD family, for tests only.

Everything is kept exactly as the paper writes it: x and v per worker, as lists of
per-tensor pieces, one Python loop per piece, the gradient oracle called at x + delta*v.
``rules.py`` must agree with this step for step (see tests/test_rules.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

# grad_fn(point, worker, step) -> gradient at point (same pieces as point)
GradFn = Callable[[list[Tensor], int, int], list[Tensor]]


class ReferenceWorker:
    def __init__(self, x0: list[Tensor], n_param_pieces: int):
        self.x = [t.clone().double() for t in x0]
        self.v = [torch.zeros_like(t) for t in self.x[:n_param_pieces]]
        self.t = 0


class ReferenceAsyncEASGD:
    """Algorithms 1 and 2 run round-robin: workers take turns, one local step per turn.

    The first ``n_param_pieces`` pieces are parameters; later pieces (buffers) only take part
    in the elastic exchange.
    """

    def __init__(self, x0: list[Tensor], workers: int, *, lr: float, alpha: float, tau: int,
                 momentum: float = 0.0, weight_decay: float = 0.0,
                 n_param_pieces: int | None = None):
        n = len(x0) if n_param_pieces is None else n_param_pieces
        self.n = n
        self.center = [t.clone().double() for t in x0]
        self.workers = [ReferenceWorker(x0, n) for _ in range(workers)]
        self.lr, self.alpha, self.tau = lr, alpha, tau
        self.delta, self.wd = momentum, weight_decay

    def step(self, i: int, grad_fn: GradFn) -> None:
        w = self.workers[i]
        # x = x^i: the gradient is taken at the point before the elastic exchange.
        point = [w.x[k] + self.delta * w.v[k] for k in range(self.n)]
        if w.t % self.tau == 0:
            # read x~, d = alpha (x - x~), x^i -= d, x~ += d
            for k in range(len(w.x)):
                d = self.alpha * (w.x[k] - self.center[k])
                w.x[k] = w.x[k] - d
                self.center[k] = self.center[k] + d
        g = grad_fn([p.float() for p in point], i, w.t)
        for k in range(self.n):
            gk = g[k].double() + self.wd * point[k]
            w.v[k] = self.delta * w.v[k] - self.lr * gk
            w.x[k] = w.x[k] + w.v[k]
        w.t += 1



def reference_sync_easgd_step(xs: list[Tensor], center: Tensor, grads: list[Tensor], *,
                              lr: float, alpha: float) -> tuple[list[Tensor], Tensor]:
    """Synchronous EASGD as the paper writes it: every worker and the center move from the
    same pre-step values x_t, c_t.

        x^i_{t+1} = x^i_t - eta g^i(x^i_t) - alpha (x^i_t - c_t)
        c_{t+1}   = c_t + alpha sum_i (x^i_t - c_t)
    """
    new_xs = [x - lr * g - alpha * (x - center) for x, g in zip(xs, grads)]
    new_center = center + alpha * sum(x - center for x in xs)
    return new_xs, new_center


class ReferenceEASGDTree:
    """EASGD-Tree run round-robin, literally: each worker exchanges with its group's center every
    tau steps (Algorithm 1's exchange, the gradient taken before it), and every tau_root-th
    exchange of a group, the group's center exchanges with the root."""

    def __init__(self, x0: list[Tensor], workers: int, group_size: int, *, lr: float,
                 alpha: float, tau: int, tau_root: int, alpha_root: float):
        self.root = [t.clone().double() for t in x0]
        self.groups = [[t.clone().double() for t in x0] for _ in range(workers // group_size)]
        self.counts = [0] * len(self.groups)
        self.workers = [ReferenceWorker(x0, len(x0)) for _ in range(workers)]
        self.group_size, self.lr, self.alpha, self.tau = group_size, lr, alpha, tau
        self.tau_root, self.alpha_root = tau_root, alpha_root

    def step(self, i: int, grad_fn: GradFn) -> None:
        w, g = self.workers[i], i // self.group_size
        point = [x.clone() for x in w.x]
        if w.t % self.tau == 0:
            center = self.groups[g]
            for k in range(len(w.x)):
                d = self.alpha * (w.x[k] - center[k])
                w.x[k] = w.x[k] - d
                center[k] = center[k] + d
            self.counts[g] += 1
            if self.counts[g] % self.tau_root == 0:
                for k in range(len(center)):
                    d = self.alpha_root * (center[k] - self.root[k])
                    self.root[k] = self.root[k] + d
                    center[k] = center[k] - d
        grad = grad_fn([p.float() for p in point], i, w.t)
        for k in range(len(w.x)):
            w.x[k] = w.x[k] - self.lr * grad[k].double()
        w.t += 1


class ReferenceLSGD:
    """LSGD run round-robin, literally (the paper's eq. 2, every term at the pre-step x): every
    tau steps a worker publishes x and the mean of its last ``window`` losses, then is pulled
    toward its group's leader (with more than one group) and, every tau_global steps, toward
    the global leader; a leader does not pull itself. The local step is Nesterov momentum
    delta, the gradient and loss taken at x + delta * v; the pulls do not enter v."""

    def __init__(self, x0: list[Tensor], workers: int, group_size: int, *, lr: float, lam: float,
                 lam_global: float, tau: int, tau_global: int, window: int, momentum: float = 0.0):
        self.slots = [[t.clone().double() for t in x0] for _ in range(workers)]
        self.losses = [math.inf] * workers
        self.workers = [ReferenceWorker(x0, len(x0)) for _ in range(workers)]
        self.recent: list[list[float]] = [[] for _ in range(workers)]
        self.group_size, self.lr, self.lam, self.lam_global = group_size, lr, lam, lam_global
        self.tau, self.tau_global, self.window = tau, tau_global, window
        self.delta = momentum

    def _leader(self, candidates: range) -> int | None:
        finite = [r for r in candidates if math.isfinite(self.losses[r])]
        return min(finite, key=lambda r: (self.losses[r], r)) if finite else None

    def step(self, i: int, grad_fn: GradFn, loss_fn: Callable[[list[Tensor], int, int], float]) -> None:
        w = self.workers[i]
        point = [w.x[k] + self.delta * w.v[k] for k in range(len(w.x))]
        loss = loss_fn([p.float() for p in point], i, w.t)
        grad = grad_fn([p.float() for p in point], i, w.t)
        if w.t % self.tau == 0:
            recent = self.recent[i][-self.window:]
            self.losses[i] = sum(recent) / len(recent) if recent else math.inf
            self.slots[i] = [x.clone() for x in w.x]
            pulls = []
            workers = len(self.workers)
            if self.group_size < workers:
                g = i // self.group_size
                pulls.append((self._leader(range(g * self.group_size, (g + 1) * self.group_size)), self.lam))
            if w.t % self.tau_global == 0:
                pulls.append((self._leader(range(workers)), self.lam_global))
            new = [x.clone() for x in w.x]
            for leader, lam in pulls:
                if leader is None or leader == i or lam == 0:
                    continue
                for k in range(len(new)):
                    new[k] = new[k] - lam * (w.x[k] - self.slots[leader][k])
            w.x = new
        for k in range(len(w.x)):
            w.v[k] = self.delta * w.v[k] - self.lr * grad[k].double()
            w.x[k] = w.x[k] + w.v[k]
        self.recent[i].append(loss)
        w.t += 1


class ReferenceGossip:
    """Elastic Gossip (``symmetric``) or Gossiping SGD's pull, round-robin, literally, with
    Nesterov momentum delta: at each period a worker takes in its inbox and, with probability
    ``prob``, picks a peer j (``choose``), takes d = alpha (x_i - x_j) with x_j = j's slot plus
    j's inbox (j's value as its peers know it), moves itself by -d and, symmetric, puts d in j's
    inbox; then it publishes x_i to its slot. Its local step follows, with the gradient taken
    before all of this."""

    def __init__(self, x0: list[Tensor], workers: int, *, lr: float, alpha: float, period: int,
                 symmetric: bool, choose: Callable[[int], int | None], momentum: float = 0.0):
        self.workers = [ReferenceWorker(x0, len(x0)) for _ in range(workers)]
        self.slots = [[t.clone().double() for t in x0] for _ in range(workers)]
        self.inbox = [[torch.zeros_like(t).double() for t in x0] for _ in range(workers)]
        self.lr, self.alpha, self.period, self.symmetric = lr, alpha, period, symmetric
        self.choose, self.delta = choose, momentum

    def step(self, i: int, grad_fn: GradFn) -> None:
        w = self.workers[i]
        point = [w.x[k] + self.delta * w.v[k] for k in range(len(w.x))]
        grad = grad_fn([p.float() for p in point], i, w.t)
        if w.t % self.period == 0:
            w.x = [a + b for a, b in zip(w.x, self.inbox[i])]
            self.inbox[i] = [torch.zeros_like(t) for t in self.inbox[i]]
            j = self.choose(i)
            if j is not None:
                x_j = [a + b for a, b in zip(self.slots[j], self.inbox[j])]
                d = [self.alpha * (w.x[k] - x_j[k]) for k in range(len(w.x))]
                w.x = [a - b for a, b in zip(w.x, d)]
                if self.symmetric:
                    self.inbox[j] = [a + b for a, b in zip(self.inbox[j], d)]
            self.slots[i] = [x.clone() for x in w.x]
        for k in range(len(w.x)):
            w.v[k] = self.delta * w.v[k] - self.lr * grad[k].double()
            w.x[k] = w.x[k] + w.v[k]
        w.t += 1


class ReferenceDOWNPOUR:
    """DOWNPOUR run round-robin, literally (Dean et al. 2012, as the EASGD paper states it):
    each worker applies -eta * g locally and accumulates it; every tau steps it pushes the sum to
    the master (x~ += sum; with master momentum delta, MDOWNPOUR: v = delta v + sum,
    x~ += sum + delta v) and replaces its parameters by x~."""

    def __init__(self, x0: list[Tensor], workers: int, *, lr: float, tau: int, momentum: float = 0.0):
        self.center = [t.clone().double() for t in x0]
        self.velocity = [torch.zeros_like(t) for t in self.center]
        self.workers = [ReferenceWorker(x0, len(x0)) for _ in range(workers)]
        self.sums = [[torch.zeros_like(t) for t in self.center] for _ in range(workers)]
        self.lr, self.tau, self.delta = lr, tau, momentum

    def step(self, i: int, grad_fn: GradFn) -> None:
        w = self.workers[i]
        grad = grad_fn([p.float() for p in w.x], i, w.t)
        for k in range(len(w.x)):
            update = -self.lr * grad[k].double()
            w.x[k] = w.x[k] + update
            self.sums[i][k] = self.sums[i][k] + update
        w.t += 1
        if w.t % self.tau == 0:
            for k in range(len(w.x)):
                self.velocity[k] = self.delta * self.velocity[k] + self.sums[i][k]
                self.center[k] = self.center[k] + self.sums[i][k] + self.delta * self.velocity[k]
                w.x[k] = self.center[k].clone()
                self.sums[i][k] = torch.zeros_like(self.sums[i][k])


def reference_elastic_round(children: list[Tensor], parent: Tensor, alpha: float) -> tuple[list[Tensor], Tensor]:
    """EASGD between K children and their parent, every term from the pre-round values:
    c_k' = c_k - alpha (c_k - r) for each k, r' = r + alpha * sum_k (c_k - r)."""
    new_children = [c - alpha * (c - parent) for c in children]
    new_parent = parent + alpha * sum(c - parent for c in children)
    return new_children, new_parent
