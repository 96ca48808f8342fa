"""Optical-flow backends and the flow proximity of the paper (sec. 3.4).

``flow_msq`` of a pair is the mean over pixels of |F|^2, in pixels^2 at the flow resolution;
its weight, ``exp(-flow_msq / sigma)``, is :func:`shards_spec.format.flow_weight`. ``flow_mag``
is the mean over pixels of |F| = sqrt(u^2 + v^2), in pixels at the flow resolution (spec 1.1).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

CPU_BACKENDS = ("dis", "farneback")
RAFT_BACKENDS = ("raft-large", "raft-small")
BACKENDS = ("auto", *CPU_BACKENDS, *RAFT_BACKENDS)

RAFT_MIN_SIDE = 128

# torchvision's weight files, as torch.hub stores them in $TORCH_HOME/hub/checkpoints.
RAFT_WEIGHT_FILES = {
    "raft-large": "raft_large_C_T_SKHT_V2-ff5fadd5.pth",
    "raft-small": "raft_small_C_T_V2-01064c6d.pth",
}


class FlowError(RuntimeError):
    """A flow backend that cannot run as configured (missing weights, unknown backend)."""


def flow_msq(flow: np.ndarray) -> float:
    """Mean squared flow magnitude of one (H, W, 2) or (2, H, W) field, in pixels^2."""
    f = np.ascontiguousarray(flow, dtype=np.float32).reshape(-1)
    return float(np.dot(f, f)) / (f.size // 2) if f.size else 0.0


def flow_mag(flow: np.ndarray) -> float:
    """Mean flow magnitude |F| = sqrt(u^2 + v^2) of one (H, W, 2) or (2, H, W) field, in pixels.

    A 3-d array whose last axis has length 2 is read as (H, W, 2), otherwise as (2, H, W).
    """
    f = np.asarray(flow, dtype=np.float32)
    if f.size == 0:
        return 0.0
    if f.ndim == 3 and f.shape[-1] == 2:
        u, v = f[..., 0], f[..., 1]
    elif f.shape[0] == 2:
        u, v = f[0], f[1]
    else:
        raise ValueError(f"flow_mag needs an (H, W, 2) or (2, H, W) field, got {f.shape}")
    return float(np.sqrt(u * u + v * v).mean(dtype=np.float64))


def pair_values(flow: np.ndarray) -> tuple[float, float]:
    """(flow_msq, flow_mag) of one field: what each adjacent pair records."""
    return flow_msq(flow), flow_mag(flow)


def resolve_backend(name: str, gpus: float) -> str:
    if name not in BACKENDS:
        raise FlowError(f"unknown flow backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "auto":
        return "raft-large" if gpus > 0 else "dis"
    return name


def downsample_flow(flow: np.ndarray, side: int) -> np.ndarray:
    """(H, W, 2) flow -> (2, side, side) float16, vectors rescaled to the new resolution."""
    h = flow.shape[0]
    small = cv2.resize(flow.astype(np.float32), (side, side), interpolation=cv2.INTER_AREA)
    small *= side / h
    return np.ascontiguousarray(small.transpose(2, 0, 1)).astype(np.float16)


# ---------------------------------------------------------------- OpenCV (CPU) backends


class OpenCVFlow:
    """DIS or Farneback on grayscale frames; one instance per worker process."""

    def __init__(self, name: str):
        if name not in CPU_BACKENDS:
            raise FlowError(f"{name} is not an OpenCV backend")
        self.name = name
        self._dis = None
        if name == "dis":
            self._dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)

    @staticmethod
    def prepare(frame: np.ndarray, bgr: bool = False) -> np.ndarray:
        """RGB (BGR with ``bgr``) frame -> what :meth:`calc` takes (grayscale); once per frame."""
        return cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY if bgr else cv2.COLOR_RGB2GRAY)

    def calc(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Flow (H, W, 2) from prepared frame ``a`` to prepared frame ``b``."""
        if self._dis is not None:
            return self._dis.calc(a, b, None)
        return cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 15, 3, 5, 1.2, 0)

    def pairs(self, frames: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Flow (H, W, 2) from each frame to the next, for consecutive RGB frames."""
        gray = [self.prepare(f) for f in frames]
        return [self.calc(a, b) for a, b in zip(gray[:-1], gray[1:], strict=True)]


# ---------------------------------------------------------------- RAFT (torchvision)


@dataclass(frozen=True)
class RaftConfig:
    name: str = "raft-large"
    weights: str | None = None  # path, "none" for random weights, None for the hub cache
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast)
    batch: int = 8
    iters: int = 12


def hub_weight_path(name: str) -> Path:
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / RAFT_WEIGHT_FILES[name]


def resolve_raft_weights(cfg: RaftConfig) -> str | None:
    """The weight file RAFT will load, or None for random weights; one-line error if missing."""
    if cfg.weights == "none":
        return None
    path = Path(cfg.weights) if cfg.weights else hub_weight_path(cfg.name)
    if not path.is_file():
        raise FlowError(
            f"RAFT weights not found: place torchvision's {RAFT_WEIGHT_FILES[cfg.name]} at {path} "
            "(or pass --flow-weights PATH; --flow-weights none uses random weights, for tests only)"
        )
    return str(path)


def file_sha256(path: str | None) -> str | None:
    if path is None:
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class RaftFlow:
    """torchvision RAFT, batched over pairs, optional bf16/fp16 autocast."""

    def __init__(self, cfg: RaftConfig, device: str | None = None):
        import torch
        from torchvision.models import optical_flow

        self.cfg = cfg
        self.torch = torch
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        build = optical_flow.raft_large if cfg.name == "raft-large" else optical_flow.raft_small
        path = resolve_raft_weights(cfg)
        if path is None:
            warnings.warn("RAFT with random weights: flow values are meaningless", stacklevel=2)
            torch.manual_seed(0)
            model = build(weights=None, progress=False)
        else:
            model = build(weights=None, progress=False)
            state = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        self.model = model.eval().to(self.device)
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, int(os.environ.get("FRAMEBRIDGE_TORCH_THREADS", "1"))))

    def _to_tensor(self, frames: Sequence[np.ndarray]):
        t = self.torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float()
        t = (t / 127.5 - 1.0).to(self.device)
        if min(t.shape[-2:]) < RAFT_MIN_SIDE:  # RAFT's correlation pyramid needs >= 128 px
            t = self.torch.nn.functional.interpolate(
                t, size=(RAFT_MIN_SIDE, RAFT_MIN_SIDE), mode="bilinear", align_corners=False
            )
        return t

    def pairs(self, frames: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Flow (H, W, 2) from each frame to the next, computed ``batch`` pairs at a time."""
        torch = self.torch
        out: list[np.ndarray] = []
        n = len(frames) - 1
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.cfg.precision)
        for s in range(0, n, self.cfg.batch):
            e = min(n, s + self.cfg.batch)
            a = self._to_tensor(frames[s:e])
            b = self._to_tensor(frames[s + 1 : e + 1])
            with (
                torch.inference_mode(),
                torch.autocast(
                    self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None
                ),
            ):
                flows = self.model(a, b, num_flow_updates=self.cfg.iters)[-1]
            flows = flows.float()
            h, w = frames[0].shape[:2]
            if flows.shape[-2:] != (h, w):  # back to the frames' resolution and pixel units
                flows = torch.nn.functional.interpolate(
                    flows, size=(h, w), mode="bilinear", align_corners=False
                )
                flows[:, 0] *= w / RAFT_MIN_SIDE
                flows[:, 1] *= h / RAFT_MIN_SIDE
            out.extend(flows.permute(0, 2, 3, 1).cpu().numpy())
        return out


def make_flow(backend: str, raft: RaftConfig | None = None, device: str | None = None):
    if backend in CPU_BACKENDS:
        return OpenCVFlow(backend)
    if backend in RAFT_BACKENDS:
        return RaftFlow(raft or RaftConfig(name=backend), device)
    raise FlowError(f"unknown flow backend {backend!r}")
