"""pdml: fused patch-wise contrastive / metric losses for unsupervised low-dose CT denoising.

The public API: :mod:`pdml.ops` (fused ops), :class:`PatchNCELoss` / :class:`PatchMetricLoss`
(drop-in modules), :mod:`pdml.reference` (the pure-PyTorch oracle). The math is in
docs/ops.md, the layering of the modules in docs/layout.md.
"""
__version__ = "0.1.0"

from pdml import ops, reference  # noqa: E402
from pdml.losses import PatchMetricLoss, PatchNCELoss  # noqa: E402

__all__ = ["__version__", "ops", "reference", "PatchNCELoss", "PatchMetricLoss"]
