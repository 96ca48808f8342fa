"""Shared fixtures: one small synthetic HanCo-format dataset per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """4 sequences x 2 cameras x 14 frames at 96 px (one sequence is not green-screen)."""
    from pipeline.synth import generate

    root = tmp_path_factory.mktemp("synth")
    generate(root, sequences=4, cameras=2, frames=14, size=96, seed=3, progress=False)
    return root


def tree_bytes(out: Path) -> dict[str, bytes]:
    """Every output file that must be reproducible (shards, index, skip record, manifest)."""
    files = {}
    for p in sorted(out.rglob("*")):
        rel = p.relative_to(out).as_posix()
        if p.is_file() and not rel.startswith(".work") and rel != "summary.json":
            files[rel] = p.read_bytes()
    return files
