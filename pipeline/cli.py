"""The `pipeline` command: synth, build, validate, inspect, subset."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pipeline.flow import BACKENDS
from pipeline.sources import SOURCES
from shards_spec.cli import add_debug_flag, ctrl_c_ends_quietly, run_command


def _add_build(p: argparse.ArgumentParser) -> None:
    from pipeline.build import BuildConfig

    d = BuildConfig()
    src = p.add_argument_group("source")
    src.add_argument("--src", default=d.src, help=f"{' | '.join(SOURCES)} (default: {d.src})")
    src.add_argument("--root", help="dataset root ($HANCO_ROOT or ./data/HanCo for handco)")
    src.add_argument("--mask", default=d.mask, help="handco mask: fg | hand | none")
    src.add_argument("--mask-root", help="video source: folder of mask videos/folders, same names")
    src.add_argument("--cameras", help="cameras to use, e.g. '0,2,4-7' (default all)")
    src.add_argument("--sequences", help="sequences to use, e.g. '0-99' (default all)")
    src.add_argument("--frame-stride", type=int, default=d.frame_stride)
    src.add_argument("--max-clips", type=int, help="use only the first N (sequence, camera) runs")
    src.add_argument(
        "--all-frames",
        action="store_true",
        help="handco: also use frames that are not green-screen (is_train false)",
    )
    src.add_argument("--synth-sequences", type=int, default=d.synth_sequences)
    src.add_argument("--synth-cameras", type=int, default=d.synth_cameras)
    src.add_argument("--synth-frames", type=int, default=d.synth_frames)
    proc = p.add_argument_group("processing")
    proc.add_argument("--size", type=int, default=d.size, help="output side, multiple of 8")
    proc.add_argument("--bg", default=d.bg, help="background fill: black | white | gray | R,G,B")
    proc.add_argument("--flow", default=d.flow, choices=BACKENDS)
    proc.add_argument("--flow-size", type=int, help="flow side (default: the source side)")
    proc.add_argument("--flow-weights", help="RAFT weight file; 'none' = random (tests only)")
    proc.add_argument(
        "--flow-precision", default=d.flow_precision, choices=("fp32", "bf16", "fp16")
    )
    proc.add_argument("--flow-batch", type=int, default=d.flow_batch, help="RAFT pairs per call")
    proc.add_argument("--raft-iters", type=int, default=d.raft_iters)
    proc.add_argument(
        "--keep-flow",
        type=int,
        default=0,
        metavar="SIDE",
        help="store flow fields downsampled to SIDE as flow.npy (0: off)",
    )
    proc.add_argument("--keep-mask", action="store_true", help="store mask{k}.png members")
    proc.add_argument("--window", type=int, default=d.window, help="frames per sample (K)")
    out = p.add_argument_group("output")
    out.add_argument("--out", default="shards", help="output folder (default: shards)")
    out.add_argument("--split-by", default=d.split_by, choices=("sequence", "subject"))
    out.add_argument("--val-fraction", type=float, default=d.val_fraction)
    out.add_argument("--max-windows", type=int, help="seeded subset of N train windows")
    out.add_argument("--seed", type=int, default=d.seed)
    out.add_argument("--shard-size", type=int, default=d.shard_size, help="samples per shard")
    run = p.add_argument_group("running")
    run.add_argument("--workers", type=int, help="cap on CPU parallelism (default: all cores)")
    run.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS or local)")
    run.add_argument("--flow-actors", type=int, help="RAFT actors (default: one per GPU)")
    run.add_argument("--overwrite", action="store_true", help="replace a build of another config")
    run.add_argument("--keep-work", action="store_true", help="keep OUT/.work after success")
    run.add_argument(
        "--drop-cache",
        action="store_true",
        help="remove OUT/.cache (decoded frames and flow per track) after success; kept by "
        "default so a rebuild with other plan options (seed, window, shard size, ...) "
        "reuses it",
    )
    run.add_argument("--no-progress", action="store_true")


def _run_build(args: argparse.Namespace) -> int:
    from pipeline.build import BuildConfig, Runtime, build, format_summary

    fields = BuildConfig.__dataclass_fields__
    cfg = BuildConfig(**{k: getattr(args, k) for k in fields if hasattr(args, k)})
    rt = Runtime(
        out=args.out,
        workers=args.workers,
        address=args.address,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        flow_actors=args.flow_actors,
        keep_work=args.keep_work,
        drop_cache=args.drop_cache,
    )
    print(format_summary(build(cfg, rt)))
    return 0


def _run_validate(args: argparse.Namespace) -> int:
    from shards_spec.validate import main as validate_main

    return validate_main([args.path])


def parser() -> argparse.ArgumentParser:
    from pipeline import inspect_build, subset, synth

    ap = argparse.ArgumentParser(
        prog="pipeline", description="Turn video datasets into flow-weighted frame-window shards."
    )
    add_debug_flag(ap)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("build", help="build shards from a dataset (Ray-parallel, resumable)")
    _add_build(p)
    p.set_defaults(func=_run_build)
    p = sub.add_parser("synth", help="write a synthetic dataset in the HanCo layout")
    synth.add_arguments(p)
    p.set_defaults(func=synth.run)
    p = sub.add_parser("validate", help="check a build against the shard spec")
    p.add_argument("path")
    p.set_defaults(func=_run_validate)
    p = sub.add_parser("inspect", help="counts, flow histogram and a PNG grid of a build")
    inspect_build.add_arguments(p)
    p.set_defaults(func=inspect_build.run)
    p = sub.add_parser("subset", help="derive a smaller build through the index")
    subset.add_arguments(p)
    p.set_defaults(func=subset.run)
    return ap


@ctrl_c_ends_quietly  # the imports below (Ray, torch) take seconds
def main(argv: Sequence[str] | None = None) -> int:
    """Run a subcommand, ended as every command ends (`shards_spec.cli`): bad input in one
    line with exit 2; an error inside a Ray task or actor in one line with exit 1."""
    from pipeline.build import BuildError
    from pipeline.flow import FlowError
    from pipeline.sources import SourceError
    from shards_spec.format import SpecError

    args = parser().parse_args(argv)
    errors = (BuildError, FlowError, SourceError, SpecError, ValueError, OSError)

    def message(e: BaseException) -> str:
        return (
            one_line(e) if isinstance(e, errors) else f"{one_line(e)} (--debug shows the traceback)"
        )

    return run_command(
        lambda: args.func(args),
        errors=errors,
        failed=_is_ray_error,
        message=message,
        prefix=f"pipeline {args.command}: ",
        debug=args.debug,
        on_stop="; run the same command again to resume",
    )


def _is_ray_error(e: BaseException) -> bool:
    return type(e).__module__.startswith("ray.")


def _root_cause(e: BaseException) -> BaseException:
    """The user's exception inside a Ray error (RayTaskError wraps it as ``cause``)."""
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        cause = getattr(e, "cause", None)
        if isinstance(cause, BaseException):
            e = cause
            continue
        break
    return e


def one_line(e: BaseException) -> str:
    """One line for the user: disk full says so; a Ray task's error shows its own message."""
    import errno

    e = _root_cause(e)
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        where = f" writing {e.filename}" if e.filename else ""
        return f"disk full{where}: free some space and run the same command again to resume"
    text = str(e).strip().splitlines()
    msg = text[-1] if text else ""
    if _is_ray_error(e) or not isinstance(e, (ValueError, RuntimeError)):
        msg = f"{type(e).__name__}: {msg}" if msg else type(e).__name__
    return msg


if __name__ == "__main__":
    sys.exit(main())
