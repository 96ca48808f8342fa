"""`python -m train` / `torchrun ... -m train`: options -> run, errors as one line."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator

from shards_spec import SpecError


class Stopped(BaseException):
    """A signal asked the run to stop (raised in the main thread, so every cleanup runs)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _stop(signum, frame) -> None:
    raise Stopped(signum)


@contextlib.contextmanager
def _stop_on_sigterm() -> Iterator[None]:
    """SIGTERM raises `Stopped` (instead of ending the process on the spot, which leaves the
    loader's fork server and workers behind); the previous handler is restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    from train.checkpoint import CheckpointError, disk_full
    from train.data import DataError
    from train.folder_lock import FolderBusy
    from train.loop import TrainingError, run
    from train.options import parse

    cfg = parse(argv)
    rank = os.environ.get("RANK")
    prefix = f"rank {rank}: " if rank not in (None, "0") else ""
    try:
        with _stop_on_sigterm():
            run(cfg)
    except (SpecError, DataError, CheckpointError, FolderBusy, ValueError) as exc:
        print(f"{prefix}error: {exc}", file=sys.stderr)
        return 2
    except TrainingError as exc:
        print(f"{prefix}error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        if not disk_full(exc):
            raise
        where = f" writing {exc.filename}" if exc.filename else ""
        print(
            f"{prefix}error: disk full{where}: free some space and run the same command again "
            "to resume from the last checkpoint",
            file=sys.stderr,
        )
        return 2
    except Stopped as exc:
        print(f"{prefix}stopped by {exc}", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print(f"{prefix}stopped by SIGINT", file=sys.stderr)
        return 128 + signal.SIGINT
    return 0


if __name__ == "__main__":
    sys.exit(main())
