"""Measure the promise the tests only bound loosely: after SIGINT, SIGTERM (to the main process
or to the whole process group) or SIGHUP, every process of a run is gone, with a checkpoint
written, within 5 seconds.

    .venv/bin/python scripts/interrupt_latency.py [--repeats 3] [--out runs/latency]

Prints one line per signal (median and max seconds from the signal to the last process gone)
and writes latency.json; it also prints the machine's one-thread samples/s beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMISE_SECONDS = 5.0
CASES = {
    "SIGINT": (signal.SIGINT, False),
    "SIGTERM": (signal.SIGTERM, False),
    "SIGTERM to the group": (signal.SIGTERM, True),
    "SIGHUP": (signal.SIGHUP, False),
}


def _children(pid: int) -> set[int]:
    kids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid and fields[0] != "Z":
                    kids.add(int(entry))
            except OSError:
                pass
    return kids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def measure(signum: int, group: bool, workdir: Path) -> float:
    out = workdir / f"run-{time.monotonic_ns()}"
    proc = subprocess.Popen([sys.executable, "-m", "easgd_local", "train", "--quiet", "--out",
                             str(out), "--time-limit", "120", "--checkpoint-every", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    while not (out / "checkpoint" / "state.pt").exists():
        if proc.poll() is not None:
            raise RuntimeError("the run ended before it could be interrupted")
        time.sleep(0.05)
    time.sleep(1.0)  # well into training
    pids = {proc.pid} | _children(proc.pid)
    start = time.monotonic()
    if group:
        os.killpg(proc.pid, signum)
    else:
        proc.send_signal(signum)
    proc.wait(timeout=120)
    while any(_alive(p) for p in pids):
        time.sleep(0.01)
    took = time.monotonic() - start
    if proc.returncode != 130:
        raise RuntimeError(f"exit code {proc.returncode}, expected 130")
    return took


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    from easgd_local.calibrate import one_thread_samples_per_second

    speed = one_thread_samples_per_second()
    print(f"this machine trains cnn at {speed:,.0f} samples/s on one thread")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (signum, group) in CASES.items():
            times = [measure(signum, group, Path(tmp)) for _ in range(args.repeats)]
            results[name] = times
            verdict = "kept" if max(times) <= PROMISE_SECONDS else "BROKEN"
            print(f"{name:22s} median {statistics.median(times):.2f} s, max {max(times):.2f} s "
                  f"(promise {PROMISE_SECONDS:g} s: {verdict})")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "latency.json").write_text(json.dumps(
            {"one_thread_samples_per_second": speed, "seconds": results}, indent=2))
    return 0 if all(max(t) <= PROMISE_SECONDS for t in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
