"""`easgd-local stability`: the round-robin analysis of the EASGD paper's section 4.

The 1-D quadratic F(x) = x^2 / 2, p workers, one active worker per step (worker l at the steps
with t mod p = l - 1). Every update is linear in the state, so one full cycle of p steps is a
matrix, and the scheme is stable when that matrix's spectral radius is at most 1.

EASGD, state (x_1..x_p, c), the active worker l, both from the values before the step::

    x_l <- x_l - eta * x_l - alpha * (x_l - c)
    c   <- c + alpha * (x_l - c)

Each step's matrix is symmetric; the paper's closed form: stable iff 0 <= eta <= 2 and
0 <= alpha <= (4 - 2 eta) / (4 - eta), whatever p is.

ADMM, with the multiplier rescaled by rho, state (x_1..x_p, lambda_1..lambda_p, c)::

    lambda_l <- lambda_l - (x_l - c)
    x_l      <- (x_l - eta * x_l + eta * rho * (lambda_l + c)) / (1 + eta * rho)   (new lambda_l)
    c        <- (1/p) * sum_k (x_k - lambda_k)                                     (new values)

This module builds both cycle matrices by applying the updates to the basis vectors, computes
their spectral radius on grids, simulates the paper's example (eta = 0.001, rho = 2.5,
lambda = 0, x = c = 1000) and writes stability.json and stability.png.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

Step = Callable[[np.ndarray, int], np.ndarray]


# The colour of the unit contour (stable inside), in the heatmaps and their legends.
UNIT = "cyan"


# --- the updates, on a state vector ---------------------------------------------------------


def easgd_step(p: int, eta: float, alpha: float) -> Step:
    """One round-robin step of EASGD on state (x_1..x_p, c), worker ``l`` active."""

    def step(s: np.ndarray, l: int) -> np.ndarray:
        s = s.copy()
        x, c = s[l], s[p]
        s[l] = x - eta * x - alpha * (x - c)
        s[p] = c + alpha * (x - c)
        return s

    return step


def admm_step(p: int, eta: float, rho: float) -> Step:
    """One round-robin step of ADMM on state (x_1..x_p, lambda_1..lambda_p, c)."""

    def step(s: np.ndarray, l: int) -> np.ndarray:
        s = s.copy()
        x, lam, c = s[:p], s[p:2 * p], s[2 * p]
        lam[l] = lam[l] - (x[l] - c)
        x[l] = (x[l] - eta * x[l] + eta * rho * (lam[l] + c)) / (1 + eta * rho)
        s[2 * p] = float(np.mean(x - lam))
        return s

    return step


def step_matrix(step: Step, size: int, l: int) -> np.ndarray:
    """The matrix of one linear step: its images of the basis vectors, as columns."""
    eye = np.eye(size)
    return np.stack([step(eye[:, j], l) for j in range(size)], axis=1)


def cycle_matrix(step: Step, size: int, p: int) -> np.ndarray:
    """One full cycle: worker 1's step first (t = 0), worker p's last."""
    m = np.eye(size)
    for l in range(p):
        m = step_matrix(step, size, l) @ m
    return m


def spectral_radius(m: np.ndarray) -> float:
    return float(np.max(np.abs(np.linalg.eigvals(m))))


def easgd_radius(p: int, eta: float, alpha: float) -> float:
    return spectral_radius(cycle_matrix(easgd_step(p, eta, alpha), p + 1, p))


def admm_radius(p: int, eta: float, rho: float) -> float:
    return spectral_radius(cycle_matrix(admm_step(p, eta, rho), 2 * p + 1, p))


def easgd_bound(eta: float) -> float:
    """The largest stable alpha for a given eta (the paper's closed form), NaN beyond eta = 2."""
    return (4 - 2 * eta) / (4 - eta) if 0 <= eta <= 2 else math.nan


def easgd_stable_closed_form(eta: float, alpha: float) -> bool:
    return 0 <= eta <= 2 and 0 <= alpha <= (4 - 2 * eta) / (4 - eta)


def simulate(step: Step, state: np.ndarray, p: int, steps: int) -> np.ndarray:
    """The state after each of ``steps`` round-robin steps (row t = after step t + 1)."""
    out = np.empty((steps, state.size))
    s = state.astype(float)
    for t in range(steps):
        s = step(s, t % p)
        out[t] = s
    return out


# --- grids and the report ---------------------------------------------------------------------

def radius_grid(radius: Callable[[float, float], float], xs: Sequence[float],
                ys: Sequence[float]) -> np.ndarray:
    """radius(x, y) on the grid: rows follow ys, columns xs."""
    return np.array([[radius(x, y) for x in xs] for y in ys])


EASGD_ETAS = np.linspace(0.02, 2.5, 63)
EASGD_ALPHAS = np.linspace(0.02, 1.5, 38)
ADMM_ETAS = np.linspace(1e-2 / 40, 1e-2, 40)  # (0, 1e-2], as the paper's figure
ADMM_RHOS = np.linspace(10 / 40, 10.0, 40)  # (0, 10]
EXAMPLE = {"eta": 0.001, "rho": 2.5, "start": 1000.0}
EXAMPLE_STEPS = 60_000


def analyse(ps: Sequence[int] = (3, 8), example_steps: int = EXAMPLE_STEPS,
            easgd_alpha: float | None = None) -> dict[str, Any]:
    """Everything stability.json holds (see the module doc)."""
    result: dict[str, Any] = {"easgd": {}, "admm": {}, "example": {}}
    eta, rho, start = EXAMPLE["eta"], EXAMPLE["rho"], EXAMPLE["start"]
    # EASGD beside ADMM in the example: the same eta, and an alpha well inside the bound.
    alpha = easgd_alpha if easgd_alpha is not None else 0.9 / 3
    for p in ps:
        e = radius_grid(lambda a, b: easgd_radius(p, a, b), EASGD_ETAS, EASGD_ALPHAS)
        agree = [[(r <= 1 + 1e-9) == easgd_stable_closed_form(x, y) for x, r in zip(EASGD_ETAS, row)]
                 for y, row in zip(EASGD_ALPHAS, e)]
        result["easgd"][str(p)] = {"eta": EASGD_ETAS.tolist(), "alpha": EASGD_ALPHAS.tolist(),
                                   "spectral_radius": e.tolist(),
                                   "agrees_with_closed_form": float(np.mean(agree))}
        a = radius_grid(lambda x, y: admm_radius(p, x, y), ADMM_ETAS, ADMM_RHOS)
        result["admm"][str(p)] = {"eta": ADMM_ETAS.tolist(), "rho": ADMM_RHOS.tolist(),
                                  "spectral_radius": a.tolist(),
                                  "unstable_share": float(np.mean(a > 1 + 1e-9)),
                                  "max_radius": float(a.max())}
        admm = simulate(admm_step(p, eta, rho), np.r_[np.full(p, start), np.zeros(p), start], p,
                        example_steps)
        easgd = simulate(easgd_step(p, eta, alpha), np.full(p + 1, start), p, example_steps)
        every = max(1, example_steps // 600)
        result["example"][str(p)] = {
            "eta": eta, "rho": rho, "easgd_alpha": alpha, "start": start,
            "admm_spectral_radius": admm_radius(p, eta, rho),
            "easgd_spectral_radius": easgd_radius(p, eta, alpha),
            "steps": list(range(every, example_steps + 1, every)),
            "admm_center": admm[every - 1::every, 2 * p].tolist(),
            "easgd_center": easgd[every - 1::every, p].tolist(),
        }
    return result


def write_plot(path: Path, result: dict[str, Any]) -> str | None:
    """stability.png: the heatmaps with their unit contours (and EASGD's closed-form bound), and
    the example's centers. Returns a note when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.colors import LogNorm
        from matplotlib.figure import Figure
    except ImportError:
        return "matplotlib is not installed: stability.png not written; pip install matplotlib"
    from .output import atomic_write

    ps = list(result["easgd"])
    fig = Figure(figsize=(5 * len(ps), 12), dpi=100)
    FigureCanvasAgg(fig)
    for col, p in enumerate(ps):
        e, a, ex = result["easgd"][p], result["admm"][p], result["example"][p]
        ax = fig.add_subplot(3, len(ps), col + 1)
        grid = np.array(e["spectral_radius"])
        mesh = ax.pcolormesh(e["eta"], e["alpha"], grid, norm=LogNorm(vmin=max(grid.min(), 1e-3)),
                             shading="auto")
        ax.contour(e["eta"], e["alpha"], grid, levels=[1.0], colors=UNIT, linewidths=1.5)
        ax.plot([], [], color=UNIT, linewidth=1.5, label="spectral radius 1")  # the contour's
        etas = np.linspace(0, 2, 200)
        ax.plot(etas, [easgd_bound(x) for x in etas], "r--", label="closed-form bound")
        ax.set(xlabel="eta", ylabel="alpha", title=f"EASGD, p = {p}: spectral radius")
        ax.legend(loc="upper right", fontsize="small")
        fig.colorbar(mesh, ax=ax)
        ax = fig.add_subplot(3, len(ps), len(ps) + col + 1)
        grid = np.array(a["spectral_radius"])
        mesh = ax.pcolormesh(a["eta"], a["rho"], grid, shading="auto")
        if grid.min() < 1 < grid.max():
            ax.contour(a["eta"], a["rho"], grid, levels=[1.0], colors=UNIT, linewidths=1.5)
            ax.plot([], [], color=UNIT, linewidth=1.5, label="spectral radius 1")
        ax.plot([ex["eta"]], [ex["rho"]], "rx", label="the paper's example")
        ax.set(xlabel="eta", ylabel="rho", title=f"ADMM, p = {p}: spectral radius")
        ax.legend(loc="upper right", fontsize="small")
        fig.colorbar(mesh, ax=ax)
        ax = fig.add_subplot(3, len(ps), 2 * len(ps) + col + 1)
        ax.plot(ex["steps"], ex["admm_center"], label=f"ADMM, rho = {ex['rho']:g}")
        ax.plot(ex["steps"], ex["easgd_center"], label=f"EASGD, alpha = {ex['easgd_alpha']:g}")
        ax.set(xlabel="step", ylabel="center", title=f"eta = {ex['eta']:g}, start 1000, p = {p}")
        ax.set_yscale("symlog", linthresh=1.0)
        ax.legend(fontsize="small")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"), binary=True)
    return None


def run(out: Path, ps: Sequence[int] = (3, 8), example_steps: int = EXAMPLE_STEPS) -> tuple[dict[str, Any], list[str]]:
    """Write stability.json and stability.png into ``out``; returns the result and notes."""
    from .output import atomic_write

    out.mkdir(parents=True, exist_ok=True)
    result = analyse(ps, example_steps)
    atomic_write(out / "stability.json", lambda f: json.dump(result, f))
    notes = [n for n in [write_plot(out / "stability.png", result)] if n]
    return result, notes
