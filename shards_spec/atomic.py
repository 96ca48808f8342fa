"""Atomic writes: a file (or folder) is either absent, its old self, or complete, never cut short.

Every writer of the project goes through these: shards, index and manifest here, checkpoints,
configs, records, plots and reports in ``train`` and ``eval``. The new content is written to a
temporary name in the same folder, flushed to disk, and renamed over the destination; a write
that fails or is interrupted leaves no temporary file behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _temp_path(path: Path) -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(name)


def is_leftover(name: str, target: str) -> bool:
    """Whether the file name `name` is what an interrupted atomic write of `target` (a file
    name in the same folder) leaves: ``.TARGET.*.tmp`` (`atomic_output`'s temporary file;
    ``.TARGET.tmp`` too, the name of earlier versions) or ``.TARGET.old-PID`` (the old folder
    of `replace_folder`)."""
    rest = name.removeprefix(f".{target}.")
    return rest != name and (rest == "tmp" or rest.endswith(".tmp") or rest.startswith("old-"))


def fsync_dir(folder: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename in it) to disk, where the filesystem allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, durable: bool = True) -> Iterator[Path]:
    """A temporary path beside ``path`` for any writer (``torch.save``, ``savefig``, ...).

    When the block ends normally the file is fsynced (unless not `durable`: a file that can be
    made again, where a power cut may leave it empty but never cut short), made readable
    (0644) and renamed over ``path``; when it raises, the temporary file is removed and the
    error goes on.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    try:
        yield tmp
        if durable:
            _fsync_file(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, durable: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (`atomic_output`)."""
    with atomic_output(path, durable) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def replace_folder(tmp: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Put the finished folder ``tmp`` where ``dest`` is; the old ``dest`` is removed after.

    The swap is two renames: between them ``dest`` is briefly absent, never half written.
    """
    tmp, dest = Path(tmp), Path(dest)
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
    if dest.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)
    fsync_dir(dest.parent)
