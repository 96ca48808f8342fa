"""DDIM against diffusers, and `python -m eval sample`: determinism, resume, ranks, bad input."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from eval import sample as es
from eval.runs import RunError
from train.diffusion import Schedule, ddim_step, ddim_timesteps
from train.unet import build_unet

pytestmark = pytest.mark.usefixtures("one_torch_thread")


ROOT = Path(__file__).resolve().parents[1]
SIZE = 16


def _diffusers_ddim(schedule: str = "linear", clip: bool = False):
    """diffusers' DDIMScheduler configured as our Schedule and DDIM are."""
    diffusers = pytest.importorskip("diffusers")
    return diffusers.DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule={"linear": "linear", "cosine": "squaredcos_cap_v2"}[schedule],
        beta_start=1e-4,
        beta_end=0.02,
        set_alpha_to_one=True,
        timestep_spacing="leading",
        clip_sample=clip,
        steps_offset=0,
        prediction_type="epsilon",
    )


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_schedule_tables_match_diffusers(schedule):
    ref = _diffusers_ddim(schedule)
    ours = Schedule(kind=schedule)
    assert (ours.betas - ref.betas).abs().max().item() < 1e-6
    assert (ours.alphas_cumprod - ref.alphas_cumprod).abs().max().item() < 1e-6
    if schedule == "cosine":  # not the linear table under another name
        assert (ours.alphas_cumprod - Schedule().alphas_cumprod).abs().max().item() > 0.1


@pytest.mark.parametrize("steps", [10, 50])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("clip", [False, True])
def test_ddim_matches_diffusers(steps, eta, schedule, clip):
    ref = _diffusers_ddim(schedule, clip)
    ref.set_timesteps(steps)
    ts = ddim_timesteps(1000, steps)
    assert ts == ref.timesteps.tolist()
    sched = Schedule(kind=schedule)
    g = torch.Generator().manual_seed(steps)
    clipped = 0
    for j, t in enumerate(ts):
        x, eps, noise = (torch.randn(2, 3, 8, 8, generator=g) for _ in range(3))
        # diffusers re-derives eps from the clipped x0 only when asked (GLIDE's rule, ours)
        want = ref.step(
            eps, t, x, eta=eta, variance_noise=noise, use_clipped_model_output=True
        ).prev_sample
        t_prev = ts[j + 1] if j + 1 < len(ts) else -1
        got = ddim_step(sched, x, eps, t, t_prev, eta, noise if eta > 0 else None, clip)
        # 1e-5, relative to the values: re-deriving eps divides by sqrt(1 - abar_t), which at
        # small t magnifies either side's float32 rounding to ~1e-5 of values near 1
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), (steps, eta, schedule, clip, t)
        a = float(sched.alphas_cumprod[t])
        clipped += int(((x - (1 - a) ** 0.5 * eps) / a**0.5).abs().gt(1).any())
    assert clipped > 0  # the clamp was exercised on these draws


def test_clipping_changes_the_step():
    x, eps = torch.full((1, 3, 4, 4), 0.5), torch.full((1, 3, 4, 4), -2.0)
    sched = Schedule()
    plain = ddim_step(sched, x, eps, 500, 400, 0.0, None)
    clipped = ddim_step(sched, x, eps, 500, 400, 0.0, None, clip=True)
    assert (plain - clipped).abs().min().item() > 0.1
    # with x0 in range, clipping is the identity
    eps_small = torch.zeros_like(x)
    same = ddim_step(sched, x * 0.1, eps_small, 500, 400, 0.0, None, clip=True)
    assert torch.equal(same, ddim_step(sched, x * 0.1, eps_small, 500, 400, 0.0, None))


def test_schedule_rejects_unknown_kind():
    with pytest.raises(ValueError, match="unknown schedule"):
        Schedule(kind="sigmoid")


def test_ddim_argument_checks():
    with pytest.raises(ValueError, match="steps"):
        ddim_timesteps(1000, 0)
    x = torch.zeros(1, 3, 4, 4)
    with pytest.raises(ValueError, match="noise"):
        ddim_step(Schedule(), x, x, 500, 400, 1.0, None)


class _Shifted(torch.nn.Module):
    """eps = sqrt(1 - abar_t) x_t + unet(x_t, t): images with spread-out pixel values."""

    def __init__(self, unet: torch.nn.Module, sched: Schedule) -> None:
        super().__init__()
        self.unet, self.image_size = unet, unet.image_size
        self.k = sched.sqrt_one_minus_alphas_cumprod

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.k[t].view(-1, 1, 1, 1) * x + self.unet(x, t)


def _perturbed_model(sched: Schedule) -> _Shifted:
    torch.manual_seed(0)
    unet = build_unet("tiny", SIZE).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return _Shifted(unet, sched)


