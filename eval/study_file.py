"""A study file (TOML) read and checked: `read_study` gives the `Study` that `eval/study.py` runs.

Its tables and keys are checked by their full names (a misspelling is an error naming the
nearest valid one); cell options are ``python -m train`` options by their full names, without
the dashes, with values of the option's type. ``EVAL_DEFAULTS`` are the ``[evaluation]``
settings a study leaves out.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from train import options as train_options
from train.objectives import METHODS

from .features import EXTRACTORS
from .runs import RunError

TABLES = ("name", "build", "budget", "evaluation", "train", "cell", "questions")
CELL_KEYS = ("name", "images", "seeds")  # a cell's own keys; the others are train options
EVAL_DEFAULTS = {
    "val_points": 20,  # validation-loss points per cell (fixed t and eps)
    "diag_points": 5,  # gradient-variance estimates per cell
    "points": 4,  # checkpoints sampled and scored per cell
    "samples": 256,
    "ddim_steps": 25,
    "clip_x0": True,  # eval sample's default (see its --clip-x0)
    "eta": 0.0,  # DDIM eta of the samples (0: deterministic)
    "extractor": "offline",
    "n_ref": 2048,
    "splits": ["train", "val"],
    "batch": 64,
}
# the evaluation settings that make a cell's samples and scores (the others shape its plan)
EVAL_OUTPUT = ("samples", "ddim_steps", "clip_x0", "eta", "extractor", "n_ref", "splits", "batch")


class StudyError(RunError):
    """A study file or folder that cannot be run (one-line message)."""


@dataclass
class Study:
    """A parsed study file."""

    path: Path
    name: str
    build: Path
    pipeline: list[list[str]]
    images: int
    evaluation: dict[str, Any]
    train: dict[str, Any]
    seeds: list[int]
    grid: list[dict[str, Any]]
    questions: dict[str, Any]


def _need(table: dict, key: str, kind: type | tuple, where: str) -> Any:
    if key not in table:
        raise StudyError(f"{where}: missing {key!r}")
    value = table[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise StudyError(f"{where}: {key!r} has the wrong type ({type(value).__name__})")
    return value


def _toml():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise StudyError(
                "reading a study file needs Python 3.11+ or `pip install tomli`"
            ) from None
    return tomllib


def unknown_keys(table: dict, known, where: str, tables: bool = False) -> None:
    """StudyError naming the first key of ``table`` not in ``known`` and the nearest known one."""
    extra = sorted(k for k in table if k not in known)
    if not extra:
        return
    key, known = extra[0], sorted(known)
    kind = "table" if tables and isinstance(table[key], dict) else "key"
    near = difflib.get_close_matches(key, known, n=1)
    if near:
        hint = f"; did you mean {near[0]!r}?"
    else:
        hint = f" (known: {', '.join(known)})" if len(known) <= 12 else ""
    more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
    raise StudyError(f"{where}: unknown {kind} {key!r}{more}{hint}")


@functools.cache
def train_flags() -> dict[str, argparse.Action]:
    """``python -m train``'s options by their full names with ``_`` for ``-`` (``lam`` too)."""
    flags: dict[str, argparse.Action] = {}
    for action in train_options.parser()._actions:
        for flag in action.option_strings:
            if flag.startswith("--") and flag != "--help":
                flags[flag[2:].replace("-", "_")] = action
    flags.setdefault("lam", flags.get("lambda"))
    return flags


def _check_option(key: str, value: Any, where: str) -> None:
    """StudyError unless ``value`` is what train's option ``key`` takes (finite numbers)."""
    action = train_flags()[key]
    if action.nargs == 0:  # a switch: true or false
        ok, want = isinstance(value, bool), "true or false"
    elif action.type is int:
        ok, want = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif action.type is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        want = "a finite number"
    elif callable(action.type) and action.type is not str:  # a parser of its own: ask it
        ok, want = _parses(action.type, value), f"a value --{key.replace('_', '-')} takes"
    else:
        ok, want = isinstance(value, str), "a string"
    if ok and action.choices is not None and value not in action.choices:
        ok, want = False, f"one of {', '.join(map(str, action.choices))}"
    if not ok:
        raise StudyError(f"{where}: {key} must be {want}, got {value!r}")


