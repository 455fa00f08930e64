"""Several boxes: each box's shared-memory center tied elastically to a root, one level up.

Launched by PyTorch's own engine, one launcher process per box::

    torchrun --nnodes N --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint HOST:PORT \\
        -m easgd_local train --multi-node --box-tau 4 --box-beta 0.9 ...

Inside a box nothing changes: its workers, their shared-memory center and its lock. Between
boxes, the top level of the hierarchy of centers (hierarchy.py): the box centers c_k are the
children of a root r replicated on every box, tied by synchronous EASGD. Every ``--box-tau``
exchanges of a box's center (counted in that box), its launcher joins a round
(``hierarchy.tie_replicated``) in which, from the same pre-round values::

    d_k  = alpha_root * (c_k - r)                  alpha_root = --box-beta / K
    c_k <- c_k - d_k                               for every box k
    r   <- r + sum_k d_k = r + beta_root * (mean_k c_k - r)     (rules.elastic_round)

with the sum of the d_k (and of the boxes' done flags) from one all-reduce (gloo on CPU
tensors; NCCL from a GPU copy where the boxes have GPUs). The root is a persistent variable
replicated on every box: box 0 broadcasts its initial value at the start (its initial center,
or the root of its checkpoint after a restart), and since every box sees the same all-reduce,
every replica takes the same steps. Rounds are collective, so they are synchronous between
boxes; inside each box everything stays asynchronous. The exchange happens in the launcher
process: the center is copied under its lock, the all-reduce runs without it (the box's
workers never wait for the network, only the launcher does), and the move is added under the
lock again, as an exchange is. A box that has finished
training keeps joining rounds (flagged as done) until every box is done; the root after the
last round is the model reported, evaluated and saved by rank 0.

A box that dies makes the others' all-reduce fail, within ``--root-timeout`` seconds at the
most: they end with one line and a checkpoint (the root in it). Under ``torchrun --max-restarts
K`` the job is started again, every box resumes its center from its own last checkpoint under
``OUT/box-k/``, and box 0's root is broadcast to all.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from .config import ConfigError, TrainConfig
from .hierarchy import Level, hierarchy_of, tie_replicated
from .settings import declarations

log = logging.getLogger(__name__)

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# What may differ between boxes (declared per_box): where each keeps its data and output, its
# local resources.
PER_BOX_FIELDS = frozenset(name for name, s in declarations(TrainConfig).items() if s.per_box)


def torchrun_env() -> tuple[int, int] | None:
    """(rank, world size) when started by torchrun, else None."""
    if not all(k in os.environ for k in TORCHRUN_ENV):
        return None
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def restart_count() -> int:
    """How many times torchrun started this box's process again after its own failure. A box
    restarted because another box failed keeps its count: the boxes agree on the maximum."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


JOB_STORE_KEY = "easgd_local/job_store"


