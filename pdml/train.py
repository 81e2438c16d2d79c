"""The trainer behind ``pdml-train``: the paper's unsupervised LDCT denoiser.

One training step (the paper's, after CUT):

1. generator step: ``fake = G(x_hi)``, ``idt = G(y_hi)`` (one pass over both), then
   ``L_G = λ_gan·LSGAN(D(fake), 1) + λ_idt·|idt − y_hi|₁ + λ_metric·L_patch``, where
   ``L_patch`` averages, over the loss layers (trunk, fusion), the fused patch loss
   (:func:`pdml.ops.patch_metric`, or :func:`pdml.ops.patch_nce`) of the projected maps
   of ``fake`` (q) and ``x_hi`` (k) at the same ``num_patches`` random positions;
2. discriminator step: ``L_D = ½·(LSGAN(D(y_hi), 1) + LSGAN(D(fake.detach()), 0))``.

``x`` is a low-dose (LD) crop, ``y`` an unpaired normal-dose (ND) crop, both in the
paper's unit window; with the wavelet split on (default) the networks see only the
high-frequency part (``_hi``, times ``net_scale``) and the LD image's low-frequency part
is added back at inference, so the global CT numbers come from the input.

Everything a run writes goes to its run folder (rank 0 only): ``config.json``,
``metrics.jsonl``, ``checkpoints/last.pt`` and ``checkpoints/best.pt`` (atomic: tmp file,
fsync, ``os.replace``), ``figures/*.png`` and ``summary.json``. Checkpoints hold only
tensors and primitive containers, so ``torch.load(path, weights_only=True)`` reads them.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import random
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from pdml import ops
from pdml.models import FEATURE_LAYERS, PatchDiscriminator, ProjectionHeads, RRDNGenerator

CHECKPOINT_FORMAT = "pdml-train-checkpoint"
CHECKPOINT_VERSION = 1
LOSSES = ("dml", "patchnce", "none")
PRECISIONS = ("fp32", "bf16", "fp16")
DEFAULT_TAU = {"dml": 0.15, "patchnce": 0.07, "none": 0.15}
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class TrainError(Exception):
    """A user-facing error (bad arguments or data): the CLI prints it without a traceback."""


# --------------------------------------------------------------------------- configuration

@dataclass
class TrainConfig:
    """Every setting of a run; ``config.json`` and the checkpoints store ``to_dict()``."""
    preset: str = "demo"
    # data: unpaired LD / ND DICOM folders; optional paired validation folders. With no
    # ``ldct``/``ndct`` the built-in dataset (simulated LD from real CT slices) is used.
    ldct: Optional[str] = None
    ndct: Optional[str] = None
    val_ldct: Optional[str] = None
    val_ndct: Optional[str] = None
    out: Optional[str] = None
    # schedule: ``steps`` generator+discriminator steps; the LR is constant, then decays
    # linearly to 0 over the last ``decay_steps``.
    steps: int = 400
    decay_steps: int = 200
    batch_size: int = 4
    crop: int = 64
    crop_margin: int = 30
    builtin_size: int = 256
    lr: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    # networks
    features: int = 32
    growth: int = 8
    block_layers: int = 5
    input_residual: bool = True
    ndf: int = 32
    d_layers: int = 3
    head_dim: int = 128
    # losses
    loss: str = "dml"
    lambda_gan: float = 1.0
    lambda_identity: float = 5.0
    lambda_metric: float = 0.1
    tau: Optional[float] = None
    num_patches: int = 128
    loss_layers: tuple = ("trunk", "fusion")
    wavelet: bool = True
    wavelet_name: str = "db3"
    wavelet_level: int = 6
    # The networks see the image times ``net_scale`` (None: 20 with the wavelet split,
    # 1 without). The high-frequency part is small in the unit window (25 HU noise is
    # 0.0125); spectral norm makes every layer 1-Lipschitz, so a discriminator fed such
    # inputs cannot move its scores far from its bias and stays at chance. At 20, one unit
    # is 100 HU. Losses other than the adversarial one are computed in the unit window.
    net_scale: Optional[float] = None
    # execution
    precision: str = "fp32"
    loss_backend: str = "auto"
    compile: bool = False
    device: str = "auto"
    threads: Optional[int] = None
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100
    ckpt_every: int = 50
    max_minutes: Optional[float] = None
    val_slices: int = 4
    progress: bool = True

    @property
    def resolved_net_scale(self) -> float:
        if self.net_scale is not None:
            return float(self.net_scale)
        return 20.0 if self.wavelet else 1.0

    @property
    def resolved_tau(self) -> float:
        return float(self.tau) if self.tau is not None else DEFAULT_TAU[self.loss]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["loss_layers"] = list(self.loss_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise TrainError(f"unknown config keys {unknown}")
        kwargs = dict(d)
        if "loss_layers" in kwargs:
            kwargs["loss_layers"] = tuple(kwargs["loss_layers"])
        return cls(**kwargs)

    def validate(self) -> None:
        """Raise TrainError naming the first bad setting."""
        if self.preset not in PRESETS:
            raise TrainError(f"--preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        if self.loss not in LOSSES:
            raise TrainError(f"--loss must be one of {LOSSES}, got {self.loss!r}")
        if self.precision not in PRECISIONS:
            raise TrainError(f"--precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.loss_backend not in ops.BACKEND_NAMES:
            raise TrainError(f"--loss-backend must be one of {ops.BACKEND_NAMES}, "
                             f"got {self.loss_backend!r}")
        if (self.ldct is None) != (self.ndct is None):
            raise TrainError("--ldct and --ndct go together (unpaired LD and ND folders); "
                             "give both, or neither for the built-in dataset")
        if (self.val_ldct is None) != (self.val_ndct is None):
            raise TrainError("--val-ldct and --val-ndct go together (a paired validation set)")
        for name in ("steps", "batch_size", "crop", "num_patches", "log_every", "eval_every",
                     "ckpt_every", "features", "growth", "ndf", "head_dim", "val_slices",
                     "builtin_size"):
            if getattr(self, name) < 1:
                raise TrainError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.decay_steps <= self.steps:
            raise TrainError(f"--decay-steps must be in [0, steps={self.steps}], got {self.decay_steps}")
        if self.crop < 8:
            raise TrainError(f"--crop must be >= 8 (the discriminator downsamples 8x), got {self.crop}")
        if self.crop_margin < 0:
            raise TrainError(f"crop_margin must be >= 0, got {self.crop_margin}")
        unknown = [n for n in self.loss_layers if n not in FEATURE_LAYERS]
        if unknown or not self.loss_layers:
            raise TrainError(f"loss layers must be a non-empty subset of {FEATURE_LAYERS}, "
                             f"got {list(self.loss_layers)}")
        if not self.resolved_net_scale > 0:
            raise TrainError(f"net_scale must be > 0, got {self.net_scale}")
        if self.resolved_tau <= 0:
            raise TrainError(f"--tau must be > 0, got {self.tau}")
        if self.threads is not None and self.threads < 1:
            raise TrainError(f"--threads must be >= 1, got {self.threads}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise TrainError(f"--max-minutes must be > 0, got {self.max_minutes}")


PRESETS: dict[str, dict[str, Any]] = {
    # Finishes in minutes on a 2-core CPU with the built-in data (the default without data).
    # The built-in slices at 128² build in seconds (256²: minutes on a busy 2-core CPU).
    "demo": dict(steps=400, decay_steps=200, batch_size=4, crop=64, log_every=10,
                 eval_every=100, ckpt_every=50, max_minutes=8.0, val_slices=4,
                 builtin_size=128, crop_margin=8),
    # The paper's settings, for a GPU: the full model, larger crops, a long schedule.
    "paper": dict(steps=100_000, decay_steps=50_000, batch_size=8, crop=128, log_every=50,
                  eval_every=2_000, ckpt_every=1_000, max_minutes=None, val_slices=16),
    # For tests and smoke runs: a few seconds.
    "tiny": dict(steps=4, decay_steps=2, batch_size=2, crop=32, num_patches=32, log_every=1,
                 eval_every=2, ckpt_every=2, max_minutes=None, val_slices=1, builtin_size=64,
                 crop_margin=4),
}


def make_config(preset: str = "demo", **overrides) -> TrainConfig:
    """The preset's config with ``overrides`` (``None`` values mean "keep the preset's")."""
    if preset not in PRESETS:
        raise TrainError(f"--preset must be one of {sorted(PRESETS)}, got {preset!r}")
    values = dict(PRESETS[preset])
    values.update({k: v for k, v in overrides.items() if v is not None})
    values["preset"] = preset
    cfg = TrainConfig.from_dict(values)
    cfg.validate()
    return cfg


