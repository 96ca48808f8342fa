"""The framebridge shard format: K-frame windows with flow weights (see SPEC.md)."""

from .format import SPEC_VERSION, SpecError
from .reader import Build, open_build
from .validate import validate

__all__ = ["SPEC_VERSION", "Build", "SpecError", "open_build", "validate"]
