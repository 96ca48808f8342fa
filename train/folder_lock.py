"""One writer per folder: an exclusive, advisory lock on ``DIR/.lock`` held for a process's life.

A training run folder, a sample folder and a study cell each have one writer. `hold` takes a
non-blocking ``flock`` on the folder's lock file and writes the holder's PID into it; a second
process gets `FolderBusy` naming that PID. The kernel drops the lock when the holder exits, however
it exits (SIGKILL included), so a stale lock file never blocks a rerun.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from collections.abc import Iterator
from pathlib import Path

LOCK_NAME = ".lock"


class FolderBusy(RuntimeError):
    """Another live process holds the folder, or its lock file is not one this module made."""


def _holder(path: Path) -> str:
    try:
        pid = path.read_text().strip()
    except OSError:
        return "another process"
    return f"PID {pid}" if pid.isdigit() else "another process"


def _not_a_lock(path: Path) -> str:
    return f"{path} is not a plain file (a link, a folder or a device): remove it and run again"


def acquire(folder: str | os.PathLike, what: str = "folder") -> int:
    """Lock ``folder`` (which must exist) for this process; return the lock's file descriptor.

    Raises `FolderBusy` with one line naming the holder when another process has it.
    """
    path = Path(folder) / LOCK_NAME
    try:  # never through a link: the PID is written into the file
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.EISDIR):
            raise FolderBusy(_not_a_lock(path)) from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise FolderBusy(_not_a_lock(path))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise FolderBusy(
                f"{folder}: this {what} is in use by {_holder(path)}; wait for it to finish or "
                "stop it first"
            ) from None
        raise
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    os.fsync(fd)
    return fd


def release(fd: int) -> None:
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_UN)
    with contextlib.suppress(OSError):
        os.close(fd)


@contextlib.contextmanager
def hold(folder: str | os.PathLike, what: str = "folder") -> Iterator[None]:
    """``with hold(dir):`` — the folder is this process's until the block ends."""
    fd = acquire(folder, what)
    try:
        yield
    finally:
        release(fd)
