"""The shared center seen from several spawned processes; no exchange lost under the lock."""

import gc
import os

import pytest
import torch
import torch.multiprocessing as mp

from easgd_local.center import CenterLink, SharedCenter

N = 1 << 18  # big enough that an unguarded += of two processes would overlap in time


def _shm():
    return set(os.listdir("/dev/shm"))


def _add_ones(center: SharedCenter, times: int) -> None:
    ones = torch.ones(center.numel)
    for _ in range(times):
        center.add_(ones)


def _exchanges(center: SharedCenter, rank: int, times: int, result) -> None:
    """Alternate drift (as local steps would) and real exchanges; report y and total drift."""
    torch.set_num_threads(1)
    link = CenterLink(center, torch.device("cpu"))
    gen = torch.Generator().manual_seed(rank)
    y = torch.randn(center.numel, generator=gen) * 10
    y0 = y.clone()
    drift = torch.zeros(center.numel)
    for _ in range(times):
        step = torch.randn(center.numel, generator=gen)
        y += step
        drift += step
        link.exchange(y, alpha=0.5)
    # numpy arrays travel by value; tensors would be shared by a descriptor of this process,
    # which is gone by the time the test reads them.
    result.put((rank, y0.numpy(), y.numpy(), drift.numpy(), link.exchanges, link.bytes))


def _write_pattern(center: SharedCenter, value: float) -> None:
    center.data.fill_(value)


