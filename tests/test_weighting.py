"""The flow method's two readings (--weighting, --flow-stat, --flow-scale), recipes that
compose (--recipe cpu-short,public-code) and --hflip: weights by hand, the refusals, and tiny
end-to-end runs on 1.0- and 1.1-shaped builds."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from shardutil import make_build
from torch import nn

from shards_spec import open_build
from train import data, recipes
from train.__main__ import main
from train.diffusion import Schedule
from train.metrics import read_metrics, steps
from train.objectives import (
    WEIGHTINGS,
    Options,
    draw_noise,
    flow_weights,
    get_method,
    inverse_weights,
)
from train.options import TrainConfig, parse, resolve_defaults
from train.setup import flow_parameters

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _mag(msq: list[float]) -> list[float]:
    """The flow_mag tests/shardutil.py gives a window without stored flow."""
    return [round(0.8 * math.sqrt(m), 6) for m in msq]


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> dict[str, Path]:
    """The same 40 train and 8 val windows at 16 px, as a 1.1 and as a 1.0 build."""
    root = tmp_path_factory.mktemp("weighting")
    common = {"n_train": 40, "n_val": 8, "size": 16, "shard_size": 7, "seed": 5}
    return {v: make_build(root, name=v, spec_version=v, **common) for v in ("1.1", "1.0")}


def args(build: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--shards", str(build), "--out", str(out), "--batch", "8", "--val-every", "0",
        "--diag-every", "0", "--ckpt-every", "5", "--no-progress", "--workers", "0", *extra,
    ]  # fmt: skip


def run(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


def config(out: Path) -> dict:
    return json.loads((out / "config.json").read_text())


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in steps(read_metrics(out))]


def p50(build: Path, key: str) -> float:
    return float(open_build(build).manifest["flow"][key]["percentiles"]["p50"])


# ---------------------------------------------------------------- the weights, by hand


class _Stub(nn.Module):
    def forward(self, x, t, capture=None):
        return torch.tanh(0.8 * x) + t.float()[:, None, None, None] / 2000


def _flow_terms(stat: torch.Tensor, opts: Options) -> dict:
    x0 = torch.rand(stat.shape[0], stat.shape[1] + 1, 3, 8, 8) * 2 - 1
    gen = torch.Generator().manual_seed(3)
    noise = draw_noise(tuple(x0.shape), True, 1000, gen, "cpu")
    return get_method("flow").objective(_Stub(), Schedule(), x0, stat, noise, opts)[1]


STAT = torch.tensor([[0.0, 1.0], [3.0, 0.25], [9.0, 0.5]], dtype=torch.float64)


def test_default_weights_are_the_papers_formula_exactly():
    """exp on msq (the defaults): the same float ops as before the options existed."""
    opts = Options(sigma=0.7)
    assert opts.weighting == "exp" and TrainConfig().weighting == "exp"
    assert TrainConfig().flow_stat == "msq" and TrainConfig().flow_scale is None
    want = torch.exp(-STAT.float() / 0.7)
    assert torch.equal(WEIGHTINGS["exp"](STAT, opts), want)
    assert torch.equal(flow_weights(STAT, 0.7), want)
    assert torch.equal(_flow_terms(STAT, opts)["w_mean"], want.mean(1))
    hand = [math.exp(-m / 0.7) for m in STAT.flatten().tolist()]
    assert want.flatten().tolist() == pytest.approx(hand, rel=1e-6)


def test_inverse_weights_by_hand():
    """inverse: w = 1 / (1 + m / scale); scale 1 is the public code's 1 / (1 + m)."""
    one = WEIGHTINGS["inverse"](STAT, Options(weighting="inverse", flow_scale=1.0))
    hand = [1.0, 0.5, 0.25, 0.8, 0.1, 2 / 3]  # 1 / (1 + m)
    assert one.flatten().tolist() == pytest.approx(hand, rel=1e-6)
    two = inverse_weights(STAT, 2.0)
    hand = [1.0, 2 / 3, 0.4, 8 / 9, 2 / 11, 0.8]  # 1 / (1 + m / 2)
    assert two.flatten().tolist() == pytest.approx(hand, rel=1e-6)
    terms = _flow_terms(STAT, Options(weighting="inverse", flow_scale=2.0))
    assert torch.equal(terms["w_mean"], two.mean(1))
    assert not torch.equal(terms["w_mean"], _flow_terms(STAT, Options(sigma=2.0))["w_mean"])


