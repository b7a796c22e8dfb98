"""sage_dist: SAGE concept erasure for diffusers text-to-image models, at scale with Ray, Optuna and MLflow.

Where to look: the loss in ``sage_dist/losses/``, the attack in ``sage_dist/attack/``, one training step in
``sage_dist/train/step.py``, the loop in ``sage_dist/train/loop.py``, the Ray wiring in
``sage_dist/train/ray_worker.py`` and ``sage_dist/tune/``, the studies in ``studies/``.
"""

import os as _os

# OpenMP's default spin-waiting made small CPU steps 10-30x slower whenever another process shared the
# cores . Must be set before torch loads.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
