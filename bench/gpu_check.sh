#!/usr/bin/env bash
# GPU checks for a lent device machine: uses only what its image has (torch, torchvision,
# OpenCV, numpy, pyarrow, tqdm; tests/test_gpu_check.py holds the scripts to that). Prints RAFT
# large/small batched bf16 against one pair fp32 at 224 px; training images/s and peak memory of
# small and base in bf16 for iid/flow/divergence, fused against plain attention; DDIM sampling
# images/s. Meant to finish in under 8 minutes on an H100/H200 (not yet run on one).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python3 bench/raft_throughput.py --model raft-large --pairs 512 --size 224 --batch 32
python3 bench/raft_throughput.py --model raft-small --pairs 512 --size 224 --batch 64
python3 bench/gpu_train.py --presets small base --size 128 --window-batch 32 --steps 30
