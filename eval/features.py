"""Image features for FID/KID/PRDC: clean-fid preprocessing and two extractors.

Every image, sample or reference, goes through clean-fid's ``clean`` mode preprocessing
(``cleanfid.resize.build_resizer("clean")``: PIL bicubic on float32 channels to 299 x 299,
values in [0, 255]) and then an extractor:

- ``inception``: clean-fid's ``InceptionV3W`` (the TorchScript Inception-v3 of
  ``inception-2015-12-05.pt``, 2048-d pool features), loaded from a local file only; nothing is
  ever downloaded.
- ``offline``: a small fixed convolutional network with seeded weights (256-d), computed in
  float32 on the CPU, for tests and offline smoke runs. Its distances are not FID.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from cleanfid.downloads_helper import inception_url
from cleanfid.fid import get_batch_features
from cleanfid.inception_torchscript import InceptionV3W
from cleanfid.resize import build_resizer
from PIL import Image
from torch import nn
from tqdm import tqdm

EXTRACTORS = ("inception", "offline")
INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = inception_url  # where clean-fid would download it from
CLEANFID_CACHE_DIR = "/tmp"  # clean-fid's own default folder for INCEPTION_FILE (non-Windows)
OFFLINE_SEED = 20240501
OFFLINE_VERSION = "offline-v1"  # bump when the offline network's architecture or weights change
RESIZE_SIZE = 299


class FeatureError(ValueError):
    """An image or extractor that cannot be used (one-line message)."""


# --------------------------------------------------------------------------- images


def list_images(folder: str | os.PathLike) -> list[Path]:
    """The ``*.png`` files directly in `folder`, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FeatureError(f"sample folder {folder} does not exist or is not a folder")
    return sorted((p for p in folder.glob("*.png") if p.is_file()), key=lambda p: p.name)


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) of a PNG from its header, checking it opens as an 8-bit RGB or L PNG."""
    try:
        with Image.open(path, formats=["PNG"]) as img:
            mode, size = img.mode, img.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise FeatureError(f"{path}: not a readable PNG image ({_first_line(exc)})") from None
    _check_mode(path, mode)
    return size


def check_images(paths: Sequence[Path]) -> tuple[int, int]:
    """Check every file's header; return the common (width, height) or raise on mixed sizes."""
    first: tuple[int, int] | None = None
    for path in paths:
        size = image_size(path)
        if first is None:
            first = size
        elif size != first:
            raise FeatureError(
                f"images of mixed sizes in {path.parent}: {paths[0].name} is "
                f"{first[0]}x{first[1]}, {path.name} is {size[0]}x{size[1]}"
            )
    if first is None:
        raise FeatureError("no images")
    return first


def load_image(path: Path) -> np.ndarray:
    """Decode a PNG to uint8 RGB ``HxWx3`` (8-bit RGB or greyscale PNGs only)."""
    try:
        with Image.open(path, formats=["PNG"]) as img:
            img.load()
            _check_mode(path, img.mode)
            return np.asarray(img.convert("RGB")).copy()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        if isinstance(exc, FeatureError):
            raise
        raise FeatureError(f"{path}: not a readable PNG image ({_first_line(exc)})") from None


def _check_mode(path: Path, mode: str) -> None:
    if mode not in ("RGB", "L"):
        raise FeatureError(f"{path}: PNG mode {mode}, expected 8-bit RGB (or greyscale L)")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# --------------------------------------------------------------------------- extractors


@dataclass
class Extractor:
    """A feature extractor: ``model`` maps clean-resized ``Nx3x299x299`` [0, 255] to ``NxD``."""

    name: str  # "inception" or "offline"
    version: str  # identifies the weights and code; part of the reference cache key
    model: nn.Module
    device: torch.device
    dim: int