# --------------------------------------------------------------------------- distributed

@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_distributed(device_request: str) -> tuple[DistInfo, torch.device]:
    """Join the torchrun job if there is one (gloo on CPU, NCCL on CUDA); pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_request == "auto":
        device_request = "cuda" if torch.cuda.is_available() else "cpu"
    if device_request.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TrainError("--device cuda was asked for but no CUDA GPU is visible")
        device = torch.device("cuda", local_rank if device_request == "cuda" else
                              torch.device(device_request).index)
        torch.cuda.set_device(device)
    elif device_request == "cpu":
        device = torch.device("cpu")
    else:
        raise TrainError(f"--device must be auto, cpu or cuda[:i], got {device_request!r}")
    info = DistInfo(rank, world, local_rank)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        info.initialized_here = True
    return info, device


def cpu_threads(requested: Optional[int]) -> int:
    """Intra-op threads for CPU training: ``requested``, else torch's default unless the
    machine is already busy (1-minute load average + our threads > cores), then 1.

    Why: OpenMP worker threads spin while they wait; on an oversubscribed machine two
    spinning threads per process run several times slower than one thread.
    """
    if requested is not None:
        return requested
    current = torch.get_num_threads()
    try:
        cores = len(os.sched_getaffinity(0))
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # platforms without them: keep torch's choice
        return current
    return 1 if current > 1 and load + current > cores + 0.5 else current


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


# --------------------------------------------------------------------------- checkpoints

def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader (or a crash) sees the old or the new file,
    never a partial one: tmp file in the same folder, fsync, ``os.replace``, fsync folder."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(obj: dict, path: Path) -> None:
    """``torch.save`` through :func:`atomic_write_bytes`."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path, map_location="cpu") -> dict:
    """Read a pdml-train checkpoint with ``weights_only=True``; TrainError if it is not one."""
    path = Path(path)
    if path.is_dir():
        for candidate in (path / "checkpoints" / "last.pt", path / "last.pt"):
            if candidate.is_file():
                path = candidate
                break
        else:
            raise TrainError(f"{path} is a folder without checkpoints/last.pt")
    if not path.is_file():
        raise TrainError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a truncated file, another format, pickled objects...
        raise TrainError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise TrainError(f"{path} is not a pdml-train checkpoint (no format tag "
                         f"{CHECKPOINT_FORMAT!r}); it was written by another program or model")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise TrainError(f"{path} has checkpoint version {ckpt.get('version')}, "
                         f"this pdml reads version {CHECKPOINT_VERSION}")
    return ckpt


# --------------------------------------------------------------------------- RNG states

