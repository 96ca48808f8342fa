"""metrics.jsonl: one JSON object per line, appended by rank 0; read back across resumes."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

METRICS_NAME = "metrics.jsonl"


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; a skipped step records its loss as null
    return value


class MetricsLog:
    """Append-only writer; a no-op on ranks other than 0."""

    def __init__(self, out: Path, enabled: bool) -> None:
        self.path = Path(out) / METRICS_NAME
        self._file = open(self.path, "a", encoding="utf-8") if enabled else None  # noqa: SIM115

    def write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            return
        line = json.dumps({k: _clean(v) for k, v in record.items()}, sort_keys=True)
        self._file.write(line + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def read_metrics(path: Path | str) -> list[dict[str, Any]]:
    """The records of a run as its checkpoints saw them.

    A ``{"kind": "resume", "step": N}`` record drops the earlier records past step N (written
    after the checkpoint the run resumed from); a torn last line is ignored.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_NAME
    records: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("kind") == "resume":
                records = [r for r in records if r.get("step", 0) <= record["step"]]
            records.append(record)
    return records


def steps(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The per-step records (those without a ``kind``)."""
    return [r for r in records if "kind" not in r]
