"""`python -m train` / `torchrun ... -m train`: options -> run, errors as one line."""

from __future__ import annotations

import os
import sys

from shards_spec import SpecError


def main(argv: list[str] | None = None) -> int:
    from train.checkpoint import CheckpointError
    from train.data import DataError
    from train.loop import TrainingError, run
    from train.options import parse

    cfg = parse(argv)
    rank = os.environ.get("RANK")
    prefix = f"rank {rank}: " if rank not in (None, "0") else ""
    try:
        run(cfg)
    except (SpecError, DataError, CheckpointError, ValueError) as exc:
        print(f"{prefix}error: {exc}", file=sys.stderr)
        return 2
    except TrainingError as exc:
        print(f"{prefix}error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
