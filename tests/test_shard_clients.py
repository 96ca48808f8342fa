"""Other programs read the shards: Hugging Face datasets, plain webdataset, a torch DataLoader.

Each client must see the windows the Parquet index lists, once each, and the pixels, flow and
JSON that shards_spec's reader decodes, without unpickling anything on the way.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from shardutil import edit_shard, make_build
from torch.utils.data import DataLoader, default_collate

from shards_spec import SpecError, open_build, validate
from shards_spec.hf import data_files as hf_data_files
from shards_spec.hf import features as hf_features
from shards_spec.reader import refuse_forbidden
from shards_spec.torchdata import WindowDataset, build_fields, to_tensors


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> Path:
    """K = 3 with flow.npy and masks; train in two shards (4 + 2 windows), val in one."""
    return make_build(tmp_path_factory.mktemp("full"), with_flow=True, with_masks=True)


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Path:
    """K = 4, frames and JSON only."""
    return make_build(tmp_path_factory.mktemp("plain"), n_train=5, n_val=2, K=4, size=24)


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> Path:
    """A `pipeline build --src synthetic` build with masks and a stored flow.npy."""
    tmp = tmp_path_factory.mktemp("real")
    out = tmp / "shards"
    cmd = [sys.executable, "-m", "pipeline", "build", "--src", "synthetic",
           "--synth-sequences", "3", "--synth-cameras", "1", "--synth-frames", "8",
           "--size", "32", "--flow", "dis", "--flow-size", "64", "--keep-flow", "8",
           "--keep-mask", "--val-fraction", "0.34", "--shard-size", "4", "--workers", "1",
           "--out", str(out), "--no-progress"]  # fmt: skip
    env = {**os.environ, "FRAMEBRIDGE_CACHE": str(tmp / "cache"), "RAY_USAGE_STATS_ENABLED": "0"}
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=300)
    assert validate(out) == []
    return out


@pytest.fixture(scope="module")
def old(tmp_path_factory) -> Path:
    """A spec 1.0 build (no flow_mag in the JSON or the index), with flow.npy."""
    return make_build(tmp_path_factory.mktemp("old"), with_flow=True, spec_version="1.0")


BUILDS = ["full", "plain", "real", "old"]


@pytest.fixture(params=BUILDS)
def built(request) -> Path:
    return request.getfixturevalue(request.param)


def reference(root: Path) -> dict[str, dict[str, dict]]:
    """{split: {key: decoded sample}} from shards_spec's reader, checked against the index."""
    b = open_build(root)
    index = b.index(["key", "split"]).to_pylist()
    out = {}
    for split in b.splits:
        samples = {s["key"]: s for s in b.samples(split)}
        assert list(samples) == [r["key"] for r in index if r["split"] == split]
        out[split] = samples
    return out


def index_keys(root: Path, split: str) -> list[str]:
    rows = open_build(root).index(["key", "split"]).to_pylist()
    return [r["key"] for r in rows if r["split"] == split]


