"""Triton kernels of the fused patch losses: gather + normalise + similarity + loss.

Row addressing. Every kernel sees "rows" of length ``C``; global row ``r`` is
- map form (``GATHER``): ``fmap[r // n_img, :, ids[r % n_img]]`` of a ``[B, C, H, W]`` map
  (any strides; the flat pixel id is split into ``h, w`` with ``width``),
- rows form: ``feat[r, :]`` of a ``[R, C]`` matrix.
Rows form groups of ``group_rows`` consecutive rows (one image, or with negatives="batch"
the whole minibatch, so a group's tiles then span images). A tensor is described by a
geometry tuple ``(ptr, s_row, s_c, s_h, s_w)`` and the gather by ``(ids_ptr, n_img, width)``;
:func:`_tile_offsets` and :func:`_load_chunk` are the one place rows are addressed.

Grid. Axis 0 enumerates (group, row tile) pairs (``group * tiles + tile``), so the number
of groups is bounded only by axis 0's 2^31 - 1. Axis 1 of the backward kernels is the
gradient chunk a program writes: ``GRAD_C`` channels of the PatchNCE and metric
gradients (one chunk, so one program per row tile, whenever C fits the launcher's budget
of accumulator registers; docs/ops.md, "Work"), ``BLOCK_C`` channels of the similarity's.
Axis 2 of the metric backward is the side (0: dq̂, 1: dk̂).

Channels of a similarity tile are processed in chunks of ``BLOCK_C``: the tile is the sum
of the chunks' dots, and the norms of a tile's rows come from a pre-pass over the chunks
(own rows) or from the same chunk loop (the other side's rows). Only a backward
program's gradient accumulator spans more channels (``GRAD_C``), so each similarity tile
is computed once per gradient chunk, not once per ``BLOCK_C`` channels of the gradient.

Scaling (map form, ``SCALE``). fp32 and bf16 features of magnitude 1e20 have ``x² = 1e40``,
which overflows fp32 although ``‖x‖`` does not (docs/ops.md, step 2), and so would the
dot of two such rows. The launcher passes the largest magnitude of each map
(``scale_ptr``: ``[max|q|, max|k|]``, fp32); every load of a row is multiplied by the
power of two ``P`` with ``P·max`` in [1, 2) (:func:`_pow2_scale`), so no square, sum or
product overflows, and the normaliser becomes ``x̂ = (x·P) / (‖x·P‖₂ + eps·P)``, the same
function. Multiplying by a power of two is exact, so wherever the unscaled formula does
not overflow the numbers are the same (a row 2^126 times smaller than its map's largest
entry loses precision to subnormals; it is far below the epsilon unless the map's
entries exceed 1e30). fp16 rows (``|x| ≤ 65504``: nothing overflows fp32) and the rows
form are not scaled (``P = 1``).

Numerics. Rows are loaded in the input dtype (fp32/fp16/bf16) and everything else is
fp32: norms, exp, logsumexp, sums, accumulators. The similarity of a tile is the dot of
the scaled rows ``x·P`` (fp32 accumulation) multiplied afterwards by the fp32 inverse
norms ``1 / (‖x·P‖₂ + 1e-7·P)`` (CUT's Normalize; ``NORMALISE`` off for the rows form,
whose rows arrive normalised). fp32 inputs use ``tl.dot(..., input_precision="ieee")`` (``IEEE``):
the logits are ``S / τ`` with τ = 0.07 … 0.15, so tf32's 10-bit mantissa (≈5e-4 relative
on S) would become ≈1e-2 absolute error on a logit, far off the fp32 reference; fp16/bf16
inputs go to the tensor cores directly. The N×N similarity of a group is never stored:
PatchNCE keeps an online (running max + sum) logsumexp per row, PatchMetric running
exp-sums per row; backward recomputes the tiles.

Gradients. The backward kernels compute ``dL/dx̂_i = Σ_j W_ij ŷ_j`` (x̂, ŷ the normalised
rows) one gradient chunk per program (grid axis 1) and write it, fp32, to a contiguous
``[R, C]`` scratch; :func:`normaliser_backward_kernel` then takes each row through the
normaliser's Jacobian (two passes over the chunks: ``x·dx̂``, then the gradient) and
stores it in the input dtype: the only cast of a gradient. (The rows form has no
normaliser: PatchNCE stores dx̂ = dx directly; the metric's pair terms go to fp32 scratch
in both forms, and :func:`metric_positive_kernel` adds the positive terms and writes the
gradient.) Computing ``x·dx̂`` from the stored dx̂ removes exactly the radial part of the
rounded dx̂, as torch's reference does. Operands of fp16/bf16 dots are kept in [-1, 1]:
upstream gradients (which GradScaler multiplies by up to 2^16) are applied in fp32 after
the dot or divided out of the operand first (:func:`_scaled_dot`, or the metric's per-row
bound). Each gradient row has exactly one writer per launch (ids are distinct; the caller
zero-fills the rest): no atomics, deterministic.

All block sizes are >= 16 (the GPU's minimum dot shape; the interpreter would accept less).
"""
import triton
import triton.language as tl

NORM_EPS = tl.constexpr(1e-7)
"""CUT's Normalize epsilon (pdml.reference.NORM_EPS)."""

DIAG_FILL = tl.constexpr(-10.0)
"""CUT's / DML_CT's fill of the self-similarity (pdml.reference.DIAG_FILL)."""


