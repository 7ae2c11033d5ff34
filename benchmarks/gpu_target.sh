#!/usr/bin/env bash
# The GPU measurements for a session with a CUDA card (H100 class), in two parts that fit a short loan:
#   a (about 6 min on a fresh machine): medium, batch 1, 5 s of audio: transformers float32 (eager), and ours
#     bfloat16 eager and bfloat16+compile (the compiled layer loop, CUDA graphs per attention window);
#   b (about 5 min): the CUDA tests, and where a compiled bfloat16 step spends its GPU time.
# Run from the repository root: `bash benchmarks/gpu_target.sh a` (or b, or all); logs go to $OUT (or /tmp).
# The "musicgen:" lines of each log (compile times, CUDA-graph skips) are printed.
set -x
export MUSICGEN_NO_KERNELS=1 PYTHONPATH=$PWD   # the CPU kernels are not needed on a GPU
L=${OUT:-/tmp}
part=${1:-all}
SPEED="python3 benchmarks/speed.py --device cuda --sizes medium --batches 1 --seconds 5"
if [ "$part" = a ] || [ "$part" = all ]; then
    nvidia-smi --query-gpu=name,memory.total --format=csv
    python3 -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)"
    timeout 330 $SPEED --hf-modes float32 --modes bfloat16,bfloat16+compile > $L/a.log 2>&1
    grep "musicgen:" $L/a.log | sort | uniq -c; tail -6 $L/a.log
fi
if [ "$part" = b ] || [ "$part" = all ]; then
    timeout 150 python3 -m pytest -q -m cuda tests > $L/b1.log 2>&1; tail -5 $L/b1.log
    timeout 150 python3 benchmarks/profile_step.py --device cuda --size medium --mode bfloat16+compile \
        --seconds 5 > $L/b2.log 2>&1; tail -24 $L/b2.log
fi
