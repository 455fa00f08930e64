"""Checks shared by the tests that start training runs: nothing may be left behind.

/dev/shm is machine-wide: run one test session at a time (as CI does), or another session's
semaphores show up here as leftovers.
"""

import gc
import os
import time


def _children(pid: int) -> set[int]:
    """Live direct children of ``pid`` (from /proc; zombies count as gone)."""
    kids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, ppid = fields[0], int(fields[1])
        if ppid == pid and state != "Z":
            kids.add(int(entry))
    return kids


def _is_resource_tracker(pid: int) -> bool:
    # multiprocessing's resource tracker is started once per interpreter and lives with it.
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"resource_tracker" in f.read()
    except OSError:
        return False


def leftovers_snapshot() -> tuple[set[int], set[str]]:
    return _children(os.getpid()), set(os.listdir("/dev/shm"))


def assert_no_leftovers(before: tuple[set[int], set[str]], wait: float = 5.0) -> None:
    """No new child process and no new /dev/shm entry since ``before``."""
    kids_before, shm_before = before
    deadline = time.monotonic() + wait
    while True:
        gc.collect()
        kids = {p for p in _children(os.getpid()) - kids_before if not _is_resource_tracker(p)}
        shm = set(os.listdir("/dev/shm")) - shm_before
        if not kids and not shm:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"left behind: processes {sorted(kids)}, /dev/shm {sorted(shm)}")
        time.sleep(0.1)
