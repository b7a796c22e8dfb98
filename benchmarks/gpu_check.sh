#!/usr/bin/env bash
# Prepared for a lent GPU (one run of a few minutes): the iteration benchmark on the SD-1.4
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
if ! "$PYTHON" -c "import diffusers" 2>/dev/null; then
    # unpack the carried wheel beside the checkout (no pip: the device's Python stays as it is)
    wheel=$(ls .whl/diffusers-*.whl 2>/dev/null | head -1 || true)
    [ -n "$wheel" ] || { echo "no diffusers in $PYTHON and no .whl/diffusers-*.whl carried (see the header)"; exit 2; }
    site=$(mktemp -d)
    "$PYTHON" -m zipfile -e "$wheel" "$site"
    export PYTHONPATH="$site:$PYTHONPATH"
fi
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
# fail here, in seconds, rather than after the first model build: versions this code needs
"$PYTHON" - <<'PY'
import sys
import PIL, regex, safetensors, tqdm, yaml  # noqa: F401 (imported by diffusers / sage_dist)
import diffusers, huggingface_hub, torch, transformers
from transformers.masking_utils import create_causal_mask  # noqa: F401 (sage_dist.models.text)
assert sys.version_info >= (3, 11), f"Python {sys.version}: diffusers 0.42 needs >= 3.11"
assert torch.cuda.is_available(), "this python has no CUDA torch"
assert int(transformers.__version__.split(".")[0]) >= 5, f"transformers {transformers.__version__}: need 5.x"
print("python", sys.version.split()[0], "torch", torch.__version__, "diffusers", diffusers.__version__,
      "transformers", transformers.__version__, "huggingface_hub", huggingface_hub.__version__)
PY
"$PYTHON" benchmarks/iteration_cost.py --models sd14-shape --device cuda \
    --phases esd_reference,sage_warmup,sage_cyclic_fast,sage_cyclic_fast_m2,sage_cyclic_fast_m1,advunlearn \
    --json "$OUT/iteration_cost_gpu.json" 2>&1 | tee "$OUT/iteration_cost_gpu.log"
# where the exact step's time goes on the GPU (synchronised part timers + torch profiler table)
"$PYTHON" benchmarks/iteration_cost.py --models sd14-shape --device cuda --phases esd_reference,sage_cyclic_fast \
    --profile --json "$OUT/iteration_cost_gpu_profile.json" 2>&1 | tee "$OUT/iteration_cost_gpu_profile.log"
