"""Experiments that test the paper's claims with pdml's trainer and data.

- :mod:`pdml.experiments.hu_shift`: the HU-shift ablation (GAN only vs PatchNCE vs the
  patch-wise metric loss), ``python -m pdml.experiments.hu_shift``.
- :mod:`pdml.experiments.classical`: the classical baselines of that table (TV, non-local
  means, BM3D), each tuned once on slices with a clean truth.
"""
