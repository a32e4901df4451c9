#!/usr/bin/env bash
# Every GPU benchmark in one command, on an H100/H200: the kernel tests on real Triton, the fused kernels,
# training (both stages, ours and its variants against the reference path) and embedding at the 3B shape, the
# pytest-benchmark suite; then the README's table is regenerated from bench/results/*.json (commit both).
# For the headline figures in at most 8 minutes use bench/gpu_quick.py instead; this is the full run. It installs
# what it needs and calls bench/gpu_quick.py --full, which runs the parts below under one time box (45 minutes).
#
#   bash bench/run_gpu.sh [all | kernels | train | embed | suite]
#
# Duration, estimated from counted work (not yet run on a GPU): about 35 minutes in all, so it does not fit one
# 10-minute command of the lent machine; kernels, embed and suite each do, train does not.
#   kernels ~6 min: tests/kernels (~56 Triton compiles, ~1.5 s each, and their tests), then
#                   bench/fused_kernels.py (30 contenders, each a compile, warm-up and ~2 s of timing).
#   train  ~16 min: 9 runs, each a fresh 3B model + AdamW (~10 s), on 48 + 240 samples or pairs: stage 1
#                   ~3,500 TFLOP (ours) to ~4,500 (reference) a run, stage 2 ~6,100 to ~6,600 (bench/work.py), at
#                   >= 30% of the bf16 peak ~15-25 s a run; 5 of the runs compile (~1-2 min each).
#   embed   ~3 min: 2 bf16 3B models, 4 workloads x 2 paths x 272 inputs (1,024-token pages among them).
#   suite  ~10 min: 4 training cases (a 3B model each, 2 of them compiled) and 8 embedding cases, 5 and 3 rounds.
#
# A machine without liger-kernel / torchao and without network (the lent GPU machine): carry them as wheels in
# .whl/ (README.md, "Benchmarks and performance", gives the pip download command; add cut-cross-entropy==25.1.1
# for that peer) and they are installed from there. With $OUT set (the device tool), the results are also copied
# to $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e .
export PYTHONUNBUFFERED=1
status=0
python3 -m bench.gpu_quick --full "${1:-all}" || status=$?  # the runner: each part time-boxed, then the table
if [[ -n "${OUT:-}" ]]; then
    cp bench/results/*.json README.md "$OUT"/
fi
exit $status
