#!/usr/bin/env bash
# Entry point of the framebridge image: the first argument says what to run.
#
#   pipeline ARGS...   pipeline ARGS...                  (build, synth, validate, inspect, subset)
#   train ARGS...      python -m train ARGS...           (one process), or, when
#                      FRAMEBRIDGE_NPROC_PER_NODE and/or FRAMEBRIDGE_TORCHRUN_ARGS is set,
#                      torchrun [--nproc-per-node N] [TORCHRUN_ARGS...] -m train ARGS...
#   eval ARGS...       python -m eval ARGS...            (sample, fid, watch, report)
#   ray ARGS...        ray ARGS...                       (cluster nodes: ray start ... --block)
#   help | --help | -h | (nothing)   this text
#   anything else      exec'd as given (bash, python, torchrun, nvidia-smi, ...)
#
# FRAMEBRIDGE_DRY_RUN=1 prints the command (one line, shell-quoted) instead of running it.
set -euo pipefail

usage() {
    sed -n '2,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

run() {
    if [[ "${FRAMEBRIDGE_DRY_RUN:-0}" == "1" ]]; then
        local quoted
        printf -v quoted '%q ' "$@"
        printf '%s\n' "${quoted% }"
        exit 0
    fi
    exec "$@"
}

if [[ $# -eq 0 ]]; then
    usage
    exit 0
fi

command="$1"
shift

case "$command" in
    help | --help | -h)
        usage
        ;;
    pipeline)
        run pipeline "$@"
        ;;
    train)
        if [[ -n "${FRAMEBRIDGE_NPROC_PER_NODE:-}" || -n "${FRAMEBRIDGE_TORCHRUN_ARGS:-}" ]]; then
            launcher=(torchrun)
            if [[ -n "${FRAMEBRIDGE_NPROC_PER_NODE:-}" ]]; then
                launcher+=("--nproc-per-node=${FRAMEBRIDGE_NPROC_PER_NODE}")
            fi
            if [[ -n "${FRAMEBRIDGE_TORCHRUN_ARGS:-}" ]]; then
                # split on whitespace, no globbing: e.g. "--nnodes=2 --rdzv-backend=c10d ..."
                read -r -a extra <<<"${FRAMEBRIDGE_TORCHRUN_ARGS}"
                launcher+=("${extra[@]}")
            fi
            run "${launcher[@]}" -m train "$@"
        fi
        run python -m train "$@"
        ;;
    eval)
        run python -m eval "$@"
        ;;
    ray)
        run ray "$@"
        ;;
    *)
        run "$command" "$@"
        ;;
esac
