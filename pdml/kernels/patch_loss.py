"""Triton kernels of the fused patch losses (DESIGN.md §1): gather + normalise + similarity + loss.

Row addressing. Every kernel sees "rows" of length ``C``; global row ``r`` is
- map form (``GATHER``): ``fmap[r // n_img, :, ids[r % n_img]]`` of a ``[B, C, H, W]`` map
  (any strides; the flat pixel id is split into ``h, w`` with ``width``),
- rows form: ``feat[r, :]`` of a ``[R, C]`` matrix.
Rows form groups of ``n_group`` consecutive rows (one image, or with ``negatives="batch"``
the whole minibatch, so a group's tiles then span images); program axis 1 is the group.

Numerics. Rows are loaded in the input dtype (fp32/fp16/bf16) and everything else is
fp32: norms, exp, logsumexp, sums, accumulators. The similarity of a tile is the dot of
the RAW rows (fp32 accumulation) scaled afterwards by the fp32 inverse norms
``1 / (‖x‖₂ + 1e-7)`` (CUT's Normalize; ``NORMALIZE`` off for the rows form, whose rows
arrive normalised). fp32 inputs use ``tl.dot(..., input_precision="ieee")`` (``IEEE``):
the logits are ``S / τ`` with τ = 0.07 … 0.15, so tf32's 10-bit mantissa (≈5e-4 relative
on S) would become ≈1e-2 absolute error on a logit, far off the fp32 reference; fp16/bf16
inputs go to the tensor cores directly. The N×N similarity of a group is never stored:
PatchNCE keeps an online (running max + sum) logsumexp per row, PatchMetric running
exp-sums per row; backward recomputes the tiles.

Gradients go through the normaliser and are written to the rows they came from (the
gradient map is zero-initialised by the caller; ids are distinct so every written row has
exactly one writer): no atomics, deterministic.

All block sizes are >= 16 (the GPU's minimum dot shape; the interpreter would accept less).
"""
import triton
import triton.language as tl

NORM_EPS = tl.constexpr(1e-7)
"""CUT's Normalize epsilon (pdml.reference.NORM_EPS)."""

DIAG_FILL = tl.constexpr(-10.0)
"""CUT's / DML_CT's fill of the self-similarity (pdml.reference.DIAG_FILL)."""


# ----------------------------------------------------------------------------- helpers
# Reductions call tl.reduce with triton's own combine functions instead of tl.sum /
# tl.max, and tl.full replaces tl.zeros: tl.sum, tl.max and tl.zeros are @triton.jit
# functions of triton.language, decorated once for the mode triton was imported in,
# while pdml.kernels loads this module once per mode (kernel_module) and every jitted
# callee must match its caller's mode. The combine functions are only passed, never
# called, by the interpreter (it recognises them and reduces with numpy), and compile
# to exactly what tl.sum / tl.max compile to.

@triton.jit
def _row_sum(x):
    """Sum over axis 1 of a 2-D tile."""
    return tl.reduce(x, 1, tl.standard._sum_combine)


@triton.jit
def _row_max(x):
    """Max over axis 1 of a 2-D tile."""
    return tl.reduce(x, 1, tl.standard._elementwise_max)


