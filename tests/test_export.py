"""`python -m eval export`: the UNet2DModel and DDIMPipeline it writes against our UNet and DDIM."""

from __future__ import annotations

import ast
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from eval import export as ex
from eval import runs
from eval import sample as es
from eval.__main__ import main
from eval.runs import RunError, load
from train import checkpoint
from train.diffusion import Schedule, ddim_step, ddim_timesteps
from train.unet import FORMER_LAYOUTS, PRESETS, UNet, build_unet

diffusers = pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4  # max abs difference of the UNets' outputs, float32 on CPU
STEPS = 5  # DDIM steps of the trajectory comparisons


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _perturbed(model: UNet, seed: int) -> UNet:
    """Every parameter drawn at random, the zero-initialised ones included: weights with
    std 1/sqrt(fan-in), biases and norm shifts N(0, 0.3^2), norm scales 1 + N(0, 0.3^2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.dim() > 1:
                p.copy_(noise / p[0].numel() ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.3 * noise)
            else:
                p.copy_(0.3 * noise)
    assert all(p.abs().mean() > 1e-3 for p in model.parameters())  # nothing is left at zero
    return model.eval()


def _max_diff(model: UNet, theirs, seed: int = 1) -> float:
    """Max |UNet2DModel - UNet| on 2 random images at t = 999 and 3 (output scale ~1)."""
    g = torch.Generator().manual_seed(seed)
    size = model.image_size
    x = torch.randn((2, 3, size, size), generator=g)
    t = torch.tensor([999, 3])
    with torch.no_grad():
        ours, out = model(x, t), theirs(x, t).sample
    assert ours.abs().max() > 0.1  # not a trivially small output
    return (out - ours).abs().max().item()


def _make_run(
    folder: Path, preset: str, size: int, schedule: str, prediction: str, steps=(2, 4)
) -> Path:
    """A run folder with random (perturbed) raw and EMA weights at each of ``steps``."""
    config = {
        "preset": preset,
        "image_size": size,
        "unet": json.loads(json.dumps(asdict(PRESETS[preset]))),
        "schedule": schedule,
        "prediction": prediction,
        "run_id": "test",
    }
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    for step in steps:
        state = {
            "model": _perturbed(build_unet(preset, size), 10 * step).state_dict(),
            "ema": _perturbed(build_unet(preset, size), 10 * step + 1).state_dict(),
            "optimizer": {},
            "step": step,
            "epoch": 0,
            "images": 8 * step,
            "wall_s": 1.0,
            "config": config,
        }
        checkpoint.save(folder, step, state, keep=10)
    return folder


def _export(run: Path, out: Path, *extra: str) -> None:
    assert main(["export", str(run), "--out", str(out), "--no-progress", *extra]) == 0


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory) -> dict[tuple[str, str], Path]:
    """Tiny 16 px runs of each schedule and prediction."""
    tmp = tmp_path_factory.mktemp("exportruns")
    return {
        (s, p): _make_run(tmp / f"{s}-{p}", "tiny", 16, s, p)
        for s in ("linear", "cosine")
        for p in ("eps", "v")
    }


# --- the UNet ------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset, size", [("tiny", 16), ("small", 32)])
def test_exported_unet_matches(preset, size, tmp_path, capsys):
    run = _make_run(tmp_path / "run", preset, size, "linear", "eps", steps=(3,))
    out = tmp_path / "export"
    _export(run, out)
    assert "checked to" in capsys.readouterr().out
    theirs = diffusers.UNet2DModel.from_pretrained(out / "unet").eval()
    diff = _max_diff(load(run).model, theirs)
    print(f"{preset} at {size} px: max abs diff {diff:.3g}")
    assert diff <= TOL


def test_base_matches():
    """base (5 levels, 2 blocks, 128 channels, groups 32, dropout 0.1 in eval mode, 4 heads of
    128 at level 3 and in the middle) at 64 px, the size of the oracle's other presets' order."""
    model = _perturbed(build_unet("base", 64), 5)
    diff = _max_diff(model, ex.to_diffusers(model))
    print(f"base at 64 px: max abs diff {diff:.3g}")
    assert diff <= TOL


def test_two_head_widths_are_refused():
    """base of framebridge 0.1 had 4 heads at widths 384 (level 3) and 512 (middle): no single
    head dimension, so no UNet2DModel."""
    _, former = FORMER_LAYOUTS["base"][0]
    with pytest.raises(RunError, match="no exact diffusers UNet2DModel") as info:
        ex.unet_config(UNet(former, 64))
    assert "level 3 384 (96 per head)" in str(info.value)
    assert "middle 512 (128 per head)" in str(info.value) and "\n" not in str(info.value)


def test_run_of_a_former_layout_is_refused_naming_the_version(tmp_path, capsys):
    """A run trained with base's layout of 0.1: eval (and so export) refuse it in one line."""
    run = tmp_path / "old-base"
    _, former = FORMER_LAYOUTS["base"][0]
    config = {"preset": "base", "image_size": 64, "unet": json.loads(json.dumps(asdict(former)))}
    run.mkdir()
    (run / "config.json").write_text(json.dumps(config))
    state = {"model": {}, "ema": {}, "optimizer": {}, "step": 1, "epoch": 0, "images": 1}
    checkpoint.save(run, 1, {**state, "wall_s": 1.0, "config": config}, keep=1)
    with pytest.raises(RunError, match="layout of framebridge 0.1") as info:
        load(run)
    assert "mults [1, 1, 2, 3, 4]" in str(info.value) and "\n" not in str(info.value)
    assert main(["export", str(run), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "framebridge 0.1" in err[0]


# --- the pipeline --------------------------------------------------------------------------------


def _our_trajectory(model: UNet, sched: Schedule, x: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM from x_T as eval sample runs it (eta 0, x0 clipped)."""
    timesteps = ddim_timesteps(sched.T, STEPS)
    with torch.no_grad():
        for t, t_prev in zip(timesteps, timesteps[1:] + [-1], strict=True):
            out = model(x, torch.full((len(x),), t, dtype=torch.long))
            x = ddim_step(sched, x, out, t, t_prev, 0.0, None, clip=True)
    return x


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_ddim_pipeline_matches_our_sampler(tiny_runs, schedule, prediction, tmp_path):
    run = tiny_runs[(schedule, prediction)]
    out = tmp_path / "export"
    _export(run, out)
    cfg = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert cfg["_class_name"] == "DDIMScheduler"
    assert cfg["beta_schedule"] == {"linear": "linear", "cosine": "squaredcos_cap_v2"}[schedule]
    assert cfg["prediction_type"] == {"eps": "epsilon", "v": "v_prediction"}[prediction]
    assert (cfg["clip_sample"], cfg["set_alpha_to_one"], cfg["steps_offset"]) == (True, True, 0)
    assert (cfg["beta_start"], cfg["beta_end"], cfg["timestep_spacing"]) == (1e-4, 0.02, "leading")

    pipe = diffusers.DDIMPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    loaded = load(run)
    seed, indices = 7, [0, 1, 2]
    images = pipe(
        batch_size=len(indices),
        generator=[es.image_generator(seed, i) for i in indices],
        num_inference_steps=STEPS,
        eta=0.0,
        use_clipped_model_output=True,
        output_type="pt",
    ).images

    # one trajectory from the same x_T, at the level of the floats
    x_T = torch.stack(
        [torch.randn((3, 16, 16), generator=es.image_generator(seed, i)) for i in indices]
    )
    ours = _our_trajectory(loaded.model, loaded.schedule, x_T).clamp(-1, 1)
    diff = (images * 2 - 1 - ours).abs().max().item()
    print(f"{schedule}/{prediction}: DDIM max abs diff {diff:.3g}")
    assert diff <= TOL
    assert 0.05 < (ours.abs() < 0.999).float().mean() < 0.999  # not all clipped

    # eval sample's images from the same seed, to one level of rounding
    ref = es.sample(loaded.model, loaded.schedule, indices, seed, STEPS, 0.0, 4, "cpu", clip=True)
    theirs = torch.round(images * 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    levels = np.abs(ref.astype(int) - theirs.astype(int))
    assert levels.max() <= 1 and (levels > 0).mean() < 0.01


def test_ddpm_pipeline_loads(tiny_runs, tmp_path):
    out = tmp_path / "export"
    _export(tiny_runs[("cosine", "v")], out)
    pipe = diffusers.DDPMPipeline.from_pretrained(out)
    assert isinstance(pipe.unet, diffusers.UNet2DModel)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    pipe.set_progress_bar_config(disable=True)
    image = pipe(batch_size=1, num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 16, 16, 3) and np.isfinite(image).all()


# --- the folder ----------------------------------------------------------------------------------


def test_weights_are_safetensors_and_the_record(tiny_runs, tmp_path):
    from safetensors.torch import load_file

    run = tiny_runs[("linear", "eps")]
    out = tmp_path / "export"
    _export(run, out, "--ckpt", "2", "--no-ema")
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == [
        ".lock",
        ex.RECORD_NAME,
        "model_index.json",
        "scheduler/scheduler_config.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
    ]
    weights = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    raw = load(run, "2", ema=False).model
    expected = ex.unet_state_dict(raw)
    assert sorted(weights) == sorted(expected)
    assert all(torch.equal(weights[k], expected[k]) for k in expected)
    info = json.loads((out / ex.RECORD_NAME).read_text())
    assert (info["step"], info["ema"], info["schedule"], info["prediction"]) == (
        2,
        False,
        "linear",
        "eps",
    )
    assert info["check_max_rel_diff"] <= TOL

    _export(run, out)  # again into the same folder: the last EMA weights replace them
    info = json.loads((out / ex.RECORD_NAME).read_text())
    assert (info["step"], info["ema"]) == (4, True)
    theirs = diffusers.UNet2DModel.from_pretrained(out / "unet").eval()
    assert _max_diff(load(run).model, theirs) <= TOL
    assert not (out / ex.TMP_NAME).exists()


def _one_line_exit_2(argv: list[str], capsys, match: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and match in err, err


def test_bad_input(tiny_runs, tmp_path, capsys, monkeypatch):
    run = tiny_runs[("linear", "eps")]
    out = str(tmp_path / "out")
    _one_line_exit_2(
        ["export", str(tmp_path / "nowhere"), "--out", out], capsys, "not a training run"
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((run / "config.json").read_text())
    _one_line_exit_2(["export", str(empty), "--out", out], capsys, "no checkpoint")
    _one_line_exit_2(["export", str(run), "--out", out, "--ckpt", "99"], capsys, "step 99")
    _one_line_exit_2(["export", str(run), "--out", out, "--ckpt", "best"], capsys, "no best")

    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    _one_line_exit_2(["export", str(run), "--out", str(a_file)], capsys, "is a file")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    _one_line_exit_2(["export", str(run), "--out", str(foreign)], capsys, "not an export's")
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with monkeypatch.context() as m:
            if os.geteuid() == 0:  # root writes anywhere: the check is what is tested
                m.setattr(runs.os, "access", lambda path, mode: Path(path) != locked)
            _one_line_exit_2(["export", str(run), "--out", str(locked / "x")], capsys, "writable")
    finally:
        locked.chmod(0o700)

    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` raises ImportError
    _one_line_exit_2(
        ["export", str(run), "--out", out], capsys, "pip install 'framebridge[diffusers]'"
    )
    assert not Path(out).exists()


def _module_level_imports(tree: ast.Module) -> list[str]:
    """Modules a file imports outside any function (at import time)."""
    found, stack = [], list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue  # run only when called
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append(node.module)
        stack.extend(ast.iter_child_nodes(node))
    return found


def test_diffusers_is_imported_by_export_only():
    """No module of eval/ or train/ imports diffusers when it is imported; eval.export does
    inside its functions."""
    for file in sorted([*(ROOT / "eval").glob("*.py"), *(ROOT / "train").glob("*.py")]):
        imports = _module_level_imports(ast.parse(file.read_text()))
        assert not [m for m in imports if m.split(".")[0] == "diffusers"], file
    assert "import diffusers" in (ROOT / "eval" / "export.py").read_text()
