"""Shared fixtures: one small synthetic HanCo-format dataset per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """4 sequences x 2 cameras x 14 frames at 96 px (one sequence is not green-screen)."""
    from pipeline.synth import generate

    root = tmp_path_factory.mktemp("synth")
    generate(root, sequences=4, cameras=2, frames=14, size=96, seed=3, progress=False)
    return root


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module (the machine is small), restored for the other modules:
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
