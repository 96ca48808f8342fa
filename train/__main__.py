"""`python -m train` / `torchrun ... -m train`: options -> run, ended as every command ends
(`shards_spec.cli`: one-line errors, exit 2 for bad input; ``--debug`` for the traceback)."""

from __future__ import annotations

import os
import sys

from shards_spec import SpecError
from shards_spec.cli import ctrl_c_ends_quietly, run_command, stop_on_sigterm


@ctrl_c_ends_quietly  # the imports below take seconds
def main(argv: list[str] | None = None) -> int:
    from train.checkpoint import CheckpointError
    from train.data import DataError
    from train.folder_lock import FolderBusy
    from train.loop import TrainingError, train
    from train.options import parse_command

    cfg, debug = parse_command(argv)
    rank = os.environ.get("RANK")

    def body() -> None:
        with stop_on_sigterm():  # SIGTERM stops the loader's workers too, not the process only
            train(cfg)

    return run_command(
        body,
        errors=(SpecError, DataError, CheckpointError, FolderBusy, ValueError),
        failed=lambda exc: isinstance(exc, TrainingError),
        prefix=f"rank {rank}: " if rank not in (None, "0") else "",
        debug=debug,
    )


if __name__ == "__main__":
    sys.exit(main())
