#!/usr/bin/env bash
# Install sage_dist with its pinned CPU dependency set into ./.venv (idempotent; ~3 min on a fresh machine).
# GPU machines: see README "Install on a GPU machine" (requirements/gpu.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade "pip>=24"
.venv/bin/python -m pip install -q -r requirements/cpu.txt -e .
.venv/bin/python -m pip install -q --no-deps -r requirements/no-deps.txt
echo "sage_dist installed in $(pwd)/.venv"
