"""The package as users get it: `python -m build` gives an sdist and a wheel (built from the
sdist), and the wheel installed into a fresh virtual environment works without this checkout.

The fresh environment sees this interpreter's installed dependencies (torch, ray, ... are too
heavy to install again, and only the package registry may be reachable) through symlinks that
leave out framebridge itself: its editable-install hook and its dist-info. Every command runs
from a temporary folder with no PYTHONPATH, so the checkout cannot be imported.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from shards_spec.format import SPEC_VERSION

pytestmark = pytest.mark.slow  # `pipeline build` starts a local Ray cluster

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "train", "eval", "shards_spec")
NAME = "framebridge"


def source_files() -> list[str]:
    """The checkout's files that git tracks or would track (working-tree contents), or all its
    files but the usual build and cache folders if git is missing."""
    cmd = ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"]
    try:
        out = subprocess.run(cmd, cwd=REPO, capture_output=True, check=True, timeout=30).stdout
        files = [f for f in out.decode().split("\0") if f]
    except (OSError, subprocess.SubprocessError):
        skip = {".git", ".venv", ".cache", ".pytest_cache", ".ruff_cache", "__pycache__"}
        skip |= {"build", "dist", "demo_out", f"{NAME}.egg-info"}
        files = [
            p.relative_to(REPO).as_posix()
            for p in REPO.rglob("*")
            if p.is_file() and not skip & set(p.relative_to(REPO).parts)
        ]
    return [f for f in files if (REPO / f).is_file()]


def package_files() -> list[str]:
    """Files the wheel must hold: every such file inside the packages."""
    return sorted(f for f in source_files() if f.split("/", 1)[0] in PACKAGES)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(PYTHONNOUSERSITE="1", RAY_USAGE_STATS_ENABLED="0", **extra)
    return env


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> tuple[Path, Path]:
    """(wheel, sdist) built by `python -m build` from a copy of the checkout's files."""
    pytest.importorskip("build")
    tmp = tmp_path_factory.mktemp("dist")
    src = tmp / "src"
    for rel in source_files():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, src / rel)
    # --no-isolation: build with this environment's setuptools instead of fetching it
    cmd = [sys.executable, "-m", "build", "--no-isolation", "--skip-dependency-check",
           "--outdir", str(tmp / "dist"), str(src)]  # fmt: skip
    run = subprocess.run(cmd, cwd=tmp, env=clean_env(), capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    wheels = list((tmp / "dist").glob(f"{NAME}-*.whl"))
    sdists = list((tmp / "dist").glob(f"{NAME}-*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, list((tmp / "dist").iterdir())
    return wheels[0], sdists[0]


def test_wheel_and_sdist_hold_the_packages(dists):
    wheel, sdist = dists
    want = package_files()
    assert "shards_spec/SPEC.md" in want and "shards_spec/dataset.schema.json" in want
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        info = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        entry_points = z.read(info).decode()
    assert sorted(set(want) - names) == []
    top = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith(".dist-info")}
    assert top == set(PACKAGES)  # no tests/, bench/, docs/ ... in site-packages
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    assert "pipeline = pipeline.cli:main" in entry_points
    with tarfile.open(sdist) as t:
        base = t.getnames()[0].split("/", 1)[0]
        in_sdist = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    assert base == sdist.name.removesuffix(".tar.gz")
    assert sorted(set(want) - in_sdist) == []
    assert {"pyproject.toml", "README.md"} <= in_sdist


def dependency_farm(dst: Path) -> list[Path]:
    """Symlinks to each site-packages entry of this interpreter except framebridge's own.

    Left out: framebridge's dist-info or egg-info, its editable-install finder and .pth hook
    (and any .pth naming the checkout), and anything named like one of its packages.
    """
    farms = []
    for i, sp in enumerate(site.getsitepackages()):
        sp = Path(sp)
        if not sp.is_dir():
            continue
        farm = dst / f"deps{i}"
        farm.mkdir(parents=True)
        for entry in sp.iterdir():
            name = entry.name
            low = name.lower()
            if name in PACKAGES or low.startswith((NAME, f"__editable__.{NAME}")):
                continue
            if low.startswith(f"__editable___{NAME}"):
                continue
            if name.endswith(".pth") and str(REPO) in entry.read_text(errors="replace"):
                continue
            (farm / name).symlink_to(entry)
        farms.append(farm)
    return farms


@pytest.fixture(scope="module")
def venv(dists, tmp_path_factory) -> dict:
    """A fresh venv with the wheel installed; {"python", "bin", "site", "cwd", "env"}."""
    wheel, _ = dists
    tmp = tmp_path_factory.mktemp("venv")
    env_dir = tmp / "env"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(env_dir)],
        check=True,
        env=clean_env(),
        timeout=120,
    )
    python = env_dir / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
        env=clean_env(),
        timeout=60,
    ).stdout.strip()
    farms = dependency_farm(tmp / "farm")
    # site.addsitedir also runs the farms' own .pth files (none of them framebridge's)
    hook = "import site; " + "; ".join(f"site.addsitedir({str(f)!r})" for f in farms)
    Path(purelib, "_framebridge_test_deps.pth").write_text(hook + "\n")
    cwd = tmp / "work"
    cwd.mkdir()
    env = clean_env(FRAMEBRIDGE_CACHE=str(tmp / "cache"), PIP_NO_INDEX="1")
    pip = [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)]
    run = subprocess.run(pip, cwd=cwd, env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return {"python": python, "bin": env_dir / "bin", "site": purelib, "cwd": cwd, "env": env}


def run_in(venv: dict, *cmd: str, timeout: int = 120) -> str:
    run = subprocess.run(
        list(cmd), cwd=venv["cwd"], env=venv["env"], capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    assert run.returncode == 0, f"{cmd}: {run.stdout[-3000:]}{run.stderr[-3000:]}"
    return run.stdout


CHECK = """
import importlib.metadata as md, importlib.resources as res, json, sys
import eval, pipeline, shards_spec, train
from shards_spec.format import load_schema
out = {"files": [m.__file__ for m in (eval, pipeline, shards_spec, train)],
       "version": md.version("framebridge"),
       "dist": str(md.distribution("framebridge").locate_file("")),
       "spec": res.files("shards_spec").joinpath("SPEC.md").read_text()[:40],
       "schemas": [load_schema(n)["type"] for n in ("dataset", "sample")],
       "path": sys.path}
print(json.dumps(out))
"""


def test_installed_package_is_the_wheel(venv):
    got = json.loads(run_in(venv, str(venv["python"]), "-c", CHECK))
    for file in got["files"]:
        assert file.startswith(venv["site"] + os.sep), file
    assert got["version"] == "0.3.0" and got["dist"].startswith(venv["site"])
    assert got["spec"].startswith(f"# Shard format {SPEC_VERSION}")
    assert got["schemas"] == ["object", "object"]
    repo = str(REPO)
    assert not [p for p in got["path"] if p == repo or p.startswith(repo + os.sep)]


def test_installed_commands_help(venv):
    assert "build" in run_in(venv, str(venv["bin"] / "pipeline"), "--help")
    assert "--shards" in run_in(venv, str(venv["python"]), "-m", "train", "--help")
    assert "sample" in run_in(venv, str(venv["python"]), "-m", "eval", "--help")


def test_installed_pipeline_builds_synthetic(venv):
    out = venv["cwd"] / "X"
    run_in(
        venv, str(venv["bin"] / "pipeline"), "build", "--src", "synthetic",
        "--synth-sequences", "2", "--synth-cameras", "1", "--synth-frames", "6",
        "--size", "32", "--flow", "dis", "--flow-size", "64", "--workers", "1",
        "--out", str(out), "--no-progress", timeout=300,
    )  # fmt: skip
    run_in(venv, str(venv["bin"] / "pipeline"), "validate", str(out))
    manifest = json.loads((out / "dataset.json").read_text())
    assert sum(s["samples"] for s in manifest["splits"].values()) > 0
