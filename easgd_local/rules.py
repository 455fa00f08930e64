"""Update rules of EASGD and EAMSGD on flat tensors. Pure functions: no processes, no locks.

Notation of Zhang, Choromanska and LeCun (2015): worker parameters x, center x~, learning
rate eta, moving rate alpha, Nesterov momentum delta, gradient g.

Asynchronous EASGD (Algorithm 1), every tau local steps::

    d   = alpha * (x - x~)
    x  -= d              # the worker moves toward the center
    x~ += d              # the center moves toward the worker (an addition, so concurrent
                         # exchanges of other workers are kept)
and at every step, with the gradient g taken at the x of before the exchange::

    x  -= eta * g(x)

EAMSGD (Algorithm 2) replaces the local step by Nesterov momentum::

    v   = delta * v - eta * g(x + delta * v)
    x  += v

Storage convention. A worker's flat buffer ``y`` holds the point where the next gradient is
taken, the look-ahead ``y = x + delta * v``; that is what the model's parameters see, so a
forward/backward pass needs no shifting of weights. With delta = 0 (EASGD, SGD) y is x itself.
The elastic difference is always computed from ``x = y - delta * v``, and since the exchange
leaves v untouched, moving x by -d moves y by -d. The reference in ``rules_reference.py``
keeps x and v literally as the paper writes them; tests check both agree step for step.

The flat buffer may hold more entries than there are parameters: floating-point buffers of
the model (batch-norm running statistics) follow the parameters, take part in the elastic
exchange, and are left alone by the gradient step. ``n`` below is the number of parameter
entries, the length of the gradient and of v.
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def elastic_difference(y: Tensor, center: Tensor, alpha: float, *, v: Tensor | None = None,
                       momentum: float = 0.0, out: Tensor | None = None) -> Tensor:
    """d = alpha * (x - center) with x = y - momentum * v on the first len(v) entries.

    ``center`` may be a copy of the center on y's device or the center itself when both are
    on the CPU. Returns ``out`` (allocated when None).
    """
    d = torch.sub(y, center, out=out)
    if v is not None and momentum:
        d[: v.numel()].sub_(v, alpha=momentum)
    return d.mul_(alpha)


@torch.no_grad()
def elastic_exchange_(y: Tensor, center: Tensor, alpha: float, *, v: Tensor | None = None,
                      momentum: float = 0.0) -> Tensor:
    """The whole exchange when worker and center share a device and a process: y -= d, center += d."""
    d = elastic_difference(y, center, alpha, v=v, momentum=momentum)
    y.sub_(d)
    center.add_(d)
    return d


@torch.no_grad()
def add_weight_decay_(grad: Tensor, y: Tensor, weight_decay: float) -> Tensor:
    """grad += weight_decay * y: the L2 penalty's gradient at the point the loss gradient was
    taken, so it joins g before the exchange moves y."""
    if weight_decay:
        grad.add_(y[: grad.numel()], alpha=weight_decay)
    return grad


@torch.no_grad()
def local_step_(y: Tensor, grad: Tensor, lr: float, *, v: Tensor | None = None,
                momentum: float = 0.0) -> None:
    """One local step on the first ``grad.numel()`` entries of ``y``.

    momentum = 0 (v may be None): plain SGD, y -= lr * g.
    momentum > 0: Nesterov momentum of EAMSGD in look-ahead form. With v' = delta*v - lr*g,
    x' = x + v' and y' = x' + delta*v', so y' = y + v' + delta*(v' - v), i.e.
    y += (1 + delta) * v' - delta * v.
    """
    p = y[: grad.numel()]
    if not momentum:
        p.add_(grad, alpha=-lr)
        return
    assert v is not None, "momentum needs a velocity buffer"
    p.sub_(v, alpha=momentum)  # back to x
    v.mul_(momentum).add_(grad, alpha=-lr)  # v'
    p.add_(v, alpha=1.0 + momentum)  # y' = x + v' + delta*v'


@torch.no_grad()
def current_x(y: Tensor, v: Tensor | None, momentum: float) -> Tensor:
    """The iterate x = y - delta * v (a new tensor); y itself when there is no momentum."""
    if v is None or not momentum:
        return y
    x = y.clone()
    x[: v.numel()].sub_(v, alpha=momentum)
    return x


# --- dynamic weighting (this project's own rule) -----------------------------------------------
#
# The seed (Xu and Carr, "A Dynamic Weighting Strategy to Mitigate Worker Node Failure in
# Distributed Deep Learning", arXiv 2409.09242) weights each worker's elastic contribution by how
# current and healthy it is; its formula could not be recovered, so this rule is ours, toward
# that goal: a straggler or a failed worker must not drag the center.
#
# Everything is counted in center updates (exchanges), not seconds, so it holds on any machine.
# At its exchange, worker i has been away for k_i updates of the others. A worker of median
# speed sees about p - 1 between two of its own (each other worker exchanges once); call the
# median of the workers' last staleness m, at least p - 1.
#
# - A straggler exchanges rarely, so its parameters drifted for many of the center's updates
#   and its pull is stale: its moving rate is weighted by w_i = min(1, m / k_i), so a worker
#   five times slower than the median pulls with a fifth of the rate.
# - A failed worker (dead, hung, not yet restarted) stops exchanging. beta = p * alpha assumes p
#   contributors; with one missing, the center would move slower. A worker counts as live while
#   its last exchange is within 4 m updates; the rate is beta / (live workers), so beta is kept
#   over the workers that are there.
# - A worker that returns from a restart (from the center) has its clock reset: k_i starts
#   small and it rejoins at full weight.
#
#     alpha_i = (beta / live) * min(1, m / k_i)


DEAD_AFTER_MEDIANS = 4.0  # a worker is live while it last exchanged within this many medians


def dynamic_rate(beta: float, k_i: int, staleness: list[int], others: list[int], workers: int) -> float:
    """The moving rate of a worker that has been away for ``k_i`` center updates.

    ``staleness``: each worker's k at its last exchange (0: none yet); ``others``: updates since
    each *other* worker last exchanged; ``workers``: p, the workers tied to this center. The
    worker exchanging now is live.
    """
    seen = sorted(k for k in staleness if k > 0)
    median = max(float(workers - 1), seen[len(seen) // 2] if seen else 0.0, 1.0)
    live = 1 + sum(1 for age in others if age <= DEAD_AFTER_MEDIANS * median)
    weight = min(1.0, median / max(k_i, 1))
    return beta / max(live, 1) * weight
