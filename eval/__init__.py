"""Evaluation: feature extractors, FID, precision/recall, max pairwise SSIM, CLIP score, scoring.

A library of its own: nothing here imports `tfd` (tests/test_eval_independent.py checks it);
`tfd` builds on it. The metrics are listed in `eval.metrics.METRICS`; file helpers (atomic
writes, hashing, provenance) are in `eval.io`.

Modules are imported lazily by their users (`from eval.score import score_samples`); importing
`eval.features` also registers the digits network with torch-fidelity as `digits-net`.
"""
