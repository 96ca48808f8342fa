"""Hugging Face ``datasets`` features of a build, for ``load_dataset("webdataset", ...)``.

The loader infers its schema from the first five samples of one shard. A nullable JSON field
(``object``, ``subject``, ``sequence``, ``camera``) that is null in all five and set in a later
sample then stops the load ("Couldn't cast array of type string to null"). Give it the build's
features instead::

    from datasets import load_dataset
    from shards_spec import open_build
    from shards_spec.hf import data_files, features

    build = open_build("shards/")
    ds = load_dataset("webdataset", data_files=data_files(build), features=features(build))

Columns: ``__key__``, ``__url__`` (str), one ``datasets.Image`` per PNG member (PIL images: RGB
frames, L masks), ``json`` (a dict of the fields of SPEC.md section 3; ``flow_mag`` only in
builds of spec 1.1 and later) and ``flow.npy`` (float16 values as nested lists). Members and JSON
fields that a later 1.x adds are left out.
"""

from __future__ import annotations

from .format import FLOW_MEMBER, FRAME_RE, JSON_MEMBER, MASK_RE, has_flow_mag
from .reader import Build


def data_files(build: Build) -> dict[str, list[str]]:
    """``{split: shard paths}`` of the splits that have shards."""
    return {split: build.urls(split) for split in build.splits if build.urls(split)}


def features(build: Build):
    """The ``datasets.Features`` of the build's samples (``datasets`` is imported on use)."""
    from datasets import Features, Image, Value

    string, int64, float64 = Value("string"), Value("int64"), Value("float64")
    meta = {
        **dict.fromkeys(("key", "clip_id", "source", "split", "subject", "object"), string),
        "sequence": int64,
        "camera": int64,
        "frame_ids": [int64],
        "flow_msq": [float64],
        **({"flow_mag": [float64]} if has_flow_mag(build.manifest) else {}),
        "weight": [float64],
    }
    cols: dict = {"__key__": string, "__url__": string}
    for member in build.members:
        if FRAME_RE.match(member) or MASK_RE.match(member):
            cols[member] = Image()
        elif member == JSON_MEMBER:
            cols[member] = meta
        elif member == FLOW_MEMBER:
            cols[member] = [[[[Value("float16")]]]]
    return Features(cols)
