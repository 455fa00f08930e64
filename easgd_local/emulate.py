"""Emulated devices: workers whose local step is a sleep and whose exchanges are real.

A worker on an emulated device does not compute. Each local step is a sleep of a given time
(the time a GPU would take; a sleep costs no core, so many such workers fit on two cores), and
every tau steps it moves a real flat state of a model's size through the real exchange path:
the same :class:`~.center.CenterLink`, lock and :class:`~.center.SharedCenter` code as a
training worker (`rules.elastic_difference`, the finiteness check, the locked addition). On a
CUDA device the link is the real GPU one (page-locked shared pages, DMA copies). Without one,
``host`` chooses what the CPU does per exchange: "gpu" (:class:`HostSideLink`) does what a GPU
worker's host side does, with the DMA copies as real copies and the device's own arithmetic
left out; "cpu" is a CPU worker's whole exchange (the elastic difference on the host too). With
``copy_gbps`` each of the two copies of a "gpu" exchange lasts at least size / bandwidth (a
sleep after the real copy): a host-device link slower than this machine's memory, e.g. PCIe 3.0
x16 at about 12 GB/s, whose DMA engines take no core.

:func:`serve` is the process that scale.py spawns; it runs one sweep point per request. The
lock is watched through :class:`TimedLock`: the same descriptor and kernel lock, with a clock.
"""

from __future__ import annotations

import logging
import signal
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

from .center import CenterLink, Diverged, SharedCenter

log = logging.getLogger(__name__)

# Parameter counts of the torchvision models (and ViT-B/16), so that a size needs no model.
MODEL_SIZES = {"resnet18": 11_689_512, "resnet50": 25_557_032, "vit-b": 86_567_656}


def parse_size(text: str) -> tuple[str, int]:
    """"resnet50" or a parameter count ("2500000", "2.5e6") -> (name, parameters)."""
    text = text.strip()
    if text in MODEL_SIZES:
        return text, MODEL_SIZES[text]
    try:
        n = float(text)
    except ValueError:
        raise ValueError(f"a size is one of {', '.join(MODEL_SIZES)} or a parameter count "
                         f"(got {text!r})") from None
    if not n.is_integer() or n < 1:
        raise ValueError(f"a parameter count is a whole number >= 1 (got {text!r})")
    return str(int(n)), int(n)


