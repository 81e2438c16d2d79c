"""One training step (the paper's, after CUT): a generator step, then a discriminator step.

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
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence

import torch
from torch import nn

from pdml import ops
from pdml.models import ProjectionHeads, RRDNGenerator
from pdml.training.config import TrainConfig


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
        # generator (and heads) step; D is frozen so its weights get no gradient
        set_requires_grad(self.discriminator, False)
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
        set_requires_grad(self.discriminator, True)
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
