"""A torch ``IterableDataset`` of a build's windows, for ``torch.utils.data.DataLoader``.

::

    from torch.utils.data import DataLoader
    from shards_spec.torchdata import WindowDataset

    loader = DataLoader(WindowDataset("shards/", "train"), batch_size=16, num_workers=2)
    for batch in loader:
        frames = batch["frames"]  # uint8 (B, K, 3, H, W)

Samples are decoded by :func:`shards_spec.reader.decode_sample` (PNG, ``.npy`` without pickle,
JSON; a shard holding a pickle-like member is refused). Shards are split over DDP ranks and
DataLoader workers, so with as many shards as workers times ranks each window comes once per
pass; a worker left without a shard yields nothing.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import numpy as np
import torch

from .format import FLOW_MEMBER, SpecError, has_flow_mag, mask_member
from .reader import Build, decode_sample, open_build

OPTIONAL = ("flow_mag", "masks", "flow")


def build_fields(build: Build) -> frozenset[str]:
    """The optional fields (of `OPTIONAL`) that every sample of `build` has, from its manifest:
    ``flow_mag`` from spec 1.1 on, ``masks`` and ``flow`` where its member list names them."""
    members = build.manifest["members"]
    have = {
        "flow_mag": has_flow_mag(build.manifest),
        "masks": mask_member(0) in members,
        "flow": FLOW_MEMBER in members,
    }
    return frozenset(name for name, present in have.items() if present)


def to_tensors(sample: dict, fields: frozenset[str] | None = None) -> dict:
    """A decoded sample as tensors that ``default_collate`` batches.

    ``key``, ``clip_id`` (str); ``frames`` uint8 ``(K, 3, H, W)``; ``frame_ids`` int64 ``(K,)``;
    ``flow_msq``, ``weight`` float64 ``(K-1,)``; and, of the optional ones, ``flow_mag`` float64
    ``(K-1,)`` (spec 1.1 on), ``masks`` uint8 ``(K, H, W)`` (0 or 255) and ``flow`` float16
    ``(K-1, 2, h, w)``. The rest of the per-sample JSON (nullable fields that
    ``default_collate`` cannot batch) is left out.

    ``fields`` (`build_fields`) fixes the optional ones for a whole build, so that every sample
    has the same keys: a sample that lacks one is a SpecError naming it. Without it, each
    sample gives those it has.
    """
    meta = sample["meta"]
    present = {
        "flow_mag": "flow_mag" in meta,
        "masks": sample["masks"] is not None,
        "flow": sample["flow"] is not None,
    }
    if fields is not None:
        lacking = [name for name in OPTIONAL if name in fields and not present[name]]
        if lacking:
            raise SpecError(
                f"sample {sample['key']} lacks {', '.join(lacking)}, which every sample of its "
                "build has (the manifest says so); `pipeline validate` lists what else is wrong"
            )
        present = {name: name in fields for name in OPTIONAL}
    window = len(sample["frames"])
    out = {
        "key": sample["key"],
        "clip_id": meta["clip_id"],
        "frames": torch.from_numpy(np.stack(sample["frames"])).permute(0, 3, 1, 2).contiguous(),
        "frame_ids": torch.tensor(meta["frame_ids"], dtype=torch.int64),
        "flow_msq": _per_pair(sample, "flow_msq", window),
        "weight": _per_pair(sample, "weight", window),
    }
    if present["flow_mag"]:
        out["flow_mag"] = _per_pair(sample, "flow_mag", window)
    if present["masks"]:
        out["masks"] = torch.from_numpy(np.stack(sample["masks"]))
    if present["flow"]:
        out["flow"] = torch.from_numpy(np.array(sample["flow"]))
    return out


def _per_pair(sample: dict, name: str, window: int) -> torch.Tensor:
    """The per-pair list `name` of a sample's JSON as float64 ``(window-1,)``; anything else
    (null, a string, a wrong length, NaN, a negative number: the schema's fields are finite
    and >= 0) is a SpecError naming the sample and the field."""
    value = sample["meta"].get(name)
    pairs = None
    numbers = isinstance(value, list) and len(value) == window - 1
    if numbers and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        with contextlib.suppress(OverflowError):  # an integer past float64
            pairs = np.array(value, dtype=np.float64)
    if pairs is None or not (np.isfinite(pairs).all() and (pairs >= 0).all()):
        raise SpecError(
            f"sample {sample['key']}: {name} {value!r} is not a list of {window - 1} finite "
            f"numbers >= 0 (one per adjacent pair of its {window} frames)"
        )
    return torch.from_numpy(pairs)


class WindowDataset(torch.utils.data.IterableDataset):
    """The windows of one split of a build, as :func:`to_tensors` dicts.

    ``shuffle`` shuffles the shard order and, within a buffer of ``bufsize`` samples, the
    samples, both seeded by ``seed`` (pass another seed for another order).
    """

    def __init__(
        self,
        build: Build | str | os.PathLike,
        split: str = "train",
        shuffle: bool = False,
        seed: int = 0,
        bufsize: int = 1000,
    ) -> None:
        super().__init__()
        self.build = build if isinstance(build, Build) else open_build(build)
        self.split = split
        self.count = self.build.count(split)  # an unknown split fails here
        self.shuffle, self.seed, self.bufsize = shuffle, seed, bufsize

    def __iter__(self) -> Iterator[dict]:
        if not self.build.urls(self.split):
            return
        window, fields = self.build.window, build_fields(self.build)
        pipe = self.build.webdataset(self.split, self.shuffle, self.seed, self.bufsize)
        for raw in pipe:
            yield to_tensors(decode_sample(raw, window), fields)