class HostSideLink(CenterLink):
    """The host's part of a GPU worker's exchange, without a GPU: the read of the center and
    the copy of the difference back as real copies (where DMA engines would do them), the
    finiteness check, and the locked addition by the same SharedCenter code. The elastic
    difference is the device's arithmetic: ``self.d`` holds a real difference of the model's
    size, made once, and each exchange sends it again."""

    def __init__(self, center: SharedCenter, copy_gbps: float = 0.0):
        super().__init__(center, "cpu")
        self.c_dev = torch.empty_like(center.data)  # the center as read onto the "device"
        self.d_host = torch.empty_like(center.data)  # the staging of the way back
        torch.sub(center.data, center.data, out=self.d).add_(1e-6)
        # Seconds one copy lasts at least (0: as fast as this machine copies).
        self.copy_seconds = center.data.numel() * 4 / (copy_gbps * 1e9) if copy_gbps > 0 else 0.0

    def _paced_copy(self, dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        started = time.perf_counter()
        dst.copy_(src)
        rest = self.copy_seconds - (time.perf_counter() - started)
        if rest > 0:
            time.sleep(rest)  # the link is slower than memory; its DMA takes no core
        return dst

    @torch.no_grad()
    def exchange(self, y: torch.Tensor, alpha: float, under_lock: Any = None, **_: Any) -> Any:
        self._paced_copy(self.c_dev, self.entry.data)  # host -> device
        host = self._paced_copy(self.d_host, self.d)  # device -> host
        if not bool(torch.isfinite(host).all()):
            raise Diverged("non-finite elastic difference")
        result = self.center.add_(host, under_lock)
        self.count()
        return result


class TimedLock:
    """A :class:`~.shared.ProcessLock` with a clock: the same lock, and how long this process
    waited for it and held it (per stripe; the whole lock counts as stripe -1)."""

    def __init__(self, lock: Any):
        self.lock = lock
        self.waited = 0.0  # seconds blocked, since the last reset
        self.held = 0.0  # seconds holding a stripe (summed over stripes), since the last reset
        self._since: dict[int, float] = {}

    @property
    def fd(self) -> int:
        return self.lock.fd

    def _taken(self, stripe: int, asked: float) -> None:
        now = time.perf_counter()
        self.waited += now - asked
        self._since[stripe] = now

    def _let_go(self, stripe: int) -> None:
        self.held += time.perf_counter() - self._since.pop(stripe)

    def __enter__(self) -> "TimedLock":
        asked = time.perf_counter()
        self.lock.__enter__()
        self._taken(-1, asked)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.lock.__exit__()  # lets go of every stripe too
        for stripe in list(self._since):
            self._let_go(stripe)

    def lock_stripe(self, i: int) -> None:
        asked = time.perf_counter()
        self.lock.lock_stripe(i)
        self._taken(i, asked)

    def unlock_stripe(self, i: int) -> None:
        self.lock.unlock_stripe(i)
        self._let_go(i)

    def reset(self) -> tuple[float, float]:
        """(waited, held) since the last reset, and start again from zero."""
        got = (self.waited, self.held)
        self.waited = self.held = 0.0
        return got


@dataclass
class Point:
    """One request to an emulated worker: a timed run (or, with ``measure``, exchanges back to
    back, alone, for the queueing model)."""

    size: str
    stripes: int
    step: float  # seconds per emulated local step
    tau: int
    start: float  # time.monotonic() at which all workers of the point begin
    seconds: float
    alpha: float = 0.1
    host: str = "gpu"  # without CUDA: a GPU worker's host side, or a CPU worker's ("cpu")
    measure: int = 0  # > 0: this many exchanges back to back, no sleeping
    copy_gbps: float = 0.0  # > 0: host "gpu"'s copies paced to this bandwidth (GB/s)


def serve(rank: int, centers: dict[str, SharedCenter], device: str, conn: Any) -> None:
    """An emulated worker: runs the points it is sent until None, or its parent is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the sweep's process decides how it ends
    torch.set_num_threads(1)  # one core's worth of exchange, as a CPU worker of a run
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    while True:
        try:
            point = conn.recv()
        except (EOFError, OSError):
            return  # the parent is gone
        if point is None:
            return
        conn.send(run_point(rank, centers[point.size], device, point))


def run_point(rank: int, center: SharedCenter, device: str, point: Point) -> dict[str, Any]:
    """Sleep-steps and real exchanges until the point's time is up; what was measured."""
    entry, timed = center.entry, None
    entry.stripes = point.stripes
    if entry.lock is not None:
        timed = entry.lock = TimedLock(entry.lock)
    cpu = not device.startswith("cuda")
    link = (HostSideLink(center, point.copy_gbps) if cpu and point.host == "gpu"
            else CenterLink(center, device))
    try:
        # A state near the center, as a worker's would be; distinct per rank.
        y = center.snapshot().add_(1e-3 * (rank + 1)).to(device)
        if point.measure:
            return _measure(link, y, timed, point)
        return _timed_run(link, y, timed, point)
    finally:
        link.close()
        if timed is not None:
            entry.lock = timed.lock


def _exchange(link: CenterLink, y: torch.Tensor, timed: TimedLock | None,
              alpha: float) -> tuple[float, float, float]:
    """One real exchange: (its seconds, seconds waiting for the lock, seconds holding it)."""
    started = time.perf_counter()
    link.exchange(y, alpha)
    took = time.perf_counter() - started
    waited, held = timed.reset() if timed is not None else (0.0, 0.0)
    return took, waited, held


def _timed_run(link: CenterLink, y: torch.Tensor, timed: TimedLock | None,
               point: Point) -> dict[str, Any]:
    time.sleep(max(0.0, point.start - time.monotonic()))
    begin = time.monotonic()
    deadline = begin + point.seconds
    steps, step_s, exchange_s, held_s, waits = 0, 0.0, 0.0, 0.0, []
    while time.monotonic() < deadline:
        if steps % point.tau == 0:  # as Elastic.exchange: the exchange, then the step
            took, waited, held = _exchange(link, y, timed, point.alpha)
            exchange_s += took
            held_s += held
            waits.append(waited)
        slept = time.perf_counter()
        time.sleep(point.step)
        # The sleep as it was: a late wake-up (a busy machine) is the timer's, not the lock's.
        step_s += time.perf_counter() - slept
        steps += 1
    return {"begin": begin, "end": time.monotonic(), "steps": steps,
            "step_seconds": step_s, "nominal_step_seconds": steps * point.step,
            "exchanges": len(waits),
            "exchange_seconds": exchange_s, "held_seconds": held_s, "waits": waits,
            "finite": bool(torch.isfinite(y).all())}


def _measure(link: CenterLink, y: torch.Tensor, timed: TimedLock | None,
             point: Point) -> dict[str, Any]:
    """The single exchange alone (median of ``measure``, after one to warm up)."""
    _exchange(link, y, timed, point.alpha)
    runs = [_exchange(link, y, timed, point.alpha) for _ in range(point.measure)]
    result = {"exchange_seconds": statistics.median(r[0] for r in runs),
              "held_seconds": statistics.median(r[2] for r in runs)}
    if link.cuda:
        result.update(copy_bandwidth(y))
    return result


def copy_bandwidth(y: torch.Tensor) -> dict[str, float]:
    """GB/s of pinned host -> ``y``'s GPU and back, for ``y``'s size: what an exchange's two
    copies cannot beat."""
    host = torch.empty(y.numel(), pin_memory=True)
    rates = {}
    for name, dst, src in (("h2d_gbps", y, host), ("d2h_gbps", host, y)):
        dst.copy_(src, non_blocking=True)  # warm up
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(5):
            dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        rates[name] = 5 * y.numel() * 4 / (time.perf_counter() - started) / 1e9
    return rates
