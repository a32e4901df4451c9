#!/usr/bin/env bash
# The one command for a lent GPU: the kernel tests on real Triton, then bench/kernels.py, whose JSON lands in
# bench/results/kernels-<device>.json (commit it). Extra arguments go to bench/kernels.py.
#
# The GPU machine has torch and triton but not liger-kernel or cut-cross-entropy: carry them as wheels in .whl/
# (pure Python; here: python3 -m pip download --no-deps -d .whl liger-kernel==0.8.5 cut-cross-entropy==25.1.1)
# and name .whl in the run's carry. Without them the Liger/CCE contenders fail to import and the run stops.
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e .
python3 -m pytest -q -p no:cacheprovider tests/kernels
PYTHONUNBUFFERED=1 python3 bench/kernels.py "$@"
