"""The arithmetic of a dense block's convolutions, in one buffer.

A dense block (:class:`pdml.models.ResidualDenseBlock`, :class:`pdml.models.DmlCtDenseBlock`)
runs ``L`` 3×3 convs with replicate padding; the i-th sees the block input and every
earlier conv's (activated) output, concatenated. Written directly, each conv first copies
all earlier maps into a new concatenation and then into a new padded copy of it: two
copies of up to ``F + (L-1)·G`` channels per conv, each kept alive for the backward.

:func:`dense_convs` instead keeps one padded buffer ``[B, F + (L-1)·G, H+2, W+2]`` in
channels-last memory (oneDNN's and cuDNN's fast layout for these narrow convs): the input
and each new map are written once into their channels, their one-pixel replicate border
filled in place. The last conv reads the whole buffer; an earlier one, which sees only
the first ``c`` channels, reads a channels-last copy of that prefix (a prefix of a
channels-last tensor is not contiguous). Zero-extending its weight to the whole buffer
instead would save that copy but cost more than it: measured with 3×3 convs of 8 outputs
on ``[8, 64, 130, 130]`` on a CPU (oneDNN), the forward and backward of a 32-channel prefix
took half the time of its zero-extended form, a 56-channel prefix the same time. The
backward (:class:`DenseConvs`) walks the convs in reverse with one gradient buffer of the
buffer's shape (the last conv's input gradient, to which each earlier conv adds the
channels it sees; the prefix is copied again rather than kept), folding the border's
gradient back onto the edge pixels (the adjoint of the
replicate border). The arithmetic is that of the direct form; only the rounding order
may differ (``tests/test_models_dense.py`` holds the two equal in float64).
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

CHANNELS_LAST = torch.channels_last


def _fill_border_(padded: torch.Tensor) -> None:
    """Replicate the interior's edge pixels into the one-pixel border of ``padded``
    ``[..., H+2, W+2]``, in place (rows first, then whole columns: the corners follow)."""
    padded[..., 0, 1:-1] = padded[..., 1, 1:-1]
    padded[..., -1, 1:-1] = padded[..., -2, 1:-1]
    padded[..., :, 0] = padded[..., :, 1]
    padded[..., :, -1] = padded[..., :, -2]


def _fold_border_(padded_grad: torch.Tensor) -> torch.Tensor:
    """The adjoint of :func:`_fill_border_`: adds the border's gradient onto the edge pixels
    in place (whole columns first, then rows) and returns the interior view ``[..., H, W]``."""
    padded_grad[..., :, 1] += padded_grad[..., :, 0]
    padded_grad[..., :, -2] += padded_grad[..., :, -1]
    padded_grad[..., 1, 1:-1] += padded_grad[..., 0, 1:-1]
    padded_grad[..., -2, 1:-1] += padded_grad[..., -1, 1:-1]
    return padded_grad[..., 1:-1, 1:-1]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the convs run in: autocast's when it is on for ``x``'s device (the dtype
    ``F.conv2d`` would cast to), else ``x``'s."""
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype


