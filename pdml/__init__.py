"""pdml: fused patch-wise contrastive / metric losses for unsupervised low-dose CT denoising.

See DESIGN.md §2 for the public API: :mod:`pdml.ops` (fused ops),
:class:`PatchNCELoss` / :class:`PatchMetricLoss` (drop-in modules), :mod:`pdml.reference`.
"""
__version__ = "0.1.0"

from pdml import ops, reference  # noqa: E402
from pdml.losses import PatchMetricLoss, PatchNCELoss  # noqa: E402

__all__ = ["__version__", "ops", "reference", "PatchNCELoss", "PatchMetricLoss"]