def test_the_resolved_sigma_and_scale(builds):
    """exp: --sigma or the median of the chosen stat; inverse: 1, a number, or that median."""
    build = open_build(builds["1.1"])
    sigma, mag50 = float(build.manifest["flow"]["sigma"]), p50(builds["1.1"], "mag_stats")
    assert mag50 != sigma

    def resolved(*argv: str) -> tuple:
        return flow_parameters(resolve_defaults(parse(list(argv))), build)

    assert resolved() == (sigma, None)  # exp on msq: the manifest's sigma, as always
    assert resolved("--sigma", "2.5") == (2.5, None)
    assert resolved("--flow-stat", "mag") == (mag50, None)
    assert resolved("--weighting", "inverse") == (None, 1.0)
    assert resolved("--weighting", "inverse", "--flow-scale", "3") == (None, 3.0)
    assert resolved("--weighting", "inverse", "--flow-scale", "median") == (None, sigma)
    assert resolved("--weighting", "inverse", "--flow-stat", "mag", "--flow-scale", "median") == (
        None,
        mag50,
    )
    # exp on mag with the median sigma, by hand
    m = torch.tensor([[0.0, mag50, 2 * mag50]], dtype=torch.float64)
    w = WEIGHTINGS["exp"](m, Options(sigma=mag50))
    assert w[0].tolist() == pytest.approx([1.0, math.exp(-1), math.exp(-2)], rel=1e-6)


def test_the_loader_reads_the_chosen_stat(builds):
    """flow_key picks the JSON member: flow_mag with --flow-stat mag, flow_msq otherwise."""
    build = open_build(builds["1.1"])
    common = {"frames": (0, 1, 2), "image_size": 16, "batch": 4, "seed": 0}
    mag = next(data.batches(data.stream_for(build, "train", flow_key="flow_mag", **common), 0))
    msq = next(data.batches(data.stream_for(build, "train", **common), 0))
    assert mag["keys"] == msq["keys"]
    assert mag["flow_stat"].tolist() == [_mag(row) for row in msq["flow_stat"].tolist()]
    f, m, keys = data.fixed_windows(build, "train", 3, (0, 1, 2), 16, flow_key="flow_mag")
    f2, m2, keys2 = data.fixed_windows(build, "train", 3, (0, 1, 2), 16)
    assert keys == keys2 and m.tolist() == [_mag(row) for row in m2.tolist()]


# ---------------------------------------------------------------- end to end and refusals


def test_public_code_recipe_records_its_values(builds, tmp_path, capsys):
    """cpu-short then public-code on a 1.1 build: both recipes' values in config.json."""
    out = tmp_path / "run"
    argv = args(builds["1.1"], out, "--recipe", "cpu-short,public-code", "--image-size", "16",
                "--max-steps", "2", "--diag-every", "2", "--probe-size", "4")  # fmt: skip
    code, err = run(argv, capsys)
    assert code == 0, err
    c = config(out)
    assert c["recipe"] == "cpu-short,public-code"
    assert (c["weighting"], c["flow_stat"], c["flow_scale"]) == ("inverse", "mag", 1.0)
    assert (c["lam"], c["schedule"], c["sigma"]) == (0.1, "cosine", None)
    assert (c["prediction"], c["lr"], c["precision"]) == ("v", 2e-3, "bf16")  # cpu-short's
    records = steps(read_metrics(out))
    assert len(records) == 2
    stream = data.stream_for(open_build(builds["1.1"]), "train", frames=(0, 1, 2), image_size=16,
                             batch=8, seed=0, flow_key="flow_mag")  # fmt: skip
    for record, batch in zip(records, data.batches(stream, 0), strict=False):  # the run's batches
        want = float((1 / (1 + batch["flow_stat"])).mean())
        assert record["w_mean"] == pytest.approx(want, rel=1e-6)
    assert [r.get("kind") for r in read_metrics(out)].count("diag") == 1  # the probe reads mag