def capture_rng_state() -> dict:
    """Every RNG a step can draw from, as tensors and primitives (weights_only-safe)."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_has_gauss": int(np_state[3]),
        "numpy_gauss": float(np_state[4]),
        "python_version": int(py_version),
        "python_internal": torch.tensor(py_internal, dtype=torch.int64),
        "python_gauss": py_gauss,
    }
    if torch.cuda.is_available():
        state["cuda"] = [s for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32),
                         state["numpy_pos"], state["numpy_has_gauss"], state["numpy_gauss"]))
    random.setstate((state["python_version"], tuple(int(v) for v in state["python_internal"]),
                     state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- networks

def build_generator(cfg: TrainConfig) -> RRDNGenerator:
    return RRDNGenerator(channels=1, features=cfg.features, growth=cfg.growth,
                         block_layers=cfg.block_layers, input_residual=cfg.input_residual)


def build_networks(cfg: TrainConfig) -> tuple[RRDNGenerator, PatchDiscriminator, Optional[ProjectionHeads]]:
    generator = build_generator(cfg)
    discriminator = PatchDiscriminator(channels=1, ndf=cfg.ndf, layers=cfg.d_layers)
    heads = None
    if cfg.loss != "none":
        heads = ProjectionHeads(cfg.loss_layers, in_channels=cfg.features,
                                hidden=cfg.head_dim, out_channels=cfg.head_dim)
    return generator, discriminator, heads


class GeneratorPass(nn.Module):
    """Everything the generator step runs through G and the heads, as one module so DDP
    sees a single forward per step.

    ``forward(x [B,1,h,w], y [B,1,h,w] or None)`` ->
    ``(fake [B,1,h,w], idt [B,1,h,w] or None, fq [maps], fk [maps])``: ``fq`` are the
    projected maps of ``fake`` (queries), ``fk`` those of ``x`` (keys), one per loss layer
    (empty lists without a patch loss).
    """

    def __init__(self, generator: RRDNGenerator, heads: Optional[ProjectionHeads],
                 layers: Sequence[str]):
        super().__init__()
        self.generator, self.heads, self.layers = generator, heads, tuple(layers)

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor]):
        b = x.shape[0]
        both = x if y is None else torch.cat([x, y], dim=0)
        if self.heads is None:
            out = self.generator(both)
            return out[:b], (None if y is None else out[b:]), [], []
        out, feats = self.generator.forward_with_features(both, self.layers)
        fake, idt = out[:b], (None if y is None else out[b:])
        fk = self.heads([f[:b] for f in feats])
        fq = self.heads(self.generator.features(fake, self.layers))
        return fake, idt, fq, fk


def patch_loss(cfg: TrainConfig, fq: Sequence[torch.Tensor], fk: Sequence[torch.Tensor]
               ) -> torch.Tensor:
    """Mean over the loss layers of the fused patch loss at ``num_patches`` random positions
    (fresh per layer from the CPU RNG, the same for q and k) -> float32 scalar."""
    total = None
    for q_map, k_map in zip(fq, fk):
        hw = q_map.shape[2] * q_map.shape[3]
        ids = torch.randperm(hw)[:min(cfg.num_patches, hw)].to(q_map.device)
        if cfg.loss == "dml":
            loss = ops.patch_metric(q_map, k_map, ids, tau=cfg.resolved_tau, negatives="image",
                                    backend=cfg.loss_backend)
        else:
            loss = ops.patch_nce(q_map, k_map, ids, tau=cfg.resolved_tau, negatives="image",
                                 backend=cfg.loss_backend).mean()
        total = loss if total is None else total + loss
    return total / len(fq)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Constant 1 for ``steps - decay_steps`` steps, then linear to 0 at ``steps``."""
    const = cfg.steps - cfg.decay_steps
    if step < const or cfg.decay_steps == 0:
        return 1.0
    return max(0.0, 1.0 - (step - const) / cfg.decay_steps)


def _set_requires_grad(module: nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


# --------------------------------------------------------------------------- inference

def generator_from_checkpoint(ckpt: dict, device: torch.device, which: str = "generator"
                              ) -> tuple[RRDNGenerator, TrainConfig]:
    """Rebuild the trained generator (eval mode) and the run's config from a checkpoint."""
    try:
        cfg = TrainConfig.from_dict(dict(ckpt["config"]))
        state = ckpt["model"][which]
    except (KeyError, TypeError, TrainError) as e:
        raise TrainError(f"checkpoint lacks a usable config or generator weights ({e})") from None
    generator = build_generator(cfg)
    try:
        generator.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise TrainError("checkpoint's generator weights do not fit the RRDN generator of its "
                         f"config (another model?): {' '.join(first[:3])[:300]}") from None
    return generator.to(device).eval(), cfg


@torch.no_grad()
def denoise_hu(generator: RRDNGenerator, hu, cfg: TrainConfig, device: torch.device,
               precision: str = "fp32", batch_size: int = 4, progress=None) -> np.ndarray:
    """Denoise CT slices: ``hu`` float ``[S, H, W]`` (or ``[H, W]``) in HU -> float32, same shape.

    The slices go to the unit window without clipping (values outside [-1000, 1000] HU pass
    through linearly), are split by the wavelet transform when the run used it, the
    generator replaces the high-frequency part, the low-frequency part is added back.
    ``progress``: optional callable ``(slices_done)`` for a progress bar.
    """
    from pdml.data.hu import hu_to_unit, unit_to_hu
    from pdml.data.wavelet import wavelet_split

    hu = np.asarray(hu, dtype=np.float32)
    squeeze = hu.ndim == 2
    if squeeze:
        hu = hu[None]
    if hu.ndim != 3:
        raise ValueError(f"hu must be [S, H, W] or [H, W], got shape {hu.shape}")
    generator.eval()
    autocast = _autocast(device, precision)
    out = np.empty_like(hu)
    for start in range(0, hu.shape[0], batch_size):
        unit = hu_to_unit(hu[start:start + batch_size], clip=False).astype(np.float32)
        if cfg.wavelet:
            low, high = wavelet_split(unit, cfg.wavelet_name, cfg.wavelet_level)
        else:
            low, high = np.zeros_like(unit), unit
        scale = cfg.resolved_net_scale
        x = torch.from_numpy(np.ascontiguousarray(high * scale)).unsqueeze(1).to(device)
        with autocast:
            y = generator(x)
        y = y.float().squeeze(1).cpu().numpy() / scale
        out[start:start + batch_size] = unit_to_hu(low + y)
        if progress is not None:
            progress(min(start + batch_size, hu.shape[0]))
    return out[0] if squeeze else out


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[precision])


# --------------------------------------------------------------------------- telemetry

