"""Check a build against the shard format; one human-readable line per problem."""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pyarrow.parquet as pq

from .format import (
    FLOW_MEMBER,
    FRAME_RE,
    INDEX_NAME,
    INDEX_SCHEMA,
    JSON_MEMBER,
    MAG_ATOL,
    MAG_RTOL,
    MANIFEST_NAME,
    MASK_RE,
    PERCENTILES,
    SHARD_RE,
    SKIPPED_NAME,
    SKIPPED_SCHEMA,
    SpecError,
    check_version,
    frame_members,
    index_schema,
    is_forbidden,
    is_meta,
    mask_members,
    sample_schema,
    shard_path,
)
from .reader import decode_png, load_npy
from .writer import check_manifest, sha256_file

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_PROBLEMS = 1000


class Problems(list):
    """A list of problem lines that stops growing at a cap and counts the rest."""

    def __init__(self, cap: int) -> None:
        super().__init__()
        self.cap = cap
        self.dropped = 0

    def add(self, line: str) -> None:
        if len(self) < self.cap:
            self.append(line)
        else:
            self.dropped += 1

    def lines(self) -> list[str]:
        tail = [f"... {self.dropped} more problems not shown"] if self.dropped else []
        return list(self) + tail


def png_header(data: bytes) -> tuple[int, int, int, int] | None:
    """(width, height, bit_depth, colour_type) from a PNG's IHDR, or None if not a PNG."""
    if len(data) < 29 or data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR":
        return None
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    return width, height, depth, colour


def _shape_of_png(data: bytes, decode: bool) -> tuple[tuple[int, ...], str] | str:
    """Shape and dtype of a PNG member, or a problem description."""
    if decode:
        try:
            img = decode_png(data)
        except SpecError as exc:
            return str(exc).removeprefix("image: ")
        return tuple(img.shape), str(img.dtype)
    header = png_header(data)
    if header is None:
        return "not a decodable PNG"
    width, height, depth, colour = header
    channels = {0: 1, 2: 3, 4: 2, 6: 4}.get(colour)
    if channels is None:
        return f"unsupported PNG colour type {colour}"
    shape = (height, width) if channels == 1 else (height, width, channels)
    return shape, "uint8" if depth == 8 else f"{depth}-bit"


class _Context:
    """What sample checks need to know about the build."""

    def __init__(self, manifest: dict, decode: bool) -> None:
        self.window = int(manifest["window"])
        self.size = int(manifest["image_size"])
        self.flow_shape: tuple[int, ...] | None = None
        self.members = list(manifest["members"])
        self.sigma = float(manifest["flow"]["sigma"])
        self.decode = decode
        self.frames = frame_members(self.window)
        self.masks = mask_members(self.window)
        self.index_schema = index_schema(manifest)
        self.sample_validator = jsonschema.Draft202012Validator(sample_schema(manifest))


def _check_members_list(ctx: _Context, problems: Problems) -> None:
    members = set(ctx.members)
    for ext in ctx.frames:
        if ext not in members:
            problems.add(f"{MANIFEST_NAME}: members lacks {ext} (window is {ctx.window})")
    if JSON_MEMBER not in members:
        problems.add(f"{MANIFEST_NAME}: members lacks {JSON_MEMBER}")
    has_masks = [m in members for m in ctx.masks]
    if any(has_masks) and not all(has_masks):
        problems.add(f"{MANIFEST_NAME}: members lists masks for some frames only")
    for ext in ctx.members:
        if is_forbidden(ext):
            problems.add(f"{MANIFEST_NAME}: member {ext} is pickle-like and forbidden")
        frame, mask = FRAME_RE.match(ext), MASK_RE.match(ext)
        if (frame or mask) and ext not in ctx.frames and ext not in ctx.masks:
            problems.add(f"{MANIFEST_NAME}: member {ext} does not fit window {ctx.window}")


def _check_image(ctx: _Context, where: str, ext: str, data: bytes, problems: Problems) -> None:
    is_mask = ext in ctx.masks
    expected = (ctx.size, ctx.size) if is_mask else (ctx.size, ctx.size, 3)
    result = _shape_of_png(data, ctx.decode)
    if isinstance(result, str):
        problems.add(f"{where}: {ext} {result}")
        return
    shape, dtype = result
    if shape != expected or dtype != "uint8":
        problems.add(f"{where}: {ext} has shape {shape} {dtype}, expected {expected} uint8")
        return
    if is_mask and ctx.decode:
        values = np.unique(decode_png(data))
        if not set(values.tolist()) <= {0, 255}:
            problems.add(f"{where}: {ext} has values other than 0 and 255")