class OfflineNet(nn.Module):
    """Fixed small CNN: 2x average pool, 4 conv+ReLU stages to 128 channels, mean+max -> 256-d.

    Weights come from a seeded NumPy PCG64 generator (He-normal, zero biases), so two
    constructions with the same seed are bit-identical regardless of torch's RNG or init code.
    Input: ``Nx3x299x299`` float32 in [0, 255], normalised like clean-fid's Inception
    (``(x - 128) / 128``).
    """

    channels = (3, 16, 32, 64, 128)

    def __init__(self, seed: int = OFFLINE_SEED) -> None:
        super().__init__()
        c = self.channels
        self.body = nn.Sequential(
            nn.AvgPool2d(2),  # 299 -> 149
            nn.Conv2d(c[0], c[1], 5, stride=2, padding=2),  # -> 75
            nn.ReLU(),
            nn.Conv2d(c[1], c[2], 3, stride=2, padding=1),  # -> 38
            nn.ReLU(),
            nn.Conv2d(c[2], c[3], 3, stride=2, padding=1),  # -> 19
            nn.ReLU(),
            nn.Conv2d(c[3], c[4], 3, stride=2, padding=1),  # -> 10
            nn.ReLU(),
        )
        self._init_weights(seed)
        self.requires_grad_(False)
        self.eval()

    def _init_weights(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        for layer in self.body:
            if isinstance(layer, nn.Conv2d):
                shape = tuple(layer.weight.shape)
                fan_in = int(np.prod(shape[1:]))
                w = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
                layer.weight.data = torch.from_numpy(w.astype(np.float32))
                layer.bias.data = torch.zeros(shape[0], dtype=torch.float32)

    @property
    def dim(self) -> int:
        """Feature dimension (256)."""
        return 2 * self.channels[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``Nx3x299x299`` [0, 255] -> ``Nx256`` (channel means then channel maxima)."""
        h = self.body((x.float() - 128.0) / 128.0)
        return torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)


def offline_extractor(seed: int = OFFLINE_SEED) -> Extractor:
    """The deterministic offline extractor (always float32 on the CPU)."""
    net = OfflineNet(seed)
    version = OFFLINE_VERSION if seed == OFFLINE_SEED else f"{OFFLINE_VERSION}-seed{seed}"
    return Extractor(
        name="offline", version=version, model=net, device=torch.device("cpu"), dim=net.dim
    )


def inception_candidates(weights: str | os.PathLike | None = None) -> list[Path]:
    """Where the Inception file is looked for, in order.

    With `weights` (a file, or a folder holding ``inception-2015-12-05.pt``) only there;
    otherwise clean-fid's cache (``/tmp/inception-2015-12-05.pt``) then
    ``$TORCH_HOME/hub/checkpoints/inception-2015-12-05.pt``.
    """
    if weights is not None:
        path = Path(weights).expanduser()
        return [path / INCEPTION_FILE if path.is_dir() else path]
    hub = Path(torch.hub.get_dir())  # $TORCH_HOME/hub (default ~/.cache/torch/hub)
    return [Path(CLEANFID_CACHE_DIR) / INCEPTION_FILE, hub / "checkpoints" / INCEPTION_FILE]


def find_inception(weights: str | os.PathLike | None = None) -> Path:
    """The local Inception file, or a one-line FeatureError saying where to put it."""
    candidates = inception_candidates(weights)
    for path in candidates:
        if path.is_file():
            return path
    where = " or ".join(str(p) for p in candidates)
    raise FeatureError(
        f"Inception weights {INCEPTION_FILE} not found (looked at {where}); nothing is "
        f"downloaded: fetch it from {INCEPTION_URL} and put it at {candidates[0]}"
        + ("" if weights is not None else " or pass --inception-weights PATH")
    )


class _InceptionFromFile(InceptionV3W):
    """clean-fid's InceptionV3W loaded from a file of any name (no download)."""

    def __init__(self, file: Path) -> None:
        nn.Module.__init__(self)
        self.base = torch.jit.load(str(file), map_location="cpu").eval()
        self.layers = self.base.layers
        self.resize_inside = False


def _load_inception(file: Path) -> InceptionV3W:
    """clean-fid's InceptionV3W from `file` (its own loader when the file has its usual name)."""
    if file.name == INCEPTION_FILE:
        try:
            return InceptionV3W(str(file.parent), download=False, resize_inside=False)
        except RuntimeError:  # e.g. tensors saved on a device this host lacks
            pass
    return _InceptionFromFile(file)  # loads with map_location="cpu"


def inception_extractor(weights: str | os.PathLike | None = None, device: str = "cpu") -> Extractor:
    """clean-fid's InceptionV3W (clean mode: resized outside the network) from a local file."""
    file = find_inception(weights)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation
            model = _load_inception(file)
    except AttributeError as exc:  # TorchScript, without clean-fid's ``layers``
        raise FeatureError(f"{file}: {_NOT_INCEPTION}; {_first_line(exc)}") from None
    except (RuntimeError, OSError, ValueError) as exc:
        raise FeatureError(
            f"{file}: cannot load the Inception model ({_first_line(exc)})"
        ) from None
    dev = torch.device(device)
    model = model.to(dev).eval()
    _check_inception(file, model, dev)
    version = f"{INCEPTION_FILE}:{file.stat().st_size}:clean-fid-{_cleanfid_version()}"
    return Extractor(name="inception", version=version, model=model, device=dev, dim=2048)


_NOT_INCEPTION = (
    f"not the expected Inception network (clean-fid's Inception-v3 of {INCEPTION_FILE}: "
    "1x2048 features of a 1x3x299x299 image)"
)


def _check_inception(file: Path, model: nn.Module, device: torch.device) -> None:
    """FeatureError unless the model maps a clean-resized image to one 2048-d feature vector."""
    dummy = torch.full((1, 3, RESIZE_SIZE, RESIZE_SIZE), 128.0, device=device)
    try:
        with torch.no_grad():
            out = model(dummy)
        got = f"it gives {tuple(out.shape)}" if isinstance(out, torch.Tensor) else "no tensor"
        ok = isinstance(out, torch.Tensor) and tuple(out.shape) == (1, 2048)
    except Exception as exc:  # a TorchScript error of any kind: not the network it should be
        got, ok = f"it fails on one: {_first_line(exc)}", False
    if not ok:
        raise FeatureError(f"{file}: {_NOT_INCEPTION}; {got}")


def _cleanfid_version() -> str:
    try:
        return metadata.version("clean-fid")
    except metadata.PackageNotFoundError:
        return "unknown"


_LOADED: dict[tuple[str, str, str], Extractor] = {}


def get_extractor(
    name: str, inception_weights: str | os.PathLike | None = None, device: str = "cpu"
) -> Extractor:
    """The extractor `name` (``inception`` or ``offline``), loaded once per process."""
    if name not in EXTRACTORS:
        raise FeatureError(f"unknown extractor {name!r} (choose from {', '.join(EXTRACTORS)})")
    if name == "offline":
        key = ("offline", "", "cpu")
    else:
        key = ("inception", str(find_inception(inception_weights).resolve()), str(device))
    if key not in _LOADED:
        if name == "offline":
            _LOADED[key] = offline_extractor()
        else:
            _LOADED[key] = inception_extractor(inception_weights, device)
    return _LOADED[key]


# --------------------------------------------------------------------------- features


_RESIZE: Callable[[np.ndarray], np.ndarray] = build_resizer("clean")


def clean_resize(image: np.ndarray) -> np.ndarray:
    """clean-fid ``clean`` preprocessing: uint8 ``HxWx3`` -> float32 ``299x299x3`` in [0, 255]."""
    return _RESIZE(image)


def _to_batch(images: list[np.ndarray]) -> torch.Tensor:
    """Resized ``HxWx3`` float32 images -> ``Nx3xHxW`` tensor (as clean-fid's ToTensor)."""
    return torch.from_numpy(np.stack(images).transpose(0, 3, 1, 2).copy())


def _workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def extract(
    images: Iterable[np.ndarray | Path],
    extractor: Extractor,
    batch: int = 64,
    total: int | None = None,
    desc: str = "features",
    progress: bool = True,
) -> np.ndarray:
    """Features (float32 ``NxD``) of images given as uint8 arrays or PNG paths, in order.

    Decoding and the clean resize run on a few threads; the extractor sees `batch` images at a
    time through clean-fid's ``get_batch_features``. A tqdm bar on stderr counts images.
    """
    feats: list[np.ndarray] = []
    bar = tqdm(total=total, desc=desc, unit="img", disable=not progress, leave=False)
    with ThreadPoolExecutor(_workers()) as pool:
        for chunk in _chunks(images, batch):
            resized = list(pool.map(_prepare, chunk))
            feats.append(_features(_to_batch(resized), extractor))
            bar.update(len(chunk))
    bar.close()
    if not feats:
        return np.zeros((0, extractor.dim), np.float32)
    return np.concatenate(feats).astype(np.float32, copy=False)


def _prepare(item: np.ndarray | Path) -> np.ndarray:
    image = load_image(item) if isinstance(item, Path) else item
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise FeatureError(f"expected a uint8 HxWx3 image, got {image.dtype} {image.shape}")
    return clean_resize(image)


def _features(batch: torch.Tensor, extractor: Extractor) -> np.ndarray:
    return get_batch_features(batch, extractor.model, extractor.device)


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    chunk: list = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
