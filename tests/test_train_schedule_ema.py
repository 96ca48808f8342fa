"""Noise schedule, EMA warmup and recipes in the trainer: recorded, resumed exactly, refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from shardutil import make_build

from train.__main__ import main
from train.checkpoint import path_for
from train.loop import ema_decay
from train.options import parse, resolve_defaults
from train.recipes import RECIPES
from train.unet import build_unet


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("schedbuild")
    return make_build(root, n_train=40, n_val=8, size=16, shard_size=7, seed=5)


def args(build: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--shards", str(build), "--out", str(out), "--batch", "8", "--val-every", "0",
        "--diag-every", "0", "--ckpt-every", "5", "--no-progress", "--workers", "0",
        "--method", "iid", *extra,
    ]  # fmt: skip


def state(out: Path, step: int) -> dict:
    return torch.load(path_for(out, step), weights_only=True)


def test_ema_decay_warms_up_as_diffusers():
    assert ema_decay(0.9995, True, 0) == 0.0  # a copy of the first updated weights
    assert ema_decay(0.9995, True, 1) == pytest.approx(2 / 11)
    assert ema_decay(0.9995, True, 8) == pytest.approx(0.5)
    assert ema_decay(0.9995, True, 890) == pytest.approx(0.99)
    assert ema_decay(0.99, True, 10**6) == 0.99  # capped at --ema
    assert ema_decay(0.9995, False, 0) == 0.9995
    diffusers = pytest.importorskip("diffusers.training_utils")
    ema = diffusers.EMAModel(torch.nn.Linear(1, 1).parameters(), decay=0.9995)
    for step in (0, 1, 3, 100, 5000):  # EMAModel.step counts its updates from 1
        assert ema.get_decay(step + 1) == pytest.approx(ema_decay(0.9995, True, step))


def test_early_ema_follows_the_weights(build, tmp_path):
    """With warmup the EMA is the weights after step 1; without, it barely left the init."""
    warm, cold = tmp_path / "warm", tmp_path / "cold"
    assert main(args(build, warm, "--max-steps", "1", "--ema", "0.999", "--ckpt-every", "1")) == 0
    assert main(args(build, cold, "--max-steps", "1", "--ema", "0.999", "--no-ema-warmup")) == 0
    w, c = state(warm, 1), state(cold, 1)
    torch.manual_seed(0)
    init = build_unet("tiny", 16).state_dict()
    floats = [k for k, v in w["ema"].items() if v.is_floating_point()]
    assert all(torch.equal(w["ema"][k], w["model"][k]) for k in floats)
    for k in floats:  # decay 0.999 from the initial weights
        want = init[k] + 0.001 * (c["model"][k] - init[k])
        assert torch.allclose(c["ema"][k], want, atol=1e-6), k
    assert json.loads((warm / "config.json").read_text())["ema_warmup"] is True
    assert json.loads((cold / "config.json").read_text())["ema_warmup"] is False


def test_resume_gives_the_same_ema_and_model(build, tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    extra = ("--schedule", "cosine", "--ema", "0.99")
    assert main(args(build, whole, "--max-steps", "10", *extra)) == 0
    assert main(args(build, parts, "--max-steps", "5", *extra)) == 0
    assert main(args(build, parts, "--max-steps", "10", *extra)) == 0
    a, b = state(whole, 10), state(parts, 10)
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert a["config"]["schedule"] == "cosine"


def test_schedule_changes_training_and_is_checked_on_resume(build, tmp_path, capsys):
    lin, cos = tmp_path / "lin", tmp_path / "cos"
    assert main(args(build, lin, "--max-steps", "5")) == 0
    assert main(args(build, cos, "--max-steps", "5", "--schedule", "cosine")) == 0
    assert json.loads((cos / "config.json").read_text())["schedule"] == "cosine"
    assert not torch.equal(
        state(lin, 5)["model"]["out_conv.weight"], state(cos, 5)["model"]["out_conv.weight"]
    )
    capsys.readouterr()
    assert main(args(build, cos, "--max-steps", "8")) == 2
    err = capsys.readouterr().err
    assert "schedule 'cosine' -> 'linear'" in err and len(err.strip().splitlines()) == 1


def test_a_checkpoint_from_before_the_options_resumes_as_linear_without_warmup(
    build, tmp_path, capsys
):
    out = tmp_path / "old"
    assert main(args(build, out, "--max-steps", "5", "--no-ema-warmup")) == 0
    s = state(out, 5)
    for key in ("schedule", "ema_warmup", "recipe"):
        del s["config"][key]
    torch.save(s, path_for(out, 5))
    capsys.readouterr()
    assert main(args(build, out, "--max-steps", "6")) == 2  # default warmup on: not the old run
    err = capsys.readouterr().err
    assert "ema_warmup False -> True" in err and "schedule" not in err
    assert main(args(build, out, "--max-steps", "6", "--no-ema-warmup")) == 0


def test_recipe_sets_defaults_that_flags_override(build, tmp_path):
    name = "cpu-short"
    recipe = RECIPES[name]
    cfg = resolve_defaults(parse(["--recipe", name, "--method", "flow"]))
    for key, value in recipe.options.items():
        assert getattr(cfg, key) == value, key
    assert cfg.batch == recipe.batch["windows"] and cfg.max_steps == recipe.max_steps["windows"]
    iid = resolve_defaults(parse(["--recipe", name, "--method", "iid", "--lr", "3e-4"]))
    assert iid.batch == recipe.batch["frames"] and iid.lr == 3e-4
    assert resolve_defaults(parse(["--recipe", name, "--max-steps", "7"])).max_steps == 7
    plain = resolve_defaults(parse([]))
    assert plain.recipe is None and plain.max_steps is None and plain.schedule == "linear"
    out = tmp_path / "run"
    # the recipe's 32 px is above this 16 px build: the recipe's value is checked like a flag
    assert main(args(build, out, "--recipe", name, "--max-steps", "2")) == 2
    assert main(args(build, out, "--recipe", name, "--max-steps", "2", "--image-size", "16")) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["recipe"] == name and config["schedule"] == recipe.options["schedule"]
    assert config["lr"] == recipe.options["lr"]


def test_unknown_recipe_and_schedule_are_usage_errors(build, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        parse(["--schedule", "sigmoid"])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
    assert main(args(build, tmp_path / "run", "--recipe", "nope")) == 2  # one line, the names
    err = capsys.readouterr().err
    assert "unknown recipe 'nope'" in err and "cpu-short" in err
    assert len(err.strip().splitlines()) == 1


def test_bf16_autocast_on_cpu_is_an_option(build, tmp_path, capsys):
    fp32, bf16 = tmp_path / "fp32", tmp_path / "bf16"
    assert main(args(build, fp32, "--max-steps", "2")) == 0
    assert main(args(build, bf16, "--max-steps", "2", "--precision", "bf16")) == 0
    a, b = state(fp32, 2)["model"], state(bf16, 2)["model"]
    assert all(v.dtype == a[k].dtype for k, v in b.items())  # the weights stay float32
    assert not all(torch.equal(a[k], b[k]) for k in a)  # the forward pass ran in bf16
    assert json.loads((bf16 / "config.json").read_text())["precision"] == "bf16"
    capsys.readouterr()
    assert main(args(build, bf16, "--max-steps", "3")) == 2
    assert "precision 'bf16' -> 'auto'" in capsys.readouterr().err
