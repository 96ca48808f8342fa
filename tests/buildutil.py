"""Helpers for build tests."""

from __future__ import annotations

from pathlib import Path

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def tree_bytes(out: Path) -> dict[str, bytes]:
    """Every output file that must be reproducible (shards, index, skip record, manifest).

    The track cache (``.cache``) is not output: a killed task may leave a temporary file there.
    """
    files = {}
    for p in sorted(out.rglob("*")):
        rel = p.relative_to(out).as_posix()
        if p.is_file() and not rel.startswith((".work", ".cache")) and rel != "summary.json":
            files[rel] = p.read_bytes()
    return files
