"""The emulated workers of a scale sweep: spawned once, fed one point at a time, always ended.

A worker that dies (killed, out of memory) ends the sweep with :class:`ScaleError`;
on the way out every worker is stopped and joined, and the centers' lock descriptors closed.
The centers' shared pages are mapped with PyTorch's file_descriptor strategy (unlinked from
/dev/shm as soon as mapped), so nothing is left there whatever happens.
"""

from __future__ import annotations

import logging
import time
from multiprocessing.connection import wait
from typing import Any

from .config import available_memory
from .emulate import Point, parse_size, serve

log = logging.getLogger(__name__)

MEASURE_EXCHANGES = 3  # exchanges timed alone per size, for the queueing model (median)
MEMORY_SHARE = 0.5  # a point may take at most this share of the memory available
JOIN_SECONDS = 10.0  # for a worker to leave after it is told to, before it is terminated
SLACK_SECONDS = 120.0  # beyond a point's own time, before a silent worker counts as hung


class ScaleError(RuntimeError):
    """The sweep could not go on (a worker died or hung); ``str()`` is one line."""


class Pool:
    """As many emulated workers as the sweep's largest p, and one center per size."""

    def __init__(self, options: Any):
        self.options = options
        self.procs: list[Any] = []
        self.conns: list[Any] = []
        self.centers: dict[str, Any] = {}

    def __enter__(self) -> "Pool":
        import torch
        import torch.multiprocessing as mp

        from .center import SharedCenter

        try:
            for size in self.options.sizes:
                self.centers[size] = SharedCenter(torch.full((parse_size(size)[1],), 0.01))
            ctx = mp.get_context("spawn")
            for rank in range(max(self.options.p)):
                mine, theirs = ctx.Pipe()
                proc = ctx.Process(target=serve, daemon=True, name=f"emulated-{rank}",
                                   args=(rank, self.centers, self.options.device, theirs))
                proc.start()
                theirs.close()
                self.procs.append(proc)
                self.conns.append(mine)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Tell every worker to leave, wait a little, then terminate what is left."""
        for conn in self.conns:
            try:
                conn.send(None)
            except OSError:
                pass
        deadline = time.monotonic() + JOIN_SECONDS
        for proc in self.procs:
            proc.join(max(0.1, deadline - time.monotonic()))
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(JOIN_SECONDS)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self.conns:
            conn.close()
        for center in self.centers.values():
            center.close()
        self.procs, self.conns, self.centers = [], [], {}

    def fits(self, size: str, p: int) -> bool:
        """Whether p workers' states of this size (a state and a difference each, with room for
        a copy in flight) fit in the allowed share of the memory available now."""
        if self.options.device != "cpu":
            return True
        available = available_memory()
        need = p * 2.5 * parse_size(size)[1] * 4
        return available is None or need <= MEMORY_SHARE * available

    def measure(self, size: str) -> dict[str, float]:
        """The single exchange alone, on worker 0 (its device, its thread)."""
        point = Point(size, 1, 0.0, 1, 0.0, 0.0, self.options.alpha, self.options.host,
                      measure=MEASURE_EXCHANGES, copy_gbps=self.options.copy_gbps)
        return self.run(1, point)[0]

    def run(self, p: int, point: Point) -> list[dict[str, Any]]:
        """Run ``point`` on the first p workers, starting together; their reports by rank."""
        # Room for every worker to allocate its state before the common start.
        n = parse_size(point.size)[1]
        point.start = time.monotonic() + 0.3 + p * n * 4 / 1e9
        for conn in self.conns[:p]:
            conn.send(point)
        return self._collect(p, point.start + point.seconds + SLACK_SECONDS)

    def _collect(self, p: int, deadline: float) -> list[dict[str, Any]]:
        pending = {self.conns[r]: r for r in range(p)}
        got: dict[int, dict[str, Any]] = {}
        sentinels = {proc.sentinel: rank for rank, proc in enumerate(self.procs)}
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ScaleError(f"emulated workers {sorted(pending.values())} sent nothing "
                                 "in time (hung?)")
            ready = wait([*pending, *sentinels], timeout=left)
            for item in ready:
                if item in pending:
                    try:
                        got[pending.pop(item)] = item.recv()
                    except (EOFError, OSError):
                        pass  # it died: its sentinel says how
            for item in ready:
                if item in sentinels:
                    rank = sentinels[item]
                    self.procs[rank].join(1.0)
                    raise ScaleError(f"emulated worker {rank} died (exit code "
                                     f"{self.procs[rank].exitcode}); the sweep stopped")
        return [got[r] for r in range(p)]
