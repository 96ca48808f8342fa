"""Constants, schemas and naming rules of the shard format (see SPEC.md)."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Sequence
from importlib import resources
from typing import Any

import numpy as np
import pyarrow as pa

SPEC_VERSION = "1.1"
SUPPORTED_MAJOR = 1
FLOW_MAG_SINCE = "1.1"  # the first version whose windows carry flow_mag (SPEC.md section 11)
# mean(|F|)^2 <= mean(|F|^2) for every pair (Jensen); equal for a uniform field, so allow the
# rounding of two float32 means: flow_mag^2 <= flow_msq * (1 + MAG_RTOL) + MAG_ATOL
MAG_RTOL, MAG_ATOL = 1e-4, 1e-9

MANIFEST_NAME = "dataset.json"
INDEX_NAME = "index.parquet"
SKIPPED_NAME = "skipped.parquet"
SUMMARY_NAME = "summary.json"

FORBIDDEN_EXTENSIONS = frozenset({"pyd", "pickle", "pkl", "pt", "pth"})
KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")
EXT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*$")
SPLIT_RE = re.compile(r"^[A-Za-z0-9_-]+$")
SHARD_RE = re.compile(r"^(?P<split>[A-Za-z0-9_-]+)/(?P=split)-(?P<n>[0-9]{6})\.tar$")
FRAME_RE = re.compile(r"^f(?P<k>[0-9]+)\.png$")
MASK_RE = re.compile(r"^mask(?P<k>[0-9]+)\.png$")
FLOW_MEMBER = "flow.npy"
JSON_MEMBER = "json"

PERCENTILES = (1, 5, 25, 50, 75, 90, 95, 99)

INDEX_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("position", pa.int32(), nullable=False),
        pa.field("clip_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("sequence", pa.int32()),
        pa.field("camera", pa.int32()),
        pa.field("subject", pa.string()),
        pa.field("object", pa.string()),
        pa.field("frame_ids", pa.list_(pa.int64()), nullable=False),
        pa.field("flow_msq", pa.list_(pa.float64()), nullable=False),
        pa.field("flow_mag", pa.list_(pa.float64()), nullable=False),
        pa.field("weight", pa.list_(pa.float64()), nullable=False),
    ]
)
# The index columns of a 1.0 build (no flow_mag); see index_schema.
INDEX_SCHEMA_1_0 = pa.schema([f for f in INDEX_SCHEMA if f.name != "flow_mag"])

SKIPPED_SCHEMA = pa.schema(
    [
        pa.field("source_path", pa.string()),
        pa.field("clip_id", pa.string()),
        pa.field("frame_id", pa.int64()),
        pa.field("reason", pa.string()),
    ]
)


class SpecError(ValueError):
    """A build, shard or sample does not follow the shard format."""


def shard_path(split: str, n: int) -> str:
    """Relative path of shard number `n` of `split`, e.g. ``train/train-000003.tar``."""
    if not SPLIT_RE.match(split):
        raise SpecError(f"bad split name {split!r}: use letters, digits, '_' or '-'")
    if not 0 <= n <= 999_999:
        raise SpecError(f"shard number {n} out of range 0..999999")
    return f"{split}/{split}-{n:06d}.tar"


def frame_member(k: int) -> str:
    """Member extension of frame `k` of a window."""
    return f"f{k}.png"


def mask_member(k: int) -> str:
    """Member extension of the mask of frame `k` of a window."""
    return f"mask{k}.png"


def frame_members(window: int) -> list[str]:
    """Frame member extensions of a `window`-frame sample, in order."""
    return [frame_member(k) for k in range(window)]


def mask_members(window: int) -> list[str]:
    """Mask member extensions of a `window`-frame sample, in order."""
    return [mask_member(k) for k in range(window)]


def is_forbidden(ext: str) -> bool:
    """True when a member extension names a pickle-like payload (``x.pkl``, ``pt``, ...)."""
    return ext.rsplit(".", 1)[-1].lower() in FORBIDDEN_EXTENSIONS


def is_meta(name: str) -> bool:
    """True for webdataset's bookkeeping fields of a raw sample (``__key__``, ``__url__``)."""
    return len(name) > 4 and name.startswith("__") and name.endswith("__")


def check_key(key: str) -> None:
    """Raise SpecError unless `key` is a valid sample key."""
    if not isinstance(key, str) or not KEY_RE.match(key):
        raise SpecError(f"bad sample key {key!r}: use letters, digits, '_' or '-' (no dots)")


