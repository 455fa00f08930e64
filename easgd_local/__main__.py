"""`python -m easgd_local` and the console script `easgd-local` (both call :func:`main`).

Nothing heavy is imported before the guard below: Ctrl-C can come at any moment, also in the
second or two that importing torch takes, and it ends the command with one line and exit code
130, never a traceback.
"""

import signal
import sys

INTERRUPTED = 130  # the exit code of a command ended by Ctrl-C (128 + SIGINT)
INTERRUPTS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # each ends a command as Ctrl-C does
# What the command line needs before it can act on an interrupt itself: PyTorch among them.
HEAVY = ("easgd_local.cli", "easgd_local.checkpoint", "easgd_local.data", "easgd_local.launcher",
         "easgd_local.output")


def main(argv: list[str] | None = None) -> int:
    """Run the command line; the process's exit code. It is the entry of a process: it leaves
    SIGINT, SIGTERM and SIGHUP ignored, and an interrupted command exits here (in-process, call
    easgd_local.cli.main instead)."""
    code = _run(argv)
    if code == INTERRUPTED:
        _exit(code)
    return code


def _run(argv: list[str] | None) -> int:
    try:
        try:
            if not _imported():
                return _interrupted()
            from easgd_local.cli import main as run

            return run(argv)
        finally:
            # The command has ended (its checkpoint, if any, written): from here to the exit,
            # a Ctrl-C changes nothing.
            for sig in INTERRUPTS:
                signal.signal(sig, signal.SIG_IGN)
    except KeyboardInterrupt:  # before cli.main could catch it
        return _interrupted()


def _imported() -> bool:
    """Import the command line's modules with the interrupts only noted; False if one came.

    A KeyboardInterrupt raised while PyTorch loads can come out of its C++ code, which calls
    back into Python (the process aborts: "terminate called after throwing an instance of
    pybind11::error_already_set"), or be swallowed there (the command then runs as if nothing
    had happened): so none is raised until the imports are done."""
    import importlib

    seen: list[int] = []
    before = {sig: signal.signal(sig, lambda signum, frame: seen.append(signum))
              for sig in INTERRUPTS}
    try:
        for name in HEAVY:
            importlib.import_module(name)
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
    return not seen


def _interrupted() -> int:
    print("interrupted", file=sys.stderr, flush=True)
    return INTERRUPTED


def _exit(code: int) -> None:
    """Exit with ``code`` after the usual exit handlers. CPython reports a process in which a
    KeyboardInterrupt once went through code run by exec() (dataclasses and namedtuples make
    their methods so), caught or not, as killed by SIGINT when it finalizes, whatever its code."""
    import atexit
    import os

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
