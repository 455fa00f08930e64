"""`python -m easgd_local` and the console script `easgd-local` (both call :func:`main`).

Nothing heavy is imported here, nor by the command line itself: PyTorch loads only when a
command starts a run (cli.load_run_modules), with Ctrl-C held off until it is in, so that
``--help`` and usage errors answer at once. Ctrl-C can come at any moment; it ends the command
with one line and exit code 130, never a traceback.
"""

import signal
import sys

INTERRUPTED = 130  # the exit code of a command ended by Ctrl-C (128 + SIGINT)
INTERRUPTS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # each ends a command as Ctrl-C does


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
            from easgd_local.cli import main as run  # pure Python: a Ctrl-C here is caught below

            return run(argv)
        finally:
            # The command has ended (its checkpoint, if any, written): from here to the exit,
            # a Ctrl-C changes nothing.
            for sig in INTERRUPTS:
                signal.signal(sig, signal.SIG_IGN)
    except KeyboardInterrupt:  # before cli.main could catch it
        return _interrupted()


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