def _check_flow(ctx: _Context, where: str, data: bytes, problems: Problems) -> None:
    try:
        flow = load_npy(data, FLOW_MEMBER)
    except SpecError as exc:
        problems.add(f"{where}: {exc}")
        return
    k = ctx.window - 1
    shape = flow.shape
    if flow.dtype != np.float16 or flow.ndim != 4 or shape[:2] != (k, 2) or min(shape) < 1:
        problems.add(
            f"{where}: {FLOW_MEMBER} is {flow.dtype}{shape}, expected float16({k}, 2, h, w)"
        )
        return
    if ctx.flow_shape is None:
        ctx.flow_shape = shape
    elif shape != ctx.flow_shape:
        problems.add(f"{where}: {FLOW_MEMBER} has shape {shape}, other samples {ctx.flow_shape}")
        return
    if ctx.decode and not np.isfinite(flow).all():
        problems.add(f"{where}: {FLOW_MEMBER} has non-finite values")


def _check_meta(
    ctx: _Context, where: str, key: str, split: str, data: bytes, problems: Problems
) -> Any:
    try:
        meta = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        problems.add(f"{where}: json is not UTF-8 JSON ({exc})")
        return None
    error = jsonschema.exceptions.best_match(ctx.sample_validator.iter_errors(meta))
    if error is not None:
        field = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        problems.add(f"{where}: json {field}: {error.message}")
        return None
    k = ctx.window
    ids, msq, weight = meta["frame_ids"], meta["flow_msq"], meta["weight"]
    if meta["key"] != key:
        problems.add(f"{where}: json key {meta['key']!r} differs from sample key")
    if meta["split"] != split:
        problems.add(f"{where}: json split {meta['split']!r} differs from shard split {split!r}")
    if len(ids) != k:
        problems.add(f"{where}: frame_ids has {len(ids)} entries, expected {k}")
    elif any(b <= a for a, b in zip(ids[:-1], ids[1:], strict=True)):
        problems.add(f"{where}: frame_ids {ids} not strictly increasing")
    if len(msq) != k - 1 or len(weight) != k - 1:
        problems.add(
            f"{where}: flow_msq/weight have {len(msq)}/{len(weight)} entries, expected {k - 1}"
        )
    elif not np.isfinite(msq).all():
        problems.add(f"{where}: flow_msq {msq} has non-finite values")
    elif not np.allclose(weight, np.exp(-np.asarray(msq, float) / ctx.sigma), rtol=1e-4, atol=1e-6):
        problems.add(f"{where}: weight {weight} != exp(-flow_msq / sigma) with sigma={ctx.sigma}")
    if "flow_mag" in meta:  # required from 1.1 (the schema says so), optional before
        _check_mag(where, meta["flow_mag"], msq, k, problems)
    return meta


def _check_mag(where: str, mag: list, msq: list, k: int, problems: Problems) -> None:
    if len(mag) != k - 1:
        problems.add(f"{where}: flow_mag has {len(mag)} entries, expected {k - 1}")
        return
    if not np.isfinite(mag).all():
        problems.add(f"{where}: flow_mag {mag} has non-finite values")
        return
    if len(msq) != k - 1 or not np.isfinite(msq).all():
        return
    for i, (g, m) in enumerate(zip(mag, msq, strict=True)):
        if g * g > m * (1 + MAG_RTOL) + MAG_ATOL:
            problems.add(
                f"{where}: pair {i}: flow_mag^2 = {g * g:.6g} exceeds flow_msq = {m:.6g} "
                "(a mean magnitude squared cannot exceed the mean squared magnitude)"
            )


def _check_sample(ctx: _Context, rel: str, split: str, raw: dict, problems: Problems) -> Any:
    key = raw["__key__"]
    where = f"{rel} sample {key}"
    exts = [e for e in raw if not is_meta(e)]
    for ext in ctx.members:
        if ext not in raw:
            problems.add(f"{where}: missing member {ext}")
    for ext in exts:
        if is_forbidden(ext):
            problems.add(f"{where}: pickle-like member {key}.{ext} is forbidden")
        elif ext not in ctx.members:
            problems.add(f"{where}: unexpected member {key}.{ext} (not in manifest members)")
    for ext in ctx.frames + ctx.masks:
        if ext in raw and ext in ctx.members:
            _check_image(ctx, where, ext, raw[ext], problems)
    meta = None
    if JSON_MEMBER in raw:
        meta = _check_meta(ctx, where, key, split, raw[JSON_MEMBER], problems)
    if FLOW_MEMBER in raw and FLOW_MEMBER in ctx.members:
        _check_flow(ctx, where, raw[FLOW_MEMBER], problems)
    return meta


