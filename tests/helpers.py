"""Checks shared by the tests that start training runs (nothing may be left behind), and the
flat-vector helpers of the rule tests.

/dev/shm is machine-wide: an entry another job holds is not counted as ours. Bounds on time are
generous (a slow machine, busy with something else, must pass); the product's promises in
seconds are measured by scripts/, not asserted here.
"""

import gc
import os
import time

import torch


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


def _descendants(pid: int) -> set[int]:
    found, todo = set(), [pid]
    while todo:
        kids = _children(todo.pop()) - found
        found |= kids
        todo.extend(kids)
    return found


def _held_by_others() -> set[str]:
    """/dev/shm entries that processes outside this test's process tree have open or mapped:
    another job's, not ours (CI machines run other work beside the tests)."""
    ours = {os.getpid()} | _descendants(os.getpid())
    held = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in ours:
            continue
        try:
            with open(f"/proc/{entry}/maps") as f:
                held |= {line.rsplit("/", 1)[-1].strip() for line in f if "/dev/shm/" in line}
            for fd in os.listdir(f"/proc/{entry}/fd"):
                target = os.readlink(f"/proc/{entry}/fd/{fd}")
                if target.startswith("/dev/shm/"):
                    held.add(target[len("/dev/shm/"):])
        except OSError:
            continue
    return held


def leftovers_snapshot() -> tuple[set[int], set[str]]:
    return _children(os.getpid()), set(os.listdir("/dev/shm"))


def assert_no_leftovers(before: tuple[set[int], set[str]], wait: float = 15.0) -> None:
    """No new child process and no new /dev/shm entry of ours since ``before`` (entries that
    other processes hold are theirs)."""
    kids_before, shm_before = before
    deadline = time.monotonic() + wait
    while True:
        gc.collect()
        kids = {p for p in _children(os.getpid()) - kids_before if not _is_resource_tracker(p)}
        shm = set(os.listdir("/dev/shm")) - shm_before
        if shm:
            shm -= _held_by_others()
        if not kids and not shm:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"left behind: processes {sorted(kids)}, /dev/shm {sorted(shm)}")
        time.sleep(0.1)


def pieces_of(flat, shapes):
    """Views of a flat vector as tensors of the given shapes, in order."""
    out, o = [], 0
    for s in shapes:
        k = torch.Size(s).numel()
        out.append(flat[o:o + k].view(s))
        o += k
    return out


def flat_of(pieces):
    """The tensors as one flat float32 vector."""
    return torch.cat([p.reshape(-1).float() for p in pieces])
