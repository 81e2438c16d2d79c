"""The generators' dense blocks as pdml computed them before :mod:`pdml.models.dense`:
a concatenation and a replicate-padded copy (inside the conv) per conv, NCHW.

The oracle of ``tests/test_models_dense.py`` and the baseline that
``benchmarks/bench_generator.py`` times beside the one-buffer blocks. It runs the blocks'
own modules, so a generator under :func:`baseline_blocks` has the same weights and the
same spectral-norm power iterations as without.
"""
from __future__ import annotations

import contextlib
import types

import torch

from pdml.models import DmlCtDenseBlock, ResidualDenseBlock
from pdml.models import dmlct as dmlct_module
from pdml.models import generator as generator_module


def dmlct_block_forward(block: DmlCtDenseBlock, x: torch.Tensor) -> torch.Tensor:
    feats = [x]
    for conv in block.convs:
        feats.append(block.act(conv(torch.cat(feats, dim=1))))
    return x + dmlct_module.RESIDUAL_SCALE * feats[-1]


def rrdn_block_forward(block: ResidualDenseBlock, x: torch.Tensor) -> torch.Tensor:
    feats = [x]
    for conv in block.convs:
        feats.append(block.act(conv(torch.cat(feats, dim=1))))
    out = block.attention(block.fuse(torch.cat(feats, dim=1)))
    return x + generator_module.RESIDUAL_SCALE * out


@contextlib.contextmanager
def baseline_blocks(generator: torch.nn.Module):
    """Inside: every dense block of ``generator`` runs the concatenating forward."""
    patched = []
    for module in generator.modules():
        forward = {DmlCtDenseBlock: dmlct_block_forward,
                   ResidualDenseBlock: rrdn_block_forward}.get(type(module))
        if forward is not None:
            module.forward = types.MethodType(forward, module)
            patched.append(module)
    try:
        yield generator
    finally:
        for module in patched:
            del module.forward


@contextlib.contextmanager
def baseline_block_classes():
    """Inside: every dense block, of any generator built before or inside, runs the
    concatenating forward (for code that builds its own generator, e.g. pdml-denoise)."""
    saved = DmlCtDenseBlock.forward, ResidualDenseBlock.forward
    DmlCtDenseBlock.forward, ResidualDenseBlock.forward = dmlct_block_forward, rrdn_block_forward
    try:
        yield
    finally:
        DmlCtDenseBlock.forward, ResidualDenseBlock.forward = saved