def _version_tuple(version: Any) -> tuple[int, int]:
    """(major, minor) of a ``"MAJOR.MINOR"`` spec version string."""
    match = re.fullmatch(r"([0-9]+)\.([0-9]+)", str(version))
    if not match:
        raise SpecError(f"bad spec_version {version!r}: expected 'MAJOR.MINOR'")
    return int(match.group(1)), int(match.group(2))


def major_version(version: Any) -> int:
    """Major number of a ``"MAJOR.MINOR"`` spec version string."""
    return _version_tuple(version)[0]


def has_flow_mag(manifest: dict) -> bool:
    """Whether every window of the build carries ``flow_mag`` (JSON member and index column)
    and its manifest ``flow.mag_stats``: True for spec version 1.1 and later.

    ``manifest`` is the build's ``dataset.json`` object (``Build.manifest``). Raises SpecError
    when it has no valid ``spec_version``.
    """
    if not isinstance(manifest, dict) or "spec_version" not in manifest:
        raise SpecError("manifest has no spec_version")
    return _version_tuple(manifest["spec_version"]) >= _version_tuple(FLOW_MAG_SINCE)


def index_schema(manifest: dict) -> pa.Schema:
    """The index columns a build of this manifest's version has (INDEX_SCHEMA from 1.1)."""
    return INDEX_SCHEMA if has_flow_mag(manifest) else INDEX_SCHEMA_1_0


def check_version(version: Any) -> None:
    """Raise SpecError unless a reader of this package can read `version`."""
    major = major_version(version)
    if major != SUPPORTED_MAJOR:
        raise SpecError(
            f"unsupported shard format version {version}: this reader reads "
            f"{SUPPORTED_MAJOR}.x only"
        )


@functools.cache
def _schema_text(name: str) -> str:
    return resources.files("shards_spec").joinpath(name).read_text(encoding="utf-8")


def load_schema(name: str) -> dict:
    """Load a JSON schema shipped with the package: ``"dataset"`` or ``"sample"``."""
    file = name if name.endswith(".json") else f"{name}.schema.json"
    if file not in ("dataset.schema.json", "sample.schema.json"):
        raise ValueError(f"unknown schema {name!r}: use 'dataset' or 'sample'")
    return json.loads(_schema_text(file))


def sample_schema(manifest: dict) -> dict:
    """The sample schema for the windows of a build of this manifest's version.

    A sample does not record its version: ``sample.schema.json`` requires what every 1.x window
    holds, and ``flow_mag`` is added to its ``required`` for builds that have it
    (:func:`has_flow_mag`).
    """
    schema = load_schema("sample")
    if has_flow_mag(manifest):
        schema = {**schema, "required": [*schema["required"], "flow_mag"]}
    return schema


def flow_weight(flow_msq: float, sigma: float) -> float:
    """Proximity weight of a pair: ``exp(-flow_msq / sigma)``."""
    return float(np.exp(-float(flow_msq) / float(sigma)))


def distinct_pair_values(rows: Iterable[dict], field: str = "flow_msq") -> list[float]:
    """``field`` (flow_msq or flow_mag) of each distinct adjacent pair (clip_id, frame_a,
    frame_b) in index rows.

    A pair shared by overlapping windows counts once; first occurrence wins.
    """
    seen: dict[tuple[str, int, int], float] = {}
    for row in rows:
        ids, values = row["frame_ids"], row[field]
        for i, value in enumerate(values):
            seen.setdefault((row["clip_id"], int(ids[i]), int(ids[i + 1])), float(value))
    return list(seen.values())


def flow_stats(values: Sequence[float]) -> dict:
    """Summary of per-pair values as stored in ``manifest["flow"]["stats"]`` (flow_msq) and
    ``manifest["flow"]["mag_stats"]`` (flow_mag)."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return {
            "count": 0,
            "mean": None,
            "min": None,
            "max": None,
            "percentiles": {f"p{p}": None for p in PERCENTILES},
        }
    pct = np.percentile(arr, PERCENTILES)
    return {
        "count": int(arr.size),
        "mean": float(arr.mean()),
        "min": float(arr.min()),
        "max": float(arr.max()),
        "percentiles": {f"p{p}": float(v) for p, v in zip(PERCENTILES, pct, strict=True)},
    }
