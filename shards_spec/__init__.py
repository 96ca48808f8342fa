"""The framebridge shard format: K-frame windows with flow weights (see SPEC.md).

The reader and validator are imported on first use, so that writing shards (the builder's
hot path) does not pay for importing webdataset's reading stack in every worker.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

from .format import SPEC_VERSION, SpecError

if TYPE_CHECKING:
    from .reader import Build, open_build
    from .validate import validate

_LAZY = {"Build": "reader", "open_build": "reader", "validate": "validate"}

__all__ = ["SPEC_VERSION", "Build", "SpecError", "open_build", "validate"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
