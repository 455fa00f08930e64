"""Slow, literal reference of the EASGD family, for tests only.

Everything is kept exactly as the paper writes it: x and v per worker, as lists of
per-tensor pieces, one Python loop per piece, the gradient oracle called at x + delta*v.
``rules.py`` must agree with this step for step (see tests/test_rules.py).
"""

from __future__ import annotations

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
