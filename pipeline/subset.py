"""Derive a smaller build from an existing one through its index, without recomputing flow.

Rows are filtered by split and by a small ``where`` expression, ``n`` of them are drawn with a
seeded RNG (index order is kept), and the chosen samples' member bytes are copied unchanged into
new shards with a new index and manifest. The new build keeps the source's spec version: a
subset of a 1.0 build is a 1.0 build (no flow_mag).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import itertools
import operator
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from shards_spec.atomic import atomic_write_bytes
from shards_spec.format import (
    INDEX_NAME,
    INDEX_SCHEMA,
    MANIFEST_NAME,
    SKIPPED_NAME,
    SUMMARY_NAME,
    SpecError,
    flow_stats,
    has_flow_mag,
    index_schema,
    shard_path,
)
from shards_spec.reader import open_build, pair_values
from shards_spec.writer import parquet_bytes, write_manifest, write_shard


class WhereError(ValueError):
    """A ``where`` expression that does not parse or names an unknown column."""


OPS: dict[str, Callable[[Any, Any], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
}
ARROW_OPS: dict[str, Callable] = {
    "<": pc.less,
    "<=": pc.less_equal,
    ">": pc.greater,
    ">=": pc.greater_equal,
    "==": pc.equal,
    "!=": pc.not_equal,
}
LIST_COLUMNS = {"frame_ids", "flow_msq", "flow_mag", "weight"}  # flow_mag: spec 1.1 on
NUMERIC_COLUMNS = {"position", "sequence", "camera"} | LIST_COLUMNS
COLUMNS = tuple(INDEX_SCHEMA.names)  # a build's own: index_schema(manifest)

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<num>[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?)
      | (?P<str>'[^']*'|"[^"]*")
      | (?P<op><=|>=|==|!=|<|>)
      | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
    )""",
    re.VERBOSE,
)


@dataclass(frozen=True)
class Condition:
    """``column op value``; for list columns every element must satisfy it."""

    column: str
    op: str
    value: float | str

    def mask(self, column: pa.ChunkedArray | pa.Array) -> np.ndarray:
        """:meth:`holds` for every cell of an index column at once (bool per row)."""
        col = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        test = ARROW_OPS[self.op]
        if self.column in LIST_COLUMNS:
            ok = test(pc.list_flatten(col), self.value).fill_null(False)
            ok = ok.to_numpy(zero_copy_only=False)
            parents = pc.list_parent_indices(col).to_numpy(zero_copy_only=False)
            failing = np.bincount(parents[~ok], minlength=len(col)) > 0
            return ~failing & col.is_valid().to_numpy(zero_copy_only=False)
        return test(col, self.value).fill_null(False).to_numpy(zero_copy_only=False)

    def holds(self, cell: Any) -> bool:
        if cell is None:
            return False
        test = OPS[self.op]
        if self.column in LIST_COLUMNS:
            return all(v is not None and test(v, self.value) for v in cell)
        return bool(test(cell, self.value))


def _tokens(text: str) -> list[tuple[str, str]]:
    out, pos, text = [], 0, text.strip()
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if not match or match.end() == pos:
            raise WhereError(f"where: cannot parse {text[pos:]!r}")
        kind = match.lastgroup
        out.append((kind, match.group(kind)))
        pos = match.end()
    return out


def parse_where(text: str) -> list[Condition]:
    """Parse ``COLUMN OP VALUE [and COLUMN OP VALUE ...]`` (no eval).

    OP is one of ``< <= > >= == !=``; VALUE a number or a quoted string.
    """
    tokens = _tokens(text)
    if not tokens:
        raise WhereError("where: empty expression")
    conditions, i = [], 0
    while True:
        conditions.append(_condition(tokens[i : i + 3]))
        i += 3
        if i == len(tokens):
            return conditions
        kind, word = tokens[i]
        if kind != "name" or word.lower() != "and":
            raise WhereError(f"where: expected 'and' before {word!r}")
        i += 1
        if i == len(tokens):
            raise WhereError("where: expression ends with 'and'")


def _condition(part: list[tuple[str, str]]) -> Condition:
    kinds = [k for k, _ in part]
    if len(part) < 3 or kinds[0] != "name" or kinds[1] != "op" or kinds[2] not in ("num", "str"):
        shown = " ".join(v for _, v in part)
        raise WhereError(f"where: expected 'COLUMN OP VALUE', got {shown!r}")
    (_, column), (_, op), (kind, raw) = part
    if column not in COLUMNS:
        raise WhereError(f"where: unknown column {column!r}; columns are {', '.join(COLUMNS)}")
    numeric = column in NUMERIC_COLUMNS
    if numeric and kind != "num":
        raise WhereError(f"where: column {column} is numeric; compare it with a number")
    if not numeric and kind != "str":
        raise WhereError(f"where: column {column} holds text; compare it with a 'quoted' string")
    return Condition(column, op, float(raw) if kind == "num" else raw[1:-1])