class GpuTelemetry:
    """Utilisation, memory and power of the run's GPU through nvidia-ml-py (NVML).

    ``sample() -> dict`` (empty on CPU, or when NVML cannot be loaded)."""

    def __init__(self, device: torch.device):
        self._handle = None
        if device.type != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            index = device.index if device.index is not None else torch.cuda.current_device()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self._nvml = pynvml
        except Exception as e:  # no driver library, no permission: training goes on
            warnings.warn(f"GPU telemetry off: NVML unavailable ({e})")

    def sample(self) -> dict:
        if self._handle is None:
            return {}
        nv = self._nvml
        out = {}
        try:
            out["gpu_util_pct"] = float(nv.nvmlDeviceGetUtilizationRates(self._handle).gpu)
            out["gpu_mem_used_mib"] = nv.nvmlDeviceGetMemoryInfo(self._handle).used / 2**20
            out["gpu_power_w"] = nv.nvmlDeviceGetPowerUsage(self._handle) / 1000.0
        except Exception:  # a counter the GPU does not expose
            pass
        return out


# --------------------------------------------------------------------------- data stream

class IndexStream:
    """The endless, resumable sample order of one rank over a dataset.

    Epoch ``e`` is the order of a :class:`~torch.utils.data.DistributedSampler` with
    ``set_epoch(e)``; sample ``p`` of the stream is a pure function of ``(seed, rank, p)``,
    so a resumed run picks up the exact same samples without replaying the loader.
    """

    def __init__(self, dataset_len: int, info: DistInfo, seed: int):
        from torch.utils.data import DistributedSampler

        if dataset_len < info.world:
            raise TrainError(f"the dataset has {dataset_len} samples, fewer than the "
                             f"{info.world} ranks")
        self.sampler = DistributedSampler(range(dataset_len), num_replicas=info.world,
                                          rank=info.rank, shuffle=True, seed=seed,
                                          drop_last=True)
        self.per_epoch = len(self.sampler)
        self._epoch, self._order = -1, []

    def positions(self, start: int, count: int) -> list[tuple[int, int]]:
        """``(epoch, dataset index)`` of stream samples ``start .. start + count - 1``."""
        out = []
        for p in range(start, start + count):
            epoch, pos = divmod(p, self.per_epoch)
            if epoch != self._epoch:
                self.sampler.set_epoch(epoch)
                self._epoch, self._order = epoch, list(iter(self.sampler))
            out.append((epoch, self._order[pos]))
        return out


# --------------------------------------------------------------------------- the run

