"""How every command of the project ends: ``pipeline``, ``python -m train``, ``python -m eval``.

One way for all of them (`run_command`):

- bad input (the errors a command names as its own): ``PREFIX error: message`` on one line,
  exit 2;
- a job that failed for a reason the user must see (a command's ``failed`` predicate): the
  same line, exit 1;
- a full disk: one line saying so (the same command resumes), exit 2;
- a path it cannot write or read (a folder in the way of a file, no permission, a read-only
  file system): the path and the reason on one line, exit 2;
- SIGINT, or SIGTERM where a command turns it into `Stopped`: ``PREFIX stopped by SIGINT``,
  exit 128 + the signal's number;
- with ``--debug`` (`add_debug_flag`), errors are raised instead, traceback and all.

Anything else is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import signal
import sys
import threading
from collections.abc import Callable, Iterator

FULL = (errno.ENOSPC, errno.EDQUOT)


class Stopped(BaseException):
    """A signal asked the command to stop (raised in the main thread, so every cleanup runs)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _stop(signum, frame) -> None:
    raise Stopped(signum)


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """SIGTERM raises `Stopped` (instead of ending the process on the spot, which leaves child
    processes behind); the previous handler is restored after. A no-op off the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGTERM and SIGINT while the block runs, then deliver the first that came, to the
    handlers in place before (`Stopped`, KeyboardInterrupt, or the default).

    For steps that must not be cut in half: a loader starting its worker processes, stopped
    midway, drops the queues a started worker is still reading and the worker dies with a
    traceback. A signal that is ignored (SIG_IGN, as under ``nohup`` or a shell's background
    job) or handled outside Python stays as it is: the processes started inside the block
    inherit that disposition, and holding it would only drop it later. A no-op off the main
    thread.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    sigs = [
        sig
        for sig in (signal.SIGTERM, signal.SIGINT)
        if signal.getsignal(sig) not in (signal.SIG_IGN, None)
    ]
    previous = {sig: signal.signal(sig, lambda signum, frame: held.append(signum)) for sig in sigs}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if held:
            signal.raise_signal(held[0])


# a path the command cannot write or read: a folder in the way of a file (or a file in the way
# of a folder), no permission, a read-only file system
BLOCKED = (errno.EISDIR, errno.ENOTDIR, errno.EACCES, errno.EPERM, errno.EROFS)


def _os_error(exc: BaseException | None, codes: tuple[int, ...]) -> OSError | None:
    """The OSError with one of `codes` that `exc` is or was raised from, if any.

    torch.save reports a failed write as a RuntimeError ("unexpected pos") raised while
    handling the OSError.
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError) and exc.errno in codes:
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def disk_full(exc: BaseException | None) -> bool:
    """Whether `exc` or an error it was raised from is a full disk (or quota)."""
    return _os_error(exc, FULL) is not None


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")


def _stopped(signum: int, prefix: str = "", on_stop: str = "") -> int:
    print(f"{prefix}stopped by {signal.Signals(signum).name}{on_stop}", file=sys.stderr)
    return 128 + signum


def ctrl_c_ends_quietly(main: Callable[..., int]) -> Callable[..., int]:
    """Decorate a command's ``main`` (which calls `run_command`): a Ctrl-C before `run_command`
    takes over, while torch and the libraries import (seconds) or the options parse, ends as
    one inside it would: ``stopped by SIGINT``, exit 130, no traceback."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except KeyboardInterrupt:
            return _stopped(signal.SIGINT)

    return wrapper


def run_command(
    body: Callable[[], int | None],
    *,
    errors: tuple[type[BaseException], ...],
    prefix: str = "",
    failed: Callable[[BaseException], bool] = lambda exc: False,
    message: Callable[[BaseException], str] = str,
    debug: bool = False,
    on_stop: str = "",
) -> int:
    """Run a command's `body` and end it the one way described above; its exit code.

    ``message`` turns an error into its line (``str`` by default); ``on_stop`` is added to the
    line a signal leaves (e.g. that the same command resumes).
    """
    try:
        return int(body() or 0)
    except Stopped as exc:
        return _stopped(exc.signum, prefix, on_stop)
    except KeyboardInterrupt:
        return _stopped(signal.SIGINT, prefix, on_stop)
    except Exception as exc:
        if debug:
            raise
        if isinstance(exc, errors) or failed(exc):
            print(f"{prefix}error: {message(exc)}", file=sys.stderr)
            return 2 if isinstance(exc, errors) else 1
        full = _os_error(exc, FULL)
        if full is not None:
            where = f" writing {full.filename}" if full.filename else ""
            print(
                f"{prefix}error: disk full{where}: free some space and run the same command "
                "again to resume",
                file=sys.stderr,
            )
            return 2
        blocked = _os_error(exc, BLOCKED)
        if blocked is None or not blocked.filename:
            raise
        path = blocked.filename2 or blocked.filename  # a rename's: its destination
        print(f"{prefix}error: {path}: {blocked.strerror}", file=sys.stderr)
        return 2