def select_rows(
    rows: pa.Table | list[dict],
    split: str | None = None,
    where: str | None = None,
    n: int | None = None,
    seed: int = 0,
) -> list[int]:
    """Indices of the chosen index rows, ascending (index order kept).

    ``rows`` is the index as an Arrow table (it needs the ``split`` column and those ``where``
    names) or a list of row dicts.
    """
    conditions = parse_where(where) if where else []
    table = pa.Table.from_pylist(rows) if isinstance(rows, list) else rows
    mask = np.ones(table.num_rows, bool)
    if split is not None:
        mask &= pc.equal(table.column("split"), split).fill_null(False).to_numpy()
    for c in conditions:
        mask &= c.mask(table.column(c.column))
    keep = np.flatnonzero(mask).tolist()
    if n is None:
        return keep
    if n < 0:
        raise ValueError(f"--n must be >= 0, not {n}")
    if n > len(keep):
        raise ValueError(f"--n {n} but only {len(keep)} rows match")
    picked = np.random.default_rng(seed).choice(len(keep), size=n, replace=False)
    return [keep[i] for i in sorted(picked.tolist())]


BUILD_FILES = (MANIFEST_NAME, INDEX_NAME, SKIPPED_NAME, SUMMARY_NAME)


def _prepare_out(src: Path, out: Path, overwrite: bool) -> None:
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
        raise ValueError(f"--out {out} must lie outside the source build {src}")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(f"--out {out} is not empty; pass --overwrite to replace it")
        if not (out / MANIFEST_NAME).is_file():
            raise ValueError(f"--out {out} is not empty and not a build; refusing to overwrite it")
        (out / MANIFEST_NAME).unlink()  # first, so an interrupted run leaves no valid build
        for name in BUILD_FILES:
            (out / name).unlink(missing_ok=True)
        for tar in out.glob("*/*.tar"):
            tar.unlink()
        for folder in out.iterdir():
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
    out.mkdir(parents=True, exist_ok=True)


def _fingerprint(src: Path) -> str:
    return hashlib.sha256((src / MANIFEST_NAME).read_bytes()).hexdigest()


def _counts(table: pa.Table) -> dict:
    """windows, distinct clips, distinct (clip_id, frame_id) and distinct pairs of index rows."""
    clip = pc.dictionary_encode(table.column("clip_id").combine_chunks()).indices
    ids = table.column("frame_ids").combine_chunks()
    lens = pc.list_value_length(ids).fill_null(0).to_numpy(zero_copy_only=False)
    codes = np.repeat(clip.to_numpy(zero_copy_only=False).astype(np.int64), lens)
    flat = pc.list_flatten(ids).to_numpy(zero_copy_only=False).astype(np.int64)
    frames = len(np.unique(np.stack([codes, flat], axis=1), axis=0)) if len(flat) else 0
    return {
        "windows": table.num_rows,
        "clips": int(pc.count_distinct(table.column("clip_id")).as_py()),
        "frames": int(frames),
        "pairs": len(pair_values(table)),
    }