def _tar_samples(path: Path) -> Iterator[dict]:
    import webdataset as wds  # imported on use: it pulls in torch

    return wds.tarfile_samples([{"url": str(path)}])


def _has_end_marker(path: Path, size: int) -> bool:
    if size < 1024 or size % 512:
        return False
    with open(path, "rb") as f:
        f.seek(size - 1024)
        return f.read(1024) == bytes(1024)


def _exc_text(exc: BaseException) -> str:
    text = str(exc.args[0]) if exc.args else type(exc).__name__
    return text.split(" @ <", 1)[0]


def _check_shard(
    ctx: _Context, root: Path, split: str, entry: dict, seen: dict, problems: Problems
) -> None:
    rel = entry["path"]
    file = root / rel
    if not file.is_file():
        problems.add(f"{rel}: shard file missing")
        return
    size = file.stat().st_size
    if size != entry["bytes"]:
        problems.add(f"{rel}: size {size} bytes, manifest says {entry['bytes']}")
    digest = sha256_file(file)
    if digest != entry["sha256"]:
        problems.add(
            f"{rel}: sha256 mismatch (file {digest[:16]}..., manifest {entry['sha256'][:16]}...)"
        )
    if not _has_end_marker(file, size):
        problems.add(f"{rel}: truncated tar (no end-of-archive marker)")
    count = 0
    try:
        for position, raw in enumerate(_tar_samples(file)):
            count = position + 1
            key = raw["__key__"]
            meta = _check_sample(ctx, rel, split, raw, problems)
            if key in seen:
                problems.add(f"{rel} sample {key}: duplicate key (also in {seen[key][0]})")
            else:
                seen[key] = (rel, position, split, _indexed_fields(meta))
    except Exception as exc:  # a broken tar is a finding, not a crash
        problems.add(f"{rel}: unreadable or truncated tar after {count} samples: {_exc_text(exc)}")
    if count != entry["samples"]:
        problems.add(f"{rel}: holds {count} samples, manifest says {entry['samples']}")


def _check_splits(ctx: _Context, root: Path, manifest: dict, problems: Problems) -> dict:
    seen: dict[str, tuple] = {}
    listed: set[str] = set()
    for split, info in manifest["splits"].items():
        shards = info["shards"]
        for n, entry in enumerate(shards):
            rel = entry["path"]
            match = SHARD_RE.match(rel)
            if not match or match.group("split") != split:
                problems.add(f"{MANIFEST_NAME}: shard path {rel} is not under split {split!r}")
            elif rel != shard_path(split, n):
                problems.add(
                    f"{MANIFEST_NAME}: shard {rel} out of sequence, expected {shard_path(split, n)}"
                )
            if rel in listed:
                problems.add(f"{MANIFEST_NAME}: shard {rel} listed twice")
                continue
            listed.add(rel)
            _check_shard(ctx, root, split, entry, seen, problems)
        total = sum(int(e["samples"]) for e in shards)
        if total != info["samples"]:
            problems.add(
                f"{MANIFEST_NAME}: split {split} says {info['samples']} samples, its shards {total}"
            )
    on_disk = sorted(p.relative_to(root).as_posix() for p in root.glob("*.tar"))
    on_disk += sorted(p.relative_to(root).as_posix() for p in root.glob("*/*.tar"))
    for rel in on_disk:
        if rel not in listed:
            problems.add(f"{rel}: shard not in manifest")
    return seen