def _parses(parse: Callable[[str], Any], value: Any) -> bool:
    """Whether an option's own type function takes ``value`` as the study passes it (text)."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return False
    try:
        parse(str(value))
    except (argparse.ArgumentTypeError, ValueError, TypeError):
        return False
    return True


def _table(data: dict, key: str, where: str) -> dict:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise StudyError(f"{where}: [{key}] must be a table")
    return value


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check_evaluation(data: dict, where: str) -> dict[str, Any]:
    evaluation = {**EVAL_DEFAULTS, **_table(data, "evaluation", where)}
    where = f"{where} [evaluation]"
    unknown_keys(evaluation, EVAL_DEFAULTS, where)
    for key in ("points", "samples", "ddim_steps", "n_ref", "batch"):
        if not _positive_int(evaluation[key]):
            raise StudyError(f"{where}: {key} must be a positive integer")
    for key in ("samples", "n_ref"):  # a Frechet distance needs two of each
        if evaluation[key] < 2:
            raise StudyError(f"{where}: {key} must be at least 2")
    for key in ("val_points", "diag_points"):
        if not _positive_int(evaluation[key]) and evaluation[key] != 0:
            raise StudyError(f"{where}: {key} must be a non-negative integer")
    if not isinstance(evaluation["clip_x0"], bool):
        raise StudyError(f"{where}: clip_x0 must be true or false")
    eta = evaluation["eta"]
    if isinstance(eta, bool) or not isinstance(eta, int | float) or not 0 <= eta <= 10:  # not nan
        raise StudyError(f"{where}: eta must be a number in [0, 10]")
    if evaluation["extractor"] not in EXTRACTORS:
        names = " or ".join(repr(name) for name in EXTRACTORS)
        raise StudyError(f"{where}: extractor must be {names}")
    splits = evaluation["splits"]
    if not isinstance(splits, list) or not splits or not all(isinstance(x, str) for x in splits):
        raise StudyError(f"{where}: splits must be a non-empty list of split names")
    return evaluation


def _check_seeds(seeds: Any, where: str) -> list[int]:
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)
        or len(set(seeds)) != len(seeds)
    ):
        raise StudyError(f"{where}: seeds must be a list of distinct integers >= 0")
    return seeds


def cell_seeds(study: Study, entry: dict[str, Any]) -> list[int]:
    """The seeds a cell runs: its own ``seeds``, or the study's."""
    return entry.get("seeds", study.seeds)


def _check_cells(
    data: dict, train: dict, where: str, reserved: frozenset[str]
) -> list[dict[str, Any]]:
    grid = data.get("cell", [])
    if not isinstance(grid, list) or not grid:
        raise StudyError(f"{where}: no [[cell]] tables")
    names: set[str] = set()
    out = []
    for i, raw in enumerate(grid):
        cw = f"{where} [[cell]] #{i + 1}"
        if not isinstance(raw, dict):
            raise StudyError(f"{cw}: not a table")
        cell = {k.replace("-", "_"): v for k, v in raw.items()}
        if len(cell) != len(raw):
            raise StudyError(f"{cw}: a key is given twice (with - and _)")
        name = _need(cell, "name", str, cw)
        cw = f"{where} [[cell]] {name!r}"
        method = _need(cell, "method", str, cw)
        if method not in METHODS:
            raise StudyError(f"{cw}: unknown method {method!r} (one of {', '.join(METHODS)})")
        if "seeds" in cell:
            _check_seeds(cell["seeds"], cw)
        if "images" in cell and not _positive_int(cell["images"]):
            raise StudyError(f"{cw}: images must be a positive integer")
        if not _positive_int({**train, **cell}.get("batch")):
            raise StudyError(f"{cw}: set batch to a positive integer (here or in [train])")
        if name in names or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise StudyError(f"{cw}: name {name!r} is repeated or not a plain folder name")
        names.add(name)
        clash = (set(cell) | set(train)) & reserved
        if clash:
            raise StudyError(f"{cw}: {sorted(clash)} are set by the study runner")
        if {"lam", "lambda"} <= set(cell) | set(train):
            raise StudyError(f"{cw}: give lambda once (lam and lambda are the same option)")
        _check_options(cell, cw, CELL_KEYS, reserved)
        out.append(cell)
    return out


