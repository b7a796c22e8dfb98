#!/usr/bin/env bash
# Issue 8 item 3, prepared for a lent GPU (one run of a few minutes): the iteration benchmark on the SD-1.4
# shape with frozen parts in bf16, SDPA attention, peak GPU memory per worker and iterations per second.
#   PYTHON=/path/to/python OUT=/tmp/out bash benchmarks/gpu_check.sh
# Untested on a GPU so far (no device was lent in sessions 2-4); the same code path runs on CPU with --device cpu.
#
# On the workplace's device machine (its python3 has CUDA torch and transformers but no diffusers, and nothing can
# be fetched there), first fetch the wheel here into the git-ignored .whl/ and carry it:
#   .venv/bin/pip download diffusers==0.42.1 --no-deps -d .whl
#   device run, carry [".whl"]:  PYTHON=python3 OUT=$OUT PYTHONUNBUFFERED=1 bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
OUT="${OUT:-runs/bench}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # sage_dist from this checkout, installed or not
if ! "$PYTHON" -c "import diffusers" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
    "$PYTHON" -m pip install --no-deps --no-index .whl/*.whl
fi
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
"$PYTHON" -c "import torch, diffusers, transformers; assert torch.cuda.is_available(), 'this python has no CUDA torch'; \
print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
"$PYTHON" benchmarks/iteration_cost.py --models sd14-shape --device cuda \
    --phases esd_reference,sage_warmup,sage_cyclic_fast,sage_cyclic_fast_m2,sage_cyclic_fast_m1,advunlearn \
    --json "$OUT/iteration_cost_gpu.json" 2>&1 | tee "$OUT/iteration_cost_gpu.log"