def _check_index(ctx: _Context, root: Path, manifest: dict, seen: dict, problems: Problems) -> None:
    file = root / INDEX_NAME
    if not file.is_file():
        problems.add(f"{INDEX_NAME}: missing")
        return
    try:
        parquet = pq.ParquetFile(file)
        schema = parquet.schema_arrow
    except Exception as exc:
        problems.add(f"{INDEX_NAME}: unreadable ({_exc_text(exc)})")
        return
    bad = False
    for field in ctx.index_schema:
        if field.name not in schema.names:
            problems.add(f"{INDEX_NAME}: column {field.name} missing")
            bad = True
        elif not schema.field(field.name).type.equals(field.type):
            got = schema.field(field.name).type
            problems.add(f"{INDEX_NAME}: column {field.name} is {got}, expected {field.type}")
            bad = True
    if bad:
        return
    at = {(rel, pos): key for key, (rel, pos, _, _) in seen.items()}
    indexed: set[str] = set()
    per_split: dict[str, int] = {}
    order = _Order()
    failed: list[str] = []
    for i, row in enumerate(_index_rows(parquet, failed, ctx.index_schema.names)):
        order.add(row)
        key = row["key"]
        per_split[row["split"]] = per_split.get(row["split"], 0) + 1
        if key in indexed:
            problems.add(f"{INDEX_NAME}: row {i}: key {key} appears twice")
            continue
        indexed.add(key)
        found = at.get((row["shard"], row["position"]))
        if found != key:
            problems.add(
                f"{INDEX_NAME}: row {i}: no sample {key} at {row['shard']} position {row['position']}"
            )
            continue
        _compare_row(i, row, seen[key], problems)
    if failed:
        problems.add(failed[0])
        return
    if not order.ok:
        problems.add(f"{INDEX_NAME}: rows are not grouped by split and ordered by shard, position")
    for key, (rel, pos, _, _) in seen.items():
        if key not in indexed:
            problems.add(f"{INDEX_NAME}: no row for sample {key} ({rel} position {pos})")
    for split, info in manifest["splits"].items():
        if per_split.get(split, 0) != info["samples"]:
            problems.add(
                f"{INDEX_NAME}: {per_split.get(split, 0)} rows for split {split}, "
                f"manifest says {info['samples']}"
            )
    for split in per_split:
        if split not in manifest["splits"]:
            problems.add(f"{INDEX_NAME}: rows for split {split} not in manifest")


INDEX_BATCH = 65536  # index rows turned into Python objects at a time


def _index_rows(parquet: pq.ParquetFile, failed: list[str], columns: list[str] | None = None):
    """The index's rows as dicts (``columns``, INDEX_SCHEMA's by default), a batch at a time
    (the whole index as Python objects would take GBs at HanCo size); a read error ends them,
    its message appended to ``failed``."""
    names = INDEX_SCHEMA.names if columns is None else columns
    batches = parquet.iter_batches(batch_size=INDEX_BATCH, columns=names)
    while True:
        try:
            batch = next(batches, None)
        except Exception as exc:
            failed.append(f"{INDEX_NAME}: unreadable ({_exc_text(exc)})")
            return
        if batch is None:
            return
        yield from batch.to_pylist()


class _Order:
    """Rows of a split are contiguous and ordered by (shard, position), checked row by row."""

    def __init__(self) -> None:
        self.ok = True
        self.done: set[str] = set()
        self.prev: tuple | None = None

    def add(self, row: dict) -> None:
        cur = (row["split"], row["shard"], row["position"])
        prev = self.prev
        if prev is not None and prev[0] == cur[0]:
            if prev[1:] >= cur[1:]:
                self.ok = False
        elif cur[0] in self.done:
            self.ok = False
        self.done.add(cur[0])
        self.prev = cur


INDEXED_FIELDS = ("clip_id", "source", "sequence", "camera", "subject", "object", "frame_ids")
INDEXED_VALUES = ("flow_msq", "flow_mag", "weight")  # floats, compared with a tolerance


def _indexed_fields(meta: Any) -> dict | None:
    """The sample-json fields the index repeats (kept per sample for the index check)."""
    if not isinstance(meta, dict):
        return None
    fields = {name: meta.get(name) for name in INDEXED_FIELDS}
    for name in INDEXED_VALUES:
        fields[name] = meta.get(name)
    return fields


def _compare_row(i: int, row: dict, found: tuple, problems: Problems) -> None:
    _, _, split, meta = found
    if row["split"] != split:
        problems.add(
            f"{INDEX_NAME}: row {i} ({row['key']}): split {row['split']}, shard is {split}"
        )
    if not isinstance(meta, dict):
        return
    for name in INDEXED_FIELDS:
        if row[name] != meta[name]:
            problems.add(f"{INDEX_NAME}: row {i} ({row['key']}): {name} differs from sample json")
    for name in INDEXED_VALUES:
        if name not in row:  # flow_mag: not an index column before 1.1
            continue
        a, b = row[name], meta[name]
        if a is None or any(v is None for v in a):  # a nullable column written by another tool
            problems.add(f"{INDEX_NAME}: row {i} ({row['key']}): {name} has null values")
            continue
        if not isinstance(b, list) or len(a) != len(b) or not np.allclose(a, b, rtol=1e-6, atol=0):
            problems.add(f"{INDEX_NAME}: row {i} ({row['key']}): {name} differs from sample json")


