"""Checkpoint files: the format tag and version, save and load, and the trained generator
rebuilt from one (:func:`generator_from_checkpoint`).

Checkpoints hold only tensors and primitive containers, so
``torch.load(path, weights_only=True)`` reads them. Writes are atomic
(:func:`pdml._files.atomic_write_bytes`): a killed run leaves the old file or the new one,
never a torn one.
"""
from __future__ import annotations

import io
from pathlib import Path

import torch

from pdml._files import atomic_write_bytes
from pdml.models import FeatureGenerator
from pdml.models.heads import linear_weight_from_conv
from pdml.training.config import TrainConfig, TrainError
from pdml.training.networks import build_generator

CHECKPOINT_FORMAT = "pdml-train-checkpoint"
CHECKPOINT_VERSION = 2
"""Version 2: the projection heads are row MLPs (linear weights ``[out, in]``). Version 1
(1×1-conv heads, weights ``[out, in, 1, 1]``) is migrated on load
(:func:`migrate_checkpoint`)."""


def save_checkpoint(obj: dict, path: Path) -> None:
    """``torch.save`` through :func:`atomic_write_bytes`."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def find_checkpoint(path, names=("last.pt",)) -> Path:
    """The checkpoint file ``path`` means: ``path`` itself when it is a file; for a run
    folder (or its ``checkpoints`` folder) the first of ``names`` found in it (``--resume``:
    last.pt; ``pdml-denoise``: best.pt, then last.pt). TrainError when there is none."""
    path = Path(path)
    if path.is_dir():
        for name in names:
            for candidate in (path / "checkpoints" / name, path / name):
                if candidate.is_file():
                    return candidate
        raise TrainError(f"{path} is a folder without {' or '.join('checkpoints/' + n for n in names)}")
    if not path.is_file():
        raise TrainError(f"checkpoint {path} does not exist")
    return path


def load_checkpoint(path, map_location="cpu") -> dict:
    """Read a pdml-train checkpoint (a file, or a run folder's ``last.pt``:
    :func:`find_checkpoint`) with ``weights_only=True``; TrainError if it is not one or its
    weights (``model``) hold NaN or inf."""
    path = find_checkpoint(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a truncated file, another format, pickled objects...
        # one short line: torch's own message runs to several sentences
        raise TrainError(f"cannot read checkpoint {path}: not a checkpoint file, or a "
                         f"truncated one ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise TrainError(f"{path} is not a pdml-train checkpoint (no format tag "
                         f"{CHECKPOINT_FORMAT!r}); it was written by another program or model")
    if ckpt.get("version") not in range(1, CHECKPOINT_VERSION + 1):
        raise TrainError(f"{path} has checkpoint version {ckpt.get('version')}, "
                         f"this pdml reads versions 1 to {CHECKPOINT_VERSION}")
    try:
        ckpt = migrate_checkpoint(ckpt)
    except (KeyError, TypeError, ValueError) as e:
        raise TrainError(f"{path}: cannot migrate checkpoint version {ckpt.get('version')} "
                         f"to {CHECKPOINT_VERSION}: {type(e).__name__}: {e}") from None
    bad = first_non_finite(ckpt.get("model"))
    if bad is not None:
        raise TrainError(f"{path}: weight {bad} holds NaN or inf (a diverged run?); "
                         "use an earlier checkpoint")
    return ckpt


def checkpoint_dict(*, step: int, world_size: int, elapsed_s: float, config: dict, model: dict,
                    optimizer: dict, scheduler: dict, scaler: dict, rng: list, best: dict) -> dict:
    """A checkpoint of a run at ``step``: ``model`` / ``optimizer`` / ``scheduler``: state
    dicts by network name; ``rng``: one RNG state per rank; ``best``: the best evaluation's
    ``{"step", "psnr"}``."""
    return {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
            "pdml_version": __import__("pdml").__version__, "step": step,
            "world_size": world_size, "elapsed_s": elapsed_s, "config": config, "model": model,
            "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler, "rng": rng,
            "best": best}


def load_training_state(ckpt: dict, networks: dict, optimizers: dict, schedulers: dict,
                        scaler) -> None:
    """Load a checkpoint's state dicts into the run's modules (dicts by name, as
    :func:`checkpoint_dict` stores them); TrainError when they do not fit."""
    try:
        for group, modules in (("model", networks), ("optimizer", optimizers),
                               ("scheduler", schedulers)):
            for name, module in modules.items():
                module.load_state_dict(ckpt[group][name])
        scaler.load_state_dict(ckpt["scaler"])
    except (KeyError, RuntimeError, ValueError) as e:
        raise TrainError(f"checkpoint does not match this run's networks: {e}") from None


def checkpoint_config(ckpt: dict, where: str) -> TrainConfig:
    """The validated :class:`TrainConfig` a checkpoint stores; TrainError naming ``where``
    when it is missing or not usable (unknown keys, wrong types, NaN, out of range)."""
    try:
        cfg = TrainConfig.from_dict(ckpt.get("config") if isinstance(ckpt, dict) else None)
        cfg.validate()
    except TrainError as e:
        raise TrainError(f"{where}: the run's stored config is not usable: {e}") from None
    return cfg


def generator_from_checkpoint(ckpt: dict, device: torch.device, which: str = "generator"
                              ) -> tuple[FeatureGenerator, TrainConfig]:
    """Rebuild the trained generator (eval mode) and the run's validated config from a
    checkpoint (:func:`load_checkpoint`); TrainError when they do not fit.
    The config's ``arch`` picks the network ("pdml" for checkpoints written before the
    option existed)."""
    cfg = checkpoint_config(ckpt, "checkpoint")
    try:
        state = ckpt["model"][which]
    except (KeyError, TypeError) as e:
        raise TrainError(f"checkpoint lacks the {which} weights ({type(e).__name__}: {e})") from None
    generator = build_generator(cfg)
    try:
        generator.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise TrainError(f"checkpoint's generator weights do not fit the {cfg.arch!r} "
                         f"generator of its config (another model?): "
                         f"{' '.join(first[:3])[:300]}") from None
    return generator.to(device).eval(), cfg


def first_non_finite(tree, prefix: str = "") -> str | None:
    """The dotted key of the first floating-point tensor in a nested dict of tensors that
    holds NaN or inf, else None (anything that is not a dict or tensor is passed over)."""
    if isinstance(tree, torch.Tensor):
        if tree.is_floating_point() and not bool(torch.isfinite(tree).all()):
            return prefix or "(tensor)"
        return None
    if isinstance(tree, dict):
        for key, value in tree.items():
            bad = first_non_finite(value, f"{prefix}.{key}" if prefix else str(key))
            if bad is not None:
                return bad
    return None


def migrate_checkpoint(ckpt: dict) -> dict:
    """Bring a checkpoint dict of an older version to :data:`CHECKPOINT_VERSION` (in place).

    1 -> 2: the head weights ``[out, in, 1, 1]`` become ``[out, in]``, and so do the
    generator optimizer's state tensors of those parameters (Adam's ``exp_avg`` and
    ``exp_avg_sq``). The heads' parameters are the last ones of the generator optimizer
    (the trainer builds it from the generator's parameters, then the heads', in the order
    of the heads' state_dict); KeyError/ValueError if the checkpoint does not fit that.
    """
    if ckpt["version"] == 1:
        heads = ckpt["model"]["heads"]
        opt = ckpt["optimizer"]["generator"]
        params = [i for group in opt["param_groups"] for i in group["params"]]
        if len(params) < len(heads):
            raise ValueError(f"the generator optimizer has {len(params)} parameters, fewer "
                             f"than the {len(heads)} head tensors")
        tail = params[len(params) - len(heads):]
        for index, key in zip(tail, list(heads)):
            old_shape = tuple(heads[key].shape)
            heads[key] = linear_weight_from_conv(heads[key])
            for name, value in opt["state"].get(index, {}).items():
                if isinstance(value, torch.Tensor) and tuple(value.shape) == old_shape:
                    opt["state"][index][name] = linear_weight_from_conv(value)
        ckpt["version"] = 2
    return ckpt