def _cast_weights(weights: Sequence[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """Each ``[out, c, 3, 3]`` weight in ``dtype``, channels-last."""
    return [w.to(dtype).contiguous(memory_format=CHANNELS_LAST) for w in weights]


def _seen(buf: torch.Tensor, channels: int) -> torch.Tensor:
    """The first ``channels`` channels of ``buf``, channels-last contiguous: the buffer
    itself when that is all of it, else a copy (module doc: cheaper than the extra
    arithmetic of a zero-extended weight)."""
    if channels == buf.shape[1]:
        return buf
    return buf[:, :channels].contiguous(memory_format=CHANNELS_LAST)


@functools.cache
def _onednn_bf16_supported() -> bool:
    """Whether this CPU runs oneDNN's bf16 convolution (AVX512BW/VL/DQ or AVX-NE-CONVERT)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _conv(buf: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
          slope: Optional[float]) -> torch.Tensor:
    """``leaky_relu(conv2d(buf, weight, bias), slope)`` (no activation when ``slope`` is
    None); on a CPU in fp32 / bf16 the activation runs inside oneDNN's conv (one pass over
    the output fewer). oneDNN's bf16 conv needs AVX512-BF16-class instructions and its fp16
    conv AVX512-FP16, so on other CPUs those dtypes run through ATen's conv apart."""
    if (buf.device.type == "cpu" and torch.backends.mkldnn.is_available()
            and (buf.dtype == torch.float32
                 or (buf.dtype == torch.bfloat16 and _onednn_bf16_supported()))):
        attr, scalars = ("none", []) if slope is None else ("leaky_relu", [slope])
        return torch.ops.mkldnn._convolution_pointwise(buf, weight, bias, [0, 0], [1, 1], [1, 1],
                                                       1, attr, scalars, "")
    out = F.conv2d(buf, weight, bias)
    return out if slope is None else F.leaky_relu_(out, slope)


class DenseConvs(torch.autograd.Function):
    """Autograd of :func:`dense_convs`: ``apply(x, slope, activate_last, n, *weights, *biases)``;
    saves the buffer (and the activated last output) for the backward."""

    @staticmethod
    def forward(ctx, x, slope, activate_last, n, *params):
        weights, biases = params[:n], params[n:]
        dtype = _compute_dtype(x)
        B, feats, H, W = x.shape
        channels = weights[-1].shape[1]
        cast_w = _cast_weights(weights, dtype)
        cast_b = [None if b is None else b.to(dtype) for b in biases]
        buf = torch.empty((B, channels, H + 2, W + 2), dtype=dtype, device=x.device,
                          memory_format=CHANNELS_LAST)
        buf[:, :feats, 1:-1, 1:-1] = x
        _fill_border_(buf[:, :feats])
        with torch.autocast(x.device.type, enabled=False):
            c = feats
            for w, b in zip(cast_w[:-1], cast_b[:-1]):
                grown = _conv(_seen(buf, c), w, b, slope)
                buf[:, c:c + grown.shape[1], 1:-1, 1:-1] = grown
                _fill_border_(buf[:, c:c + grown.shape[1]])
                c += grown.shape[1]
                del grown
            last = _conv(buf, cast_w[-1], cast_b[-1], slope if activate_last else None)
        ctx.slope, ctx.activate_last, ctx.feats = slope, activate_last, feats
        ctx.in_channels = [w.shape[1] for w in weights]
        ctx.dtypes = (x.dtype, [w.dtype for w in weights],
                      [None if b is None else b.dtype for b in biases])
        ctx.save_for_backward(buf, last if activate_last else None, *cast_w)
        return last

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_last):
        buf, last, *cast_w = ctx.saved_tensors
        x_dtype, w_dtypes, b_dtypes = ctx.dtypes
        n = len(cast_w)
        grad_buf: Optional[torch.Tensor] = None
        grad_w: list[Optional[torch.Tensor]] = [None] * n
        grad_b: list[Optional[torch.Tensor]] = [None] * n
        g = grad_last.to(buf.dtype)
        if ctx.activate_last:
            g = torch.ops.aten.leaky_relu_backward(g, last, ctx.slope, True)
        for i in range(n - 1, -1, -1):
            if i < n - 1:
                # map i (the input of the convs after it): the gradient they sent to its
                # channels, the border folded back; LeakyReLU's output has its input's sign
                lo, hi = ctx.in_channels[i], ctx.in_channels[i + 1]
                g = torch.ops.aten.leaky_relu_backward(
                    _fold_border_(grad_buf[:, lo:hi]), buf[:, lo:hi, 1:-1, 1:-1], ctx.slope, True)
            has_bias = b_dtypes[i] is not None
            seen = ctx.in_channels[i]
            gi, gw, gb = torch.ops.aten.convolution_backward(
                g.contiguous(memory_format=CHANNELS_LAST), _seen(buf, seen), cast_w[i],
                [cast_w[i].shape[0]] if has_bias else None, [1, 1], [0, 0], [1, 1], False,
                [0, 0], 1, [True, True, has_bias])
            if grad_buf is None:
                # the last conv sees every channel: its input gradient starts the buffer
                grad_buf = gi
            else:
                grad_buf[:, :seen] += gi
            del gi
            grad_w[i] = gw.to(w_dtypes[i])
            grad_b[i] = gb.to(b_dtypes[i]) if has_bias else None
        grad_x = _fold_border_(grad_buf[:, :ctx.feats]).to(x_dtype)
        return (grad_x, None, None, None, *grad_w, *grad_b)


def dense_convs(x: torch.Tensor, weights: Sequence[torch.Tensor],
                biases: Sequence[Optional[torch.Tensor]], slope: float = 0.2,
                activate_last: bool = True) -> torch.Tensor:
    """The convs of a dense block on ``x [B, F, H, W]``: ``-> [B, out, H, W]``, the last
    conv's output (LeakyReLU(``slope``) applied when ``activate_last``), channels-last.

    ``weights[i]`` ``[G, F + i·G, 3, 3]`` for the first ``L-1`` convs (each output goes
    through LeakyReLU(``slope``) and joins the dense input), ``weights[-1]``
    ``[out, F + (L-1)·G, 3, 3]``; ``biases[i]`` ``[out_i]`` or None. One pixel of replicate
    padding, stride 1. Under autocast the convs run in autocast's dtype, as ``F.conv2d``
    would; the gradients come back in the dtypes of ``x``, the weights and the biases.
    Not twice differentiable.
    """
    if not weights or len(weights) != len(biases):
        raise ValueError(f"dense_convs: {len(weights)} weights and {len(biases)} biases")
    growth = weights[0].shape[0]
    for i, w in enumerate(weights):
        want = x.shape[1] + i * growth
        if w.dim() != 4 or w.shape[1] != want or tuple(w.shape[2:]) != (3, 3):
            raise ValueError(f"dense_convs: weights[{i}] must be [out, {want}, 3, 3], "
                             f"got {tuple(w.shape)}")
    if torch.compiler.is_compiling():
        return _dense_convs_composite(x, weights, biases, slope, activate_last)
    return DenseConvs.apply(x, slope, activate_last, len(weights), *weights, *biases)


def _dense_convs_composite(x: torch.Tensor, weights: Sequence[torch.Tensor],
                           biases: Sequence[Optional[torch.Tensor]], slope: float,
                           activate_last: bool) -> torch.Tensor:
    """:func:`dense_convs` from ATen ops (concatenate, replicate-pad, conv): what
    torch.compile traces, since it cannot trace :class:`DenseConvs`' in-place buffer
    (oneDNN's fused conv has no meta kernel); inductor plans the copies itself."""
    def conv(feats, w, b):
        return F.conv2d(F.pad(feats, (1, 1, 1, 1), mode="replicate"), w, b)

    feats = x
    for w, b in zip(weights[:-1], biases[:-1]):
        feats = torch.cat([feats, F.leaky_relu(conv(feats, w, b), slope)], dim=1)
    last = conv(feats, weights[-1], biases[-1])
    return F.leaky_relu(last, slope) if activate_last else last