def subset_build(
    src: str | os.PathLike,
    out: str | os.PathLike,
    split: str | None = None,
    n: int | None = None,
    where: str | None = None,
    seed: int = 0,
    shard_size: int = 1000,
    overwrite: bool = False,
) -> dict:
    """Write a new build at `out` holding the chosen samples of `src`; return a summary."""
    if shard_size < 1:
        raise ValueError("--shard-size must be at least 1")
    source = open_build(src)
    if split is not None and split not in source.splits:
        raise ValueError(f"--split {split!r} is not in the build (has {', '.join(source.splits)})")
    schema = index_schema(source.manifest)
    names = ["split", *sorted({c.column for c in (parse_where(where) if where else [])})]
    missing = [c for c in names if c not in schema.names]
    if missing:
        raise WhereError(
            f"where: column {missing[0]} is not in this build's index (spec "
            f"{source.manifest['spec_version']} builds have no {missing[0]})"
        )
    picked = select_rows(
        source.index(list(dict.fromkeys(names))), split=split, where=where, n=n, seed=seed
    )
    if not picked:
        raise ValueError("no samples match; nothing to write")
    n_source = pq.ParquetFile(source.path / INDEX_NAME).metadata.num_rows
    chosen = source.index(list(schema.names)).take(picked).combine_chunks()
    del picked
    src_path, out_path = Path(source.path), Path(out)
    _prepare_out(src_path, out_path, overwrite)

    fetched = source.raw_at(_locations(chosen))
    splits: dict[str, dict] = {}
    new_shard: list[str] = []
    new_position: list[np.ndarray] = []
    start = 0
    for name, group in itertools.groupby(chosen.column("split").to_pylist()):
        count = sum(1 for _ in group)
        entries = []
        for number, first in enumerate(range(start, start + count, shard_size)):
            part = chosen.slice(first, min(shard_size, start + count - first))
            rel = shard_path(name, number)
            samples = _checked(itertools.islice(fetched, part.num_rows), part)
            entries.append({**write_shard(out_path / rel, samples), "path": rel})
            new_shard += [rel] * part.num_rows
            new_position.append(np.arange(part.num_rows, dtype=np.int32))
        splits[name] = {"samples": count, "shards": entries}
        start += count
    columns = {n: chosen.column(n) for n in schema.names}
    columns["shard"] = pa.array(new_shard, pa.string())
    columns["position"] = pa.array(np.concatenate(new_position), pa.int32())
    try:
        new = pa.Table.from_arrays([columns[n] for n in schema.names], schema=schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as exc:
        raise SpecError(f"index rows do not fit the schema: {exc}") from exc
    del chosen, columns, new_shard, new_position
    atomic_write_bytes(out_path / INDEX_NAME, parquet_bytes(new))

    manifest = copy.deepcopy(source.manifest)
    manifest["splits"] = splits
    manifest["counts"] = _counts(new)
    train = new.filter(pc.equal(new.column("split"), "train"))
    manifest["flow"]["stats"] = flow_stats(pair_values(train))
    if has_flow_mag(manifest):
        manifest["flow"]["mag_stats"] = flow_stats(pair_values(train, "flow_mag"))
    del train
    manifest["build_config"] = {
        "subset_of": {
            "path": str(src_path),
            "fingerprint": _fingerprint(src_path),
            "source": source.manifest["source"],
            "build_config": source.manifest["build_config"],
        },
        "split": split,
        "n": n,
        "where": where,
        "seed": seed,
        "shard_size": shard_size,
    }
    write_manifest(out_path / MANIFEST_NAME, manifest)
    return {
        "out": str(out_path),
        "source": str(src_path),
        "source_samples": n_source,
        "samples": new.num_rows,
        "splits": {s: v["samples"] for s, v in splits.items()},
        "shards": sum(len(v["shards"]) for v in splits.values()),
        "flow_stats": manifest["flow"]["stats"],
        "mag_stats": manifest["flow"].get("mag_stats"),
    }


def _locations(table: pa.Table):
    """(shard, position) of each row, read a batch at a time."""
    for batch in table.select(["shard", "position"]).to_batches(65536):
        yield from zip(batch.column(0).to_pylist(), batch.column(1).to_pylist(), strict=True)


def _checked(samples, part: pa.Table):
    keys = part.column("key").to_pylist()
    where = _locations(part)
    for raw, key, (shard, position) in zip(samples, keys, where, strict=True):
        if raw["__key__"] != key:
            raise ValueError(
                f"index and shard disagree: {shard} position {position} holds "
                f"{raw['__key__']}, index says {key}"
            )
        yield raw


def format_summary(summary: dict) -> str:
    splits = ", ".join(f"{k} {v}" for k, v in summary["splits"].items())
    return (
        f"subset {summary['out']}: {summary['samples']} of {summary['source_samples']} samples "
        f"({splits}) in {summary['shards']} shards, bytes copied from {summary['source']}"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="source build folder")
    parser.add_argument("--out", required=True, help="folder for the new build")
    parser.add_argument("--split", help="keep only this split")
    parser.add_argument("--n", type=int, help="draw this many samples (seeded), index order kept")
    parser.add_argument(
        "--where",
        help='filter, e.g. "flow_msq < 2.5 and camera == 3"; list columns must hold for every pair',
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the draw (default 0)")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing build at --out"
    )


def run(args: argparse.Namespace) -> int:
    summary = subset_build(
        args.path,
        args.out,
        split=args.split,
        n=args.n,
        where=args.where,
        seed=args.seed,
        shard_size=args.shard_size,
        overwrite=args.overwrite,
    )
    print(format_summary(summary))
    return 0


__all__ = ["subset_build", "parse_where", "select_rows", "add_arguments", "run", "WhereError"]
