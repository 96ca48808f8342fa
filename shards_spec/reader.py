"""Read a build: manifest, index and decoded K-frame samples, without ever unpickling."""

from __future__ import annotations

import io
import itertools
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from .format import (
    FLOW_MEMBER,
    INDEX_NAME,
    JSON_MEMBER,
    MANIFEST_NAME,
    SpecError,
    check_version,
    frame_member,
    index_schema,
    is_forbidden,
    is_meta,
    mask_member,
)
from .writer import check_manifest

if TYPE_CHECKING:
    import webdataset as wds


def refuse_forbidden(sample: dict) -> dict:
    """Raise SpecError if a raw sample holds a pickle-like member; return it unchanged."""
    for ext in sample:
        if not is_meta(ext) and is_forbidden(ext):
            where = sample.get("__url__", "?")
            raise SpecError(
                f"refusing pickle-like member {sample.get('__key__')}.{ext} in {where}: "
                "shards hold png/npy/json only"
            )
    return sample


def decode_png(data: bytes, what: str = "image") -> np.ndarray:
    """Decode 8-bit PNG bytes to uint8 RGB ``HxWx3`` or single-channel ``HxW``.

    Other PNG modes (palette, alpha, 16-bit) raise SpecError naming the mode.
    """
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as img:
            img.load()
            mode, pixels = img.mode, np.asarray(img).copy()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise SpecError(f"{what}: not a decodable PNG ({exc})") from exc
    if mode not in ("RGB", "L"):
        raise SpecError(f"{what}: PNG mode {mode}, expected RGB or L (8-bit)")
    return pixels


def load_npy(data: bytes, what: str = "array") -> np.ndarray:
    """Load ``.npy`` bytes with pickling disabled."""
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as exc:
        raise SpecError(f"{what}: not a plain .npy array ({exc})") from exc


def _frame(raw: dict, ext: str, channels: int) -> np.ndarray:
    key = raw.get("__key__")
    if ext not in raw:
        raise SpecError(f"sample {key} lacks member {ext}")
    img = decode_png(raw[ext], f"{key}.{ext}")
    if channels == 3 and (img.ndim != 3 or img.shape[2] != 3):
        raise SpecError(f"{key}.{ext}: expected an RGB image, got shape {img.shape}")
    if channels == 1 and img.ndim != 2:
        raise SpecError(f"{key}.{ext}: expected a single-channel mask, got shape {img.shape}")
    return img


def decode_sample(raw: dict, window: int) -> dict:
    """Decode one raw webdataset sample of a `window`-frame build.

    Returns ``{"key", "frames", "masks", "flow", "meta"}``; unknown members are ignored.
    """
    refuse_forbidden(raw)
    key = raw["__key__"]
    frames = [_frame(raw, frame_member(k), 3) for k in range(window)]
    masks = None
    if mask_member(0) in raw:
        masks = [_frame(raw, mask_member(k), 1) for k in range(window)]
    flow = load_npy(raw[FLOW_MEMBER], f"{key}.{FLOW_MEMBER}") if FLOW_MEMBER in raw else None
    if JSON_MEMBER not in raw:
        raise SpecError(f"sample {key} lacks member {JSON_MEMBER}")
    try:
        meta = json.loads(raw[JSON_MEMBER].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SpecError(f"{key}.json: not UTF-8 JSON ({exc})") from exc
    return {"key": key, "frames": frames, "masks": masks, "flow": flow, "meta": meta}


def raw_samples(urls: Iterable[str]) -> Iterator[dict]:
    """Undecoded samples (``__key__``, ``__url__`` and member bytes) of shards, in order."""
    import webdataset as wds  # imported on use: it pulls in torch

    urls = list(urls)
    if not urls:
        return iter(())
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.tarfile_to_samples(),
        wds.map(refuse_forbidden),
    )
    return iter(pipeline)


