#!/usr/bin/env bash
# Issue 8 item 3, prepared for a lent GPU (one run of a few minutes): the iteration benchmark on the SD-1.4
# shape with frozen parts in bf16, SDPA attention, peak GPU memory per worker and iterations per second.
#   PYTHON=/path/to/python OUT=/tmp/out bash benchmarks/gpu_check.sh
# Untested on a GPU so far (no device was lent in sessions 2-3); the same code path runs on CPU with --device cpu.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
OUT="${OUT:-runs/bench}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'this python has no CUDA torch'; print(torch.__version__)"
"$PYTHON" benchmarks/iteration_cost.py --models sd14-shape --device cuda \
    --phases esd_reference,sage_warmup,sage_cyclic_fast,sage_cyclic_fast_m2,sage_cyclic_fast_m1,advunlearn \
    --json "$OUT/iteration_cost_gpu.json" 2>&1 | tee "$OUT/iteration_cost_gpu.log"
