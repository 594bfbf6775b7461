"""tfd: one-step diffusion distillation (Teacher-Feature Drifting and baselines) under one protocol."""
import os as _os
import sys as _sys

# OpenMP threads that wait for work sleep instead of spinning (OMP_WAIT_POLICY=PASSIVE) unless the
# user chose otherwise: on a CPU shared with another process, spinning threads made a 2-thread
# training step ~29x slower (1,402 vs 49 ms per step measured beside other jobs on 2 cores, README
# "CPU threads"). It changes no result (same threads, same reduction order). OpenMP reads the
# variable when torch loads it, so it only takes effect when tfd is imported before torch (the CLI).
if "torch" not in _sys.modules:
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