@pytest.fixture
def no_unpickling(monkeypatch):
    """Any pickle.load(s) or torch.load while a client reads fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a shard client unpickled something")

    for name in ("load", "loads"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Hugging Face offline, its caches under tmp_path, and no socket may connect."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)

    def no_network(*args, **kwargs):
        raise AssertionError("a shard client opened a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    return datasets


# ------------------------------------------------------------------ (a) Hugging Face datasets


@pytest.mark.parametrize(
    "name, given",
    [
        ("full", True),
        ("plain", True),
        ("real", True),
        ("old", True),
        ("full", False),
        ("plain", False),
    ],
)
def test_hf_datasets_webdataset_loader(name, given, request, offline, no_unpickling, tmp_path):
    """With shards_spec.hf's features, or inferred where the first samples set every field.

    (Inference reads 5 samples of one shard: on `real` its val shard has object null throughout
    and train has objects, which the inferred null type cannot hold.)
    """
    built = request.getfixturevalue(name)
    b = open_build(built)
    ref = reference(built)
    kw = {"features": hf_features(b)} if given else {}
    dd = offline.load_dataset(
        "webdataset", data_files=hf_data_files(b), cache_dir=str(tmp_path / "hf"), **kw
    )
    assert sorted(dd) == sorted(b.splits)
    members = set(b.members)
    for split in b.splits:
        ds = dd[split]
        assert ds.num_rows == b.count(split) == len(index_keys(built, split))
        assert set(ds.column_names) == members | {"__key__", "__url__"}
        assert ds["__key__"] == index_keys(built, split)  # shard order, position order
        for row in ds:
            want = ref[split][row["__key__"]]
            assert row["json"] == want["meta"]  # a dict (Arrow struct), the same values
            for k, frame in enumerate(want["frames"]):
                img = row[f"f{k}.png"]  # PIL.Image, mode RGB
                assert img.mode == "RGB" and np.array_equal(np.asarray(img), frame)
            if want["masks"] is not None:
                for k, mask in enumerate(want["masks"]):
                    img = row[f"mask{k}.png"]  # PIL.Image, mode L
                    assert img.mode == "L" and np.array_equal(np.asarray(img), mask)
            if want["flow"] is not None:  # nested Python lists of floats
                flow = np.asarray(row["flow.npy"], dtype=np.float16)
                assert np.array_equal(flow, want["flow"])
        first = ref[split][ds[0]["__key__"]]
        as_numpy = ds.with_format("numpy")[0]
        assert np.array_equal(as_numpy["f0.png"], first["frames"][0])  # uint8 HxWx3
        as_torch = ds.with_format("torch")[0]
        assert np.array_equal(as_torch["f0.png"].permute(1, 2, 0).numpy(), first["frames"][0])
        if "flow.npy" in members:  # an array (K-1, 2, h, w) of the same values
            assert np.array_equal(as_numpy["flow.npy"], first["flow"])


def test_hf_features_have_flow_mag_from_spec_1_1(full, old):
    pytest.importorskip("datasets")
    assert "flow_mag" in hf_features(open_build(full))["json"]
    assert "flow_mag" not in hf_features(open_build(old))["json"]


# ------------------------------------------------------------------ (b) plain webdataset


@pytest.mark.parametrize("spec", ["rgb8", "pil"])
def test_webdataset_default_decoders(built, spec, no_unpickling):
    b = open_build(built)
    ref = reference(built)
    for split in b.splits:
        ds = wds.WebDataset(b.urls(split), shardshuffle=False).map(refuse_forbidden).decode(spec)
        keys = []
        for s in ds:
            keys.append(s["__key__"])
            want = ref[split][s["__key__"]]
            assert s["json"] == want["meta"]  # dict, json.loads
            for k, frame in enumerate(want["frames"]):
                got = s[f"f{k}.png"]
                if spec == "rgb8":  # uint8 HxWx3 array
                    assert got.dtype == np.uint8 and np.array_equal(got, frame)
                else:  # PIL.Image, mode RGB
                    assert got.mode == "RGB" and np.array_equal(np.asarray(got), frame)
            if want["masks"] is not None:
                for k, mask in enumerate(want["masks"]):
                    got = s[f"mask{k}.png"]  # both specs convert to RGB: three equal channels
                    if spec == "pil":  # PIL.Image, mode RGB
                        assert got.mode == "RGB"
                        got = np.asarray(got)
                    assert got.shape == (*mask.shape, 3)  # rgb8: uint8 HxWx3
                    assert all(np.array_equal(got[..., c], mask) for c in range(3))
            if want["flow"] is not None:  # numpy float16 (K-1, 2, h, w), read without pickle
                got = s["flow.npy"]
                assert got.dtype == np.float16 and np.array_equal(got, want["flow"])
        assert keys == index_keys(built, split)


def test_webdataset_pickle_members_are_refused_or_left_alone(tmp_path, no_unpickling):
    """Our shards hold no pickle member; a foreign one is refused, or never decoded with only=."""
    root = make_build(tmp_path, n_val=0)
    rel = "train/train-000000.tar"
    payload = pickle.dumps({"x": 1})
    edit_shard(root, rel, lambda m: m[:1] + [(m[0][0].split(".")[0] + ".pyd", payload)] + m[1:])
    url = str(root / rel)
    # webdataset's default decoders would unpickle .pyd / .pickle / .pkl (and torch.load .pth)
    with pytest.raises(Exception) as info:
        list(wds.WebDataset([url], shardshuffle=False).decode("rgb8"))
    assert "unpickled" in str(info.value.__cause__)
    # the reader's rule first: the shard is refused
    with pytest.raises(SpecError, match="pickle-like member"):
        list(wds.WebDataset([url], shardshuffle=False).map(refuse_forbidden).decode("rgb8"))
    # or decode only the listed members: the .pyd member stays bytes
    only = open_build(root).members
    samples = list(wds.WebDataset([url], shardshuffle=False).decode("rgb8", only=only))
    assert isinstance(samples[0]["pyd"], bytes) and samples[0]["f0.png"].dtype == np.uint8


def test_hf_datasets_leaves_pickle_members_as_bytes(tmp_path, offline, no_unpickling):
    root = make_build(tmp_path, n_val=0)
    rel = "train/train-000000.tar"
    payload = pickle.dumps({"x": 1})

    def add_pyd(members):  # a .pyd member in every sample, after its json
        out = []
        for name, data in members:
            out.append((name, data))
            if name.endswith(".json"):
                out.append((name.removesuffix("json") + "pyd", payload))
        return out

    edit_shard(root, rel, add_pyd)
    ds = offline.load_dataset(
        "webdataset", data_files={"train": [str(root / rel)]}, cache_dir=str(tmp_path / "hf")
    )["train"]
    assert all(row["pyd"] == payload for row in ds)


# ------------------------------------------------------------------ (c) torch DataLoader


def test_dataloader_over_the_reader(built, no_unpickling):
    b = open_build(built)
    ref = reference(built)
    for split in b.splits:
        loader = DataLoader(WindowDataset(built, split), batch_size=3)
        keys = []
        for batch in loader:
            n = len(batch["key"])
            assert batch["frames"].dtype == torch.uint8
            assert batch["frames"].shape == (n, b.window, 3, b.image_size, b.image_size)
            for i, key in enumerate(batch["key"]):
                keys.append(key)
                want = ref[split][key]
                meta = want["meta"]
                assert batch["clip_id"][i] == meta["clip_id"]
                assert batch["frame_ids"][i].tolist() == meta["frame_ids"]
                assert batch["flow_msq"][i].tolist() == meta["flow_msq"]
                if "flow_mag" in meta:  # spec 1.1
                    assert batch["flow_mag"][i].tolist() == meta["flow_mag"]
                else:
                    assert "flow_mag" not in batch
                assert batch["weight"][i].tolist() == meta["weight"]
                for k, frame in enumerate(want["frames"]):
                    assert np.array_equal(batch["frames"][i, k].permute(1, 2, 0).numpy(), frame)
                if want["masks"] is None:
                    assert "masks" not in batch
                else:
                    assert np.array_equal(batch["masks"][i].numpy(), np.stack(want["masks"]))
                if want["flow"] is None:
                    assert "flow" not in batch
                else:
                    assert batch["flow"].dtype == torch.float16
                    assert np.array_equal(batch["flow"][i].numpy(), want["flow"])
        assert keys == index_keys(built, split)


def test_dataloader_workers_share_the_shards(full):
    """Two workers, two train shards: every window once; shuffled: the same windows."""
    want = sorted(index_keys(full, "train"))
    for shuffle in (False, True):
        ds = WindowDataset(full, "train", shuffle=shuffle, seed=1, bufsize=4)
        loader = DataLoader(ds, batch_size=2, num_workers=2)
        assert sorted(k for batch in loader for k in batch["key"]) == want


def test_torch_adapter_checks(full, tmp_path):
    with pytest.raises(SpecError, match="unknown split"):
        WindowDataset(full, "test")
    root = make_build(tmp_path, n_val=0)
    assert list(WindowDataset(root, "val")) == []
    rel = "train/train-000000.tar"
    edit_shard(root, rel, lambda m: m[:1] + [(m[0][0].split(".")[0] + ".pkl", b"x")] + m[1:])
    with pytest.raises(SpecError, match="pickle-like"):
        list(WindowDataset(root, "train"))
    tensors = to_tensors(next(open_build(full).samples("train")))
    assert tensors["frames"].shape == (3, 3, 32, 32) and tensors["masks"].shape == (3, 32, 32)


def test_torch_adapter_decides_the_fields_by_the_build(full, old, tmp_path):
    """Every sample of a WindowDataset has the optional fields its build stores (the manifest
    says which), so batches always collate; a sample that lacks one is a SpecError naming it."""
    assert build_fields(open_build(full)) == {"flow_mag", "masks", "flow"}
    assert "flow_mag" not in build_fields(open_build(old))  # spec 1.0
    first = next(iter(WindowDataset(full, "train")))
    assert {"flow_mag", "masks", "flow"} <= set(first)
    root = tmp_path / "damaged"
    shutil.copytree(full, root)
    rel = "train/train-000000.tar"

    def drop_flow_mag(members):  # from the first sample's JSON
        i = next(i for i, (name, _) in enumerate(members) if name.endswith(".json"))
        name, data = members[i]
        meta = json.loads(data)
        del meta["flow_mag"]
        return [*members[:i], (name, json.dumps(meta).encode()), *members[i + 1 :]]

    edit_shard(root, rel, drop_flow_mag)
    with pytest.raises(SpecError, match=r"sample \S+ lacks flow_mag, which every sample"):
        list(WindowDataset(root, "train"))
    lone = to_tensors(next(open_build(root).samples("train")))  # alone: what the sample has
    assert "flow_mag" not in lone and "masks" in lone


@pytest.mark.parametrize(
    "value",
    [None, [], [0.5], [0.5, 0.5, 0.5], ["1", 2.0], [True, 1.0], [float("nan"), 0.5],
     [0.5, float("inf")], [-0.1, 0.5], [10**400, 0.5]],
)  # fmt: skip
def test_torch_adapter_refuses_a_per_pair_field_that_does_not_fit(full, value):
    """A null, non-numeric, wrong-length, non-finite or negative flow_mag (or weight, flow_msq)
    is a SpecError naming the sample and the field, not a TypeError, a collate error later or a
    NaN in training."""
    sample = next(open_build(full).samples("train"))
    assert len(sample["frames"]) == 3
    for name in ("flow_mag", "weight", "flow_msq"):
        broken = {**sample, "meta": {**sample["meta"], name: value}}
        with pytest.raises(
            SpecError, match=rf"sample \S+: {name} .* is not a list of 2 finite numbers >= 0"
        ):
            to_tensors(broken, build_fields(open_build(full)))


def test_reader_samples_need_the_adapter_to_batch(plain):
    """What the reader yields does not batch by itself (masks None, null JSON fields)."""
    two = list(open_build(plain).samples("val"))
    with pytest.raises(TypeError):
        default_collate(two)
    batch = default_collate([to_tensors(s) for s in two])
    assert batch["frames"].shape == (2, 4, 3, 24, 24)
