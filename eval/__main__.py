"""``python -m eval``: sample, fid, generation, watch, report, study, export, tensorboard."""

from __future__ import annotations

import argparse
import sys

from shards_spec import SpecError
from shards_spec.cli import add_debug_flag, ctrl_c_ends_quietly, run_command
from train.folder_lock import FolderBusy


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m eval`` parser with its subcommands."""
    # imported here, not at the top (torch, clean-fid, matplotlib: seconds), so that a Ctrl-C
    # while they import ends quietly (`main`)
    from . import generation, metrics, report, sample, study, watch

    parser = argparse.ArgumentParser(prog="python -m eval", description=__doc__)
    add_debug_flag(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    smp = sub.add_parser("sample", help="DDIM samples of a run's checkpoint as numbered PNGs")
    sample.add_arguments(smp)
    smp.set_defaults(func=sample.run)
    from . import export  # diffusers itself is imported only when the command runs

    exp = sub.add_parser("export", help="a run's checkpoint as a diffusers pipeline folder")
    export.add_arguments(exp)
    exp.set_defaults(func=export.run)
    fid = sub.add_parser("fid", help="FID/KID/P/R/D/C of sample PNGs against a build's frames")
    metrics.add_arguments(fid)
    fid.set_defaults(func=metrics.run)
    gen = sub.add_parser(
        "generation", help="samples against noise and real held-out frames: FD, P/R, background"
    )
    generation.add_arguments(gen)
    gen.set_defaults(func=generation.run)
    wat = sub.add_parser("watch", help="sample and score each checkpoint of a run as it lands")
    watch.add_arguments(wat)
    wat.set_defaults(func=watch.run)
    rep = sub.add_parser("report", help="Table 1, equal-budget comparisons and plots for runs")
    report.add_arguments(rep)
    rep.set_defaults(func=report.run)
    stu = sub.add_parser("study", help="a grid of runs from a study file: train, evaluate, report")
    study.add_arguments(stu)
    stu.set_defaults(func=study.run)
    from . import tensorboard  # tensorboard itself is imported only when the command runs

    tbd = sub.add_parser("tensorboard", help="a run's metrics and evaluations as RUN/tb events")
    tensorboard.add_arguments(tbd)
    tbd.set_defaults(func=tensorboard.run)
    return parser


@ctrl_c_ends_quietly
def main(argv: list[str] | None = None) -> int:
    """Run a subcommand, ended as every command ends (`shards_spec.cli`: one-line ``error:
    ...`` on stderr and exit 2 for bad input; ``--debug`` for the traceback)."""
    args = build_parser().parse_args(argv)
    from .metrics import MetricsError
    from .runs import RunError

    return run_command(
        lambda: args.func(args),
        errors=(RunError, MetricsError, SpecError, FolderBusy),
        debug=args.debug,
    )


if __name__ == "__main__":
    sys.exit(main())
