"""`easgd-local scale`: how the shared center's lock scales, measured with emulated devices.

For each point of a grid (workers p, model size, tau, step time, center stripes), p emulated
workers (emulate.py: a sleep per local step, a real exchange every tau steps) run for a few
seconds against one shared center. Measured: exchanges per second, the share of time the lock
is held, the wait for it (mean, 99th percentile), the exchange's share of worker time, and the
efficiency (time in steps over wall time); beside them what a queueing model predicts from the
single exchange measured alone (:func:`predict`). Writes scale.json, scale.md and scale.png.

The workers are spawned once, as many as the largest p, and reused for every point (a point
with p workers uses the first p); the centers are allocated once per size before they start.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .config import DECLARED, ConfigError
from .emulate import MODEL_SIZES, Point, parse_size
from .scale_pool import Pool, ScaleError

__all__ = ["ScaleError", "ScaleOptions", "options_from_text", "predict", "run_scale"]

log = logging.getLogger(__name__)

DEFAULT_STRIPES = DECLARED["center_stripes"].default  # compared with 1 by default

@dataclass
class ScaleOptions:
    out: Path = Path("runs/scale")
    p: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    sizes: list[str] = field(default_factory=lambda: list(MODEL_SIZES))
    taus: list[int] = field(default_factory=lambda: [1, 10])
    steps_ms: list[float] = field(default_factory=lambda: [30.0, 100.0])
    stripes: list[int] = field(default_factory=lambda: [1, DEFAULT_STRIPES])
    device: str = "cpu"
    seconds: float = 6.0  # the longest a point runs; shorter where cycles are short
    alpha: float = 0.1
    host: str = "gpu"  # without CUDA: a GPU worker's host side of an exchange, or "cpu"'s whole
    copy_gbps: float = 0.0  # host "gpu": each copy paced to this bandwidth (0: unpaced)


QUICK = {"p": [1, 2], "sizes": ["200000"], "taus": [1, 4], "steps_ms": [10.0],
         "stripes": [1, 4], "seconds": 0.6}


def _numbers(flag: str, text: str, kind: type, low: float) -> list[Any]:
    try:
        values = [kind(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ConfigError(f"{flag} is comma-separated numbers (got {text!r})") from None
    if not values or min(values) < low or not all(math.isfinite(v) for v in values):
        raise ConfigError(f"{flag} values must be >= {low:g} (got {text!r})")
    return values


def options_from_text(out: Path, p: str, sizes: str, taus: str, steps_ms: str, stripes: str,
                      device: str, seconds: float, quick: bool, host: str = "gpu",
                      copy_gbps: float = 0.0) -> ScaleOptions:
    """The command line's values -> ScaleOptions; ConfigError (one line) when malformed.
    ``quick``: a small grid for tests, whatever else is given."""
    if host not in ("gpu", "cpu"):
        raise ConfigError(f"--host is gpu or cpu (got {host!r})")
    if not (copy_gbps >= 0 and math.isfinite(copy_gbps)):
        raise ConfigError(f"--copy-gbps must be >= 0 (got {copy_gbps:g})")
    if copy_gbps > 0 and (host != "gpu" or device != "cpu"):
        raise ConfigError("--copy-gbps paces the emulated copies of --host gpu on --device cpu; "
                          "a real GPU's copies run at its own speed")
    if quick:
        return ScaleOptions(out=out, device=device, host=host, copy_gbps=copy_gbps, **QUICK)
    try:
        names = [parse_size(s)[0] for s in sizes.split(",") if s.strip()]
    except ValueError as e:
        raise ConfigError(f"--sizes: {e}") from None
    if not names:
        raise ConfigError("--sizes needs at least one size")
    if not (seconds > 0 and math.isfinite(seconds)):
        raise ConfigError(f"--seconds must be > 0 (got {seconds:g})")
    if device != "cpu" and not device.startswith("cuda"):
        raise ConfigError(f"--device is cpu or cuda[:N] (got {device!r})")
    return ScaleOptions(out=out, p=_numbers("--p", p, int, 1), sizes=names,
                        taus=_numbers("--taus", taus, int, 1),
                        steps_ms=_numbers("--steps-ms", steps_ms, float, 0.1),
                        stripes=_numbers("--stripes", stripes, int, 1), device=device,
                        seconds=seconds, host=host, copy_gbps=copy_gbps)


def point_seconds(tau: int, step: float, cap: float) -> float:
    """Long enough for about six exchange cycles of each worker, within [min(2, cap), cap]."""
    return min(cap, max(min(2.0, cap), 6 * tau * step))


def predict(p: int, tau: int, step: float, t_exchange: float, t_held: float, stripes: int = 1,
            cores: int | None = None) -> dict[str, float]:
    """What a queueing model expects from the single exchange measured alone.

    A worker's cycle is c = tau * step + t_exchange. The lock is a server with deterministic
    service s = t_held / stripes (an exchange passes the stripes as a pipeline, so the slowest
    stage, one stripe, bounds the flow) and p sources each arriving once a cycle: utilisation
    rho = p s / c, wait W = rho s / (2 (1 - rho)) (M/D/1). The cores are a second bound: each
    exchange is t_exchange of one core's work. Efficiency = tau * step over the cycle with the
    wait, capped by what the lock (1/s exchanges per second) and the cores allow.
    """
    cores = cores or os.cpu_count() or 1
    work = tau * step
    cycle = work + t_exchange
    s = t_held / max(1, stripes)
    rho = p * s / cycle
    rho_cpu = p * t_exchange / (cores * cycle)
    wait = rho * s / (2 * (1 - rho)) if rho < 1 else math.inf
    bounds = [1.0]
    if math.isfinite(wait):  # else the lock is saturated: its bound below is the flow
        bounds.append(work / (cycle + wait))
    if s > 0:
        bounds.append(work / (p * s))
    if t_exchange > 0:
        bounds.append(cores * work / (p * t_exchange))
    efficiency = min(bounds)
    return {"rho_lock": rho, "rho_cpu": rho_cpu, "wait_mean": wait, "efficiency": efficiency,
            "exchanges_per_second": p * efficiency / work if work else 0.0}


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def summarize(results: list[dict[str, Any]], stripes: int, step: float) -> dict[str, float]:
    """The workers' reports of one point -> the point's figures."""
    begin = min(r["begin"] for r in results)
    wall = max(r["end"] for r in results) - begin
    waits = [w for r in results for w in r["waits"]]
    worker_time = sum(r["end"] - r["begin"] for r in results)
    return {
        "wall_seconds": wall,
        "exchanges": sum(r["exchanges"] for r in results),
        "exchanges_per_second": sum(r["exchanges"] for r in results) / wall,
        "lock_held_share": sum(r["held_seconds"] for r in results) / (stripes * wall),
        "wait_mean": sum(waits) / len(waits) if waits else 0.0,
        "wait_p99": _percentile(waits, 0.99),
        "exchange_share": sum(r["exchange_seconds"] for r in results) / worker_time,
        "efficiency": sum(r["step_seconds"] for r in results) / worker_time,
        "nominal_efficiency": sum(r["nominal_step_seconds"] for r in results) / worker_time,
        "finite": all(r["finite"] for r in results),
    }


def load_average() -> list[float]:
    try:
        return list(os.getloadavg())
    except OSError:
        return []


def run_scale(options: ScaleOptions, on_point: Callable[[str], None] | None = None,
              ) -> dict[str, Any]:
    """Run the grid; writes scale.json and scale.md after every point, scale.png at the end."""
    options.out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"options": {**asdict(options), "out": str(options.out)},
                              "cores": os.cpu_count(), "load_average_before": load_average(),
                              "alone": {}, "points": [], "skipped": []}
    with Pool(options) as pool:
        for size in options.sizes:
            result["alone"][size] = pool.measure(size)
        for point in grid(options):
            size, p = point["size"], point["p"]
            if not pool.fits(size, p):
                result["skipped"].append({**point, "why": "memory"})
                continue
            step = point["step_ms"] / 1000
            got = pool.run(p, Point(size, point["stripes"], step, point["tau"], 0.0,
                                    point_seconds(point["tau"], step, options.seconds),
                                    options.alpha, options.host, copy_gbps=options.copy_gbps))
            alone = result["alone"][size]
            point.update(summarize(got, point["stripes"], step))
            point["predicted"] = predict(p, point["tau"], step, alone["exchange_seconds"],
                                         alone["held_seconds"], point["stripes"])
            result["points"].append(point)
            write(result, options.out)
            if on_point is not None:
                on_point(point_line(point))
    result["load_average_after"] = load_average()
    write(result, options.out)
    from .scale_report import plot

    plot(result, options.out / "scale.png")
    return result


def grid(options: ScaleOptions) -> list[dict[str, Any]]:
    return [{"stripes": s, "size": size, "params": parse_size(size)[1], "p": p, "tau": tau,
             "step_ms": step}
            for s in options.stripes for size in options.sizes for step in options.steps_ms
            for tau in options.taus for p in options.p]


def point_line(point: dict[str, Any]) -> str:
    return (f"stripes {point['stripes']} {point['size']} p={point['p']} tau={point['tau']} "
            f"step {point['step_ms']:g} ms: efficiency {point['efficiency']:.3f} (model "
            f"{point['predicted']['efficiency']:.3f}), exchange {100 * point['exchange_share']:.1f}%"
            f", lock wait p99 {1000 * point['wait_p99']:.1f} ms")


def write(result: dict[str, Any], out: Path) -> None:
    from .scale_report import markdown_table

    (out / "scale.json").write_text(json.dumps(_finite(result), indent=1) + "\n")
    (out / "scale.md").write_text(markdown_table(result))


def _finite(value: Any) -> Any:
    """JSON has no infinity: an unbounded prediction (rho >= 1) is written as null."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
