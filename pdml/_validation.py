"""Every input check of pdml's ops, shared by :mod:`pdml.ops` and the backends.

Each check raises ``TypeError`` for a wrong type or dtype and ``ValueError`` for a wrong
shape or value, naming the argument, before any kernel runs (docs/ops.md, "Numerics
and checks"). The checks that read the ids' values (range, distinctness) synchronise
with the device; on a GPU, where a training step is launch-bound, they therefore run once
per ids tensor, not once per call (:func:`check_ids_values`, "Checked once"), and ids that
are valid by construction are marked so where they are made (:func:`mark_ids_valid`).
While ``torch.compile`` traces, the ids have no values yet: the check then goes into the
graph as the opaque op ``pdml_checks::checked_ids``, which runs :func:`check_ids_values`
when the graph runs, on every backend. Meta tensors (shape only) skip the value checks.
The NaN/inf check of the features is off by default (it reads every feature, and
synchronises on a GPU): :func:`set_check_finite` or ``PDML_CHECK_FINITE=1`` turns it on.

This module imports nothing else of pdml, so every layer above it may use it.
"""
from __future__ import annotations

import math
import os
import weakref
from typing import Optional, Sequence

import torch
from torch._subclasses.fake_tensor import is_fake

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
NEGATIVE_MODES = ("image", "batch")

_check_finite = os.environ.get("PDML_CHECK_FINITE", "0") not in ("", "0")


def set_check_finite(enabled: bool) -> None:
    """Turn the NaN/inf check of the features on or off (default: ``PDML_CHECK_FINITE``)."""
    global _check_finite
    _check_finite = bool(enabled)


def is_compiling() -> bool:
    return torch.compiler.is_compiling()


def has_values(t: torch.Tensor) -> bool:
    """False for a fake or meta tensor (shape only): reading its values would fail."""
    if t.device.type == "meta":
        return False
    return not is_fake(t)


def _can_read_values(t: torch.Tensor) -> bool:
    return not is_compiling() and has_values(t)


# --------------------------------------------------------------------------- features

