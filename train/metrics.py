"""metrics.jsonl: one JSON object per line, appended by rank 0; read back across resumes.

With ``--tensorboard`` each record is mirrored as TensorBoard scalars into ``RUN/tb/train/``
(`EventWriter`, one event per record, written by the writer's own thread). A resumed run
continues the same curves: when the checkpoint it resumes from was written by a run that
mirrored every record, the new event file starts with a restart marker at the next step
(TensorBoard drops the points past the checkpoint that an interrupted run left); otherwise
the folder is written again from `read_metrics` first. ``RUN/tb/eval/`` is `eval watch`'s.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

METRICS_NAME = "metrics.jsonl"
TB_DIR = "tb"  # RUN/tb: TensorBoard event files (tensorboard --logdir RUN/tb)
TB_TRAIN = "train"  # RUN/tb/train: the metrics.jsonl scalars
TB_EVAL = "eval"  # RUN/tb/eval: eval watch's distances and sample grids
TB_MISSING = "tensorboard is not installed: pip install 'framebridge[tensorboard]'"
EVENTS_PREFIX = "events.out.tfevents."
# record fields that are where a record is, not what was measured: no scalar of their own
NOT_SCALARS = frozenset(
    ("step", "kind", "epoch", "images", "windows", "wall_s", "val_size", "probe_size")
)
NO_SCALARS_KINDS = ("resume", "finished")


class MetricsWarning(UserWarning):
    """A line of metrics.jsonl that is not a record (torn by a power loss, or garbled)."""


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; a skipped step records its loss as null
    return value


class TensorBoardMissing(ValueError):
    """``--tensorboard`` without the tensorboard package (one-line message)."""


class MetricsLog:
    """Append-only writer; a no-op on ranks other than 0.

    A file whose last line was cut short (a power loss during a write) is continued on a new
    line, so the torn line stays one bad line instead of swallowing the next record.

    ``resumed`` is the step of the checkpoint the run goes on from (None: a start from step
    0, whose stale event files in ``RUN/tb`` are removed). With ``tensorboard`` the records
    are mirrored into ``RUN/tb/train``; ``tb_complete`` says that the event files there hold
    every record up to ``resumed`` (the checkpoint's run mirrored them), else they are
    written again from metrics.jsonl.
    """

    def __init__(
        self,
        out: Path,
        enabled: bool,
        tensorboard: bool = False,
        resumed: int | None = None,
        tb_complete: bool = False,
    ) -> None:
        self.path = Path(out) / METRICS_NAME
        self._file = None
        self._tb: EventWriter | None = None
        if enabled:
            tb = Path(out) / TB_DIR
            if resumed is None:
                for name in (TB_TRAIN, TB_EVAL):
                    remove_events(tb / name)
            torn = _ends_mid_line(self.path)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
            if torn:
                print(
                    f"warning: {self.path} ends in a torn line (a write cut short); it is left "
                    "out and the records go on from the next line",
                    file=sys.stderr,
                )
                self._file.write("\n")
            if tensorboard:
                self._tb = _open_train_events(self.path, tb / TB_TRAIN, resumed, tb_complete)

    def write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            return
        clean = {k: _clean(v) for k, v in record.items()}
        line = json.dumps(clean, sort_keys=True)
        self._file.write(line + "\n")
        self._file.flush()
        if self._tb is not None:
            self._tb.record(clean)

    def sync(self) -> None:
        """Put the mirrored records on disk (before a checkpoint: a run resumed from it
        relies on its event files holding every record up to it)."""
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


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


# TensorBoard: tensorboard is imported here only when used (an optional extra)


def require_tensorboard() -> None:
    """Raise `TensorBoardMissing` (one line) unless the tensorboard package can be imported."""
    try:
        from tensorboard.compat.proto import event_pb2  # noqa: F401
        from tensorboard.summary.writer.event_file_writer import EventFileWriter  # noqa: F401
    except ImportError:
        raise TensorBoardMissing(TB_MISSING) from None


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """A metrics record's TensorBoard scalars: ``train/KEY`` for a step's record, ``KIND/KEY``
    for the others (``val/val_loss_ema``, ``diag/grad_var``); null values have no point."""
    kind = record.get("kind", "train")
    if kind in NO_SCALARS_KINDS or not isinstance(kind, str):
        return {}
    out = {}
    for key, value in record.items():
        if key in NOT_SCALARS or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(value):
            out[f"{kind}/{key}"] = float(value)
    return out


class EventWriter:
    """One new event file in ``folder``, written by tensorboard's background thread.

    With ``purge_step``, the file starts with a restart marker: TensorBoard then drops the
    points at and past that step of the folder's earlier files. Its name sorts after theirs
    (it waits for the clock's next second if one was made in this second), since TensorBoard
    reads a folder's files in name order.
    """

    def __init__(
        self, folder: Path | str, purge_step: int | None = None, flush_secs: float = 30.0
    ) -> None:
        require_tensorboard()
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._event, self._summary = event_pb2.Event, summary_pb2.Summary
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        _after_newest(folder)
        self._writer = EventFileWriter(str(folder), max_queue_size=1000, flush_secs=flush_secs)
        if purge_step is not None:
            start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
            self._writer.add_event(
                self._event(step=purge_step, wall_time=time.time(), session_log=start)
            )

    def _add(self, step: int, values: list, wall_time: float | None) -> None:
        wall = time.time() if wall_time is None else wall_time
        event = self._event(step=step, wall_time=wall, summary=self._summary(value=values))
        self._writer.add_event(event)

    def scalars(self, step: int, values: dict[str, float], wall_time: float | None = None) -> None:
        """One event with every scalar of ``values`` at ``step``."""
        if values:
            value = self._summary.Value
            self._add(step, [value(tag=k, simple_value=v) for k, v in values.items()], wall_time)

    def record(self, record: dict[str, Any], wall_time: float | None = None) -> None:
        """A metrics record's `scalars` at its step."""
        self.scalars(int(record["step"]), scalars(record), wall_time)

    def image(
        self, tag: str, step: int, png: bytes, size: tuple[int, int], wall_time: float | None = None
    ) -> None:
        """A PNG image (``size`` is its width and height) at ``step``."""
        width, height = size
        image = self._summary.Image(
            height=height, width=width, colorspace=3, encoded_image_string=png
        )
        self._add(step, [self._summary.Value(tag=tag, image=image)], wall_time)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def event_files(folder: Path | str) -> list[Path]:
    """The event files of ``folder`` (none when there is no such folder), in name order."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.startswith(EVENTS_PREFIX))


def remove_events(folder: Path | str) -> None:
    """Remove the event files of ``folder``, and the folder once it is empty."""
    for path in event_files(folder):
        path.unlink(missing_ok=True)
    folder = Path(folder)
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


def write_train_events(records: list[dict[str, Any]], writer: EventWriter, bar=None) -> None:
    """Every record's scalars; wall times from the records' training clock (``wall_s``),
    counted back from now."""
    walls = [r["wall_s"] for r in records if _number(r.get("wall_s"))]
    base = time.time() - (max(walls) if walls else 0.0)
    for record in records:
        wall = record.get("wall_s")
        writer.record(record, base + wall if _number(wall) else base)
        if bar is not None:
            bar.update(1)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _open_train_events(
    metrics: Path, folder: Path, resumed: int | None, complete: bool
) -> EventWriter:
    """The trainer's writer of ``RUN/tb/train``: a restart marker past the checkpoint when the
    folder holds every record up to it, else the folder written again from metrics.jsonl."""
    if resumed is not None and complete and event_files(folder):
        return EventWriter(folder, purge_step=resumed + 1)
    stale = folder.with_name(f".{folder.name}-stale-{os.getpid()}")
    if folder.exists():
        shutil.rmtree(stale, ignore_errors=True)
        os.replace(folder, stale)
    writer = EventWriter(folder)
    if resumed is not None and metrics.exists():
        records = [
            r for r in read_metrics(metrics) if r["step"] <= resumed and r.get("kind") != "finished"
        ]
        if records:
            print(
                f"tensorboard: writing the {len(records)} records of {metrics} up to step "
                f"{resumed} to {folder}",
                file=sys.stderr,
            )
        write_train_events(records, writer)
    shutil.rmtree(stale, ignore_errors=True)
    return writer


def _after_newest(folder: Path) -> None:
    """Wait, if need be, until a new event file's name (which starts with the time in whole
    seconds) sorts after the newest one in ``folder``."""
    stamps = []
    for path in event_files(folder):
        stamp = path.name[len(EVENTS_PREFIX) :].split(".", 1)[0]
        if stamp.isdigit():
            stamps.append(int(stamp))
    if stamps:
        wait = max(stamps) + 1 - time.time()
        if wait > 0:
            time.sleep(wait)