def _check_options(table: dict, where: str, own: tuple[str, ...], reserved: frozenset[str]) -> None:
    """Every key of a [train] or [[cell]] table is one of ``own`` or a train option by its full
    name (never an abbreviation), with a value of the option's type; a ``reserved`` key is
    refused by `_check_cells`, not named unknown here."""
    options = set(train_flags()) - reserved
    unknown_keys(table, options | set(own) | (set(table) & reserved), where)
    for key, value in table.items():
        if key in options:
            _check_option(key, value, where)


ROLES = ("baseline", "step_matched", "method", "adjacent", "seq")
LIST_ROLES = ("lambdas", "readings")  # lists of cells: lambda values; readings of the method


def _check_questions(data: dict, names: set[str], splits: list[str], where: str) -> dict[str, Any]:
    questions = _table(data, "questions", where)
    where = f"{where} [questions]"
    unknown_keys(questions, {*ROLES, *LIST_ROLES, "split"}, where)
    if questions.get("split", splits[0]) not in splits:  # the frames the answers' metrics use
        raise StudyError(f"{where}: split must be one of the evaluated splits {splits}")
    listed = []
    for role in LIST_ROLES:
        cells = questions.get(role, [])
        if not isinstance(cells, list):
            raise StudyError(f"{where}: {role} must be a list of cell names")
        listed += cells
    for value in [*(questions.get(r) for r in ROLES if r in questions), *listed]:
        if not isinstance(value, str) or value not in names:
            raise StudyError(f"{where}: {value!r} is not the name of a [[cell]]")
    return questions


def read_study(path: Path | str, out: Path | str, reserved: frozenset[str]) -> Study:
    """Parse and check a study file; the build path is relative to ``out``. ``reserved``: the
    train options the runner sets for every cell, which a study may not set."""
    path, out, tomllib = Path(path), Path(out), _toml()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StudyError(f"{path}: no such study file") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise StudyError(f"{path}: not a readable TOML file ({exc})") from None
    where = str(path)
    unknown_keys(data, TABLES, where, tables=True)
    build = _need(data, "build", dict, where)
    unknown_keys(build, ("path", "pipeline"), f"{where} [build]")
    budget = _need(data, "budget", dict, where)
    unknown_keys(budget, ("images",), f"{where} [budget]")
    images = _need(budget, "images", int, f"{where} [budget]")
    if images <= 0:
        raise StudyError(f"{where} [budget]: images must be positive")
    train = {k.replace("-", "_"): v for k, v in _table(data, "train", where).items()}
    seeds = _check_seeds(train.pop("seeds", [0]), f"{where} [train]")
    grid = _check_cells(data, train, where, reserved)
    _check_options(train, f"{where} [train]", (), reserved)
    pipeline = build.get("pipeline", [])
    if not isinstance(pipeline, list) or not all(
        isinstance(c, list) and c and all(isinstance(a, str) for a in c) for c in pipeline
    ):
        raise StudyError(f"{where} [build]: pipeline must be a list of argument lists")
    evaluation = _check_evaluation(data, where)
    return Study(
        path=path,
        name=str(data.get("name", path.stem)),
        build=out / _need(build, "path", str, f"{where} [build]"),
        pipeline=pipeline,
        images=images,
        evaluation=evaluation,
        train=train,
        seeds=list(seeds),
        grid=grid,
        questions=_check_questions(data, {c["name"] for c in grid}, evaluation["splits"], where),
    )