def _run(target, args_list, collect=None):
    """Run one spawned process per args; ``collect()`` reads their results before the join
    (a child that queued a large result cannot exit until it is read)."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=args) for args in args_list]
    for p in procs:
        p.start()
    got = collect() if collect else None
    for p in procs:
        p.join(timeout=120)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return got


def test_children_see_and_write_the_same_center():
    before = _shm()
    ctx = mp.get_context("spawn")
    center = SharedCenter(torch.zeros(N))
    _run(_write_pattern, [(center, 3.5)])
    assert torch.all(center.data == 3.5)
    del center
    gc.collect()
    assert _shm() <= before  # neither the tensor's segment nor the lock's semaphore is left


def test_no_lost_addition_under_the_lock():
    ctx = mp.get_context("spawn")
    center = SharedCenter(torch.zeros(N), lock=True)
    procs, times = 3, 300
    _run(_add_ones, [(center, times)] * procs)
    # Integers up to 900 are exact in float32: any lost += would show as a smaller value.
    assert torch.all(center.data == procs * times)


def test_exchanges_conserve_the_sum_of_workers_and_center():
    """Each exchange moves d from the worker to the center, so with every exchange applied
    whole, center + sum of workers = initial values + all local drift, whatever the interleaving."""
    ctx = mp.get_context("spawn")
    c0 = torch.randn(N, generator=torch.Generator().manual_seed(99))
    center = SharedCenter(c0, lock=True)
    result = ctx.Queue()
    procs, times = 3, 100
    got = _run(_exchanges, [(center, r, times, result) for r in range(procs)],
               collect=lambda: [tuple(torch.from_numpy(x) if hasattr(x, "shape") else x
                                      for x in result.get(timeout=120)) for _ in range(procs)])
    before = c0.double() + sum(g[1].double() for g in got) + sum(g[3].double() for g in got)
    after = center.data.double() + sum(g[2].double() for g in got)
    # Only float32 rounding separates the two sides (a lost exchange would be off by ~|d| ~ 1).
    assert torch.max(torch.abs(after - before)).item() < 1e-2
    assert all(g[4] == times and g[5] == times * 2 * N * 4 for g in got)


def test_snapshot_is_a_copy():
    center = SharedCenter(torch.arange(4.0))
    snap = center.snapshot()
    center.add_(torch.ones(4))
    assert torch.equal(snap, torch.arange(4.0))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_link_registers_shared_pages_and_exchanges():
    center = SharedCenter(torch.zeros(1024))
    link = CenterLink(center, torch.device("cuda:0"))
    try:
        assert center.data.is_pinned()  # page-locked in place, not a pinned copy
        y = torch.ones(1024, device="cuda:0")
        link.exchange(y, alpha=0.5)
        torch.testing.assert_close(y.cpu(), torch.full((1024,), 0.5))
        torch.testing.assert_close(center.data, torch.full((1024,), 0.5))
    finally:
        link.close()


class _FakeCudart:
    def __init__(self, err):
        self.err = err

    def cudaHostRegister(self, ptr, size, flags):  # noqa: N802 (CUDA's name)
        return self.err


@pytest.mark.parametrize("cleared", [True, False])
def test_failed_page_lock_clears_cuda_error_or_says_why(monkeypatch, cleared):
    """A refused cudaHostRegister leaves CUDA's last error set: it is cleared (and copies go
    pageable), or the worker stops with one line; never a later, unrelated kernel failure."""
    from easgd_local import center as center_module

    calls = []
    monkeypatch.setattr(torch.cuda, "cudart", lambda: _FakeCudart(2))
    monkeypatch.setattr(center_module, "_clear_cuda_error", lambda: calls.append(1) or cleared)
    t = torch.zeros(8)
    if cleared:
        assert center_module.page_lock(t) is False
    else:
        with pytest.raises(RuntimeError) as err:
            center_module.page_lock(t)
        assert "\n" not in str(err.value) and "cudaError 2" in str(err.value)
    assert calls == [1]
    monkeypatch.setattr(torch.cuda, "cudart", lambda: _FakeCudart(0))
    assert center_module.page_lock(t) is True and calls == [1]  # success: nothing to clear


# -- a center in stripes: additions stripe by stripe, each stripe under its own lock ----------


def _add_ones_striped(center: SharedCenter, times: int) -> None:
    assert center.entry.stripes == 4  # the stripe count travels with the center
    _add_ones(center, times)


def test_no_lost_addition_with_stripes():
    center = SharedCenter(torch.zeros(N), lock=True, stripes=4)
    procs, times = 3, 300
    _run(_add_ones_striped, [(center, times)] * procs)
    assert torch.all(center.data == procs * times)


def test_exchanges_conserve_the_sum_with_stripes():
    c0 = torch.randn(N, generator=torch.Generator().manual_seed(7))
    center = SharedCenter(c0, lock=True, stripes=5)
    result = mp.get_context("spawn").Queue()
    procs, times = 3, 60
    got = _run(_exchanges, [(center, r, times, result) for r in range(procs)],
               collect=lambda: [tuple(torch.from_numpy(x) if hasattr(x, "shape") else x
                                      for x in result.get(timeout=120)) for _ in range(procs)])
    before = c0.double() + sum(g[1].double() for g in got) + sum(g[3].double() for g in got)
    after = center.data.double() + sum(g[2].double() for g in got)
    assert torch.max(torch.abs(after - before)).item() < 1e-2


def test_striped_addition_runs_under_lock_once_after_the_whole_addition():
    center = SharedCenter(torch.zeros(10), stripes=3)
    seen = center.add_(torch.arange(10.0), under_lock=lambda: center.data.clone())
    assert torch.equal(seen, torch.arange(10.0))  # every stripe added before under_lock ran
    assert center.entry.lock.fd >= 0 and not center.state.lock_holders()  # all let go


def _hold_stripe_then_whole(center: SharedCenter, conn) -> None:
    """Hold stripe 1 until told; report that a whole-entry lock in another process waited."""
    center.lock.lock_stripe(1)
    conn.send("holding")
    conn.recv()
    center.lock.unlock_stripe(1)


def test_a_held_stripe_blocks_the_whole_entry_but_not_another_stripe():
    from easgd_local.shared import stripe_bounds

    assert stripe_bounds(10, 3) == [(0, 3), (3, 6), (6, 10)]
    center = SharedCenter(torch.zeros(12), stripes=3)
    ctx = mp.get_context("spawn")
    mine, theirs = ctx.Pipe()
    proc = ctx.Process(target=_hold_stripe_then_whole, args=(center, theirs))
    proc.start()
    try:
        assert mine.recv() == "holding"
        assert not center.lock.acquire(0.05)  # the whole entry waits for stripe 1
        center.lock.lock_stripe(0)  # another stripe is free
        center.lock.unlock_stripe(0)
        mine.send("go")
        assert center.lock.acquire(30.0)
        center.lock.__exit__()
    finally:
        proc.join(timeout=60)
    assert proc.exitcode == 0


def _crash_in_striped_addition(center: SharedCenter) -> None:
    center.crash_in_lock = True
    center.add_(torch.ones(center.numel))


def test_kill_halfway_through_a_striped_addition_lets_go_of_its_stripe():
    center = SharedCenter(torch.zeros(1000), stripes=4)
    ctx = mp.get_context("spawn")
    proc = ctx.Process(target=_crash_in_striped_addition, args=(center,))
    proc.start()
    proc.join(timeout=120)
    assert proc.exitcode == -9
    assert center.lock.acquire(5.0)  # the kernel let go of the dead process's stripe
    center.lock.__exit__()
    # stripes 0 and 1 whole, half of stripe 2, nothing of stripe 3
    assert center.data[:500].eq(1).all() and center.data[500:625].eq(1).all()
    assert center.data[625:].eq(0).all()