def _fmt_time(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s"


class TrainingRun:
    """One run of ``pdml-train`` (all ranks construct one; rank 0 alone writes).

    ``TrainingRun(cfg).run() -> summary dict``; ``TrainingRun(None, resume=RUN_DIR)``
    continues a run from ``RUN_DIR/checkpoints/last.pt`` with the run's own config.
    """

    def __init__(self, cfg: Optional[TrainConfig], resume: Optional[str] = None,
                 stream=None):
        self.stream = stream if stream is not None else sys.stdout
        ckpt = None
        if resume is not None:
            ckpt = load_checkpoint(Path(resume) / "checkpoints" / "last.pt"
                                   if Path(resume).is_dir() else resume)
            cfg = TrainConfig.from_dict(dict(ckpt["config"]))
            run_dir = Path(resume) if Path(resume).is_dir() else Path(resume).parent.parent
        else:
            if cfg is None:
                raise TrainError("a config or --resume RUN_DIR is needed")
            cfg.validate()
            run_dir = Path(cfg.out) if cfg.out else Path("runs") / (
                time.strftime("%Y%m%d-%H%M%S") + f"-{cfg.loss}")
        self.cfg, self.run_dir = cfg, run_dir
        self.info, self.device = init_distributed(cfg.device)
        try:
            self._setup(ckpt)
        except BaseException:
            self.close()
            raise

    # ---------------------------------------------------------------- setup
    def _setup(self, ckpt: Optional[dict]) -> None:
        cfg, info, device = self.cfg, self.info, self.device
        if info.is_main and ckpt is None and (self.run_dir / "checkpoints" / "last.pt").exists():
            raise TrainError(f"{self.run_dir} already holds a run; continue it with "
                             f"--resume {self.run_dir} or choose another --out")
        if cfg.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise TrainError("--precision bf16 needs a GPU with bfloat16 support")
        if device.type == "cpu":
            torch.set_num_threads(cpu_threads(cfg.threads))
        # identical initial weights on every rank (DDP also broadcasts rank 0's)
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        random.seed(cfg.seed)
        self.data = build_data(cfg, info)
        self.generator, self.discriminator, self.heads = build_networks(cfg)
        for m in (self.generator, self.discriminator, self.heads):
            if m is not None:
                m.to(device)
        g_params = list(self.generator.parameters())
        if self.heads is not None:
            g_params += list(self.heads.parameters())
        betas = (cfg.beta1, cfg.beta2)
        self.opt_g = torch.optim.Adam(g_params, lr=cfg.lr, betas=betas)
        self.opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=cfg.lr, betas=betas)
        self.sched_g = torch.optim.lr_scheduler.LambdaLR(self.opt_g, lambda s: lr_factor(s, cfg))
        self.sched_d = torch.optim.lr_scheduler.LambdaLR(self.opt_d, lambda s: lr_factor(s, cfg))
        # fp16: start at 2**10, not torch's 2**16, which overflows the first steps' gradients
        # (the metric loss's exp(s/τ) terms are up to e^{1/0.15}) and so skips them.
        self.scaler = torch.amp.GradScaler(device.type, init_scale=2.0 ** 10,
                                           enabled=cfg.precision == "fp16")
        self.autocast = _autocast(device, cfg.precision)

        g_pass: nn.Module = GeneratorPass(self.generator, self.heads, cfg.loss_layers)
        d_model: nn.Module = self.discriminator
        if info.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [device.index] if device.type == "cuda" else None
            g_pass = DDP(g_pass, device_ids=ids)
            d_model = DDP(d_model, device_ids=ids)
        d_for_g: nn.Module = self.discriminator
        if cfg.compile:
            g_pass, d_model, d_for_g = (torch.compile(g_pass), torch.compile(d_model),
                                        torch.compile(d_for_g))
        self.g_pass, self.d_model, self.d_for_g = g_pass, d_model, d_for_g

        self.step = 0
        self.best = {"step": -1, "psnr": None}
        self.last_eval: Optional[dict] = None
        self.elapsed_before = 0.0
        # each rank draws its own crops and patch positions
        torch.manual_seed(cfg.seed + 1_000_003 * (info.rank + 1))
        np.random.seed((cfg.seed + 7919 * (info.rank + 1)) % 2**32)
        random.seed(cfg.seed + 104_729 * (info.rank + 1))
        if ckpt is not None:
            self._load_state(ckpt)
        self.samples = IndexStream(len(self.data.train), info, cfg.seed)
        self.telemetry = GpuTelemetry(device)
        if info.is_main:
            (self.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            (self.run_dir / "figures").mkdir(exist_ok=True)
            atomic_write_bytes(self.run_dir / "config.json",
                               (json.dumps(cfg.to_dict(), indent=2) + "\n").encode())
            self._trim_metrics(self.step)

    def _load_state(self, ckpt: dict) -> None:
        try:
            self.generator.load_state_dict(ckpt["model"]["generator"])
            self.discriminator.load_state_dict(ckpt["model"]["discriminator"])
            if self.heads is not None:
                self.heads.load_state_dict(ckpt["model"]["heads"])
            self.opt_g.load_state_dict(ckpt["optimizer"]["generator"])
            self.opt_d.load_state_dict(ckpt["optimizer"]["discriminator"])
            self.sched_g.load_state_dict(ckpt["scheduler"]["generator"])
            self.sched_d.load_state_dict(ckpt["scheduler"]["discriminator"])
            self.scaler.load_state_dict(ckpt["scaler"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise TrainError(f"checkpoint does not match this run's networks: {e}") from None
        self.step = int(ckpt["step"])
        self.best = dict(ckpt["best"])
        self.elapsed_before = float(ckpt.get("elapsed_s", 0.0))
        states = ckpt["rng"]
        if len(states) == self.info.world:
            restore_rng_state(states[self.info.rank])
        elif self.info.is_main:
            warnings.warn(f"the checkpoint was written by {len(states)} ranks, this run has "
                          f"{self.info.world}: random streams restart (not bit-exact)")

    def _trim_metrics(self, step: int) -> None:
        """Drop metric records past ``step`` (a killed run logged beyond its checkpoint)
        and any torn last line."""
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("step", 0) <= step:
                kept.append(line)
        atomic_write_bytes(path, ("\n".join(kept) + "\n" if kept else "").encode())

    # ---------------------------------------------------------------- one step
    def _batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Step ``step``'s crops of this rank: LD ``x`` and ND ``y`` ``[B, 1, crop, crop]``
        float32, in the networks' scale (unit window × ``net_scale``), on the device."""
        b = self.cfg.batch_size
        pairs = [self.data.train.get(e, i) for e, i in self.samples.positions(step * b, b)]
        scale = self.cfg.resolved_net_scale
        x = torch.stack([p[0] for p in pairs]) * scale
        y = torch.stack([p[1] for p in pairs]) * scale
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """One generator step then one discriminator step; -> detached float32 losses."""
        cfg = self.cfg
        zero = torch.zeros((), device=self.device)
        # generator (and heads) step; D is frozen so its weights get no gradient
        _set_requires_grad(self.discriminator, False)
        self.opt_g.zero_grad(set_to_none=True)
        with self.autocast:
            fake, idt, fq, fk = self.g_pass(x, y if cfg.lambda_identity > 0 else None)
            loss_gan = (self.d_for_g(fake).float() - 1.0).square().mean()
            # identity L1 in the unit window (the paper's scale), not the networks' scale
            loss_idt = ((idt.float() - y).abs().mean() / cfg.resolved_net_scale
                        if idt is not None else zero)
            loss_patch = patch_loss(cfg, fq, fk) if fq else zero
            loss_g = (cfg.lambda_gan * loss_gan + cfg.lambda_identity * loss_idt
                      + cfg.lambda_metric * loss_patch)
        self.scaler.scale(loss_g).backward()
        self.scaler.step(self.opt_g)
        _set_requires_grad(self.discriminator, True)
        # discriminator step: LSGAN, real ND = 1, generated = 0
        self.opt_d.zero_grad(set_to_none=True)
        with self.autocast:
            scores = self.d_model(torch.cat([y, fake.detach()], dim=0)).float()
            s_real, s_fake = scores[:y.shape[0]], scores[y.shape[0]:]
            loss_d = 0.5 * ((s_real - 1.0).square().mean() + s_fake.square().mean())
        self.scaler.scale(loss_d).backward()
        self.scaler.step(self.opt_d)
        self.scaler.update()
        with warnings.catch_warnings():
            # fp16: a step the scaler skipped (inf gradients) still advances the schedule
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            self.sched_g.step()
            self.sched_d.step()
        return {"loss_G": loss_g.detach().float(), "loss_D": loss_d.detach(),
                "loss_gan": loss_gan.detach(), "loss_idt": loss_idt.detach(),
                "loss_patch": loss_patch.detach().float()}

    # ---------------------------------------------------------------- evaluation
    def evaluate(self, step: int) -> Optional[dict]:
        """Denoise the held-out slices (rank 0): metrics record, figure; None elsewhere."""
        if not self.info.is_main or not self.data.val:
            return None
        metrics = evaluate_slices(self.generator, self.data.val, self.cfg, self.device)
        self.generator.train()
        record = {"kind": "eval", "step": step, **metrics}
        self._log(record)
        try:
            save_eval_figure(self.data.val[0], metrics.pop("_first_denoised"),
                             self.run_dir / "figures" / f"eval_step{step:07d}.png", step)
        except Exception as e:  # a figure must never stop training
            warnings.warn(f"eval figure not written: {e}")
        record.pop("_first_denoised", None)
        return record

    # ---------------------------------------------------------------- checkpoint
    def _checkpoint_obj(self, step: int, elapsed: float) -> dict:
        states = capture_rng_state()
        if self.info.enabled:
            gathered = [None] * self.info.world
            dist.all_gather_object(gathered, states)
            states = gathered
        else:
            states = [states]
        return {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
            "pdml_version": __import__("pdml").__version__,
            "step": step, "world_size": self.info.world, "elapsed_s": elapsed,
            "config": self.cfg.to_dict(),
            "model": {"generator": self.generator.state_dict(),
                      "discriminator": self.discriminator.state_dict(),
                      "heads": self.heads.state_dict() if self.heads is not None else {}},
            "optimizer": {"generator": self.opt_g.state_dict(),
                          "discriminator": self.opt_d.state_dict()},
            "scheduler": {"generator": self.sched_g.state_dict(),
                          "discriminator": self.sched_d.state_dict()},
            "scaler": self.scaler.state_dict(),
            "rng": states, "best": dict(self.best),
        }

    def checkpoint(self, step: int, elapsed: float, is_best: bool) -> None:
        obj = self._checkpoint_obj(step, elapsed)  # collective: every rank takes part
        if self.info.is_main:
            save_checkpoint(obj, self.run_dir / "checkpoints" / "last.pt")
            if is_best:
                save_checkpoint(obj, self.run_dir / "checkpoints" / "best.pt")
        barrier(self.info)

    # ---------------------------------------------------------------- logging
    def _log(self, record: dict) -> None:
        if not self.info.is_main:
            return
        record = {k: v for k, v in record.items() if not k.startswith("_")}
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def _ranks_in_sync(self) -> Optional[bool]:
        """True when every rank holds bit-identical networks (None without DDP)."""
        if not self.info.enabled:
            return None
        modules = [self.generator, self.discriminator] + ([self.heads] if self.heads else [])
        flat = torch.cat([p.detach().float().flatten() for m in modules for p in m.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(self.info.world)]
        dist.all_gather(gathered, flat)
        return all(torch.equal(gathered[0], g) for g in gathered[1:])

    def _stop_now(self, started: float) -> bool:
        """Time budget reached? Rank 0 decides for every rank."""
        if self.cfg.max_minutes is None:
            return False
        flag = torch.tensor([float(time.time() - started > 60.0 * self.cfg.max_minutes)])
        if self.info.enabled:
            dist.broadcast(flag, 0)
        return bool(flag.item())

    # ---------------------------------------------------------------- main loop
    def run(self) -> dict:
        from tqdm.auto import tqdm

        cfg, info = self.cfg, self.info
        start_step = self.step
        started = time.time()
        bar = tqdm(total=cfg.steps, initial=start_step, desc="pdml-train", unit="step",
                   dynamic_ncols=True, disable=not (info.is_main and cfg.progress),
                   file=sys.stderr)
        sums: dict[str, torch.Tensor] = {}
        window_steps, window_start = 0, time.time()
        stopped_early = False
        try:
            while self.step < cfg.steps:
                if self._stop_now(started):
                    stopped_early = True
                    break
                x, y = self._batch(self.step)
                losses = self.train_step(x, y)
                self.step += 1
                window_steps += 1
                for k, v in losses.items():
                    sums[k] = sums[k] + v if k in sums else v
                bar.update(1)
                last_step = self.step == cfg.steps
                if self.step % cfg.log_every == 0 or last_step:
                    dt = max(time.time() - window_start, 1e-9)
                    rec = {"kind": "train", "step": self.step,
                           **{k: float(v) / window_steps for k, v in sums.items()},
                           "lr": self.opt_g.param_groups[0]["lr"],
                           "img_per_s": window_steps * cfg.batch_size * info.world / dt,
                           **self.telemetry.sample()}
                    self._log(rec)
                    bar.set_postfix(G=f"{rec['loss_G']:.3f}", D=f"{rec['loss_D']:.3f}",
                                    P=f"{rec['loss_patch']:.3f}", img_s=f"{rec['img_per_s']:.1f}")
                    sums, window_steps, window_start = {}, 0, time.time()
                paused = time.time()
                if self._maybe_eval_and_checkpoint(started, force=last_step):
                    window_start += time.time() - paused  # img/s counts training time only
            if stopped_early and self.step > start_step:
                self._maybe_eval_and_checkpoint(started, force=True)
        finally:
            bar.close()
        summary = self._summary(start_step, started, stopped_early)
        self.close()
        return summary

    def _maybe_eval_and_checkpoint(self, started: float, force: bool) -> bool:
        """Evaluate and/or checkpoint when due; -> whether anything ran."""
        cfg = self.cfg
        is_best, ran = False, False
        if self.step % cfg.eval_every == 0 or force:
            rec = self.evaluate(self.step)
            if rec is not None and rec["psnr"] is not None and (
                    self.best["psnr"] is None or rec["psnr"] > self.best["psnr"]):
                self.best = {"step": self.step, "psnr": rec["psnr"]}
                is_best = True
            if self.info.enabled:  # every rank tracks the same best
                box = [self.best, is_best]
                dist.broadcast_object_list(box, 0)
                self.best, is_best = box
            self.last_eval = rec
            ran = True
        if self.step % cfg.ckpt_every == 0 or force or is_best:
            self.checkpoint(self.step, self.elapsed_before + time.time() - started, is_best)
            ran = True
        return ran

    def _summary(self, start_step: int, started: float, stopped_early: bool) -> dict:
        in_sync = self._ranks_in_sync()
        elapsed = time.time() - started
        summary = {
            "run_dir": str(self.run_dir), "steps": self.step, "planned_steps": self.cfg.steps,
            "stopped_early": stopped_early, "world_size": self.info.world,
            "elapsed_s": elapsed, "total_elapsed_s": self.elapsed_before + elapsed,
            "img_per_s": (self.step - start_step) * self.cfg.batch_size * self.info.world
            / max(elapsed, 1e-9),
            "ranks_in_sync": in_sync, "best": self.best,
            "cpu_threads": torch.get_num_threads() if self.device.type == "cpu" else None,
            "final_eval": self.last_eval,
        }
        if self.info.is_main:
            try:
                save_loss_figure(self.run_dir / "metrics.jsonl",
                                 self.run_dir / "figures" / "losses.png")
            except Exception as e:
                warnings.warn(f"loss figure not written: {e}")
            atomic_write_bytes(self.run_dir / "summary.json",
                               (json.dumps(summary, indent=2) + "\n").encode())
            print(format_summary(summary, self.cfg), file=self.stream, flush=True)
        return summary

    def close(self) -> None:
        if self.info.initialized_here and dist.is_initialized():
            dist.destroy_process_group()
            self.info.initialized_here = False


def train(cfg: Optional[TrainConfig] = None, resume: Optional[str] = None, stream=None) -> dict:
    """Run (or with ``resume=RUN_DIR`` continue) a training; -> the summary dict."""
    return TrainingRun(cfg, resume=resume, stream=stream).run()


# --------------------------------------------------------------------------- figures, summary

DISPLAY_WINDOW = (-160.0, 240.0)
"""Soft-tissue display window (HU) of the figures (W 400, L 40)."""


def _write_figure(fig, path: Path) -> None:
    """Lay out, render to PNG in memory and write atomically (a killed run leaves no torn PNG)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def save_eval_figure(val_item, denoised: np.ndarray, path: Path, step: int) -> None:
    """PNG of one held-out slice: LD | denoised | ND (when known) | denoised − LD (HU)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    ld, nd = val_item.ld, val_item.nd
    panels = [("LD input", ld), (f"denoised (step {step})", denoised)]
    if nd is not None:
        panels.append(("ND reference", nd))
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(3.2 * (len(panels) + 1), 3.4))
    lo, hi = DISPLAY_WINDOW
    for ax, (title, img) in zip(axes, panels):
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    diff = axes[-1].imshow(denoised - ld, cmap="RdBu_r", vmin=-150, vmax=150)
    axes[-1].set_title("denoised − LD (HU)", fontsize=9)
    axes[-1].axis("off")
    fig.colorbar(diff, ax=axes[-1], fraction=0.046, pad=0.04)
    fig.suptitle(f"window [{lo:.0f}, {hi:.0f}] HU", fontsize=9)
    _write_figure(fig, path)


def save_loss_figure(metrics_path: Path, path: Path) -> None:
    """PNG of the training losses over steps, from ``metrics.jsonl`` (resumed runs included)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    records = []
    for line in Path(metrics_path).read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("kind") == "train":
            records.append(rec)
    if not records:
        return
    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for key in ("loss_G", "loss_D", "loss_gan", "loss_idt", "loss_patch"):
        ax.plot(steps, [r[key] for r in records], label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _write_figure(fig, path)


def format_summary(summary: dict, cfg: TrainConfig) -> str:
    """The terminal table printed at the end of a run."""
    lines = [
        "",
        f"pdml-train summary: {summary['run_dir']}",
        f"  {summary['steps']}/{summary['planned_steps']} steps"
        + (" (stopped at the time limit)" if summary["stopped_early"] else "")
        + f", {_fmt_time(summary['elapsed_s'])} this session"
        + f", {summary['img_per_s']:.1f} img/s, {summary['world_size']} rank(s)"
        + f", loss={cfg.loss}, precision={cfg.precision}"
        + (f", {summary['cpu_threads']} CPU thread(s)" if summary.get("cpu_threads") else ""),
    ]
    if summary.get("ranks_in_sync") is not None:
        lines.append(f"  ranks hold identical parameters: {summary['ranks_in_sync']}")
    ev = summary.get("final_eval")
    if ev:
        rows = [("LD input", "ld_"), ("denoised", "")]
        head = f"  {'held-out slices':<16}{'PSNR dB':>9}{'SSIM':>8}{'noise HU':>10}{'HU shift':>10}"
        lines += [head, "  " + "-" * (len(head) - 2)]
        for name, prefix in rows:
            def cell(key, spec, width):
                v = ev.get(prefix + key)
                return format(v, spec).rjust(width) if v is not None else "-".rjust(width)
            lines.append(f"  {name:<16}{cell('psnr', '.2f', 9)}{cell('ssim', '.4f', 8)}"
                         f"{cell('noise_std', '.1f', 10)}{cell('hu_shift', '+.1f', 10)}")
        ref = "truth/ND" if ev.get("psnr") is not None else "the LD input (no reference)"
        lines.append(f"  ({ev.get('slices')} slice(s); noise = std in homogeneous ROIs, "
                     f"HU shift = mean difference to {ref})")
    best = summary.get("best") or {}
    if best.get("psnr") is not None:
        lines.append(f"  best PSNR {best['psnr']:.2f} dB at step {best['step']} "
                     f"(checkpoints/best.pt)")
    lines.append(f"  checkpoints: {summary['run_dir']}/checkpoints/last.pt; "
                 f"figures: {summary['run_dir']}/figures/")
    return "\n".join(lines)


# --------------------------------------------------------------------------- data

@dataclass
class ValItem:
    """One held-out slice: ``ld`` float32 ``[H, W]`` HU, ``nd`` its ND reference or None."""
    ld: np.ndarray
    nd: Optional[np.ndarray]
    name: str = ""


@dataclass
class RunData:
    """What a run trains and evaluates on.

    ``train``: ``len()`` and ``get(epoch, index) -> (ld, nd)`` crops ``[1, crop, crop]``
    float32 in the unit window (the high-frequency part when the wavelet split is on), the
    two unpaired (:class:`HighFrequencyCrops`); ``val``: held-out slices in HU.
    """
    train: Any
    val: list = field(default_factory=list)


class HighFrequencyCrops:
    """Training crops of the wavelet high-frequency part of whole slices.

    Wraps :class:`pdml.data.UnpairedCTDataset` built on the high-frequency part (HU) of
    every slice: the split is made once on whole slices, exactly as at inference, then
    cropped. The dataset maps HU to the unit window linearly (``(hu + 1000) / 2000``); the
    high-frequency part of the unit image is that minus the window's image of 0 HU.
    Item ``i`` (after ``set_epoch``): ``(ld [1, c, c], nd [1, c, c])`` float32.
    """

    def __init__(self, ld_hu: np.ndarray, nd_hu: np.ndarray, cfg: TrainConfig):
        from pdml.data import UnpairedCTDataset, hu_to_unit, wavelet_split

        if cfg.wavelet:
            ld_hu = wavelet_split(ld_hu, cfg.wavelet_name, cfg.wavelet_level)[1]
            nd_hu = wavelet_split(nd_hu, cfg.wavelet_name, cfg.wavelet_level)[1]
            self.offset = float(hu_to_unit(np.float32(0.0), clip=False))
        else:
            self.offset = 0.0
        try:
            self.dataset = UnpairedCTDataset(ld_hu, nd_hu, crop=cfg.crop, margin=cfg.crop_margin,
                                             flip=True, seed=cfg.seed)
        except ValueError as e:
            raise TrainError(f"training data: {e}") from None

    def __len__(self) -> int:
        return len(self.dataset)

    def get(self, epoch: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.dataset.set_epoch(epoch)
        item = self.dataset[index]
        return item["ld"] - self.offset, item["nd"] - self.offset


def _read_folder(flag: str, folder: Optional[str]) -> np.ndarray:
    """All CT slices of a DICOM (or .npy) folder as float32 [S, H, W] HU; TrainError if unusable."""
    from pdml.data import read_slices

    path = Path(folder)
    if not path.exists():
        raise TrainError(f"{flag} {folder}: no such folder")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # per-file skip warnings of load_ct
        try:
            return read_slices(path)
        except FileNotFoundError as e:  # NoCTImagesError: a folder without CT images
            raise TrainError(f"{flag} {folder}: {e}") from None
        except ValueError as e:
            raise TrainError(f"{flag} {folder}: {e}") from None


def _spread(count: int, total: int) -> list[int]:
    """``count`` indices spread evenly over ``range(total)``."""
    count = min(count, total)
    return sorted({int(round(v)) for v in np.linspace(0, total - 1, count)})


def build_data(cfg: TrainConfig, info: DistInfo) -> RunData:
    """The run's training crops and held-out slices.

    - no ``--ldct/--ndct``: the built-in dataset (:func:`pdml.data.builtin_dataset`, built
      once by rank 0 and cached); held-out: its test split (simulated LD and clean truth);
    - ``--ldct/--ndct``: unpaired folders; held-out: ``--val-ldct/--val-ndct`` when given
      (paired), else a few LD training slices without a reference.
    """
    from pdml.data import builtin_dataset

    val: list[ValItem] = []
    if cfg.ldct is None:
        if info.is_main:
            builtin_dataset(size=cfg.builtin_size, progress=cfg.progress)
        barrier(info)
        ds = builtin_dataset(size=cfg.builtin_size, progress=False)
        ld, nd = ds.load("train/ld"), ds.load("train/nd")
        test_ld, test_truth = ds.load("test/ld"), ds.load("test/truth")
        for i in _spread(cfg.val_slices, len(test_ld)):
            val.append(ValItem(test_ld[i], test_truth[i], f"builtin test {i}"))
    else:
        ld, nd = _read_folder("--ldct", cfg.ldct), _read_folder("--ndct", cfg.ndct)
        if cfg.val_ldct is not None:
            v_ld, v_nd = _read_folder("--val-ldct", cfg.val_ldct), _read_folder("--val-ndct", cfg.val_ndct)
            if v_ld.shape != v_nd.shape:
                raise TrainError(f"--val-ldct and --val-ndct must hold paired slices of the same "
                                 f"shape, got {v_ld.shape} and {v_nd.shape}")
            for i in _spread(cfg.val_slices, len(v_ld)):
                val.append(ValItem(v_ld[i], v_nd[i], f"val {i}"))
        else:
            for i in _spread(cfg.val_slices, len(ld)):
                val.append(ValItem(ld[i], None, f"train LD {i}"))
    for flag, arr in (("--ldct", ld), ("--ndct", nd)):
        if min(arr.shape[1:]) < cfg.crop:
            raise TrainError(f"{flag}: slices of {arr.shape[1]}x{arr.shape[2]} px are smaller "
                             f"than --crop {cfg.crop}")
    return RunData(train=HighFrequencyCrops(ld, nd, cfg), val=val)


def evaluate_slices(generator: RRDNGenerator, val: Sequence[ValItem], cfg: TrainConfig,
                    device: torch.device) -> dict:
    """Denoise the held-out slices; -> mean metrics (HU / dB) for the denoised slices and,
    prefixed ``ld_``, for the LD input; ``_first_denoised`` is slice 0 (for the figure).

    With a reference (truth or ND): PSNR, SSIM, noise std of ``image − reference`` and the
    HU shift ``image − reference`` in homogeneous ROIs (:mod:`pdml.metrics`). Without
    (unpaired data and no validation folders): the noise std of the image and the HU
    shift of the denoised slice against its LD input.
    """
    from pdml import metrics

    groups: dict[tuple, list[int]] = {}
    for i, item in enumerate(val):  # slices of one shape go through the network together
        groups.setdefault(item.ld.shape, []).append(i)
    denoised: list[Optional[np.ndarray]] = [None] * len(val)
    for idxs in groups.values():
        out = denoise_hu(generator, np.stack([val[i].ld for i in idxs]), cfg, device,
                         precision=cfg.precision)
        for j, i in enumerate(idxs):
            denoised[i] = out[j]
    per: dict[str, list[float]] = {}

    def add(key, value):
        per.setdefault(key, []).append(float(np.asarray(value).reshape(-1)[0]))

    for item, den in zip(val, denoised):
        if item.nd is not None:
            for prefix, img in (("", den), ("ld_", item.ld)):
                add(prefix + "psnr", metrics.psnr(img, item.nd))
                add(prefix + "ssim", metrics.ssim(img, item.nd))
                add(prefix + "noise_std", metrics.noise_std(img, item.nd))
                add(prefix + "hu_shift", metrics.hu_shift(img, item.nd))
        else:
            add("noise_std", metrics.noise_std(den))
            add("ld_noise_std", metrics.noise_std(item.ld))
            add("hu_shift", metrics.hu_shift(den, item.ld))
            add("ld_hu_shift", 0.0)
    result: dict[str, Any] = {k: float(np.mean(v)) for k, v in per.items()}
    if "psnr" not in result:
        result["psnr"] = None
    result["slices"] = len(val)
    result["_first_denoised"] = denoised[0]
    return result