def _stats_finding(name: str, stats: dict) -> str | None:
    """What is wrong with one pair-statistics object, or None: with no pairs every value is
    null; otherwise every value is a finite number >= 0 and min <= p1 <= ... <= p99 <= max, with
    the mean between min and max."""
    where = f"{MANIFEST_NAME}: flow.{name}"
    values = {"mean": stats["mean"], "min": stats["min"], "max": stats["max"],
              **stats["percentiles"]}  # fmt: skip
    if stats["count"] == 0:
        if any(v is not None for v in values.values()):
            return f"{where} counts 0 pairs but has values"
        return None
    bad = sorted(k for k, v in values.items()
                 if not isinstance(v, (int, float)) or not np.isfinite(v) or v < 0)  # fmt: skip
    if bad:
        return f"{where}: {', '.join(bad)} not a finite number >= 0"
    order = [stats["min"], *(stats["percentiles"][f"p{p}"] for p in PERCENTILES), stats["max"]]
    slack = 1e-9 * max(order[-1], 1.0)  # a float mean of equal values may pass max by an ulp
    if any(b < a - slack for a, b in zip(order, order[1:], strict=False)):
        return f"{where}: min, percentiles and max are not in increasing order"
    if not stats["min"] - slack <= stats["mean"] <= stats["max"] + slack:
        return f"{where}: mean {stats['mean']} is outside [min, max]"
    return None


def _check_flow_stats(manifest: dict, problems: Problems) -> None:
    """flow.stats and flow.mag_stats are coherent summaries, and mag_stats summarises the same
    pairs as stats (SPEC section 6)."""
    flow = manifest["flow"]
    for name in ("stats", "mag_stats"):
        finding = _stats_finding(name, flow[name]) if name in flow else None
        if finding:
            problems.add(finding)
    if "mag_stats" in flow and flow["mag_stats"]["count"] != flow["stats"]["count"]:
        problems.add(
            f"{MANIFEST_NAME}: flow.mag_stats counts {flow['mag_stats']['count']} pairs, "
            f"flow.stats {flow['stats']['count']}"
        )


def _check_skipped(root: Path, problems: Problems) -> None:
    file = root / SKIPPED_NAME
    if not file.exists():
        return
    try:
        schema = pq.read_schema(file)
    except Exception as exc:
        problems.add(f"{SKIPPED_NAME}: unreadable ({_exc_text(exc)})")
        return
    for field in SKIPPED_SCHEMA:
        if field.name not in schema.names:
            problems.add(f"{SKIPPED_NAME}: column {field.name} missing")


def _load_manifest(root: Path, problems: Problems) -> dict | None:
    file = root / MANIFEST_NAME
    if not file.is_file():
        problems.add(f"{MANIFEST_NAME}: missing (not a build: {root})")
        return None
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        problems.add(f"{MANIFEST_NAME}: not valid JSON ({exc})")
        return None
    try:
        if isinstance(manifest, dict) and "spec_version" in manifest:
            check_version(manifest["spec_version"])
        check_manifest(manifest)
    except SpecError as exc:
        problems.add(str(exc))
        return None
    return manifest


def validate(
    path: str | os.PathLike, decode: bool = True, max_problems: int = MAX_PROBLEMS
) -> list[str]:
    """Problems found in the build at `path`, one line each; an empty list means valid.

    With ``decode=False`` images are checked from their PNG headers only (much faster).
    """
    root = Path(path)
    problems = Problems(max_problems)
    manifest = _load_manifest(root, problems)
    if manifest is None:
        return problems.lines()
    ctx = _Context(manifest, decode)
    _check_members_list(ctx, problems)
    _check_flow_stats(manifest, problems)
    seen = _check_splits(ctx, root, manifest, problems)
    _check_index(ctx, root, manifest, seen, problems)
    _check_skipped(root, problems)
    return problems.lines()


def summarize(path: str | os.PathLike) -> tuple[int, int]:
    """(samples, shards) listed in a build's manifest."""
    manifest = json.loads((Path(path) / MANIFEST_NAME).read_text(encoding="utf-8"))
    splits = manifest["splits"].values()
    return sum(s["samples"] for s in splits), sum(len(s["shards"]) for s in splits)


def main(argv: list[str] | None = None) -> int:
    """Validate a build; print each problem, or a one-line summary. Returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="validate", description="Check a build against the shard format."
    )
    parser.add_argument("path", help="build folder (holds dataset.json)")
    parser.add_argument("--no-decode", action="store_true", help="check PNG headers only")
    args = parser.parse_args(argv)
    problems = validate(args.path, decode=not args.no_decode)
    if problems:
        for line in problems:
            print(line)
        return 1
    samples, shards = summarize(args.path)
    print(f"valid: {samples} samples in {shards} shards")
    return 0


if __name__ == "__main__":
    sys.exit(main())
