"""Drop-in loss modules over :mod:`pdml.ops` (rows form, CUT / DML_CT compatible).

Both take the rows that CUT's ``PatchSampleF`` returns: ``feat_q``, ``feat_k`` of
shape ``[B·N, C]``, already gathered and L2-normalised; they do not normalise again.
"""
from __future__ import annotations

from torch import Tensor, nn

from pdml import _validation, ops
from pdml.backends.registry import BACKEND_NAMES

_UNSET = object()


def _option(opt, attr: str, value, default):
    """An explicit keyword wins over the options object, which wins over the default."""
    if value is not _UNSET:
        return value
    if opt is not None and hasattr(opt, attr):
        return getattr(opt, attr)
    return default


class _PatchLoss(nn.Module):
    _tau_attr: str
    _tau_default: float
    _check_tau = staticmethod(_validation.check_tau)

    def __init__(self, opt=None, *, tau=_UNSET, batch_size=_UNSET,
                 all_negatives_from_minibatch=_UNSET, backend: str = "auto"):
        super().__init__()
        self.tau = self._check_tau(_option(opt, self._tau_attr, tau, self._tau_default))
        self.batch_size = _validation.check_batch_size(_option(opt, "batch_size", batch_size, 1))
        # CUT's option name lives only at this drop-in boundary; inside pdml it is `negatives`
        all_from_minibatch = _option(opt, "nce_includes_all_negatives_from_minibatch",
                                     all_negatives_from_minibatch, False)
        self.negatives = "batch" if all_from_minibatch else "image"
        if backend not in BACKEND_NAMES:
            raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {backend!r}")
        self.backend = backend

    def extra_repr(self) -> str:
        return (f"tau={self.tau}, batch_size={self.batch_size}, "
                f"negatives={self.negatives!r}, backend={self.backend!r}")


class PatchNCELoss(_PatchLoss):
    """CUT's PatchNCELoss: ``PatchNCELoss(opt)`` reads ``opt.nce_T``, ``opt.batch_size``,
    ``opt.nce_includes_all_negatives_from_minibatch``; or give them as keywords
    (``tau`` 0.07 without either).

    ``forward(feat_q [B·N, C], feat_k [B·N, C]) -> [B·N]`` per-row loss (float32),
    equal to CUT's; ``feat_k`` is detached.
    """
    _tau_attr, _tau_default = "nce_T", 0.07

    def forward(self, feat_q: Tensor, feat_k: Tensor) -> Tensor:
        return ops.patch_nce_rows(feat_q, feat_k, self.tau, self.batch_size,
                                  self.negatives, self.backend)


class PatchMetricLoss(_PatchLoss):
    """The paper's patch-wise metric loss, DML_CT's ``PatchMetricLoss(opt)``: reads
    ``opt.metric_T``, ``opt.batch_size``, ``opt.nce_includes_all_negatives_from_minibatch``;
    or give them as keywords. Without either (an ``opt`` with no ``metric_T``, such as
    CUT's), ``tau`` is the paper's 0.15. A ``tau`` too small for any dtype
    (``exp(1/tau)`` overflows float64's sums) is refused here, one too small for the
    features' dtype (float32: ``tau < 0.01503``) at the call (:func:`pdml._validation.check_metric_tau`).

    ``forward(feat_q [B·N, C] output features, feat_k [B·N, C] input features) -> scalar``
    (float32); gradients flow to both.
    """
    _tau_attr, _tau_default = "metric_T", 0.15
    _check_tau = staticmethod(_validation.check_metric_tau)

    def forward(self, feat_q: Tensor, feat_k: Tensor) -> Tensor:
        return ops.patch_metric_rows(feat_q, feat_k, self.tau, self.batch_size,
                                     self.negatives, self.backend)