# ----------------------------------------------------------------------------- helpers
# tl.sum / tl.max are @triton.jit functions, decorated once for the mode triton was
# imported in, while this module may be loaded once per mode (pdml.kernels.runtime) and a
# jitted callee must match its caller's mode: the raw functions (``.fn``) are decorated
# again here, in this module's mode.
_sum = triton.jit(tl.sum.fn)
_max = triton.jit(tl.max.fn)


@triton.jit
def _row_sum(x):
    """Sum over axis 1 of a 2-D tile."""
    return _sum(x, 1)


@triton.jit
def _row_max(x):
    """Max over axis 1 of a 2-D tile."""
    return _max(x, 1)


@triton.jit
def _tile_offsets(x, where, group, local, group_rows, GATHER: tl.constexpr):
    """``(offsets, mask)`` of rows ``local`` (``[BLOCK]`` int32) of group ``group``.

    ``x = (ptr, s_row, s_c, s_h, s_w)``, ``where = (ids_ptr, n_img, width)``; the offsets
    are int64 element offsets of each row's channel 0, the mask says which rows exist.
    """
    mask = local < group_rows
    rows = group * group_rows + local
    if GATHER:
        pix = tl.load(where[0] + rows % where[1], mask=mask, other=0).to(tl.int64)
        offs = (rows // where[1]).to(tl.int64) * x[1] + (pix // where[2]) * x[3] + (pix % where[2]) * x[4]
    else:
        offs = rows.to(tl.int64) * x[1]
    return offs, mask


@triton.jit
def _load_chunk(x, offs, mask, start, C, BLOCK_C: tl.constexpr):
    """Channels ``start .. start+BLOCK_C`` of the rows at ``offs``: ``[BLOCK, BLOCK_C]`` in
    the input dtype, zeros outside the rows and channels that exist."""
    cols = start + tl.arange(0, BLOCK_C)
    return tl.load(x[0] + offs[:, None] + cols[None, :].to(tl.int64) * x[2],
                   mask=mask[:, None] & (cols[None, :] < C), other=0.0)


@triton.jit
def _pow2_scale(absmax):
    """fp32 power of two ``P`` with ``P·absmax`` in [1, 2) (built in the exponent bits), at
    most 2^126 (``absmax`` 0 or subnormal) and at least 2^-126, so that it is a normal number."""
    biased = tl.minimum(tl.maximum((absmax.to(tl.int32, bitcast=True) >> 23) & 0xFF, 1), 253)
    return ((254 - biased) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _map_scale(max_ptr, SCALE: tl.constexpr):
    """``P``, the power of two of a map's largest magnitude ``max_ptr[0]`` (the module
    docstring, "Scaling"); 1.0 without ``SCALE`` (multiplications by it fold away)."""
    if SCALE:
        p = _pow2_scale(tl.load(max_ptr))
    else:
        p = 1.0
    return p


@triton.jit
def _map_scales(scale_ptr, SCALE: tl.constexpr):
    """``(P_q, P_k)`` of the maps' largest magnitudes ``scale_ptr[0..1]`` (:func:`_map_scale`)."""
    return _map_scale(scale_ptr, SCALE), _map_scale(scale_ptr + 1, SCALE)


@triton.jit
def _load_scaled(x, offs, mask, start, C, p, SCALE: tl.constexpr, BLOCK_C: tl.constexpr):
    """:func:`_load_chunk` times the power of two ``p`` (exact), in the input dtype."""
    xc = _load_chunk(x, offs, mask, start, C, BLOCK_C)
    if SCALE:
        xc = (xc.to(tl.float32) * p).to(xc.dtype)
    return xc


@triton.jit
def _store_chunk(x, offs, mask, start, C, value, BLOCK_C: tl.constexpr):
    """Store fp32 ``value [BLOCK, BLOCK_C]`` into channels ``start ..`` of the rows at ``offs``
    (the one cast to the destination's dtype)."""
    cols = start + tl.arange(0, BLOCK_C)
    tl.store(x[0] + offs[:, None] + cols[None, :].to(tl.int64) * x[2], value.to(x[0].dtype.element_ty),
             mask=mask[:, None] & (cols[None, :] < C))


@triton.jit
def _store_rows(ptr, rows, mask, start, C, value, BLOCK_C: tl.constexpr):
    """Store fp32 ``value`` into channels ``start ..`` of rows ``rows`` of a contiguous ``[R, C]``."""
    _store_chunk((ptr, C, 1), rows.to(tl.int64) * C, mask, start, C, value, BLOCK_C)


@triton.jit
def _row_stats(a, a_offs, a_p, b, b_offs, b_p, mask, C, SCALE: tl.constexpr, BLOCK_C: tl.constexpr):
    """Pre-pass over the chunks of a tile's rows (of two tensors, each with its own
    offsets and scale): fp32 ``(‖a·p_a‖², ‖b·p_b‖², (a·p_a)·(b·p_b))`` per row."""
    aa = a_offs.to(tl.float32) * 0.0
    bb = aa
    ab = aa
    for start in range(0, C, BLOCK_C):
        xa = _load_scaled(a, a_offs, mask, start, C, a_p, SCALE, BLOCK_C).to(tl.float32)
        xb = _load_scaled(b, b_offs, mask, start, C, b_p, SCALE, BLOCK_C).to(tl.float32)
        aa += _row_sum(xa * xa)
        bb += _row_sum(xb * xb)
        ab += _row_sum(xa * xb)
    return aa, bb, ab


@triton.jit
def _inv_norm(sq, p, NORMALISE: tl.constexpr):
    """``1 / (‖x·p‖₂ + eps·p)`` from ``‖x·p‖²``: times ``x·p`` it is CUT's ``x / (‖x‖₂ + eps)``
    (ones when the rows arrive normalised)."""
    if NORMALISE:
        inv = 1.0 / (tl.sqrt(sq) + NORM_EPS * p)
    else:
        inv = sq * 0.0 + 1.0
    return inv


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """``a @ b`` with fp32 accumulation; exact fp32 products for fp32 inputs (see module doc)."""
    if IEEE:
        prod = tl.dot(a, b, input_precision="ieee")
    else:
        prod = tl.dot(a, b)
    return prod


@triton.jit
def _tile_dot(a, a_offs, a_mask, a_p, b, b_offs, b_mask, b_p, C, IEEE: tl.constexpr, SCALE: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """``(a_i·p_a) · (b_j·p_b)`` over all channels (fp32 ``[BLOCK_M, BLOCK_N]``) and
    ``‖b_j·p_b‖²`` (``[BLOCK_N]``)."""
    s = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
    sq = tl.full([BLOCK_N], 0.0, tl.float32)
    for start in range(0, C, BLOCK_C):
        xa = _load_scaled(a, a_offs, a_mask, start, C, a_p, SCALE, BLOCK_C)
        xb = _load_scaled(b, b_offs, b_mask, start, C, b_p, SCALE, BLOCK_C)
        s += _dot(xa, tl.trans(xb), IEEE)
        xf = xb.to(tl.float32)
        sq += _row_sum(xf * xf)
    return s, sq


@triton.jit
def _normalised_chunk(x, offs, mask, start, C, p, inv, BLOCK_C: tl.constexpr):
    """Chunk of the normalised rows ``x̂ = (x·p)·inv`` in the input dtype (|x̂| <= 1: a safe
    tensor-core operand; ``p`` and ``inv`` as :func:`_inv_norm`)."""
    xc = _load_chunk(x, offs, mask, start, C, BLOCK_C)
    return (xc.to(tl.float32) * p * inv[:, None]).to(xc.dtype)


@triton.jit
def _scaled_dot(w, y, IEEE: tl.constexpr):
    """``w @ y`` for fp32 weights ``w`` of any magnitude: for fp16/bf16 each row of ``w`` is
    divided by its largest magnitude before the cast to ``y``'s dtype (so it cannot
    overflow) and multiplied back after; fp32 dots take ``w`` as it is."""
    if IEEE:
        out = tl.dot(w, y, input_precision="ieee")
    else:
        scale = _row_max(tl.abs(w))
        scale = tl.where(scale > 0.0, scale, 1.0)
        out = tl.dot((w / scale[:, None]).to(y.dtype), y) * scale[:, None]
    return out


@triton.jit
def _group_max_abs(ptr, stride, group, group_rows, BLOCK: tl.constexpr):
    """``max_j |ptr[(group·group_rows + j)·stride]|`` over the rows of ``group`` (fp32 scalar)."""
    top = tl.full([BLOCK], 0.0, tl.float32)
    for start in range(0, group_rows, BLOCK):
        local = start + tl.arange(0, BLOCK)
        value = tl.load(ptr + (group * group_rows + local).to(tl.int64) * stride, mask=local < group_rows, other=0.0)
        top = tl.maximum(top, tl.abs(value.to(tl.float32)))
    return _max(top, 0)


@triton.jit
def _program_tile(group_rows, BLOCK_M: tl.constexpr):
    """``(group, local rows [BLOCK_M])`` of this program (axis 0 = group * tiles + tile)."""
    tiles = (group_rows + BLOCK_M - 1) // BLOCK_M
    pid = tl.program_id(0)
    return pid // tiles, (pid % tiles) * BLOCK_M + tl.arange(0, BLOCK_M)


# ----------------------------------------------------------------------------- PatchNCE

@triton.jit
def nce_forward_kernel(
    q_ptr, k_ptr, ids_ptr, scale_ptr, loss_ptr, lse_ptr,
    group_rows, n_img, width, C, inv_tau,
    q_srow, q_sc, q_sh, q_sw, k_srow, k_sc, k_sh, k_sw,
    GATHER: tl.constexpr, NORMALISE: tl.constexpr, SCALE: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Per-row PatchNCE loss and logsumexp (both fp32 ``[R]``) of BLOCK_M rows of one group.

    logits of row i: ``[S_ii, S_i0 .. S_i(n-1) with S_ii -> -10] / τ``; loss = lse - S_ii/τ.
    """
    q = (q_ptr, q_srow, q_sc, q_sh, q_sw)
    k = (k_ptr, k_srow, k_sc, k_sh, k_sw)
    where = (ids_ptr, n_img, width)
    group, local_m = _program_tile(group_rows, BLOCK_M)
    p_q, p_k = _map_scales(scale_ptr, SCALE)
    q_offs, mask_m = _tile_offsets(q, where, group, local_m, group_rows, GATHER)
    inv_q = _inv_norm(_row_stats(q, q_offs, p_q, q, q_offs, p_q, mask_m, C, SCALE, BLOCK_C)[0], p_q, NORMALISE)

    run_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    run_sum = tl.full([BLOCK_M], 0.0, tl.float32)
    pos = tl.full([BLOCK_M], 0.0, tl.float32)
    for start in range(0, group_rows, BLOCK_N):
        local_n = start + tl.arange(0, BLOCK_N)
        k_offs, mask_n = _tile_offsets(k, where, group, local_n, group_rows, GATHER)
        s, sq_k = _tile_dot(q, q_offs, mask_m, p_q, k, k_offs, mask_n, p_k, C, IEEE, SCALE, BLOCK_M, BLOCK_N, BLOCK_C)
        logits = s * (inv_q[:, None] * inv_tau) * _inv_norm(sq_k, p_k, NORMALISE)[None, :]
        diag = local_m[:, None] == local_n[None, :]
        pos += _row_sum(tl.where(diag, logits, 0.0))
        logits = tl.where(diag, DIAG_FILL * inv_tau, logits)
        logits = tl.where(mask_n[None, :], logits, float("-inf"))
        new_max = tl.maximum(run_max, _row_max(logits))
        run_sum = run_sum * tl.exp(run_max - new_max) + _row_sum(tl.exp(logits - new_max[:, None]))
        run_max = new_max
    # add the positive logit (class 0) to the negatives' logsumexp
    top = tl.maximum(run_max, pos)
    lse = top + tl.log(run_sum * tl.exp(run_max - top) + tl.exp(pos - top))
    rows_m = group * group_rows + local_m
    tl.store(loss_ptr + rows_m, lse - pos, mask=mask_m)
    tl.store(lse_ptr + rows_m, lse, mask=mask_m)


@triton.jit
def nce_backward_kernel(
    q_ptr, k_ptr, ids_ptr, scale_ptr, lse_ptr, grad_ptr, dqhat_ptr,
    group_rows, n_img, width, C, inv_tau, grad_stride,
    q_srow, q_sc, q_sh, q_sw, k_srow, k_sc, k_sh, k_sw,
    GATHER: tl.constexpr, NORMALISE: tl.constexpr, SCALE: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, GRAD_C: tl.constexpr,
):
    """dL/dq̂ of PatchNCE for BLOCK_M rows and the ``GRAD_C`` channels of gradient chunk
    ``program_id(1)`` (all channels when C <= GRAD_C: each similarity tile once), into the
    contiguous ``dqhat [R, C]`` (fp32 for :func:`normaliser_backward_kernel`, or the input
    dtype in the rows form, where dq̂ is dq).

    ``dL/dS_ij = g_i/τ · (softmax_ij - δ_ij)`` over the negatives j (entry i of the
    negatives is the constant -10/τ, so the diagonal's softmax is the positive's),
    ``dq̂_i = Σ_j dL/dS_ij k̂_j`` (k is detached).
    """
    q = (q_ptr, q_srow, q_sc, q_sh, q_sw)
    k = (k_ptr, k_srow, k_sc, k_sh, k_sw)
    where = (ids_ptr, n_img, width)
    group, local_m = _program_tile(group_rows, BLOCK_M)
    chunk = tl.program_id(1) * GRAD_C
    p_q, p_k = _map_scales(scale_ptr, SCALE)
    q_offs, mask_m = _tile_offsets(q, where, group, local_m, group_rows, GATHER)
    inv_q = _inv_norm(_row_stats(q, q_offs, p_q, q, q_offs, p_q, mask_m, C, SCALE, BLOCK_C)[0], p_q, NORMALISE)
    rows_m = group * group_rows + local_m
    lse = tl.load(lse_ptr + rows_m, mask=mask_m, other=0.0)
    grad = tl.load(grad_ptr + rows_m.to(tl.int64) * grad_stride, mask=mask_m, other=0.0).to(tl.float32)

    acc = tl.full([BLOCK_M, GRAD_C], 0.0, tl.float32)
    for start in range(0, group_rows, BLOCK_N):
        local_n = start + tl.arange(0, BLOCK_N)
        k_offs, mask_n = _tile_offsets(k, where, group, local_n, group_rows, GATHER)
        s, sq_k = _tile_dot(q, q_offs, mask_m, p_q, k, k_offs, mask_n, p_k, C, IEEE, SCALE, BLOCK_M, BLOCK_N, BLOCK_C)
        inv_k = _inv_norm(sq_k, p_k, NORMALISE)
        # the logits exactly as in forward, so softmax is consistent with the saved lse
        logits = s * (inv_q[:, None] * inv_tau) * inv_k[None, :]
        weight = tl.exp(logits - lse[:, None]) - tl.where(local_m[:, None] == local_n[None, :], 1.0, 0.0)
        weight = tl.where(mask_n[None, :], weight, 0.0)
        # |weight| <= 1 and |k̂| <= 1: safe operands for fp16/bf16 tensor cores; g/τ goes after
        k_hat = _normalised_chunk(k, k_offs, mask_n, chunk, C, p_k, inv_k, GRAD_C)
        acc += _dot(weight.to(k_hat.dtype), k_hat, IEEE)
    _store_rows(dqhat_ptr, rows_m, mask_m, chunk, C, acc * (grad * inv_tau)[:, None], GRAD_C)


# ----------------------------------------------------------------------------- PatchMetric

@triton.jit
def metric_forward_kernel(
    q_ptr, k_ptr, ids_ptr, scale_ptr, out_ptr,
    group_rows, n_img, width, C, inv_tau, pos_scale, pair_scale,
    q_srow, q_sc, q_sh, q_sw, k_srow, k_sc, k_sh, k_sw,
    GATHER: tl.constexpr, NORMALISE: tl.constexpr, SCALE: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Per-row contribution ``v_i`` (fp32 ``[R]``) to the metric loss; the loss is ``Σ_i v_i``.

    ``v_i = -pos_scale · e^{S_qk[i,i]/τ} + pair_scale · Σ_j (e^{S̃_qq[i,j]/τ} + e^{S̃_kk[i,j]/τ})``
    with ``pos_scale = 1/(R·C)``, ``pair_scale = 1/(G·n²·C)`` and S̃'s diagonal -10.
    """
    q = (q_ptr, q_srow, q_sc, q_sh, q_sw)
    k = (k_ptr, k_srow, k_sc, k_sh, k_sw)
    where = (ids_ptr, n_img, width)
    group, local_m = _program_tile(group_rows, BLOCK_M)
    q_offs, mask_m = _tile_offsets(q, where, group, local_m, group_rows, GATHER)
    k_offs = _tile_offsets(k, where, group, local_m, group_rows, GATHER)[0]
    p_q, p_k = _map_scales(scale_ptr, SCALE)
    sq_q, sq_k, qk = _row_stats(q, q_offs, p_q, k, k_offs, p_k, mask_m, C, SCALE, BLOCK_C)
    inv_q = _inv_norm(sq_q, p_q, NORMALISE)
    inv_k = _inv_norm(sq_k, p_k, NORMALISE)
    pos = qk * inv_q * inv_k

    sum_qq = tl.full([BLOCK_M], 0.0, tl.float32)
    sum_kk = tl.full([BLOCK_M], 0.0, tl.float32)
    diag_exp = tl.exp(DIAG_FILL * inv_tau)
    for start in range(0, group_rows, BLOCK_N):
        local_n = start + tl.arange(0, BLOCK_N)
        qn_offs, mask_n = _tile_offsets(q, where, group, local_n, group_rows, GATHER)
        kn_offs = _tile_offsets(k, where, group, local_n, group_rows, GATHER)[0]
        s_qq, sq_qn = _tile_dot(q, q_offs, mask_m, p_q, q, qn_offs, mask_n, p_q, C, IEEE, SCALE, BLOCK_M, BLOCK_N, BLOCK_C)
        s_kk, sq_kn = _tile_dot(k, k_offs, mask_m, p_k, k, kn_offs, mask_n, p_k, C, IEEE, SCALE, BLOCK_M, BLOCK_N, BLOCK_C)
        diag = local_m[:, None] == local_n[None, :]
        e_qq = tl.exp(s_qq * (inv_q[:, None] * inv_tau) * _inv_norm(sq_qn, p_q, NORMALISE)[None, :])
        e_kk = tl.exp(s_kk * (inv_k[:, None] * inv_tau) * _inv_norm(sq_kn, p_k, NORMALISE)[None, :])
        sum_qq += _row_sum(tl.where(mask_n[None, :], tl.where(diag, diag_exp, e_qq), 0.0))
        sum_kk += _row_sum(tl.where(mask_n[None, :], tl.where(diag, diag_exp, e_kk), 0.0))
    v = -pos_scale * tl.exp(pos * inv_tau) + pair_scale * (sum_qq + sum_kk)
    tl.store(out_ptr + group * group_rows + local_m, v, mask=mask_m)


@triton.jit
def _metric_side_gradient(
    x, where, p_x, grad_ptr, out_ptr, group, local_m, chunk, group_rows, C, inv_tau, pair_scale, grad_stride,
    GATHER: tl.constexpr, NORMALISE: tl.constexpr, SCALE: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, GRAD_C: tl.constexpr,
):
    """The pair term of dL/dx̂ of one side ``x`` (q or k) for rows ``local_m`` of ``group``,
    channels ``chunk .. chunk+GRAD_C``, into the contiguous fp32 ``out_ptr [R, C]``:

    ``pair_scale/τ · Σ_{j≠i} (g_i + g_j) e^{S_xx[i,j]/τ} x̂_j``

    (S_xx is symmetric: row i meets x̂_j in v_i and in v_j, so one pass over the column
    tiles gives the whole sum). Only S_xx is recomputed: the two sides share no tile product.
    """
    x_offs, mask_m = _tile_offsets(x, where, group, local_m, group_rows, GATHER)
    inv_x = _inv_norm(_row_stats(x, x_offs, p_x, x, x_offs, p_x, mask_m, C, SCALE, BLOCK_C)[0], p_x, NORMALISE)
    rows_m = group * group_rows + local_m
    grad_m = tl.load(grad_ptr + rows_m.to(tl.int64) * grad_stride, mask=mask_m, other=0.0).to(tl.float32)
    # |g_i + g_j| <= |g_i| + max_j |g_j|: dividing row i's weights by that bound keeps the
    # fp16/bf16 dot operand in [-1, 1] with one factor per row for the whole loop, so the
    # products accumulate in place (a factor per tile needs a second [BLOCK_M, GRAD_C] tile,
    # which spills); fp32 dots take the weights as they are
    if IEEE:
        bound = grad_m * 0.0 + 1.0
    else:
        bound = tl.abs(grad_m) + _group_max_abs(grad_ptr, grad_stride, group, group_rows, BLOCK_N)
        bound = tl.where(bound > 0.0, bound, 1.0)

    acc = tl.full([BLOCK_M, GRAD_C], 0.0, tl.float32)
    for start in range(0, group_rows, BLOCK_N):
        local_n = start + tl.arange(0, BLOCK_N)
        xn_offs, mask_n = _tile_offsets(x, where, group, local_n, group_rows, GATHER)
        grad_n = tl.load(grad_ptr + (group * group_rows + local_n).to(tl.int64) * grad_stride,
                         mask=mask_n, other=0.0).to(tl.float32)
        pair_grad = (grad_m[:, None] + grad_n[None, :]) / bound[:, None]
        off = (local_m[:, None] == local_n[None, :]) | (mask_n[None, :] == 0)
        s_xx, sq_xn = _tile_dot(x, x_offs, mask_m, p_x, x, xn_offs, mask_n, p_x, C, IEEE, SCALE, BLOCK_M, BLOCK_N, BLOCK_C)
        inv_xn = _inv_norm(sq_xn, p_x, NORMALISE)
        s_xx = s_xx * inv_x[:, None] * inv_xn[None, :]
        w_xx = tl.where(off, 0.0, tl.exp((s_xx - 1.0) * inv_tau)) * pair_grad
        x_hat = _normalised_chunk(x, xn_offs, mask_n, chunk, C, p_x, inv_xn, GRAD_C)
        acc += _dot(w_xx.to(x_hat.dtype), x_hat, IEEE)
    pair_coef = pair_scale * inv_tau * tl.exp(inv_tau)
    _store_rows(out_ptr, rows_m, mask_m, chunk, C, acc * (pair_coef * bound)[:, None], GRAD_C)


@triton.jit
def metric_backward_kernel(
    q_ptr, k_ptr, ids_ptr, scale_ptr, grad_ptr, dqhat_ptr, dkhat_ptr,
    group_rows, n_img, width, C, inv_tau, pair_scale, grad_stride,
    q_srow, q_sc, q_sh, q_sw, k_srow, k_sc, k_sh, k_sw,
    GATHER: tl.constexpr, NORMALISE: tl.constexpr, SCALE: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, GRAD_C: tl.constexpr,
):
    """The pair terms of dL/dq̂ (``program_id(2) == 0``) or dL/dk̂ (``1``) of
    ``L = Σ_i g_i v_i`` (v from the forward kernel) for BLOCK_M rows and the ``GRAD_C``
    channels of gradient chunk ``program_id(1)``, into the contiguous fp32
    ``dqhat``/``dkhat [R, C]`` (in both forms); :func:`metric_positive_kernel` then adds the
    positive terms. The math is :func:`_metric_side_gradient`'s.

    The exp weights are shifted by the largest possible logit 1/τ (so they lie in (0, 1])
    and e^{1/τ} is put back in fp32 after the dot; the upstream gradients (g_i + g_j) stay
    in the fp32 weights, divided by a per-row bound that keeps the fp16/bf16 operand in
    [-1, 1] (so GradScaler's 2^16 cannot overflow it) and multiplied back after the loop.
    """
    # dq̂ needs only S_qq and dk̂ only S_kk: one side per program holds one accumulator and
    # recomputes one similarity matrix, with nothing recomputed twice. The side's tensors are
    # selected, not branched on: two inlined copies of the loop (an if/else) cost registers.
    on_q = tl.program_id(2) == 0
    x = (tl.where(on_q, q_ptr, k_ptr), tl.where(on_q, q_srow, k_srow), tl.where(on_q, q_sc, k_sc),
         tl.where(on_q, q_sh, k_sh), tl.where(on_q, q_sw, k_sw))
    where = (ids_ptr, n_img, width)
    group, local_m = _program_tile(group_rows, BLOCK_M)
    chunk = tl.program_id(1) * GRAD_C
    p_x = _map_scale(scale_ptr + tl.where(on_q, 0, 1), SCALE)
    _metric_side_gradient(x, where, p_x, grad_ptr, tl.where(on_q, dqhat_ptr, dkhat_ptr), group, local_m, chunk,
                          group_rows, C, inv_tau, pair_scale, grad_stride, GATHER, NORMALISE, SCALE, IEEE,
                          BLOCK_M, BLOCK_N, BLOCK_C, GRAD_C)


@triton.jit
def _add_positive_term(x, y, where, p_x, p_y, grad_ptr, pair_ptr, out_ptr, local, rows, C, inv_tau, pos_scale,
                       grad_stride, GATHER: tl.constexpr, NORMALISE: tl.constexpr, SCALE: tl.constexpr,
                       BLOCK_C: tl.constexpr):
    """``out_i = pair_i - g_i·pos_scale/τ·e^{S_xy[i,i]/τ} ŷ_i`` for rows ``local`` of one side
    ``x`` (``y`` the other): ``pair_ptr`` the fp32 ``[R, C]`` pair terms, ``out_ptr`` a
    contiguous ``[R, C]`` (the pair terms themselves, or the gradient in the input dtype)."""
    x_offs, mask = _tile_offsets(x, where, 0, local, rows, GATHER)
    y_offs = _tile_offsets(y, where, 0, local, rows, GATHER)[0]
    sq_x, sq_y, xy = _row_stats(x, x_offs, p_x, y, y_offs, p_y, mask, C, SCALE, BLOCK_C)
    inv_y = _inv_norm(sq_y, p_y, NORMALISE)
    pos = xy * _inv_norm(sq_x, p_x, NORMALISE) * inv_y
    grad = tl.load(grad_ptr + local.to(tl.int64) * grad_stride, mask=mask, other=0.0).to(tl.float32)
    coef = (-pos_scale * inv_tau) * grad * tl.exp(pos * inv_tau)
    offs = local.to(tl.int64) * C
    for start in range(0, C, BLOCK_C):
        pair = _load_chunk((pair_ptr, C, 1), offs, mask, start, C, BLOCK_C)
        y_hat = _load_chunk(y, y_offs, mask, start, C, BLOCK_C).to(tl.float32) * p_y * inv_y[:, None]
        _store_rows(out_ptr, local, mask, start, C, pair + coef[:, None] * y_hat, BLOCK_C)


@triton.jit
def metric_positive_kernel(
    q_ptr, k_ptr, ids_ptr, scale_ptr, grad_ptr, dqhat_ptr, dkhat_ptr, dq_ptr, dk_ptr,
    rows, n_img, width, C, inv_tau, pos_scale, grad_stride,
    q_srow, q_sc, q_sh, q_sw, k_srow, k_sc, k_sh, k_sw,
    GATHER: tl.constexpr, NORMALISE: tl.constexpr, SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Adds the positive terms ``-g_i·pos_scale/τ·e^{S_qk[i,i]/τ} k̂_i`` (``program_id(1) == 0``,
    to ``dqhat``) or ``... q̂_i`` (``1``, to ``dkhat``) of BLOCK_M rows to the pair terms of
    :func:`metric_backward_kernel` and writes the sum to ``dq``/``dk`` (contiguous ``[R, C]``:
    the fp32 scratch itself in the map form, the gradient in the input dtype in the rows
    form). A term of row i needs row i alone (no dot); kept out of the pair kernel, whose
    accumulator leaves no registers for a tile of the other side."""
    q = (q_ptr, q_srow, q_sc, q_sh, q_sw)
    k = (k_ptr, k_srow, k_sc, k_sh, k_sw)
    where = (ids_ptr, n_img, width)
    local = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    p_q, p_k = _map_scales(scale_ptr, SCALE)
    if tl.program_id(1) == 0:
        _add_positive_term(q, k, where, p_q, p_k, grad_ptr, dqhat_ptr, dq_ptr, local, rows, C, inv_tau, pos_scale,
                           grad_stride, GATHER, NORMALISE, SCALE, BLOCK_C)
    else:
        _add_positive_term(k, q, where, p_k, p_q, grad_ptr, dkhat_ptr, dk_ptr, local, rows, C, inv_tau, pos_scale,
                           grad_stride, GATHER, NORMALISE, SCALE, BLOCK_C)


# ----------------------------------------------------------------------------- similarity

@triton.jit
def similarity_forward_kernel(
    q_ptr, k_ptr, ids_ptr, scale_ptr, out_ptr,
    n_img, width, C,
    q_sb, q_sc, q_sh, q_sw, k_sb, k_sc, k_sh, k_sw,
    SCALE: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One ``[BLOCK_M, BLOCK_N]`` tile of ``q̂ k̂ᵀ`` of one image into ``out [B, N, N]`` fp32
    (axis 0 = (image * tiles_m + tile_m) * tiles_n + tile_n)."""
    q = (q_ptr, q_sb, q_sc, q_sh, q_sw)
    k = (k_ptr, k_sb, k_sc, k_sh, k_sw)
    where = (ids_ptr, n_img, width)
    tiles_n = (n_img + BLOCK_N - 1) // BLOCK_N
    tiles = ((n_img + BLOCK_M - 1) // BLOCK_M) * tiles_n
    image = tl.program_id(0) // tiles
    pair = tl.program_id(0) % tiles
    local_m = (pair // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    local_n = (pair % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    q_offs, mask_m = _tile_offsets(q, where, image, local_m, n_img, True)
    k_offs, mask_n = _tile_offsets(k, where, image, local_n, n_img, True)
    p_q, p_k = _map_scales(scale_ptr, SCALE)
    s, sq_k = _tile_dot(q, q_offs, mask_m, p_q, k, k_offs, mask_n, p_k, C, IEEE, SCALE, BLOCK_M, BLOCK_N, BLOCK_C)
    inv_q = _inv_norm(_row_stats(q, q_offs, p_q, q, q_offs, p_q, mask_m, C, SCALE, BLOCK_C)[0], p_q, True)
    sim = s * inv_q[:, None] * _inv_norm(sq_k, p_k, True)[None, :]
    out_offs = image.to(tl.int64) * n_img * n_img + local_m[:, None].to(tl.int64) * n_img + local_n[None, :]
    tl.store(out_ptr + out_offs, sim, mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def similarity_backward_kernel(
    q_ptr, k_ptr, ids_ptr, scale_ptr, grad_ptr, dqhat_ptr, dkhat_ptr,
    n_img, width, C, g_sb, g_si, g_sj,
    q_sb, q_sc, q_sh, q_sw, k_sb, k_sc, k_sh, k_sw,
    SCALE: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dq̂, dk̂ (fp32, contiguous ``[B·N, C]``) of ``S = q̂ k̂ᵀ`` given ``dS [B, N, N]`` for
    BLOCK_M rows of one image and channel chunk ``program_id(1)``.

    ``dq̂_i = Σ_j dS_ij k̂_j``, ``dk̂_i = Σ_j dS_ji q̂_j``. dS is an arbitrary upstream
    gradient (no bound on its range): :func:`_scaled_dot` keeps the fp16/bf16 operand in
    [-1, 1].
    """
    q = (q_ptr, q_sb, q_sc, q_sh, q_sw)
    k = (k_ptr, k_sb, k_sc, k_sh, k_sw)
    where = (ids_ptr, n_img, width)
    image, local_m = _program_tile(n_img, BLOCK_M)
    chunk = tl.program_id(1) * BLOCK_C
    mask_m = local_m < n_img
    p_q, p_k = _map_scales(scale_ptr, SCALE)
    acc_q = tl.full([BLOCK_M, BLOCK_C], 0.0, tl.float32)
    acc_k = tl.full([BLOCK_M, BLOCK_C], 0.0, tl.float32)
    g_base = grad_ptr + image.to(tl.int64) * g_sb
    for start in range(0, n_img, BLOCK_N):
        local_n = start + tl.arange(0, BLOCK_N)
        qn_offs, mask_n = _tile_offsets(q, where, image, local_n, n_img, True)
        kn_offs = _tile_offsets(k, where, image, local_n, n_img, True)[0]
        sq_qn, sq_kn, _ = _row_stats(q, qn_offs, p_q, k, kn_offs, p_k, mask_n, C, SCALE, BLOCK_C)
        tile_mask = mask_m[:, None] & mask_n[None, :]
        m64 = local_m[:, None].to(tl.int64)
        n64 = local_n[None, :].to(tl.int64)
        g_ij = tl.load(g_base + m64 * g_si + n64 * g_sj, mask=tile_mask, other=0.0).to(tl.float32)
        g_ji = tl.load(g_base + n64 * g_si + m64 * g_sj, mask=tile_mask, other=0.0).to(tl.float32)
        acc_q += _scaled_dot(g_ij, _normalised_chunk(k, kn_offs, mask_n, chunk, C, p_k, _inv_norm(sq_kn, p_k, True),
                                                     BLOCK_C), IEEE)
        acc_k += _scaled_dot(g_ji, _normalised_chunk(q, qn_offs, mask_n, chunk, C, p_q, _inv_norm(sq_qn, p_q, True),
                                                     BLOCK_C), IEEE)
    rows_m = image * n_img + local_m
    _store_rows(dqhat_ptr, rows_m, mask_m, chunk, C, acc_q, BLOCK_C)
    _store_rows(dkhat_ptr, rows_m, mask_m, chunk, C, acc_k, BLOCK_C)


# ----------------------------------------------------------------------------- normaliser

@triton.jit
def normaliser_backward_kernel(
    x_ptr, ids_ptr, scale_ptr, dxhat_ptr, dx_ptr,
    rows, n_img, width, C,
    x_srow, x_sc, x_sh, x_sw, d_srow, d_sc, d_sh, d_sw,
    GATHER: tl.constexpr, SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Gradient w.r.t. the raw rows ``x`` of ``x̂ = x / (‖x‖ + eps)`` given ``dL/dx̂`` (fp32,
    contiguous ``[R, C]``), for BLOCK_M rows; written (the one cast to x's dtype) to the
    rows of ``dx`` (same form and geometry as ``x``).

    ``dx = (dx̂ - x (x·dx̂) / (‖x‖ (‖x‖ + eps))) / (‖x‖ + eps)``, computed on the scaled rows
    ``y = x·P`` (``scale_ptr``: this map's largest magnitude; the module docstring,
    "Scaling"): with ``d = ‖y‖ + eps·P``, ``dx = (dx̂ - y (y·dx̂) / (‖y‖ d)) / (d / P)``. A zero
    row gets ``dx̂ / eps`` (the norm's subgradient 0 at 0, as torch's vector_norm). Two
    passes over the channel chunks: the row sums, then the gradient.
    """
    x = (x_ptr, x_srow, x_sc, x_sh, x_sw)
    dx = (dx_ptr, d_srow, d_sc, d_sh, d_sw)
    where = (ids_ptr, n_img, width)
    local = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    x_offs, mask = _tile_offsets(x, where, 0, local, rows, GATHER)
    d_offs = _tile_offsets(dx, where, 0, local, rows, GATHER)[0]
    g_offs = local.to(tl.int64) * C
    g = (dxhat_ptr, C, 1)
    p = _map_scale(scale_ptr, SCALE)
    sq = tl.full([BLOCK_M], 0.0, tl.float32)
    xg = tl.full([BLOCK_M], 0.0, tl.float32)
    for start in range(0, C, BLOCK_C):
        xc = _load_chunk(x, x_offs, mask, start, C, BLOCK_C).to(tl.float32) * p
        sq += _row_sum(xc * xc)
        xg += _row_sum(xc * _load_chunk(g, g_offs, mask, start, C, BLOCK_C))
    norm = tl.sqrt(sq)
    denom = norm + NORM_EPS * p
    proj = tl.where(norm > 0.0, xg / tl.where(norm > 0.0, norm * denom, 1.0), 0.0)
    for start in range(0, C, BLOCK_C):
        xc = _load_chunk(x, x_offs, mask, start, C, BLOCK_C).to(tl.float32) * p
        gc = _load_chunk(g, g_offs, mask, start, C, BLOCK_C)
        _store_chunk(dx, d_offs, mask, start, C, (gc - xc * proj[:, None]) / (denom / p)[:, None], BLOCK_C)
