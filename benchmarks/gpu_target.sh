#!/usr/bin/env bash
# Issue 4's GPU target on one CUDA card (H100 class): medium, batch 1, 5 s, bfloat16 with compile, at least
# 300 steps/s and 5x transformers' eager float32. Run from the repository root on the GPU machine:
#     bash benchmarks/gpu_target.sh [a|b|all]        (logs under $OUT, else /tmp)
# Part a (about 8 min on a fresh machine, which first builds the random medium checkpoint; the sizes are
# estimates from earlier device runs of these commands, not from a run of this script):
#   - bfloat16+compile: the target row, its self-attention over a window of the cache;
#   - bfloat16+compile+gemv: the same with few-row products as Triton reductions (compile(gemv=True));
#   - transformers float32, eager: the ratio's base;
#   - bfloat16+graphs: CUDA graphs of the eager step, no compile.
# Part b (about 6 min, right after a on the same warm machine):
#   - the CUDA tests (compiled gemv step, graphs, attention backends);
#   - where a gemv-compiled bfloat16 step spends its GPU time;
#   - int8 weights with and without gemv.
# "musicgen:" lines (compile times, CUDA-graph skips, recording failures) are printed from each log.
set -x
export MUSICGEN_NO_KERNELS=1 PYTHONPATH=$PWD   # the CPU kernels are not needed on a GPU
L=${OUT:-/tmp}
part=${1:-all}
SPEED="python3 benchmarks/speed.py --device cuda --sizes medium --batches 1 --seconds 5"
if [ "$part" = a ] || [ "$part" = all ]; then
    nvidia-smi --query-gpu=name,memory.total --format=csv
    python3 -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)"
    timeout 330 $SPEED --hf-modes float32 --modes bfloat16+compile,bfloat16+compile+gemv > $L/a1.log 2>&1
    grep "musicgen:" $L/a1.log | sort | uniq -c; tail -6 $L/a1.log
    timeout 120 $SPEED --hf-modes none --modes bfloat16+graphs > $L/a2.log 2>&1
    grep "musicgen:" $L/a2.log | sort | uniq -c; tail -3 $L/a2.log
fi
if [ "$part" = b ] || [ "$part" = all ]; then
    timeout 150 python3 -m pytest -q -m cuda tests/test_fast.py > $L/b1.log 2>&1; tail -5 $L/b1.log
    timeout 150 python3 benchmarks/profile_step.py --device cuda --size medium --mode bfloat16+compile+gemv \
        --seconds 5 > $L/b2.log 2>&1; tail -24 $L/b2.log
    timeout 200 $SPEED --hf-modes none --modes int8+compile+gemv,int8+compile > $L/b3.log 2>&1
    grep "musicgen:" $L/b3.log | sort | uniq -c; tail -4 $L/b3.log
fi
