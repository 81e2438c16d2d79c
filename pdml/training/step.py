"""One training step (the paper's, after CUT): a generator step, then a discriminator step.

1. generator step: ``fake = G(x_hi)``, ``idt = G(y_hi)`` (one pass over both), then
   ``L_G = λ_gan·LSGAN(D(fake), 1) + λ_idt·|idt − y_hi|₁ + λ_metric·L_patch``, where
   ``L_patch`` averages, over the loss layers (trunk, fusion), the patch loss
   (:func:`pdml.ops.patch_metric_rows_layers`, or ``patch_nce_rows_layers``; all layers in
   one call) of the projected rows of ``fake`` (q) and ``x_hi`` (k) at the same
   ``num_patches`` random positions per layer. Sample, then project: the heads run only on
   the sampled pixels (:func:`project_patches`), never on the full maps;
2. discriminator step: ``L_D = ½·(LSGAN(D(y_hi), 1) + LSGAN(D(fake.detach()), 0))``.

:class:`SupervisedStep` is the upper bound the HU-shift experiment compares with: G alone,
``L = |G(x) − y|₁`` against the paired reference ``y`` of the same crop.

``x`` is a low-dose (LD) crop, ``y`` an unpaired normal-dose (ND) crop, both in the
paper's unit window; with the wavelet split on (default) the networks see only the
high-frequency part (``_hi``, times ``net_scale``) and the LD image's low-frequency part
is added back at inference, so the global CT numbers come from the input.
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence

import torch
from torch import nn
from torch.profiler import record_function

from pdml import ops
from pdml.models import FeatureGenerator, ProjectionHeads
from pdml.sample import draw_patch_ids, sampled_rows
from pdml.training.config import AUTOCAST_DTYPES, METRIC_LOSS, TrainConfig, TrainError

COMPILE_OPTIONS = {"layout_optimization": False}
"""Inductor settings of ``--compile``: the networks keep their tensors' layouts. With
inductor's own choice (channels-last conv outputs) the backward of replicate padding, which
every 3×3 conv here uses, returns strides its shape function does not predict, and the
compiled step stops with an assertion (torch 2.14)."""


def sample_patch_ids(hw: int, num_patches: int, layers: int, device: torch.device
                     ) -> list[torch.Tensor]:
    """``layers`` draws of ``min(num_patches, hw)`` distinct flat positions in ``[0, hw)``
    (int64 ``[N]`` each, on ``device``), fresh per layer from the CPU RNG
    (:func:`pdml.sample.draw_patch_ids`); the same ids serve the output's (q) and the
    input's (k) rows of a layer."""
    return [draw_patch_ids(hw, num_patches, device) for _ in range(layers)]


