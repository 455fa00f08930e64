"""Synchronous data-parallel SGD with torch.nn.parallel.DistributedDataParallel: gradients
all-reduced at every step (gloo on CPU, NCCL on GPU). The baseline that is not elastic."""

from __future__ import annotations

import socket
import time
from typing import TYPE_CHECKING, Any

from .base import Algorithm, Communicator, WorkerContext, deferred
from .reference import Publisher

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn

    from .. import center, control
    from .. import shared as shm
    from ..shared import SharedState
else:  # loaded when a run starts (base.py)
    torch, center, control, shm = deferred("torch", "..center", "..control", "..shared",
                                           package=__package__)


def free_loopback_port() -> int:
    """A TCP port free on 127.0.0.1 now (the process group's store binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DDPSync(Publisher):
    """DDP: gradients are all-reduced inside backward; every tau steps (the template's period)
    the ranks meet at a barrier (barrier.py) to agree on stopping (an all-reduce that one rank
    skips would hang the others), and rank 0 publishes the model, which is the same on every
    rank (Publisher's ``exchange_after``)."""

    def __init__(self, ctx: WorkerContext, port: int):
        config, ch = ctx.config, ctx.channels
        super().__init__(center.Link(ctx.shared["model"], ctx.device), config.tau, 0.0,
                         active=ctx.rank == 0)
        self.ctx, self.port = ctx, port
        self.barrier, self.agreed = ctx.barrier(), ch.agreed
        self.steps = 0
        world = config.workers
        # Ring all-reduce: each rank sends and receives 2 (p-1)/p of the gradient per step.
        self.bytes_per_step = int(2 * (world - 1) / world * ctx.n_params * 4)
        self.group_started = False

    def wrap(self, model: nn.Module) -> nn.Module:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        device = self.ctx.device
        # A TCP store on a loopback port chosen by the main process: no file to place, nothing
        # shared with another run.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                init_method=f"tcp://127.0.0.1:{self.port}",
                                rank=self.ctx.rank, world_size=self.ctx.config.workers)
        self.group_started = True
        # Gradients are copied from DDP's buckets into the existing .grad views, i.e. the flat
        # gradient buffer, so the local step stays one fused op.
        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      process_group=dist.group.WORLD)
        self._time_allreduce(ddp)
        return ddp

    def _time_allreduce(self, ddp_model: Any) -> None:
        """Time each bucket's all-reduce from launch to completion (it overlaps backward)."""
        import torch.distributed as dist
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        # No annotations: DDP checks them against its own classes, and postponed annotations
        # (from __future__) would be strings.
        def hook(state, bucket):  # type: ignore[no-untyped-def]
            start = time.perf_counter()
            # Waiting for the other ranks from here until backward returns (before_step): a rank
            # stopped elsewhere is the one the watchdog blames.
            self.barrier.mark(True)

            def done(fut):  # type: ignore[no-untyped-def]
                self.seconds += time.perf_counter() - start
                return fut.value()

            return default_hooks.allreduce_hook(dist.group.WORLD, bucket).then(done)

        ddp_model.register_comm_hook(None, hook)

    def before_step(self, step: int, y: Tensor, v: Tensor | None) -> bool:
        """Every step: one all-reduce done (counted); then the template's period."""
        self.steps += 1
        self.barrier.mark(False)  # backward has returned: every all-reduce is done
        return super().before_step(step, y, v)

    def exchange(self, step: int, y: Tensor, v: Tensor | None) -> bool:
        """The stop decision, taken together at the barrier."""
        self.barrier.wait()
        return not self.agreed[control.AGREED_STOP]

    def close(self) -> None:
        super().close()
        if self.group_started:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.group_started = False

    @property
    def exchanges(self) -> int:
        return self.steps

    @property
    def bytes(self) -> int:
        return self.steps * self.bytes_per_step


class DDP(Algorithm):
    name = "ddp"
    summary = "DistributedDataParallel: gradients all-reduced every step"
    synchronous = True
    has_tau = False
    reports = "rank 0's model (the same on every rank)"

    def shared_state(self, config: Any, init: Tensor, n_params: int) -> SharedState:
        state = shm.SharedState(locked=True)
        state.add("model", init)
        # Where the process group meets, chosen once per run (and anew on a resume).
        state.add("port", torch.tensor([free_loopback_port()]), lock=False, dtype=torch.int64)
        return state

    def reported(self, shared: SharedState, config: Any) -> Tensor:
        return shared["model"].snapshot()

    def state_dict(self, shared: SharedState) -> dict[str, Tensor]:
        return {"model": shared["model"].snapshot()}

    def load_state_dict(self, shared: SharedState, state: dict[str, Tensor]) -> None:
        shared["model"].copy_(state["model"])

    def communicator(self, ctx: WorkerContext) -> Communicator:
        return DDPSync(ctx, int(ctx.shared["port"].data[0]))
