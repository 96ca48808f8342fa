"""Deterministic, atomic writers for shards, index, skipped list and manifest."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import io
import json
import os
import sys
from collections.abc import Iterable
from typing import Any

import cv2
import jsonschema
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .atomic import atomic_output, atomic_write_bytes
from .format import (
    EXT_RE,
    INDEX_SCHEMA,
    SKIPPED_SCHEMA,
    SpecError,
    check_key,
    is_forbidden,
    is_meta,
    load_schema,
)

TAR_MTIME = 0
TAR_USER = "framebridge"
TAR_GROUP = "framebridge"
TAR_MODE = 0o444
PNG_COMPRESSION = 3


def dumps_json(obj: Any) -> str:
    """Canonical JSON text of the format: indented, sorted keys, newline-terminated."""
    return json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n"


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write `obj` as canonical JSON (indent 2, sorted keys)."""
    atomic_write_bytes(path, dumps_json(obj).encode("utf-8"))


def encode_png(img: np.ndarray, bgr: bool = False) -> bytes:
    """Encode an RGB ``HxWx3`` or grey ``HxW`` uint8 image as PNG bytes (deterministic).

    With ``bgr`` a colour image is in OpenCV's BGR order already (no conversion is needed); the
    PNG holds RGB either way.
    """
    img = np.asarray(img)
    if img.dtype != np.uint8:
        raise SpecError(f"encode_png needs uint8 pixels, got {img.dtype}")
    if img.ndim == 3 and img.shape[2] == 3:
        if not bgr:
            img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    elif img.ndim != 2:
        raise SpecError(f"encode_png needs HxWx3 RGB or HxW grey, got shape {img.shape}")
    ok, buf = cv2.imencode(
        ".png", np.ascontiguousarray(img), [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION]
    )
    if not ok:
        raise SpecError("PNG encoding failed")
    return buf.tobytes()


def encode_npy(arr: np.ndarray) -> bytes:
    """Encode an array as ``.npy`` bytes (never pickled)."""
    arr = np.asarray(arr)
    if arr.dtype.hasobject:
        raise SpecError("object arrays cannot be stored: .npy members must not need pickle")
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def encode_json(obj: Any) -> bytes:
    """Encode a per-sample metadata object as compact, sorted UTF-8 JSON."""
    return json.dumps(obj, sort_keys=True, allow_nan=False, ensure_ascii=False).encode("utf-8")


def _prepare(sample: dict) -> dict:
    if "__key__" not in sample:
        raise SpecError("sample has no __key__")
    key = sample["__key__"]
    check_key(key)
    out: dict[str, Any] = {"__key__": key}
    for ext, value in sample.items():
        if is_meta(ext):
            continue
        if not EXT_RE.match(ext):
            raise SpecError(f"sample {key}: bad member extension {ext!r}")
        if is_forbidden(ext):
            raise SpecError(f"sample {key}: member {key}.{ext} is pickle-like and not allowed")
        if ext == "json" and isinstance(value, dict):
            value = encode_json(value)
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise SpecError(f"sample {key}: member {ext} must be bytes, got {type(value).__name__}")
        out[ext] = bytes(value)
    if len(out) == 1:
        raise SpecError(f"sample {key} has no members")
    return out


_TAR_WRITER: type | None = None