def _pick(samples: Iterator[dict], shard: str, positions: list[int]) -> Iterator[dict]:
    ascending = all(a < b for a, b in zip(positions[:-1], positions[1:], strict=True))
    wanted = set(positions)
    found: dict[int, dict] = {}
    last = max(positions)
    try:
        for position, raw in enumerate(samples):
            if position in wanted:
                if ascending:
                    yield raw
                else:
                    found[position] = raw
            if position == last:
                break
        else:
            raise SpecError(f"{shard} has no sample at position {last}")
    finally:
        close = getattr(samples, "close", None)
        if close is not None:
            close()
    if not ascending:
        yield from (found[p] for p in positions)


def pair_values(table: pa.Table | pa.RecordBatch, column: str = "flow_msq") -> np.ndarray:
    """``column`` (flow_msq, or flow_mag from spec 1.1) of each distinct adjacent pair
    (clip_id, frame_a, frame_b) of index rows.

    The same values, in the same order (first occurrence), as
    ``shards_spec.format.distinct_pair_values(table.to_pylist(), column)``, computed
    column-wise. ``table`` needs the columns clip_id, frame_ids and ``column``.
    """
    n = table.num_rows
    if n == 0:
        return np.zeros(0, np.float64)
    ids_col = _combined(table.column("frame_ids"))
    msq_col = _combined(table.column(column))
    ids = ids_col.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    msq = msq_col.flatten().to_numpy(zero_copy_only=False).astype(np.float64)
    lens = pc.list_value_length(ids_col).fill_null(0).to_numpy(zero_copy_only=False)
    mlens = pc.list_value_length(msq_col).fill_null(0).to_numpy(zero_copy_only=False)
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
    if np.any(mlens > np.maximum(lens - 1, 0)):
        raise SpecError(f"index: a row has more {column} values than adjacent frame pairs")
    row = np.repeat(np.arange(n), mlens)  # the row of each value
    j = np.arange(len(msq)) - np.repeat(np.cumsum(mlens) - mlens, mlens)  # pair number in row
    a = ids[starts[row] + j]
    b = ids[starts[row] + j + 1]
    clips = pc.dictionary_encode(_combined(table.column("clip_id"))).indices
    clip = clips.to_numpy(zero_copy_only=False).astype(np.int64)[row]
    keys = np.stack([clip, a, b], axis=1)
    _, first = np.unique(keys, axis=0, return_index=True)
    return msq[np.sort(first)]


def _combined(column) -> pa.Array:
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


