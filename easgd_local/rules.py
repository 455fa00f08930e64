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
leaves v untouched, moving x by -d moves y by -d. The reference in ``tests/rules_reference.py``
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


# --- the family: every rule of the algorithms beyond Algorithms 1 and 2 --------------------------
#
# Each is a pure function of tensors and numbers (in place on the tensors it names with a
# trailing underscore). The communicators only take locks, copy between devices and call these;
# tests/rules_reference.py writes each out literally and the tests check the communicators
# against it step for step.


@torch.no_grad()
def downpour_push_(center: Tensor, u: Tensor, n_params: int, *, velocity: Tensor | None = None,
                   momentum: float = 0.0) -> None:
    """The master's side of a DOWNPOUR push (Dean et al. 2012; the EASGD paper's baselines).

    ``u`` holds the pushing worker's accumulated update of the parameters (the sum of its
    -eta * g over tau steps), then its float buffers. Parameters: x~ += u. With master momentum
    (MDOWNPOUR), Nesterov momentum in the look-ahead form of ``local_step_``::

        v  = delta * v + u
        x~ += u + delta * v          # x~ is the look-ahead point the workers pull

    Buffers (batch-norm statistics) are not sums of gradients: the center takes the pusher's.
    """
    n = n_params
    center[:n].add_(u[:n])
    center[n:].copy_(u[n:])
    if velocity is not None:
        velocity.mul_(momentum).add_(u[:n])
        center[:n].add_(velocity, alpha=momentum)


@torch.no_grad()
def running_average_(average: Tensor, center: Tensor, rate: float) -> None:
    """ADOWNPOUR / MVADOWNPOUR's reported model: z = (1 - a) z + a x~ (a = 1/(t+1): the mean of
    every center so far; a = 0.001: a moving average)."""
    average.lerp_(center, rate)


def elastic_round(child: Tensor, parent: Tensor, children_mean: Tensor, alpha: float,
                  children: int) -> tuple[Tensor, Tensor]:
    """One synchronous EASGD round between K children and their parent (the paper's synchronous
    EASGD, its center's update included, applied one level up: boxes around a root)::

        c_k <- c_k - alpha * (c_k - r)                  for every child k
        r   <- r + alpha * sum_k (c_k - r) = r + beta * (mean_k c_k - r),   beta = K * alpha

    both from the same pre-round values. The parent r is a persistent variable with its own
    rate beta; replacing it by the children's current mean (beta = 1) would be partial
    averaging, not EASGD. Returns (d_k, r'): the child applies -d_k as an addition (its own
    exchanges go on meanwhile), and every replica of the parent becomes r'. This is the closed
    form, from the children's mean, of hierarchy.tie_replicated (which sums the children's d).
    """
    d = torch.sub(child, parent).mul_(alpha)
    new_parent = parent + (children_mean - parent) * (alpha * children)
    return d, new_parent


def pair_difference(x_i: Tensor, x_j: Tensor, alpha: float, out: Tensor | None = None) -> Tensor:
    """Elastic Gossip's exchange between a pair (Pramod 2018), from both current values::

        d    = alpha * (x_i - x_j)
        x_i -= d          x_j += d          # symmetric: the pair's sum is kept

    alpha = 1/2 brings both to the pair's mean. Gossiping SGD's pull (Jin et al. 2016) is the
    initiator's half alone with alpha = 1/2: x_i <- (x_i + x_j) / 2, x_j unchanged.
    """
    return torch.sub(x_i, x_j, out=out).mul_(alpha)


def leader_pull(x: Tensor, pulls: list[tuple[Tensor, float]]) -> Tensor | None:
    """LSGD's pulls (Teng et al. 2019, eq. 2, the terms beside the gradient's), all from the
    pre-step x::

        d = sum over leaders l of lam_l * (x - x_l)         then x -= d

    ``pulls``: (the leader's published iterate, lam) for the group leader and, on a global
    period, the global leader; a worker that is its own leader is left out by the caller.
    Returns d, or None when there is nothing to pull toward.
    """
    d = None
    for leader_x, lam in pulls:
        term = torch.sub(x, leader_x).mul_(lam)
        d = term if d is None else d.add_(term)
    return d


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
# - With few live workers beta / live grows toward beta, which may exceed 1 (beta = p * alpha
#   with a large --alpha): at a rate of 1 the gap between a worker and the center no longer
#   shrinks, above 1 it grows. So the rate is capped at max(alpha, 1/2), alpha the fixed rate
#   beta / p: at 1/2 a worker and the center meet at their mean, and a user's own rate is never
#   cut. Every rate stays in (0, 1) as long as alpha < 1 (dynamic weighting refuses alpha = 1).
# - A worker that returns from a restart (from the center) has its clock reset: k_i starts
#   small and it rejoins at full weight.
#
#     alpha_i = min(beta / live, max(beta / p, 1/2)) * min(1, m / k_i)


DEAD_AFTER_MEDIANS = 4.0  # a worker is live while it last exchanged within this many medians
RATE_CAP = 0.5  # the dynamic rate never exceeds max(this, the fixed rate beta / p)


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
    return min(beta / max(live, 1), max(beta / workers, RATE_CAP)) * weight