def check_features(name: str, t, rank: int, layout: str) -> None:
    """``t`` is a non-empty float tensor of ``rank`` dims (``layout`` names them)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
    if t.dim() != rank:
        raise ValueError(f"{name} must have shape {layout}, got {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(t.shape)}")
    if _check_finite and _can_read_values(t) and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or inf")


def check_pair(a_name: str, a: torch.Tensor, b_name: str, b: torch.Tensor) -> None:
    """``a`` and ``b`` agree in shape, dtype and device."""
    if a.shape != b.shape:
        raise ValueError(f"{a_name} and {b_name} must have the same shape, "
                         f"got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dtype != b.dtype:
        raise TypeError(f"{a_name} and {b_name} must have the same dtype, got {a.dtype} and {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"{a_name} and {b_name} must be on the same device, "
                         f"got {a.device} and {b.device}")


# --------------------------------------------------------------------------- ids

@torch.library.custom_op("pdml_checks::checked_ids", mutates_args=())
def checked_ids(ids: torch.Tensor, hw: int) -> torch.Tensor:
    """A copy of ``ids`` (int64 ``[N]``) after :func:`check_ids_values`: the ids check inside a
    compiled graph. An op the compiler cannot see through, whose output the ops consume,
    so the check can be neither traced away nor dropped as dead code."""
    check_ids_values(ids, hw)
    return ids.clone()


@checked_ids.register_fake
def _(ids, hw):
    return torch.empty_like(ids)


# Checked once. Reading the ids' values on a GPU costs a host synchronisation, a stall per
# call in a launch-bound training step, while the same ids tensor serves many calls (the q
# and k maps of a layer, forward and the heads' gather). So a device tensor that passed the
# check is remembered, by identity, with its version counter (bumped by every in-place
# write through torch), its storage address and the smallest H*W it was found valid for
# (valid for hw is valid for any larger hw; distinctness does not depend on hw). CPU ids are
# checked on every call: there the check is cheap and no stall, and CPU tensors are often
# written behind torch's back (through numpy), which no version counter sees. On a GPU such
# writes (through ``.data``, DLPack or another library) go unseen too: the record trusts
# the version counter, so ids written that way must be passed as a new tensor (a clone).
CACHED_DEVICE_TYPES = ("cuda",)


class _ValidIds:
    """id(tensor) -> (weak reference, version, data_ptr, smallest hw it is valid for)."""

    def __init__(self):
        self.entries: dict[int, tuple] = {}

    @staticmethod
    def _applies(ids: torch.Tensor) -> bool:
        # inference tensors have no version counter: they are checked on every call
        return ids.device.type in CACHED_DEVICE_TYPES and not ids.is_inference()

    def knows(self, ids: torch.Tensor, hw: int) -> bool:
        if not self._applies(ids):
            return False
        entry = self.entries.get(id(ids))
        return (entry is not None and entry[0]() is ids and entry[1] == ids._version
                and entry[2] == ids.data_ptr() and entry[3] <= hw)

    def add(self, ids: torch.Tensor, hw: int) -> None:
        if not self._applies(ids):
            return
        key = id(ids)
        entry = self.entries.get(key)
        if (entry is not None and entry[0]() is ids and entry[1] == ids._version
                and entry[2] == ids.data_ptr()):
            hw = min(hw, entry[3])

        def forget(ref, key=key):
            current = self.entries.get(key)
            if current is not None and current[0] is ref:
                del self.entries[key]

        self.entries[key] = (weakref.ref(ids, forget), ids._version, ids.data_ptr(), hw)


_valid_ids = _ValidIds()


def mark_ids_valid(ids: torch.Tensor, hw: int) -> torch.Tensor:
    """Record, without reading them, that ``ids`` (int64 ``[N]``) lie in ``[0, hw)`` and are
    distinct, so that the ops skip their check (and its device synchronisation) while the
    tensor is not written to. Only for ids valid by construction (e.g. the first entries of
    ``torch.randperm(hw)``); returns ``ids``. Nothing is recorded while ``torch.compile``
    traces (the ids have no storage yet; the compiled graph checks them itself)."""
    if _can_read_values(ids):
        _valid_ids.add(ids, hw)
    return ids


def check_ids_values(ids: torch.Tensor, hw: int, name: str = "ids") -> None:
    """Raise ValueError (naming ``name``) unless every id is in ``[0, hw)`` and all are distinct.

    One host synchronisation; the details are worked out only on failure. A GPU tensor that
    passed (or was marked by :func:`mark_ids_valid`) is not read again until it is written
    to ("Checked once" above).
    """
    if _valid_ids.knows(ids, hw):
        return
    _check_ids_values_now(ids, hw, name)
    _valid_ids.add(ids, hw)


def _check_ids_values_now(ids: torch.Tensor, hw: int, name: str) -> None:
    s = torch.sort(ids).values
    bad = (s[0] < 0) | (s[-1] >= hw)
    if s.numel() > 1:
        bad = bad | (s[1:] == s[:-1]).any()
    if not bool(bad):
        return
    lo, hi = int(s[0]), int(s[-1])
    if lo < 0 or hi >= hw:
        raise ValueError(f"{name} must lie in [0, H*W) = [0, {hw}), got values in [{lo}, {hi}]")
    dup = s[1:][s[1:] == s[:-1]]
    raise ValueError(f"{name} must be distinct, got repeated values {dup.unique()[:8].tolist()}")


def check_ids(ids, fmap: torch.Tensor, name: str = "ids", values: bool = True) -> torch.Tensor:
    """``ids`` ``[N]`` integer on ``fmap``'s device -> ids as int64; with ``values`` also in
    ``[0, H*W)`` and distinct (eagerly, or inside the graph while ``torch.compile`` traces).
    ``name`` is the argument's name in the messages."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of int64, got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor (int64), got {ids.dtype}")
    if ids.dim() != 1:
        raise ValueError(f"{name} must have shape [N], got {tuple(ids.shape)}")
    if ids.numel() == 0:
        raise ValueError(f"{name} must not be empty")
    if ids.device != fmap.device:
        raise ValueError(f"{name} must be on the features' device {fmap.device}, got {ids.device}")
    ids = ids.to(torch.int64)
    if not values:
        return ids
    hw = fmap.shape[2] * fmap.shape[3]
    if _can_read_values(ids):
        check_ids_values(ids, hw, name)
    elif is_compiling():
        ids = checked_ids(ids, hw)
    return ids