def tar_writer() -> type:
    """webdataset's own ``TarWriter`` class, without importing torch when it can.

    ``import webdataset`` runs the package's ``__init__``, which imports its data-loading half
    and with it torch (about 1.8 s of a shard worker's first shard, for a class that needs only
    ``tarfile``). ``webdataset.writer`` itself imports only ``gopen`` and ``utils`` (numpy,
    braceexpand), so when webdataset is not imported yet the writer module is loaded under a bare
    package object (its ``__init__`` not run), and the bare package and its submodules are taken
    out of ``sys.modules`` again: a later ``import webdataset`` anywhere in the process imports
    the whole package as usual. Where webdataset is already imported, its ``TarWriter`` is used.
    """
    global _TAR_WRITER
    if _TAR_WRITER is not None:
        return _TAR_WRITER
    if "webdataset" in sys.modules:
        import webdataset

        _TAR_WRITER = webdataset.TarWriter
        return _TAR_WRITER
    spec = importlib.util.find_spec("webdataset")
    if spec is not None and spec.submodule_search_locations is not None:
        try:
            sys.modules["webdataset"] = importlib.util.module_from_spec(spec)
            _TAR_WRITER = importlib.import_module("webdataset.writer").TarWriter
        except Exception:  # a webdataset whose writer needs its package: import it whole
            pass
        finally:
            for name in [n for n in sys.modules if n.partition(".")[0] == "webdataset"]:
                del sys.modules[name]
    if _TAR_WRITER is None:
        import webdataset

        _TAR_WRITER = webdataset.TarWriter
    return _TAR_WRITER


def write_shard(path: str | os.PathLike, samples: Iterable[dict]) -> dict:
    """Write samples to a deterministic, uncompressed tar at `path` (atomically).

    Each sample is ``{"__key__": key, ext: bytes, ...}``; ``"json"`` may be a dict. Samples are
    written in the order given; members inside a sample are sorted by extension (webdataset's
    TarWriter order). Returns ``{"path", "sha256", "bytes", "samples"}``.
    """
    writer_class = tar_writer()
    count = 0
    seen: set[str] = set()
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as stream:
            writer = writer_class(
                stream,
                user=TAR_USER,
                group=TAR_GROUP,
                mode=TAR_MODE,
                compress=False,
                encoder=False,
                mtime=TAR_MTIME,
            )
            with writer:
                for sample in samples:
                    prepared = _prepare(sample)
                    if prepared["__key__"] in seen:
                        raise SpecError(f"duplicate sample key {prepared['__key__']} in {path}")
                    seen.add(prepared["__key__"])
                    writer.write(prepared)
                    count += 1
        digest = sha256_file(tmp)
        size = tmp.stat().st_size
    return {"path": str(path), "sha256": digest, "bytes": size, "samples": count}


def parquet_bytes(table: pa.Table) -> bytes:
    """A table as the format's Parquet bytes (zstd, with statistics)."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", write_statistics=True)
    return buf.getvalue()


def _table(rows: list[dict], schema: pa.Schema, what: str) -> pa.Table:
    names = schema.names
    for i, row in enumerate(rows):
        missing = [n for n in names if n not in row]
        if missing:
            raise SpecError(f"{what} row {i} lacks column(s) {', '.join(missing)}")
    columns = {n: [row[n] for row in rows] for n in names}
    try:
        return pa.Table.from_pydict(columns, schema=schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as exc:
        raise SpecError(f"{what} rows do not fit the schema: {exc}") from exc


def write_index(
    path: str | os.PathLike, rows: list[dict], schema: pa.Schema = INDEX_SCHEMA
) -> None:
    """Write ``index.parquet`` (``schema``: INDEX_SCHEMA, or ``format.index_schema(manifest)``
    for a build of an earlier version; rows in the order given) atomically."""
    atomic_write_bytes(path, parquet_bytes(_table(rows, schema, "index")))


def write_skipped(path: str | os.PathLike, rows: list[dict]) -> None:
    """Write ``skipped.parquet`` (SKIPPED_SCHEMA, rows in the order given) atomically."""
    atomic_write_bytes(path, parquet_bytes(_table(rows, SKIPPED_SCHEMA, "skipped")))


def check_manifest(manifest: dict) -> None:
    """Raise SpecError with the first schema problem of a manifest."""
    validator = jsonschema.Draft202012Validator(load_schema("dataset"))
    err = jsonschema.exceptions.best_match(validator.iter_errors(manifest))
    if err is not None:
        where = "/".join(str(p) for p in err.absolute_path) or "(top level)"
        raise SpecError(f"dataset.json {where}: {err.message}")


def write_manifest(path: str | os.PathLike, manifest: dict) -> None:
    """Validate a manifest against dataset.schema.json, then write it atomically."""
    check_manifest(manifest)
    atomic_write_json(path, manifest)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
