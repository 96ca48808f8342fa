"""bench/gpu_check.sh runs on an image with torch, torchvision, OpenCV, numpy, pyarrow and tqdm
only: the modules it runs import nothing else (ptflops, webdataset, Ray, ... are blocked)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = ("torch", "torchvision", "cv2", "numpy", "pyarrow", "tqdm")

CHILD = f"""
import importlib.abc, sys
import {", ".join(ALLOWED)}  # what the image has, with their own dependencies
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        top = name.split(".")[0]
        if top in sys.stdlib_module_names or top in ("train", "pipeline", "bench", "shards_spec"):
            return None
        raise ImportError(f"the GPU image has no {{name}}")
sys.meta_path.insert(0, Block())
sys.path.insert(0, {str(ROOT)!r})
import importlib
for module in sys.argv[1:]:
    importlib.import_module(module)
"""


def _scripts() -> list[str]:
    """The bench modules gpu_check.sh runs, as module names."""
    text = (ROOT / "bench" / "gpu_check.sh").read_text()
    return [f"bench.{name}" for name in re.findall(r"python3 bench/(\w+)\.py", text)]


def test_gpu_check_imports_only_what_the_image_has():
    scripts = _scripts()
    assert {"bench.raft_throughput", "bench.gpu_train"} <= set(scripts)
    done = subprocess.run(
        [sys.executable, "-c", CHILD, *scripts], capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_blocker_blocks():
    """The check itself: a module the image lacks is refused."""
    done = subprocess.run(
        [sys.executable, "-c", CHILD, "ptflops"], capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode != 0 and "the GPU image has no ptflops" in done.stderr