def read_manifest(path: str | os.PathLike) -> dict:
    """Load and check ``dataset.json`` of the build at `path` (raises a one-line SpecError)."""
    file = Path(path) / MANIFEST_NAME
    if not file.is_file():
        raise SpecError(f"not a build: {file} is missing")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SpecError(f"{file}: not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict):
        raise SpecError(f"{file}: expected a JSON object")
    if "spec_version" in manifest:
        check_version(manifest["spec_version"])
    check_manifest(manifest)
    return manifest


class Build:
    """A build on disk: ``dataset.json``, ``index.parquet`` and the split shards."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path).resolve()
        self.manifest: dict[str, Any] = read_manifest(self.path)

    def __repr__(self) -> str:
        counts = ", ".join(f"{s}={self.count(s)}" for s in self.splits)
        return f"Build({str(self.path)!r}, K={self.window}, {counts})"

    @property
    def window(self) -> int:
        """K, the number of frames per sample."""
        return int(self.manifest["window"])

    @property
    def image_size(self) -> int:
        return int(self.manifest["image_size"])

    @property
    def flow_size(self) -> int:
        return int(self.manifest["flow_size"])

    @property
    def members(self) -> list[str]:
        return list(self.manifest["members"])

    @property
    def splits(self) -> list[str]:
        return list(self.manifest["splits"])

    def _split(self, split: str) -> dict:
        try:
            return self.manifest["splits"][split]
        except KeyError:
            have = ", ".join(self.splits) or "none"
            raise SpecError(f"unknown split {split!r} (this build has: {have})") from None

    def urls(self, split: str) -> list[str]:
        """Absolute paths of the shards of `split`, in order."""
        return [str(self.path / s["path"]) for s in self._split(split)["shards"]]

    def count(self, split: str) -> int:
        """Number of samples in `split`."""
        return int(self._split(split)["samples"])

    def index(self, columns: list[str] | None = None) -> pa.Table:
        """The index table (one row per sample), or only ``columns`` of it.

        Read only the columns you need: at HanCo size (~850k rows) the whole table is a few
        hundred MB in Arrow, and several GB as Python objects (``to_pylist``).
        """
        return pq.read_table(self._index_file(columns), columns=columns)

    def index_batches(
        self, columns: list[str] | None = None, batch_size: int = 65536
    ) -> Iterator[pa.RecordBatch]:
        """The index's rows in order, ``batch_size`` at a time (bounded memory)."""
        yield from pq.ParquetFile(self._index_file(columns)).iter_batches(
            batch_size=batch_size, columns=columns
        )

    def _index_file(self, columns: list[str] | None) -> Path:
        """The index file, after checking that it has ``columns`` (a SpecError names those it
        lacks, where pyarrow would say "No match for FieldRef")."""
        file = self.path / INDEX_NAME
        if columns:
            names = set(pq.read_schema(file).names)
            missing = [c for c in columns if c not in names]
            version = self.manifest["spec_version"]
            if missing and set(missing) <= set(index_schema(self.manifest).names):
                raise SpecError(
                    f"{file}: no column {', '.join(missing)}, which spec {version} requires; "
                    f"`pipeline validate {self.path}` lists what else is wrong"
                )
            if missing:
                raise SpecError(
                    f"{file}: no column {', '.join(missing)} (it has {', '.join(sorted(names))})"
                )
        return file

    def raw_at(self, wanted: Iterable[tuple[str, int]]) -> Iterator[dict]:
        """Raw samples at ``(shard, position)`` pairs, in the order given.

        Consecutive requests for one shard are served by one pass over it; ascending positions
        stream, others are buffered for that shard only.
        """
        known = self._shard_paths()
        for shard, group in itertools.groupby(wanted, key=lambda item: item[0]):
            positions = [int(p) for _, p in group]
            if shard not in known:
                raise SpecError(f"shard {shard} is not in this build's manifest")
            yield from _pick(raw_samples([str(self.path / shard)]), shard, positions)

    def _shard_paths(self) -> set[str]:
        return {e["path"] for info in self.manifest["splits"].values() for e in info["shards"]}

    def webdataset(
        self, split: str, shuffle: bool = False, seed: int = 0, bufsize: int = 1000
    ) -> wds.DataPipeline:
        """Undecoded, pickle-safe webdataset pipeline over `split` for trainers.

        Shards are split by node and by DataLoader worker; samples are raw member bytes.
        """
        import webdataset as wds

        urls = self.urls(split)
        if not urls:
            raise SpecError(f"split {split!r} has no shards")
        stages: list[Any] = [
            wds.SimpleShardList(urls, seed=seed if shuffle else None),
            wds.split_by_node,
            wds.split_by_worker,
            wds.tarfile_to_samples(),
            wds.map(refuse_forbidden),
        ]
        if shuffle:
            stages.append(wds.shuffle(bufsize, seed=seed))
        return wds.DataPipeline(*stages)

    def samples(
        self, split: str, shuffle: bool = False, seed: int = 0, bufsize: int = 1000
    ) -> Iterator[dict]:
        """Decoded samples of `split`: ``{"key", "frames", "masks", "flow", "meta"}``.

        Frames are uint8 RGB ``HxWx3``; masks uint8 ``HxW`` or None; flow float16
        ``(K-1, 2, h, w)`` or None; meta the per-sample JSON object.
        """
        import webdataset as wds

        urls = self.urls(split)
        if not urls:
            return
        stages: list[Any] = [
            wds.SimpleShardList(urls, seed=seed if shuffle else None),
            wds.tarfile_to_samples(),
            wds.map(refuse_forbidden),
        ]
        if shuffle:
            stages.append(wds.shuffle(bufsize, seed=seed))
        window = self.window
        for raw in wds.DataPipeline(*stages):
            yield decode_sample(raw, window)


def open_build(path: str | os.PathLike) -> Build:
    """Open the build at `path`."""
    return Build(path)