@triton.jit
def _row_offsets(rows, mask, ids_ptr, n_img, width, s_row, s_h, s_w, GATHER: tl.constexpr):
    """Element offsets (int64) of the first channel of every row in ``rows``."""
    if GATHER:
        pix = tl.load(ids_ptr + rows % n_img, mask=mask, other=0).to(tl.int64)
        offs = (rows // n_img).to(tl.int64) * s_row + (pix // width) * s_h + (pix % width) * s_w
    else:
        offs = rows.to(tl.int64) * s_row
    return offs


@triton.jit
def _load_rows(ptr, offs, s_c, cols, mask, C):
    """``[BLOCK_rows, BLOCK_C]`` tile in the input dtype, zeros outside the rows/channels."""
    return tl.load(ptr + offs[:, None] + cols[None, :].to(tl.int64) * s_c,
                   mask=mask[:, None] & (cols[None, :] < C), other=0.0)


@triton.jit
def _inv_norm(x, NORMALIZE: tl.constexpr):
    """Per-row ``1 / (‖x‖₂ + eps)`` in fp32 (ones when the rows are already normalised)."""
    xf = x.to(tl.float32)
    if NORMALIZE:
        inv = 1.0 / (tl.sqrt(_row_sum(xf * xf)) + NORM_EPS)
    else:
        inv = _row_sum(xf * 0.0) + 1.0
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
def _normaliser_backward(x, dxhat, NORMALIZE: tl.constexpr):
    """Gradient w.r.t. raw rows ``x`` of ``x̂ = x / (‖x‖ + eps)`` given ``dL/dx̂`` (fp32).

    ``dx = (dx̂ - x (x·dx̂) / (‖x‖ (‖x‖ + eps))) / (‖x‖ + eps)``; a zero row gets
    ``dx̂ / eps`` (the norm's subgradient 0 at 0, as torch's vector_norm).
    """
    if NORMALIZE:
        xf = x.to(tl.float32)
        norm = tl.sqrt(_row_sum(xf * xf))
        denom = norm + NORM_EPS
        proj = _row_sum(xf * dxhat) / tl.where(norm > 0.0, norm * denom, 1.0)
        proj = tl.where(norm > 0.0, proj, 0.0)
        dx = (dxhat - xf * proj[:, None]) / denom[:, None]
    else:
        dx = dxhat
    return dx


# ----------------------------------------------------------------------------- PatchNCE

@triton.jit
def nce_forward_kernel(
    q_ptr, k_ptr, ids_ptr, loss_ptr, lse_ptr,
    n_group, n_img, width, C, inv_tau,
    q_srow, q_sc, q_sh, q_sw, k_srow, k_sc, k_sh, k_sw,
    GATHER: tl.constexpr, NORMALIZE: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Per-row PatchNCE loss and logsumexp (both fp32 ``[R]``) of BLOCK_M rows of one group.

    logits of row i: ``[S_ii, S_i0 .. S_i(n-1) with S_ii -> -10] / τ``; loss = lse - S_ii/τ.
    """
    group = tl.program_id(1)
    local_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = local_m < n_group
    rows_m = group * n_group + local_m
    cols = tl.arange(0, BLOCK_C)

    q = _load_rows(q_ptr, _row_offsets(rows_m, mask_m, ids_ptr, n_img, width, q_srow, q_sh, q_sw, GATHER),
                   q_sc, cols, mask_m, C)
    inv_q = _inv_norm(q, NORMALIZE)

    run_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    run_sum = tl.full([BLOCK_M], 0.0, tl.float32)
    pos = tl.full([BLOCK_M], 0.0, tl.float32)
    for start in range(0, n_group, BLOCK_N):
        local_n = start + tl.arange(0, BLOCK_N)
        mask_n = local_n < n_group
        k = _load_rows(k_ptr, _row_offsets(group * n_group + local_n, mask_n, ids_ptr, n_img, width,
                                           k_srow, k_sh, k_sw, GATHER), k_sc, cols, mask_n, C)
        inv_k = _inv_norm(k, NORMALIZE)
        logits = _dot(q, tl.trans(k), IEEE) * (inv_q[:, None] * inv_tau) * inv_k[None, :]
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
    tl.store(loss_ptr + rows_m, lse - pos, mask=mask_m)
    tl.store(lse_ptr + rows_m, lse, mask=mask_m)


@triton.jit
def nce_backward_kernel(
    q_ptr, k_ptr, ids_ptr, lse_ptr, grad_ptr, dq_ptr,
    n_group, n_img, width, C, inv_tau, grad_stride,
    q_srow, q_sc, q_sh, q_sw, k_srow, k_sc, k_sh, k_sw, d_srow, d_sc, d_sh, d_sw,
    GATHER: tl.constexpr, NORMALIZE: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dL/dq of PatchNCE for BLOCK_M rows, written to their rows of ``dq`` (input dtype).

    ``dL/dS_ij = g_i/τ · (softmax_ij - δ_ij)`` over the negatives j (entry i of the
    negatives is the constant -10/τ, so the diagonal's softmax is the positive's),
    ``dq̂_i = Σ_j dL/dS_ij k̂_j`` (k is detached), then through the normaliser.
    """
    group = tl.program_id(1)
    local_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = local_m < n_group
    rows_m = group * n_group + local_m
    cols = tl.arange(0, BLOCK_C)

    q = _load_rows(q_ptr, _row_offsets(rows_m, mask_m, ids_ptr, n_img, width, q_srow, q_sh, q_sw, GATHER),
                   q_sc, cols, mask_m, C)
    inv_q = _inv_norm(q, NORMALIZE)
    lse = tl.load(lse_ptr + rows_m, mask=mask_m, other=0.0)
    grad = tl.load(grad_ptr + rows_m.to(tl.int64) * grad_stride, mask=mask_m, other=0.0).to(tl.float32)

    acc = tl.full([BLOCK_M, BLOCK_C], 0.0, tl.float32)
    for start in range(0, n_group, BLOCK_N):
        local_n = start + tl.arange(0, BLOCK_N)
        mask_n = local_n < n_group
        k = _load_rows(k_ptr, _row_offsets(group * n_group + local_n, mask_n, ids_ptr, n_img, width,
                                           k_srow, k_sh, k_sw, GATHER), k_sc, cols, mask_n, C)
        inv_k = _inv_norm(k, NORMALIZE)
        # the logits exactly as in forward, so softmax is consistent with the saved lse
        logits = _dot(q, tl.trans(k), IEEE) * (inv_q[:, None] * inv_tau) * inv_k[None, :]
        diag = local_m[:, None] == local_n[None, :]
        weight = tl.exp(logits - lse[:, None]) - tl.where(diag, 1.0, 0.0)
        weight = tl.where(mask_n[None, :], weight, 0.0)
        # |weight| <= 1 and |k̂| <= 1: safe operands for fp16/bf16 tensor cores; g/τ goes after
        k_hat = (k.to(tl.float32) * inv_k[:, None]).to(k.dtype)
        acc += _dot(weight.to(k.dtype), k_hat, IEEE)
    dq_hat = acc * (grad * inv_tau)[:, None]
    dq = _normaliser_backward(q, dq_hat, NORMALIZE)
    d_offs = _row_offsets(rows_m, mask_m, ids_ptr, n_img, width, d_srow, d_sh, d_sw, GATHER)
    tl.store(dq_ptr + d_offs[:, None] + cols[None, :].to(tl.int64) * d_sc,
             dq.to(dq_ptr.dtype.element_ty), mask=mask_m[:, None] & (cols[None, :] < C))


# ----------------------------------------------------------------------------- PatchMetric

@triton.jit
def metric_forward_kernel(
    q_ptr, k_ptr, ids_ptr, out_ptr,
    n_group, n_img, width, C, inv_tau, pos_scale, pair_scale,
    q_srow, q_sc, q_sh, q_sw, k_srow, k_sc, k_sh, k_sw,
    GATHER: tl.constexpr, NORMALIZE: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Per-row contribution ``v_i`` (fp32 ``[R]``) to the metric loss; the loss is ``Σ_i v_i``.

    ``v_i = -pos_scale · e^{S_qk[i,i]/τ} + pair_scale · Σ_j (e^{S̃_qq[i,j]/τ} + e^{S̃_kk[i,j]/τ})``
    with ``pos_scale = 1/(R·C)``, ``pair_scale = 1/(G·n²·C)`` (per layer) and S̃'s diagonal -10.
    """
    group = tl.program_id(1)
    local_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = local_m < n_group
    rows_m = group * n_group + local_m
    cols = tl.arange(0, BLOCK_C)

    q = _load_rows(q_ptr, _row_offsets(rows_m, mask_m, ids_ptr, n_img, width, q_srow, q_sh, q_sw, GATHER),
                   q_sc, cols, mask_m, C)
    k = _load_rows(k_ptr, _row_offsets(rows_m, mask_m, ids_ptr, n_img, width, k_srow, k_sh, k_sw, GATHER),
                   k_sc, cols, mask_m, C)
    inv_q = _inv_norm(q, NORMALIZE)
    inv_k = _inv_norm(k, NORMALIZE)
    pos = _row_sum(q.to(tl.float32) * k.to(tl.float32)) * inv_q * inv_k

    sum_qq = tl.full([BLOCK_M], 0.0, tl.float32)
    sum_kk = tl.full([BLOCK_M], 0.0, tl.float32)
    diag_exp = tl.exp(DIAG_FILL * inv_tau)
    for start in range(0, n_group, BLOCK_N):
        local_n = start + tl.arange(0, BLOCK_N)
        mask_n = local_n < n_group
        rows_n = group * n_group + local_n
        q_n = _load_rows(q_ptr, _row_offsets(rows_n, mask_n, ids_ptr, n_img, width, q_srow, q_sh, q_sw, GATHER),
                         q_sc, cols, mask_n, C)
        k_n = _load_rows(k_ptr, _row_offsets(rows_n, mask_n, ids_ptr, n_img, width, k_srow, k_sh, k_sw, GATHER),
                         k_sc, cols, mask_n, C)
        inv_q_n = _inv_norm(q_n, NORMALIZE)
        inv_k_n = _inv_norm(k_n, NORMALIZE)
        diag = local_m[:, None] == local_n[None, :]
        s_qq = _dot(q, tl.trans(q_n), IEEE) * (inv_q[:, None] * inv_tau) * inv_q_n[None, :]
        s_kk = _dot(k, tl.trans(k_n), IEEE) * (inv_k[:, None] * inv_tau) * inv_k_n[None, :]
        e_qq = tl.where(diag, diag_exp, tl.exp(s_qq))
        e_kk = tl.where(diag, diag_exp, tl.exp(s_kk))
        sum_qq += _row_sum(tl.where(mask_n[None, :], e_qq, 0.0))
        sum_kk += _row_sum(tl.where(mask_n[None, :], e_kk, 0.0))
    v = -pos_scale * tl.exp(pos * inv_tau) + pair_scale * (sum_qq + sum_kk)
    tl.store(out_ptr + rows_m, v, mask=mask_m)


@triton.jit
def metric_backward_kernel(
    q_ptr, k_ptr, ids_ptr, grad_ptr, dq_ptr, dk_ptr,
    n_group, n_img, width, C, inv_tau, pos_scale, pair_scale, grad_stride,
    q_srow, q_sc, q_sh, q_sw, k_srow, k_sc, k_sh, k_sw,
    dq_srow, dq_sc, dq_sh, dq_sw, dk_srow, dk_sc, dk_sh, dk_sw,
    GATHER: tl.constexpr, NORMALIZE: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dL/dq and dL/dk of ``L = Σ_i g_i v_i`` (v from the forward kernel) for BLOCK_M rows.

    ``dq̂_i = -g_i·pos_scale/τ·e^{S_qk[i,i]/τ} k̂_i + pair_scale/τ · Σ_{j≠i} (g_i + g_j) e^{S_qq[i,j]/τ} q̂_j``
    (S_qq is symmetric: row i meets q̂_j in v_i and in v_j); dk̂ likewise with q ↔ k.
    The exp weights are shifted by the largest possible logit 1/τ before the dot, so they
    lie in (0, 1] and cannot overflow fp16; e^{1/τ} is put back after.
    """
    group = tl.program_id(1)
    local_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = local_m < n_group
    rows_m = group * n_group + local_m
    cols = tl.arange(0, BLOCK_C)

    q = _load_rows(q_ptr, _row_offsets(rows_m, mask_m, ids_ptr, n_img, width, q_srow, q_sh, q_sw, GATHER),
                   q_sc, cols, mask_m, C)
    k = _load_rows(k_ptr, _row_offsets(rows_m, mask_m, ids_ptr, n_img, width, k_srow, k_sh, k_sw, GATHER),
                   k_sc, cols, mask_m, C)
    inv_q = _inv_norm(q, NORMALIZE)
    inv_k = _inv_norm(k, NORMALIZE)
    pos = _row_sum(q.to(tl.float32) * k.to(tl.float32)) * inv_q * inv_k
    grad_m = tl.load(grad_ptr + rows_m.to(tl.int64) * grad_stride, mask=mask_m, other=0.0).to(tl.float32)

    acc_q = tl.full([BLOCK_M, BLOCK_C], 0.0, tl.float32)
    acc_k = tl.full([BLOCK_M, BLOCK_C], 0.0, tl.float32)
    for start in range(0, n_group, BLOCK_N):
        local_n = start + tl.arange(0, BLOCK_N)
        mask_n = local_n < n_group
        rows_n = group * n_group + local_n
        q_n = _load_rows(q_ptr, _row_offsets(rows_n, mask_n, ids_ptr, n_img, width, q_srow, q_sh, q_sw, GATHER),
                         q_sc, cols, mask_n, C)
        k_n = _load_rows(k_ptr, _row_offsets(rows_n, mask_n, ids_ptr, n_img, width, k_srow, k_sh, k_sw, GATHER),
                         k_sc, cols, mask_n, C)
        inv_q_n = _inv_norm(q_n, NORMALIZE)
        inv_k_n = _inv_norm(k_n, NORMALIZE)
        grad_n = tl.load(grad_ptr + rows_n.to(tl.int64) * grad_stride, mask=mask_n, other=0.0).to(tl.float32)
        pair_grad = grad_m[:, None] + grad_n[None, :]
        off = (local_m[:, None] == local_n[None, :]) | (mask_n[None, :] == 0)
        s_qq = _dot(q, tl.trans(q_n), IEEE) * (inv_q[:, None] * inv_tau) * inv_q_n[None, :]
        s_kk = _dot(k, tl.trans(k_n), IEEE) * (inv_k[:, None] * inv_tau) * inv_k_n[None, :]
        w_qq = tl.where(off, 0.0, tl.exp(s_qq - inv_tau)) * pair_grad
        w_kk = tl.where(off, 0.0, tl.exp(s_kk - inv_tau)) * pair_grad
        q_hat_n = (q_n.to(tl.float32) * inv_q_n[:, None]).to(q.dtype)
        k_hat_n = (k_n.to(tl.float32) * inv_k_n[:, None]).to(k.dtype)
        acc_q += _dot(w_qq.to(q.dtype), q_hat_n, IEEE)
        acc_k += _dot(w_kk.to(k.dtype), k_hat_n, IEEE)
    # the fp32 normalised rows only now, not live across the loop (registers)
    q_hat = q.to(tl.float32) * inv_q[:, None]
    k_hat = k.to(tl.float32) * inv_k[:, None]
    pair_coef = pair_scale * inv_tau * tl.exp(inv_tau)
    pos_coef = (-pos_scale * inv_tau) * grad_m * tl.exp(pos * inv_tau)
    dq_hat = pos_coef[:, None] * k_hat + pair_coef * acc_q
    dk_hat = pos_coef[:, None] * q_hat + pair_coef * acc_k
    dq = _normaliser_backward(q, dq_hat, NORMALIZE)
    dk = _normaliser_backward(k, dk_hat, NORMALIZE)
    cmask = mask_m[:, None] & (cols[None, :] < C)
    dq_offs = _row_offsets(rows_m, mask_m, ids_ptr, n_img, width, dq_srow, dq_sh, dq_sw, GATHER)
    dk_offs = _row_offsets(rows_m, mask_m, ids_ptr, n_img, width, dk_srow, dk_sh, dk_sw, GATHER)
    tl.store(dq_ptr + dq_offs[:, None] + cols[None, :].to(tl.int64) * dq_sc,
             dq.to(dq_ptr.dtype.element_ty), mask=cmask)
    tl.store(dk_ptr + dk_offs[:, None] + cols[None, :].to(tl.int64) * dk_sc,
             dk.to(dk_ptr.dtype.element_ty), mask=cmask)


# ----------------------------------------------------------------------------- similarity

@triton.jit
def similarity_forward_kernel(
    q_ptr, k_ptr, ids_ptr, out_ptr,
    n_img, width, C,
    q_sb, q_sc, q_sh, q_sw, k_sb, k_sc, k_sh, k_sw,
    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One ``[BLOCK_M, BLOCK_N]`` tile of ``q̂ k̂ᵀ`` of image ``program_id(2)`` into ``out [B, N, N]`` fp32."""
    image = tl.program_id(2)
    local_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    local_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = local_m < n_img
    mask_n = local_n < n_img
    cols = tl.arange(0, BLOCK_C)
    q = _load_rows(q_ptr, _row_offsets(image * n_img + local_m, mask_m, ids_ptr, n_img, width,
                                       q_sb, q_sh, q_sw, True), q_sc, cols, mask_m, C)
    k = _load_rows(k_ptr, _row_offsets(image * n_img + local_n, mask_n, ids_ptr, n_img, width,
                                       k_sb, k_sh, k_sw, True), k_sc, cols, mask_n, C)
    sim = _dot(q, tl.trans(k), IEEE) * _inv_norm(q, True)[:, None] * _inv_norm(k, True)[None, :]
    out_offs = image.to(tl.int64) * n_img * n_img + local_m[:, None].to(tl.int64) * n_img + local_n[None, :]
    tl.store(out_ptr + out_offs, sim, mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def similarity_backward_kernel(
    q_ptr, k_ptr, ids_ptr, grad_ptr, dq_ptr, dk_ptr,
    n_img, width, C, g_sb, g_si, g_sj,
    q_sb, q_sc, q_sh, q_sw, k_sb, k_sc, k_sh, k_sw,
    dq_sb, dq_sc, dq_sh, dq_sw, dk_sb, dk_sc, dk_sh, dk_sw,
    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dq, dk of ``S = q̂ k̂ᵀ`` given ``dS [B, N, N]`` for BLOCK_M rows of one image.

    ``dq̂_i = Σ_j dS_ij k̂_j``, ``dk̂_i = Σ_j dS_ji q̂_j``. dS is an arbitrary upstream
    gradient (no bound on its range): each row of a dS tile is divided by its largest
    magnitude before the cast to fp16/bf16 for the dot (so it cannot overflow) and
    multiplied back after.
    """
    image = tl.program_id(1)
    local_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = local_m < n_img
    rows_m = image * n_img + local_m
    cols = tl.arange(0, BLOCK_C)
    q = _load_rows(q_ptr, _row_offsets(rows_m, mask_m, ids_ptr, n_img, width, q_sb, q_sh, q_sw, True),
                   q_sc, cols, mask_m, C)
    k = _load_rows(k_ptr, _row_offsets(rows_m, mask_m, ids_ptr, n_img, width, k_sb, k_sh, k_sw, True),
                   k_sc, cols, mask_m, C)
    acc_q = tl.full([BLOCK_M, BLOCK_C], 0.0, tl.float32)
    acc_k = tl.full([BLOCK_M, BLOCK_C], 0.0, tl.float32)
    g_base = grad_ptr + image.to(tl.int64) * g_sb
    for start in range(0, n_img, BLOCK_N):
        local_n = start + tl.arange(0, BLOCK_N)
        mask_n = local_n < n_img
        rows_n = image * n_img + local_n
        q_n = _load_rows(q_ptr, _row_offsets(rows_n, mask_n, ids_ptr, n_img, width, q_sb, q_sh, q_sw, True),
                         q_sc, cols, mask_n, C)
        k_n = _load_rows(k_ptr, _row_offsets(rows_n, mask_n, ids_ptr, n_img, width, k_sb, k_sh, k_sw, True),
                         k_sc, cols, mask_n, C)
        q_hat_n = (q_n.to(tl.float32) * _inv_norm(q_n, True)[:, None]).to(q.dtype)
        k_hat_n = (k_n.to(tl.float32) * _inv_norm(k_n, True)[:, None]).to(k.dtype)
        tile_mask = mask_m[:, None] & mask_n[None, :]
        m64 = local_m[:, None].to(tl.int64)
        n64 = local_n[None, :].to(tl.int64)
        g_ij = tl.load(g_base + m64 * g_si + n64 * g_sj, mask=tile_mask, other=0.0).to(tl.float32)
        g_ji = tl.load(g_base + n64 * g_si + m64 * g_sj, mask=tile_mask, other=0.0).to(tl.float32)
        scale_ij = _row_max(tl.abs(g_ij))
        scale_ij = tl.where(scale_ij > 0.0, scale_ij, 1.0)
        scale_ji = _row_max(tl.abs(g_ji))
        scale_ji = tl.where(scale_ji > 0.0, scale_ji, 1.0)
        acc_q += _dot((g_ij / scale_ij[:, None]).to(q.dtype), k_hat_n, IEEE) * scale_ij[:, None]
        acc_k += _dot((g_ji / scale_ji[:, None]).to(k.dtype), q_hat_n, IEEE) * scale_ji[:, None]
    dq = _normaliser_backward(q, acc_q, True)
    dk = _normaliser_backward(k, acc_k, True)
    cmask = mask_m[:, None] & (cols[None, :] < C)
    dq_offs = _row_offsets(rows_m, mask_m, ids_ptr, n_img, width, dq_sb, dq_sh, dq_sw, True)
    dk_offs = _row_offsets(rows_m, mask_m, ids_ptr, n_img, width, dk_sb, dk_sh, dk_sw, True)
    tl.store(dq_ptr + dq_offs[:, None] + cols[None, :].to(tl.int64) * dq_sc,
             dq.to(dq_ptr.dtype.element_ty), mask=cmask)
    tl.store(dk_ptr + dk_offs[:, None] + cols[None, :].to(tl.int64) * dk_sc,
             dk.to(dk_ptr.dtype.element_ty), mask=cmask)
