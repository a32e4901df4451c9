#!/usr/bin/env bash
# Every GPU benchmark in one command, on an H100/H200: the kernel tests on real Triton, the fused kernels,
# training (both stages, ours and its variants against the reference path) and embedding at the 3B shape, the
# pytest-benchmark suite; then the README's table is regenerated from bench/results/*.json (commit both).
#
#   bash bench/run_gpu.sh [all | kernels | train | embed | suite]      (default: all; about 25 minutes)
#
# A machine without liger-kernel / torchao and without network (the lent GPU machine): carry them as wheels in
# .whl/ (python -m pip download --no-deps -d .whl liger-kernel==0.8.5 torchao==0.18.0 cut-cross-entropy==25.1.1)
# and they are installed from there. With $OUT set (the device tool), the results are also copied to $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e .
export PYTHONUNBUFFERED=1
part="${1:-all}"
slug=$(python3 -c "import torch, sys; sys.path.insert(0, 'bench'); from report import device_slug; print(device_slug(torch.cuda.get_device_name()))")
if [[ $part == all || $part == kernels ]]; then
    python3 -m pytest -q -p no:cacheprovider tests/kernels
    python3 bench/fused_kernels.py
fi
if [[ $part == all || $part == train ]]; then
    python3 bench/train.py --size 3b
fi
if [[ $part == all || $part == embed ]]; then
    python3 bench/embed.py --size 3b
fi
if [[ $part == all || $part == suite ]]; then
    python3 -m pytest -q -p no:cacheprovider bench --benchmark-enable --benchmark-only \
        --benchmark-json "bench/results/pytest-benchmark-$slug.json"
fi
python3 bench/table.py
if [[ -n "${OUT:-}" ]]; then
    cp bench/results/*.json README.md "$OUT"/
fi