def test_image_independent_of_neighbours_and_batch():
    sched = Schedule()
    model = _perturbed_model(sched)
    full = es.sample(model, sched, list(range(8)), 3, 5, 0.5, 8, "cpu")
    assert full.shape == (8, SIZE, SIZE, 3) and full.dtype.name == "uint8"
    assert len(set(full.ravel().tolist())) > 200  # not a saturated image: a real comparison
    # same batch: other neighbours, positions, a short (padded) chunk -> the same bytes
    mixed = es.sample(model, sched, [5, 100, 2], 3, 5, 0.5, 8, "cpu")
    assert (mixed[0] == full[5]).all() and (mixed[2] == full[2]).all()
    odd = es.sample(model, sched, [7, 5, 3, 1], 3, 5, 0.5, 8, "cpu")
    assert (odd == full[[7, 5, 3, 1]]).all()
    # other batch sizes: the same noise; the CPU kernels round batch 1..16 differently (~5e-7
    # in eps), which may move an odd pixel by one level, never more
    for batch in (1, 3):
        other = es.sample(model, sched, list(range(8)), 3, 5, 0.5, batch, "cpu").astype(int)
        diff = abs(other - full)
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (batch, (diff > 0).sum())
    assert not (es.sample(model, sched, [5], 4, 5, 0.5, 1, "cpu")[0] == full[5]).all()


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A 4-step tiny iid run at 16 px with checkpoints at steps 2 and 4."""
    from shardutil import make_build

    import train.__main__ as train_main

    tmp = tmp_path_factory.mktemp("evalsample")
    build = make_build(tmp, n_train=40, n_val=8, size=SIZE, shard_size=7)
    run = tmp / "run"
    argv = ["--shards", str(build), "--out", str(run), "--batch", "8", "--max-steps", "4"]
    argv += ["--val-every", "0", "--diag-every", "0", "--ckpt-every", "2", "--no-progress"]
    argv += ["--workers", "0", "--preset", "tiny", "--method", "iid", "--lr", "0.01"]
    assert train_main.main(argv + ["--ema", "0.5"]) == 0
    return run


def _args(run: Path, out: Path, *extra: str) -> argparse.Namespace:
    """Parsed `eval sample` options (5 steps, eta 0.5, seed 1 unless `extra` overrides)."""
    parser = argparse.ArgumentParser()
    es.add_arguments(parser)
    base = ["--run", str(run), "--out", str(out), "--n", "6", "--steps", "5", "--eta", "0.5"]
    base += ["--seed", "1", "--device", "cpu", "--no-progress"]
    return parser.parse_args(base + list(extra))


def _pngs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def test_resume_rewrites_only_missing(trained_run, tmp_path, monkeypatch):
    out = tmp_path / "s"
    assert es.run(_args(trained_run, out, "--batch", "4")) == 0  # chunks [0..3], [4, 5]
    first = _pngs(out)
    assert sorted(first) == [f"{i:06d}.png" for i in range(6)]
    record = es.read_record(out)
    assert record["n"] == 6 and record["step"] == 4 and record["ema"] is True
    (out / "000001.png").unlink()
    (out / "000004.png").unlink()
    (out / ".000003.png.tmp").write_bytes(b"half")  # a stale temp of a done image: removed
    (out / ".000004.png.tmp").write_bytes(b"half")  # a killed write: not done
    written = []
    real = es.write_png
    monkeypatch.setattr(es, "write_png", lambda f, i, im: written.append(i) or real(f, i, im))
    assert es.run(_args(trained_run, out, "--batch", "4")) == 0  # one chunk [1, 4]
    assert sorted(written) == [1, 4]
    assert _pngs(out) == first
    assert not list(out.glob(".*.tmp"))


def test_png_is_the_rgb_sample(trained_run, tmp_path):
    from PIL import Image

    from eval.runs import load

    out = tmp_path / "s"
    assert es.run(_args(trained_run, out, "--n", "2", "--ckpt", "2", "--no-ema")) == 0
    model = load(trained_run, "2", ema=False).model
    want = es.sample(model, Schedule(), [0, 1], 1, 5, 0.5, 64, "cpu", clip=True)
    for i in (0, 1):
        with Image.open(out / f"{i:06d}.png") as im:
            assert im.mode == "RGB" and (np.asarray(im) == want[i]).all()
    record = es.read_record(out)
    assert record["ema"] is False and record["step"] == 2
    assert record["clip_x0"] is True and record["schedule"] == "linear"
    unclipped = tmp_path / "u"
    assert (
        es.run(_args(trained_run, unclipped, "--n", "2", "--ckpt", "2", "--no-ema", "--no-clip-x0"))
        == 0
    )
    plain = es.sample(model, Schedule(), [0, 1], 1, 5, 0.5, 64, "cpu", clip=False)
    assert _pngs(unclipped) != _pngs(out)  # lr 0.01 for 2 steps: x0 leaves [-1, 1]
    for i in (0, 1):
        with Image.open(unclipped / f"{i:06d}.png") as im:
            assert (np.asarray(im) == plain[i]).all()
    # a folder sampled without clipping (or before the option existed) is not resumed with it
    _one_line_error(_args(trained_run, unclipped, "--n", "2", "--ckpt", "2", "--no-ema"), "clip_x0")
    record = es.read_record(unclipped)
    del record["clip_x0"]
    es.write_record(unclipped, record)
    _one_line_error(
        _args(trained_run, unclipped, "--n", "2", "--ckpt", "2", "--no-ema"), "clip_x0 False"
    )


def test_sampling_reads_the_runs_schedule(trained_run, tmp_path):
    from eval.runs import RunError as Refused
    from eval.runs import load, schedule_of

    assert schedule_of({}).kind == "linear"  # a run made before --schedule existed
    assert schedule_of({"schedule": "cosine"}).kind == "cosine"
    with pytest.raises(Refused, match="unknown schedule"):
        schedule_of({"schedule": "sigmoid"})
    cosine = tmp_path / "cosine"
    shutil.copytree(trained_run, cosine)
    config = json.loads((cosine / "config.json").read_text())
    (cosine / "config.json").write_text(json.dumps({**config, "schedule": "cosine"}))
    from train.checkpoint import path_for, steps_saved

    for step in steps_saved(cosine):  # the checkpoints say so too (a mismatch is refused)
        state = torch.load(path_for(cosine, step), weights_only=True)
        state["config"]["schedule"] = "cosine"
        torch.save(state, path_for(cosine, step))
    a, b = tmp_path / "a", tmp_path / "b"
    assert es.run(_args(trained_run, a, "--n", "2")) == 0
    assert es.run(_args(cosine, b, "--n", "2")) == 0
    assert es.read_record(b)["schedule"] == "cosine" and _pngs(a) != _pngs(b)
    model = load(cosine, "last").model
    want = es.sample(model, Schedule(kind="cosine"), [0, 1], 1, 5, 0.5, 64, "cpu", clip=True)
    from PIL import Image

    with Image.open(b / "000001.png") as im:
        assert (np.asarray(im) == want[1]).all()


@pytest.mark.slow  # torchrun, two ranks
def test_two_ranks_match_one(trained_run, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert es.run(_args(trained_run, one, "--n", "5", "--batch", "2")) == 0  # [0,1] [2,3] [4]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    # --run-dir / --n-images: torchrun would take --run and --n for its own options
    cmd += ["-m", "eval", "sample", "--run-dir", str(trained_run), "--out", str(two)]
    cmd += ["--n-images", "5", "--steps", "5", "--eta", "0.5", "--seed", "1", "--batch", "2"]
    cmd += ["--device", "cpu", "--no-progress"]  # rank 0 samples [0, 2] [4], rank 1 [1, 3]
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _pngs(two) == _pngs(one) and len(_pngs(one)) == 5
    assert es.read_record(two) == es.read_record(one)


def _one_line_error(args: argparse.Namespace, match: str) -> str:
    with pytest.raises(RunError, match=match) as info:
        es.run(args)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_bad_input(trained_run, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(trained_run / "config.json", empty / "config.json")
    _one_line_error(_args(empty, tmp_path / "o1"), "no checkpoint")
    _one_line_error(_args(tmp_path / "nowhere", tmp_path / "o1"), "not a training run")
    _one_line_error(_args(trained_run, tmp_path / "o1", "--ckpt", "99"), "no checkpoint of step 99")

    broken = tmp_path / "broken"
    shutil.copytree(trained_run, broken)
    ckpt = broken / "ckpt-00000004.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    _one_line_error(_args(broken, tmp_path / "o2"), "unreadable checkpoint")

    out = tmp_path / "o3"
    assert es.run(_args(trained_run, out, "--n", "1", "--ckpt", "2")) == 0
    _one_line_error(_args(trained_run, out, "--n", "2"), "step 2 .now 4.")
    _one_line_error(_args(trained_run, out, "--n", "2", "--ckpt", "2", "--eta", "0"), "eta")
    assert sorted(_pngs(out)) == ["000000.png"]

    from eval.__main__ import main

    argv = ["sample", "--run", str(trained_run), "--out", str(out), "--n", "2", "--steps", "5"]
    assert main(argv + ["--device", "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
