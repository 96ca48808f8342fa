"""metrics.jsonl: one JSON object per line, appended by rank 0; read back across resumes."""

from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path
from typing import Any

METRICS_NAME = "metrics.jsonl"


class MetricsWarning(UserWarning):
    """A line of metrics.jsonl that is not a record (torn by a power loss, or garbled)."""


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; a skipped step records its loss as null
    return value


class MetricsLog:
    """Append-only writer; a no-op on ranks other than 0.

    A file whose last line was cut short (a power loss during a write) is continued on a new
    line, so the torn line stays one bad line instead of swallowing the next record.
    """

    def __init__(self, out: Path, enabled: bool) -> None:
        self.path = Path(out) / METRICS_NAME
        self._file = None
        if enabled:
            torn = _ends_mid_line(self.path)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
            if torn:
                print(
                    f"warning: {self.path} ends in a torn line (a write cut short); it is left "
                    "out and the records go on from the next line",
                    file=sys.stderr,
                )
                self._file.write("\n")

    def write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            return
        line = json.dumps({k: _clean(v) for k, v in record.items()}, sort_keys=True)
        self._file.write(line + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _ends_mid_line(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            if f.seek(0, 2) == 0:
                return False
            f.seek(-1, 2)
            return f.read(1) != b"\n"
    except FileNotFoundError:
        return False


def read_metrics(path: Path | str) -> list[dict[str, Any]]:
    """The records of a run as its checkpoints saw them.

    A ``{"kind": "resume", "step": N}`` record drops the earlier records past step N (written
    after the checkpoint the run resumed from) and any earlier ``finished`` record. A line
    that is not a record (a torn last line, not UTF-8 or not JSON, not an object, no whole
    ``step``) is skipped with a `MetricsWarning` naming the file and the line number.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_NAME
    records: list[dict[str, Any]] = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            record, problem = _parse(raw)
            if record is None:
                warnings.warn(f"{path} line {number}: {problem}; skipped", MetricsWarning, 2)
                continue
            if record.get("kind") == "resume":
                step = record["step"]
                records = [r for r in records if r["step"] <= step and r.get("kind") != "finished"]
            records.append(record)
    return records


def _parse(raw: bytes) -> tuple[dict[str, Any] | None, str]:
    """One line as a record, or None and why it is not one."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, "not UTF-8 text"
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        return None, "not JSON (a torn or garbled line)"
    if not isinstance(record, dict):
        return None, f"not a JSON object ({text.strip()[:40]})"
    step = record.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        return None, f"no whole step number (step {step!r})"
    return record, ""


def steps(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The per-step records (those without a ``kind``)."""
    return [r for r in records if "kind" not in r]