def job_store(rank: int, timeout: float) -> Any:
    """A store for this start of the job only, or None where torchrun's env:// gives one.

    torchrun keeps one store for the whole job across its restarts and hands it to every start
    (TORCHELASTIC_USE_AGENT_STORE): the keys of the start before, among them the addresses gloo
    listened on, are still there, and a box that read them would connect to a process that is
    gone. So box 0 serves a fresh store on a free port and publishes its address in torchrun's;
    the other boxes read it and retry until box 0 of this start answers."""
    from torch.distributed import TCPStore

    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    wait = timedelta(seconds=timeout)
    agent = TCPStore(addr, port, is_master=False, timeout=wait)
    if rank == 0:
        own = TCPStore(addr, 0, is_master=True, timeout=wait)
        agent.set(JOB_STORE_KEY, f"{addr}:{own.port}")
        return own
    deadline = time.monotonic() + timeout
    while True:
        host, _, p = agent.get(JOB_STORE_KEY).decode().rpartition(":")
        try:  # the address of an earlier start refuses: read again until box 0 has written
            return TCPStore(host, int(p), is_master=False, timeout=timedelta(seconds=2))
        except (RuntimeError, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def config_hash(config: TrainConfig) -> str:
    """What every box must agree on: the configuration but its per-box fields."""
    shared = {k: v for k, v in config.to_dict().items() if k not in PER_BOX_FIELDS
              and not k.startswith("resolved") and k != "worker_devices"}
    shared["workers_per_box"] = config.workers
    return hashlib.sha256(json.dumps(shared, sort_keys=True, default=str).encode()).hexdigest()


def box_dir(out: Path, rank: int) -> Path:
    return Path(out) / f"box-{rank}"


@dataclass
class BoxLink:
    """This box's side of the rounds between boxes (lives in the launcher process)."""

    rank: int
    world: int
    level: Level  # the boxes' level: period --box-tau (exchanges of this box's center between
    # two rounds), alpha --box-beta / boxes
    timeout: float
    rounds: int = 0
    last_exchanges: float = 0.0
    bytes: int = 0  # sent and received by this box in all-reduces
    lock_seconds: list[float] = field(default_factory=list)  # the center's lock held per round
    round_seconds: list[float] = field(default_factory=list)  # the launcher's wait per round
    root: torch.Tensor | None = None  # this box's replica of the root (the same on every box)
    all_done: bool = False
    backend: str = "gloo"
    restarted: bool = False  # this start of the job follows a failure: every box resumes
    store: Any = None  # box 0 serves it for this start of the job
    agent: int = field(default_factory=os.getppid)  # torchrun's agent, our parent

    @property
    def tau(self) -> int:
        return self.level.period

    @property
    def alpha_root(self) -> float:
        return self.level.alpha

    def orphaned(self) -> bool:
        """torchrun's agent is gone (killed): this box must not go on training on its own."""
        return os.getppid() != self.agent

    @classmethod
    def start(cls, config: TrainConfig) -> "BoxLink":
        """Join the process group torchrun set up and check that every box runs the same job.
        ``config`` is validated (its --box-tau and --box-beta resolved)."""
        import torch.distributed as dist

        env = torchrun_env()
        if env is None:
            raise ConfigError("--multi-node needs the environment torchrun sets (RANK, "
                              "WORLD_SIZE, MASTER_ADDR, MASTER_PORT); start it with torchrun")
        rank, world = env
        timeout = config.root_timeout
        backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
        store = job_store(rank, timeout)
        if store is None:
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
        else:
            dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                                    timeout=timedelta(seconds=timeout))
        hashes: list[Any] = [None] * world
        dist.all_gather_object(hashes, (config_hash(config), restart_count()))
        counts = [c for _, c in hashes]
        hashes = [h for h, _ in hashes]
        differ = [k for k, h in enumerate(hashes) if h != hashes[0]]
        if differ:
            dist.destroy_process_group()
            raise ConfigError(f"the boxes disagree on the job (box {differ[0]}'s configuration "
                              "differs from box 0's: algorithm, model, data set, workers per box, "
                              "rates, ...); start every box with the same options")
        link = cls(rank, world, hierarchy_of(config, boxes=world).level("boxes"), timeout)
        link.backend, link.store, link.restarted = backend, store, max(counts) > 0
        return link

    def start_root(self, center: torch.Tensor, saved: dict[str, Any] | None) -> None:
        """The root every box starts from: box 0's, broadcast (its initial ``center``, a copy of
        the box center, or the root of its checkpoint ``saved`` after a restart)."""
        import torch.distributed as dist

        root = center.detach().to("cpu", torch.float32).clone()
        if saved is not None:
            root.copy_(saved["root"])
            self.rounds = int(saved["rounds"])
        self.root = self._collective(dist.broadcast, root, src=0)

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps of the rounds: the root and their count."""
        assert self.root is not None, "start_root() first"
        return {"root": self.root.clone(), "rounds": self.rounds}

    def due(self, exchanges: float, done: bool) -> bool:
        return done or exchanges - self.last_exchanges >= self.tau

    def round(self, center: Any, exchanges: float, done: bool) -> None:
        """One round of synchronous EASGD between the box centers and the root (the module's
        docstring). ``center`` is the box's shared center entry (a SharedTensor)."""
        import torch.distributed as dist

        assert self.root is not None, "start_root() first"
        t0 = time.perf_counter()
        snap = center.snapshot()  # under the lock, a copy
        d, root, (done_boxes,) = tie_replicated(
            snap, self.root, self.level.alpha, lambda t: self._collective(dist.all_reduce, t),
            flags=(1.0 if done else 0.0,))
        self.all_done = int(round(done_boxes)) == self.world
        held = time.perf_counter()
        center.add_(d.neg_())  # c_k -= alpha_root (c_k - r), an addition as an exchange is
        self.lock_seconds.append(time.perf_counter() - held)
        self.root = root
        # Ring all-reduce of d and the flag (float32): each box sends and receives 2 (W-1)/W of it.
        self.bytes += int(2 * (self.world - 1) / self.world * (d.numel() + 1) * 4)
        self.rounds += 1
        self.last_exchanges = exchanges
        self.round_seconds.append(time.perf_counter() - t0)

    def _collective(self, op: Any, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """``op`` (all_reduce, broadcast) on a CPU tensor, through a GPU copy under NCCL."""
        if self.backend != "nccl":
            op(t, **kwargs)
            return t
        gpu = t.cuda()
        op(gpu, **kwargs)
        return gpu.cpu()

    def totals(self, values: list[float]) -> list[float]:
        """The sums of ``values`` over every box (one all-reduce)."""
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
