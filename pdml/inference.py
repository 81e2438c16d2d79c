"""``pdml-denoise``'s and the experiments' view of inference: denoise CT slices with a
trained generator rebuilt from a checkpoint.

The code lives in the trainer's layer, below this module (docs/layout.md, "Package
layers"): :mod:`pdml.training.denoise` (:func:`denoise_hu`, its tiles and precision) and
:mod:`pdml.training.checkpoint` (:func:`generator_from_checkpoint`), so the trainer's
evaluation denoises without importing this face.
"""
from pdml.training.checkpoint import generator_from_checkpoint
from pdml.training.denoise import (DENOISE_PRECISIONS, DENOISE_TILE, denoise_hu,
                                   denoise_precision, forward_tiled)

__all__ = ["DENOISE_PRECISIONS", "DENOISE_TILE", "denoise_hu", "denoise_precision",
           "forward_tiled", "generator_from_checkpoint"]