def project_patches(heads: ProjectionHeads, q_maps: Sequence[torch.Tensor],
                    k_maps: Sequence[torch.Tensor], ids: Sequence[torch.Tensor],
                    backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Project the sampled rows of every loss layer and L2-normalise them.

    ``q_maps``/``k_maps``: one generator feature map ``[B, F, H, W]`` per layer (of the
    output and of the input); ``ids``: one int64 ``[N]`` per layer. -> ``(q, k)``, each
    ``[L·B·N, D]`` in the maps' dtype: layer ``l`` is rows ``l·B·N .. (l+1)·B·N − 1``,
    row ``b·N + i`` of a layer is pixel ``ids[i]`` of image ``b`` (CUT's order), each row
    divided by ``‖row‖₂ + 1e-7`` (CUT's Normalize, computed in float32 at least): the rows
    of :func:`pdml.sample.sampled_rows`, as :class:`pdml.sample.PatchSampleF` makes them.
    Only the sampled pixels go through the heads (:meth:`ProjectionHead.forward_sampled`).
    ``backend`` (the run's loss backend) also runs the fused gather + first linear layer
    when it has that op for these maps, else "auto" picks one.
    """
    if backend != "auto" and ops.available_backends(q_maps[0], "gather_project")[backend]:
        backend = "auto"
    for what, items in (("maps", q_maps), ("maps", k_maps), ("ids", ids)):
        if len(items) != len(heads.layers):
            raise ValueError(f"expected {len(heads.layers)} {what} (layers {heads.layers}), got {len(items)}")

    def rows(maps):
        return torch.cat([sampled_rows(fmap, layer_ids, heads.heads[name], backend)
                          for name, fmap, layer_ids in zip(heads.layers, maps, ids)], dim=0)

    return rows(q_maps), rows(k_maps)


class GeneratorPass(nn.Module):
    """Everything the generator step runs through G and the heads, as one module so DDP
    sees a single forward per step.

    ``forward(x [B,1,h,w], y [B,1,h,w] or None, ids [per loss layer] or None)`` ->
    ``(fake [B,1,h,w], idt [B,1,h,w] or None, q, k)``: ``q``/``k`` are the normalised,
    projected rows ``[L·B·N, D]`` of ``fake`` (queries) and ``x`` (keys) at ``ids``
    (:func:`project_patches`); ``None`` without heads.
    """

    def __init__(self, generator: FeatureGenerator, heads: Optional[ProjectionHeads],
                 layers: Sequence[str], backend: str = "auto"):
        super().__init__()
        self.generator, self.heads, self.layers = generator, heads, tuple(layers)
        self.backend = backend

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor],
                ids: Optional[Sequence[torch.Tensor]] = None):
        b = x.shape[0]
        both = x if y is None else torch.cat([x, y], dim=0)
        if self.heads is None:
            with record_function("G forward"):
                out = self.generator(both)
            return out[:b], (None if y is None else out[b:]), None, None
        with record_function("G forward"):
            out, feats = self.generator.forward_with_features(both, self.layers)
            fake, idt = out[:b], (None if y is None else out[b:])
            fake_feats = self.generator.features(fake, self.layers)
        with record_function("heads+loss"):
            q, k = project_patches(self.heads, fake_feats, [f[:b] for f in feats], ids,
                                   backend=self.backend)
        return fake, idt, q, k


def patch_loss(cfg: TrainConfig, q: torch.Tensor, k: torch.Tensor, batch_size: int
               ) -> torch.Tensor:
    """Mean over the ``len(cfg.loss_layers)`` loss layers of the patch loss of the rows
    ``q``, ``k`` ``[L·B·N, D]`` (:func:`project_patches`), negatives from the same image,
    in ONE op call -> float32 scalar (float64 for float64 rows)."""
    layers = len(cfg.loss_layers)
    if cfg.loss == METRIC_LOSS:
        return ops.patch_metric_rows_layers(q, k, layers=layers, tau=cfg.resolved_tau,
                                            batch_size=batch_size, negatives="image",
                                            backend=cfg.loss_backend)
    return ops.patch_nce_rows_layers(q, k, layers=layers, tau=cfg.resolved_tau,
                                     batch_size=batch_size, negatives="image",
                                     backend=cfg.loss_backend).mean()


def loss_backend_used(cfg: TrainConfig, device: torch.device) -> Optional[str]:
    """The backend that runs the run's patch loss on ``device`` in its precision ("auto"
    and ``PDML_BACKEND`` resolved; None with ``--loss none``); TrainError when the one
    asked for by name cannot (Triton on a CPU, an extension not built, ...)."""
    if cfg.loss == "none":
        return None
    op = "patch_metric_rows" if cfg.loss == METRIC_LOSS else "patch_nce_rows"
    rows = torch.empty(0, device=device, dtype=AUTOCAST_DTYPES.get(cfg.precision, torch.float32))
    if cfg.loss_backend != "auto":
        why = ops.available_backends(rows, op)[cfg.loss_backend]
        if why is not None:
            raise TrainError(f"--loss-backend {cfg.loss_backend} cannot run the {cfg.loss} "
                             f"loss on {device} ({cfg.precision}): {why}")
    try:
        return ops.resolve_backend(cfg.loss_backend, rows, op).name
    except (RuntimeError, ValueError) as e:  # PDML_BACKEND naming one that cannot run
        raise TrainError(f"the {cfg.loss} loss cannot run on {device} ({cfg.precision}): {e}") from None


def set_requires_grad(module: nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


class GanStep:
    """The G+D step of a run: ``step(x, y) -> losses``.

    ``x``, ``y``: LD and ND crops ``[B, 1, crop, crop]`` float32 in the networks' scale, on
    the run's device. Returns detached float32 scalars ``loss_G``, ``loss_D``, ``loss_gan``,
    ``loss_idt``, ``loss_patch``. ``g_pass``/``d_model`` may be DDP- or compile-wrapped;
    ``d_for_g`` is the discriminator the generator step scores with (never DDP-wrapped:
    D takes no step there), ``discriminator`` the bare module (frozen during the G step).
    """

    def __init__(self, cfg: TrainConfig, *, g_pass: nn.Module, d_model: nn.Module,
                 d_for_g: nn.Module, discriminator: nn.Module, opt_g, opt_d, sched_g, sched_d,
                 scaler: torch.amp.GradScaler, autocast, device: torch.device):
        self.cfg, self.g_pass, self.d_model, self.d_for_g = cfg, g_pass, d_model, d_for_g
        self.discriminator, self.opt_g, self.opt_d = discriminator, opt_g, opt_d
        self.sched_g, self.sched_d, self.scaler = sched_g, sched_d, scaler
        self.autocast, self.device = autocast, device

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        zero = torch.zeros((), device=self.device)
        ids = None
        if cfg.loss != "none":
            ids = sample_patch_ids(x.shape[2] * x.shape[3], cfg.num_patches,
                                   len(cfg.loss_layers), x.device)
        # generator (and heads) step; D is frozen so its weights get no gradient
        set_requires_grad(self.discriminator, False)
        with record_function("optimizer"):
            self.opt_g.zero_grad(set_to_none=True)
        with self.autocast:
            fake, idt, q, k = self.g_pass(x, y if cfg.lambda_identity > 0 else None, ids)
            with record_function("G forward"):
                loss_gan = (self.d_for_g(fake).float() - 1.0).square().mean()
                # identity L1 in the unit window (the paper's scale), not the networks' scale
                loss_idt = ((idt.float() - y).abs().mean() / cfg.resolved_net_scale
                            if idt is not None else zero)
            with record_function("heads+loss"):
                loss_patch = patch_loss(cfg, q, k, x.shape[0]) if q is not None else zero
            loss_g = (cfg.lambda_gan * loss_gan + cfg.lambda_identity * loss_idt
                      + cfg.lambda_metric * loss_patch)
        with record_function("G backward"):
            self.scaler.scale(loss_g).backward()
        with record_function("optimizer"):
            self.scaler.step(self.opt_g)
        set_requires_grad(self.discriminator, True)
        # discriminator step: LSGAN, real ND = 1, generated = 0
        with record_function("D"):
            self.opt_d.zero_grad(set_to_none=True)
            with self.autocast:
                scores = self.d_model(torch.cat([y, fake.detach()], dim=0)).float()
                s_real, s_fake = scores[:y.shape[0]], scores[y.shape[0]:]
                loss_d = 0.5 * ((s_real - 1.0).square().mean() + s_fake.square().mean())
            self.scaler.scale(loss_d).backward()
        with record_function("optimizer"):
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


class SupervisedStep:
    """The step of a ``--supervised`` run: ``step(x, y) -> losses`` with ``L_G = |G(x) − y|₁``
    in the unit window (``y`` the paired reference crop of ``x``, both ``[B, 1, crop, crop]``
    float32 in the networks' scale); Adam on G only. The returned dict has the keys of
    :class:`GanStep` (the adversarial, identity, patch and D terms are 0)."""

    def __init__(self, cfg: TrainConfig, *, generator: nn.Module, opt_g, sched_g, scaler,
                 autocast, device: torch.device):
        self.cfg, self.generator, self.opt_g, self.sched_g = cfg, generator, opt_g, sched_g
        self.scaler, self.autocast, self.device = scaler, autocast, device

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        zero = torch.zeros((), device=self.device)
        self.opt_g.zero_grad(set_to_none=True)
        with self.autocast:
            loss = (self.generator(x).float() - y).abs().mean() / self.cfg.resolved_net_scale
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt_g)
        self.scaler.update()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            self.sched_g.step()
        return {"loss_G": loss.detach(), "loss_D": zero, "loss_gan": zero, "loss_idt": zero,
                "loss_patch": zero}


def build_step(cfg: TrainConfig, *, generator: nn.Module, discriminator: nn.Module,
               heads: Optional[ProjectionHeads], opt_g, opt_d, sched_g, sched_d, scaler,
               autocast, device: torch.device, distributed: bool):
    """The run's step: :class:`SupervisedStep` with ``cfg.supervised`` (G alone; D stays at
    its initial weights), else the G+D :class:`GanStep`. Under torchrun (``distributed``)
    the modules that take a step are DDP-wrapped; with ``cfg.compile`` compiled."""

    def wrap(module: nn.Module, ddp: bool = True) -> nn.Module:
        if ddp and distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            module = DDP(module, device_ids=[device.index] if device.type == "cuda" else None)
        return torch.compile(module, options=COMPILE_OPTIONS) if cfg.compile else module

    if cfg.supervised:
        return SupervisedStep(cfg, generator=wrap(generator), opt_g=opt_g, sched_g=sched_g,
                              scaler=scaler, autocast=autocast, device=device)
    g_pass = GeneratorPass(generator, heads, cfg.loss_layers, cfg.loss_backend)
    # the D that scores G's output takes no step there: never DDP-wrapped
    return GanStep(cfg, g_pass=wrap(g_pass), d_model=wrap(discriminator),
                   d_for_g=wrap(discriminator, ddp=False), discriminator=discriminator,
                   opt_g=opt_g, opt_d=opt_d, sched_g=sched_g, sched_d=sched_d, scaler=scaler,
                   autocast=autocast, device=device)
