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
from pdml.models.feature_generator import FeatureGenerator, FeatureTap
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


def baseline_run(generator: FeatureGenerator, x: torch.Tensor, tap: FeatureTap,
                 block_dtype=None):
    """``FeatureGenerator._run`` as it was: NCHW maps, ``head + β·h`` in two ops."""
    head = generator.head(x)
    if tap("head", head):
        return None
    h = head
    for i, block in enumerate(generator.blocks(), start=1):
        h = block(h)
        if tap(f"rdb{i}", h):
            return None
    trunk = head + generator.trunk_scale * h
    if tap("trunk", trunk):
        return None
    fusion = generator.fusion(trunk)
    if tap("fusion", fusion):
        return None
    return generator._output(x, head, fusion)


@contextlib.contextmanager
def baseline_blocks(generator: torch.nn.Module):
    """Inside: ``generator`` runs as before the one-buffer blocks (its dense blocks
    concatenate, its maps are NCHW)."""
    patched = []
    if isinstance(generator, FeatureGenerator):
        generator._run = types.MethodType(baseline_run, generator)
        patched.append(generator)
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
            del module.__dict__["_run" if isinstance(module, FeatureGenerator) else "forward"]


@contextlib.contextmanager
def baseline_block_classes():
    """Inside: every dense block, of any generator built before or inside, runs the
    concatenating forward (for code that builds its own generator, e.g. pdml-denoise)."""
    saved = DmlCtDenseBlock.forward, ResidualDenseBlock.forward, FeatureGenerator._run
    DmlCtDenseBlock.forward, ResidualDenseBlock.forward = dmlct_block_forward, rrdn_block_forward
    FeatureGenerator._run = baseline_run
    try:
        yield
    finally:
        DmlCtDenseBlock.forward, ResidualDenseBlock.forward, FeatureGenerator._run = saved
