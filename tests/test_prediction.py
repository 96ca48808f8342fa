"""What the network predicts (--prediction eps|v): held to diffusers, trained, resumed, sampled."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from shardutil import make_build

from eval.__main__ import main as eval_main
from eval.runs import RunError, schedule_of
from train.__main__ import main
from train.checkpoint import path_for
from train.diffusion import PREDICTIONS, Schedule, ddim_step, ddim_timesteps
from train.objectives import Noise, Options, get_method

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _diffusers(name: str, schedule: str, clip: bool = False):
    diffusers = pytest.importorskip("diffusers")
    return getattr(diffusers, name)(
        num_train_timesteps=1000,
        beta_schedule={"linear": "linear", "cosine": "squaredcos_cap_v2"}[schedule],
        beta_start=1e-4,
        beta_end=0.02,
        clip_sample=clip,
        prediction_type="v_prediction",
        **({"set_alpha_to_one": True, "timestep_spacing": "leading", "steps_offset": 0}
           if name == "DDIMScheduler" else {}),
    )  # fmt: skip


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_v_target_is_diffusers_velocity(schedule):
    ref = _diffusers("DDPMScheduler", schedule)
    sched = Schedule(kind=schedule, prediction="v")
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.rand(6, 3, 4, 4, generator=g) * 2 - 1, torch.randn(6, 3, 4, 4, generator=g)
    t = torch.tensor([0, 1, 250, 500, 900, 999])
    want = ref.get_velocity(x0, eps, t)
    assert torch.allclose(sched.target(x0, t, eps), want, atol=1e-5)
    # and the noise it implies at x_t is the noise that made x_t
    xt = sched.q_sample(x0, t, eps)
    assert torch.allclose(sched.eps_from(want, xt, t), eps, atol=1e-5)
    # eps prediction: the target is the noise, the output is read as the noise
    plain = Schedule(kind=schedule)
    assert torch.equal(plain.target(x0, t, eps), eps)
    assert torch.equal(plain.eps_from(eps, xt, t), eps)


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("clip", [False, True])
def test_ddim_with_v_matches_diffusers(eta, schedule, clip):
    ref = _diffusers("DDIMScheduler", schedule, clip)
    ref.set_timesteps(50)
    ts = ddim_timesteps(1000, 50)
    sched = Schedule(kind=schedule, prediction="v")
    g = torch.Generator().manual_seed(7)
    for j, t in enumerate(ts):
        x, v, noise = (torch.randn(2, 3, 8, 8, generator=g) for _ in range(3))
        want = ref.step(v, t, x, eta=eta, variance_noise=noise, use_clipped_model_output=True)
        t_prev = ts[j + 1] if j + 1 < len(ts) else -1
        got = ddim_step(sched, x, v, t, t_prev, eta, noise if eta > 0 else None, clip)
        assert torch.allclose(got, want.prev_sample, rtol=1e-5, atol=1e-5), (t, eta, clip)
    # the same output read as eps is another step
    eps_step = ddim_step(Schedule(kind=schedule), x, v, ts[0], ts[1], 0.0, None)
    v_step = ddim_step(sched, x, v, ts[0], ts[1], 0.0, None)
    assert (eps_step - v_step).abs().max().item() > 0.1


class _Output(torch.nn.Module):
    """Outputs a fixed tensor per call, whatever it is given (to check what the loss compares)."""

    def __init__(self, out: torch.Tensor) -> None:
        super().__init__()
        self.out = out

    def forward(self, x, t):
        return self.out


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_objectives_compare_outputs_with_their_target_and_regularise_noise(prediction):
    sched = Schedule(kind="cosine", prediction=prediction)
    g = torch.Generator().manual_seed(3)
    B, k = 2, 3
    x0 = torch.rand(B, k, 3, 4, 4, generator=g) * 2 - 1
    t = torch.randint(0, 1000, (B, 1), generator=g).expand(B, k)
    eps = torch.randn(B, 1, 3, 4, 4, generator=g).expand(B, k, 3, 4, 4)
    flat = x0.flatten(0, 1)
    target = sched.target(flat, t.reshape(-1), eps.reshape(flat.shape))
    msq = torch.zeros(B, k - 1)
    # an exact prediction: no denoising loss, and its noise is the shared noise: no mismatch
    loss, terms = get_method("flow").objective(
        _Output(target), sched, x0, msq, Noise(t, eps), Options()
    )
    assert terms["denoise"].abs().max().item() < 1e-10
    assert terms["reg"].abs().max().item() < 1e-8
    # off by 0.1 everywhere: a denoising loss of 0.01 in the output's own units
    _, terms = get_method("flow").objective(
        _Output(target + 0.1), sched, x0, msq, Noise(t, eps), Options()
    )
    assert torch.allclose(terms["denoise"], torch.full((B,), 0.01), atol=1e-6)


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Path:
    return make_build(tmp_path_factory.mktemp("vbuild"), n_train=24, n_val=8, size=16, seed=9)


def _args(build: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--shards", str(build), "--out", str(out), "--batch", "8", "--val-every", "0",
        "--diag-every", "0", "--ckpt-every", "3", "--no-progress", "--workers", "0",
        "--method", "flow", "--schedule", "cosine", *extra,
    ]  # fmt: skip


def test_prediction_is_recorded_checked_on_resume_and_read_by_sampling(build, tmp_path, capsys):
    v, eps = tmp_path / "v", tmp_path / "eps"
    assert main(_args(build, v, "--max-steps", "3", "--prediction", "v")) == 0
    assert main(_args(build, eps, "--max-steps", "3")) == 0
    config = json.loads((v / "config.json").read_text())
    assert config["prediction"] == "v" and schedule_of(config).prediction == "v"
    a, b = (torch.load(path_for(d, 3), weights_only=True) for d in (v, eps))
    assert a["config"]["prediction"] == "v"
    assert not torch.equal(a["model"]["out_conv.weight"], b["model"]["out_conv.weight"])
    capsys.readouterr()
    assert main(_args(build, v, "--max-steps", "5")) == 2  # resumed as eps: refused
    err = capsys.readouterr().err
    assert "prediction 'v' -> 'eps'" in err and len(err.strip().splitlines()) == 1
    assert main(_args(build, v, "--max-steps", "5", "--prediction", "v")) == 0
    # sampling reads the prediction from the run: the same weights read as eps draw otherwise
    for run, folder in ((v, tmp_path / "sv"), (eps, tmp_path / "se")):
        argv = ["sample", "--run", str(run), "--n", "2", "--steps", "4", "--out", str(folder)]
        assert eval_main([*argv, "--device", "cpu", "--no-progress"]) == 0
    assert json.loads((tmp_path / "sv" / "sample.json").read_text())["prediction"] == "v"
    assert json.loads((tmp_path / "se" / "sample.json").read_text())["prediction"] == "eps"


def test_a_run_from_before_the_option_is_read_as_eps(build, tmp_path, capsys):
    out = tmp_path / "old"
    assert main(_args(build, out, "--max-steps", "3")) == 0
    state = torch.load(path_for(out, 3), weights_only=True)
    del state["config"]["prediction"]
    torch.save(state, path_for(out, 3))
    config = json.loads((out / "config.json").read_text())
    del config["prediction"]
    (out / "config.json").write_text(json.dumps(config))
    assert schedule_of(config).prediction == "eps"
    assert main(_args(build, out, "--max-steps", "4")) == 0
    capsys.readouterr()
    assert main(_args(build, out, "--max-steps", "5", "--prediction", "v")) == 2
    assert "prediction 'eps' -> 'v'" in capsys.readouterr().err
    with pytest.raises(RunError, match="unknown prediction 'x0'"):
        schedule_of({**config, "prediction": "x0"})


def test_unknown_prediction_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--prediction", "x0"])
    assert e.value.code == 2 and "--prediction" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown prediction"):
        Schedule(prediction="sample")


def test_sampling_refuses_a_config_that_names_another_prediction_than_the_checkpoint(
    build, tmp_path, capsys
):
    out = tmp_path / "run"
    assert main(_args(build, out, "--max-steps", "3")) == 0  # eps
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "prediction": "v"}))
    argv = ["sample", "--run", str(out), "--n", "1", "--steps", "2", "--out", str(tmp_path / "s")]
    capsys.readouterr()
    assert eval_main([*argv, "--device", "cpu", "--no-progress"]) == 2
    assert "prediction 'eps', config.json has 'v'" in capsys.readouterr().err