def test_flow_stat_mag_on_a_1_0_build_is_refused(builds, tmp_path, capsys):
    out = tmp_path / "run"
    argv = args(builds["1.0"], out, "--recipe", "public-code", "--max-steps", "2")
    code, err = run(argv, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "spec 1.0 build without it" in err and "rebuild it with this version" in err
    assert "pipeline build" in err and "Traceback" not in err
    assert not (out / "config.json").exists()
    assert run(args(builds["1.0"], tmp_path / "ok", "--max-steps", "1"), capsys)[0] == 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--method", "iid", "--weighting", "inverse"], "--weighting inverse: for --method flow"),
        (["--method", "adjacent", "--flow-stat", "mag"], "--flow-stat mag: for --method flow"),
        (["--method", "seq", "--flow-scale", "2"], "--flow-scale 2.0: for --method flow"),
        (["--weighting", "inverse", "--sigma", "2"], "--sigma is exp's"),
        (["--flow-scale", "2"], "--flow-scale is inverse's"),
        (["--flow-scale", "median"], "--flow-scale is inverse's"),
        (["--weighting", "inverse", "--flow-scale", "0"], "--flow-scale must be a positive"),
        (["--weighting", "inverse", "--flow-scale", "big"], "--flow-scale must be a positive"),
        (["--weighting", "inverse", "--flow-scale", "nan"], "--flow-scale must be a finite"),
        (["--recipe", "cpu-short,nope"], "unknown recipe 'nope' in --recipe 'cpu-short,nope'"),
        (["--recipe", "cpu-short,"], "unknown recipe '' in --recipe"),
    ],
)
def test_refusals_are_one_line(builds, tmp_path, capsys, extra, message):
    code, err = run(args(builds["1.1"], tmp_path / "run", "--max-steps", "1", *extra), capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_unknown_recipe_names_the_valid_ones(builds, tmp_path, capsys):
    code, err = run(args(builds["1.1"], tmp_path / "run", "--recipe", "nope"), capsys)
    assert code == 2 and "use one of cpu-short, public-code" in err


def test_public_code_leaves_other_methods_their_weighting(builds, tmp_path, capsys):
    """The recipe's flow-only values are not set for iid (which would refuse them)."""
    out = tmp_path / "iid"
    argv = args(builds["1.0"], out, "--recipe", "public-code", "--method", "iid", "--max-steps",
                "1")  # fmt: skip
    code, err = run(argv, capsys)
    assert code == 0, err
    c = config(out)
    assert (c["weighting"], c["flow_stat"], c["lam"], c["schedule"]) == (
        "exp",
        "msq",
        0.1,
        "cosine",
    )


def test_weighting_is_a_variant_checked_on_resume(builds, tmp_path, capsys):
    from train.options import NOT_VARIANT, RESUMABLE

    assert not {"weighting", "flow_stat", "flow_scale", "hflip"} & (NOT_VARIANT | RESUMABLE)
    out = tmp_path / "run"
    assert run(args(builds["1.1"], out, "--max-steps", "5"), capsys)[0] == 0
    for extra, named in (
        (["--weighting", "inverse"], "weighting 'exp' -> 'inverse'"),
        (["--flow-stat", "mag"], "flow_stat 'msq' -> 'mag'"),
        (["--hflip"], "hflip False -> True"),
    ):
        code, err = run(args(builds["1.1"], out, "--max-steps", "8", *extra), capsys)
        assert code == 2 and named in err and len(err.strip().splitlines()) == 1, err


# ---------------------------------------------------------------- recipes compose


def test_recipes_apply_in_order(monkeypatch):
    fake = {
        "a": recipes.Recipe("a", {"lr": 1.0, "warmup": 3}, batch={"windows": 4, "frames": 8}),
        "b": recipes.Recipe("b", {"lr": 2.0}, {"weighting": "inverse"}, max_steps={"windows": 9}),
        "c": recipes.Recipe("c", {}, batch={"windows": 6, "frames": 6}),
    }
    monkeypatch.setattr(recipes, "RECIPES", fake)
    ab = resolve_defaults(parse(["--recipe", "a,b"]))
    assert (ab.lr, ab.warmup, ab.batch, ab.max_steps, ab.weighting) == (2.0, 3, 4, 9, "inverse")
    ba = resolve_defaults(parse(["--recipe", "b,a"]))
    assert (ba.lr, ba.batch, ba.max_steps) == (1.0, 4, 9)
    assert resolve_defaults(parse(["--recipe", "a,c"])).batch == 6  # the last that names it
    assert resolve_defaults(parse(["--recipe", "c,a"])).batch == 4
    typed = resolve_defaults(parse(["--recipe", "a,b", "--lr", "5", "--batch", "2"]))
    assert (typed.lr, typed.batch, typed.recipe) == (5.0, 2, "a,b")
    iid = resolve_defaults(parse(["--recipe", "a, b", "--method", "iid"]))
    assert (iid.lr, iid.batch, iid.weighting) == (2.0, 8, "exp")  # b's flow-only value not set


def test_cpu_short_then_public_code():
    cfg = resolve_defaults(parse(["--recipe", "cpu-short,public-code"]))
    short = recipes.RECIPES["cpu-short"]
    assert (cfg.lam, cfg.schedule) == (0.1, "cosine")
    assert (cfg.weighting, cfg.flow_stat) == ("inverse", "mag")
    assert (cfg.prediction, cfg.lr, cfg.image_size) == ("v", 2e-3, 32)
    assert cfg.batch == short.batch["windows"] and cfg.max_steps == short.max_steps["windows"]
    alone = resolve_defaults(parse(["--recipe", "public-code"]))
    assert alone.batch == 128 and alone.max_steps is None and alone.prediction == "eps"


def test_a_study_cell_may_compose_recipes(tmp_path):
    from eval.study import RESERVED
    from eval.study_file import read_study

    path = tmp_path / "study.toml"
    path.write_text(
        '[build]\npath = "b"\n[budget]\nimages = 96\n[train]\nbatch = 8\n'
        '[[cell]]\nname = "flow"\nmethod = "flow"\nrecipe = "cpu-short,public-code"\n'
    )
    study = read_study(path, tmp_path, RESERVED)
    assert study.grid[0]["recipe"] == "cpu-short,public-code"


# ---------------------------------------------------------------- --hflip


def test_a_window_flips_all_its_frames_alike():
    x0 = torch.rand(64, 3, 3, 4, 5)
    coins = data.hflip_coins(0, 7, 64)
    out = data.hflip(x0, coins)
    for i in range(64):
        assert torch.equal(out[i], x0[i].flip(-1) if coins[i] else x0[i])
    frames = torch.rand(64, 1, 3, 4, 5)  # iid: each frame is its own window of 1
    assert torch.equal(data.hflip(frames, coins)[coins], frames[coins].flip(-1))
    assert torch.equal(data.hflip(frames, coins)[~coins], frames[~coins])


def test_ranks_flip_what_one_process_flips():
    x0 = torch.rand(8, 3, 3, 4, 5)
    one = data.hflip_windows(x0, 0, 5)
    two = [data.hflip_windows(x0[r * 4 : (r + 1) * 4], 0, 5, rank=r, world=2) for r in (0, 1)]
    four = [data.hflip_windows(x0[r * 2 : (r + 1) * 2], 0, 5, rank=r, world=4) for r in range(4)]
    assert torch.equal(torch.cat(two), one) and torch.equal(torch.cat(four), one)
    assert torch.equal(one, data.hflip(x0, data.hflip_coins(0, 5, 8)))


def test_the_coins_are_fair_and_depend_on_seed_and_step_only():
    coins = np.stack([data.hflip_coins(0, s, 128) for s in range(50)])
    assert 0.45 < coins.mean() < 0.55  # 6400 coins
    assert ((coins.mean(1) > 0.3) & (coins.mean(1) < 0.7)).all()  # each step's 128
    assert np.array_equal(data.hflip_coins(0, 3, 128), data.hflip_coins(0, 3, 128))
    assert not np.array_equal(data.hflip_coins(0, 3, 128), data.hflip_coins(0, 4, 128))
    assert not np.array_equal(data.hflip_coins(0, 3, 128), data.hflip_coins(1, 3, 128))


def test_hflip_in_the_step(builds, tmp_path, capsys, monkeypatch):
    """With --hflip each step's batch gets the global batch's coins; without, none is drawn."""
    calls = []
    real = data.hflip

    def spy(x0, coins):
        calls.append((x0.shape, coins.copy()))
        return real(x0, coins)

    monkeypatch.setattr(data, "hflip", spy)
    plain, flipped = tmp_path / "plain", tmp_path / "flipped"
    assert run(args(builds["1.1"], plain, "--max-steps", "3"), capsys)[0] == 0
    assert calls == []
    assert run(args(builds["1.1"], flipped, "--max-steps", "3", "--hflip"), capsys)[0] == 0
    assert [shape[0] for shape, _ in calls] == [8, 8, 8]
    for step, (_, coins) in enumerate(calls):
        assert np.array_equal(coins, data.hflip_coins(0, step, 8))
    assert losses(plain) != losses(flipped)
    assert config(flipped)["hflip"] is True and config(plain)["hflip"] is False


def test_a_resumed_hflip_run_repeats_the_uninterrupted_one(builds, tmp_path, capsys):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert run(args(builds["1.1"], whole, "--max-steps", "10", "--hflip"), capsys)[0] == 0
    assert run(args(builds["1.1"], parts, "--max-steps", "5", "--hflip"), capsys)[0] == 0
    assert run(args(builds["1.1"], parts, "--max-steps", "10", "--hflip"), capsys)[0] == 0
    assert [r.get("kind") for r in read_metrics(parts)].count("resume") == 1
    assert losses(parts) == losses(whole)