# --------------------------------------------------------------------------- scalars

def check_tau(tau) -> float:
    if isinstance(tau, bool) or not isinstance(tau, (int, float)):
        raise TypeError(f"tau must be a float, got {type(tau).__name__}")
    tau = float(tau)
    if not (tau > 0.0 and tau < float("inf")):
        raise ValueError(f"tau must be a positive finite float, got {tau}")
    return tau


METRIC_SUMMED_TERMS = 2 ** 32
"""The most terms ``exp(S/τ)`` a sum of the metric loss is sized for (far above any batch:
the reference's largest sum has ``B·N²`` terms)."""


def metric_tau_min(dtype: torch.dtype) -> float:
    """The smallest τ of the metric loss for features of ``dtype``: its terms ``exp(S/τ)``
    reach ``exp(1/τ)`` (``S ≤ 1``), and a sum of :data:`METRIC_SUMMED_TERMS` of them must stay
    finite in the accumulation dtype (float64 for float64 features, float32 otherwise):
    0.01503 for float32, 0.001454 for float64 (docs/ops.md, "Numerics and checks")."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return 1.0 / (math.log(torch.finfo(acc).max) - math.log(METRIC_SUMMED_TERMS))


def check_metric_tau(tau, dtype: torch.dtype = torch.float64) -> float:
    """:func:`check_tau`, and ``tau >= metric_tau_min(dtype)``: below, the metric loss
    overflows to inf or NaN. The default ``dtype`` gives the loosest bound (for callers that
    do not know the features' dtype yet)."""
    tau = check_tau(tau)
    low = metric_tau_min(dtype)
    if tau < low:
        acc = "float64" if dtype == torch.float64 else "float32"
        raise ValueError(f"tau={tau:g} is too small for the metric loss with {dtype} features: its terms "
                         f"exp(S/tau) reach exp(1/tau) and their sums overflow {acc}; "
                         f"use tau >= {low:.4g} (the paper uses 0.15)")
    return tau


def check_negatives(negatives) -> str:
    if negatives not in NEGATIVE_MODES:
        raise ValueError(f"negatives must be one of {NEGATIVE_MODES}, got {negatives!r}")
    return negatives


def _check_count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def check_batch_size(batch_size, rows: Optional[int] = None, what: str = "the number of rows of feat_q") -> int:
    """A positive int; when ``rows`` is given, also a divisor of it (``what`` names ``rows``)."""
    batch_size = _check_count("batch_size", batch_size)
    if rows is not None and rows % batch_size != 0:
        raise ValueError(f"batch_size={batch_size} must divide {what} ({rows})")
    return batch_size


def check_layers(layers, rows: int) -> int:
    """A positive int dividing ``rows`` (the rows of all layers stacked)."""
    layers = _check_count("layers", layers)
    if rows % layers != 0:
        raise ValueError(f"layers={layers} must divide the number of rows of feat_q ({rows})")
    return layers


def groups_of(negatives: str, batch: int) -> int:
    """The number of groups of negatives: ``batch`` for "image", 1 for "batch"."""
    return batch if check_negatives(negatives) == "image" else 1


# --------------------------------------------------------------------------- whole calls

def validate_map(fq, fk, ids) -> torch.Tensor:
    """Two maps ``[B, C, H, W]`` and their ``ids`` -> ids as int64."""
    check_features("fq", fq, 4, "[B, C, H, W]")
    check_features("fk", fk, 4, "[B, C, H, W]")
    check_pair("fq", fq, "fk", fk)
    return check_ids(ids, fq)


def validate_rows(feat_q, feat_k, batch_size) -> int:
    """Two row tensors ``[B·N, C]`` grouped into ``batch_size`` images -> batch_size."""
    check_features("feat_q", feat_q, 2, "[B·N, C]")
    check_features("feat_k", feat_k, 2, "[B·N, C]")
    check_pair("feat_q", feat_q, "feat_k", feat_k)
    return check_batch_size(batch_size, feat_q.shape[0])


def validate_rows_layers(feat_q, feat_k, layers, batch_size) -> tuple[int, int]:
    """``L`` layers of rows stacked ``[L·R, C]`` -> ``(layers, batch_size)``."""
    check_features("feat_q", feat_q, 2, "[L·R, C]")
    check_features("feat_k", feat_k, 2, "[L·R, C]")
    check_pair("feat_q", feat_q, "feat_k", feat_k)
    layers = check_layers(layers, feat_q.shape[0])
    rows = feat_q.shape[0] // layers
    return layers, check_batch_size(batch_size, rows, "the number of rows of one layer")


def validate_map_layers(fqs, fks, ids) -> torch.Tensor:
    """Two equal-length lists of maps, all of one shape, dtype and device -> ids as int64."""
    for name, maps in (("fqs", fqs), ("fks", fks)):
        if not isinstance(maps, Sequence) or isinstance(maps, (str, torch.Tensor)):
            raise TypeError(f"{name} must be a list of [B, C, H, W] tensors, got {type(maps).__name__}")
    if len(fqs) == 0 or len(fqs) != len(fks):
        raise ValueError(f"fqs and fks must be non-empty and of the same length, got {len(fqs)} and {len(fks)}")
    for layer, (fq, fk) in enumerate(zip(fqs, fks)):
        check_features(f"fqs[{layer}]", fq, 4, "[B, C, H, W]")
        check_features(f"fks[{layer}]", fk, 4, "[B, C, H, W]")
        check_pair(f"fqs[{layer}]", fq, f"fks[{layer}]", fk)
        if layer:
            check_pair(f"fqs[{layer}]", fq, "fqs[0]", fqs[0])
    return check_ids(ids, fqs[0])


def validate_gather_project(fmap, ids, weight, bias) -> torch.Tensor:
    """``fmap [B, F, H, W]``, ``ids [N]``, ``weight [D, F]``, ``bias [D]`` or None -> ids int64."""
    check_features("fmap", fmap, 4, "[B, F, H, W]")
    ids = check_ids(ids, fmap)
    check_features("weight", weight, 2, "[D, F]")
    if weight.shape[1] != fmap.shape[1]:
        raise ValueError(f"weight must have shape [D, F] with F = fmap.shape[1] = {fmap.shape[1]}, "
                         f"got {tuple(weight.shape)}")
    _check_like("weight", weight, fmap)
    if bias is not None:
        check_features("bias", bias, 1, "[D]")
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have shape [D] with D = weight.shape[0] = {weight.shape[0]}, "
                             f"got {tuple(bias.shape)}")
        _check_like("bias", bias, fmap)
    return ids


def _check_like(name: str, t: torch.Tensor, fmap: torch.Tensor) -> None:
    if t.dtype != fmap.dtype:
        raise TypeError(f"{name} must have fmap's dtype {fmap.dtype}, got {t.dtype}")
    if t.device != fmap.device:
        raise ValueError(f"{name} must be on fmap's device {fmap.device}, got {t.device}")
