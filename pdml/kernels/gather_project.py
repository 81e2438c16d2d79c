"""Triton kernels of the fused gather + linear layer ``gather_project`` (sampled-first heads).

Rows. Row ``r`` of the ``R = B·N`` rows is ``fmap[r // N, :, ids[r % N]]`` of a
``[B, F, H, W]`` map (any strides; the flat pixel id is split into ``h, w`` with ``width``).
The kernels read only those pixels' channels, straight from the map: no gathered or
permuted copy of the map exists anywhere.

- :func:`gather_project_forward_kernel`: ``out [R, D] = rows @ weightᵀ (+ bias)``; a program
  owns a ``BLOCK_R × BLOCK_D`` output tile and loops over the ``F`` channels in chunks.
- :func:`gather_project_grad_fmap_kernel`: ``grad [R, D] @ weight [D, F]`` written back to
  the sampled pixels of a zero-initialised gradient map (ids are distinct: every pixel has
  one writer, no atomics).
- :func:`gather_project_grad_weight_kernel`: ``gradᵀ @ rows -> [D, F]`` (and ``Σ_r grad
  -> [D]`` for the bias) as a reduction over all rows inside one program per output tile:
  no atomics, a fixed summation order, deterministic.

Numerics: operands are loaded in the input dtype (fp32/fp16/bf16) and multiplied by
``tl.dot`` with fp32 accumulation; fp32 asks for ``input_precision="ieee"`` (``IEEE``) so a
GPU does not round the operands to tf32; fp16/bf16 use the tensor cores. Results are cast
to the output's dtype on store. Every block is >= 16 (the smallest dot a GPU accepts).

Like :mod:`pdml.kernels.patch_loss`, this module may be loaded once per Triton mode
(:func:`pdml.kernels.runtime.kernel_module`), so reductions use ``tl.reduce`` with triton's
combine function and ``tl.full`` instead of the jitted ``tl.sum`` / ``tl.zeros``.
"""
import triton
import triton.language as tl


@triton.jit
def _dot_acc(a, b, acc, IEEE: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation (exact fp32 products when ``IEEE``)."""
    if IEEE:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _pixel_offsets(rows, mask, ids_ptr, n_img, width, s_b, s_h, s_w):
    """int64 element offsets of channel 0 of the pixels of ``rows`` in a map with strides
    ``s_b, s_h, s_w`` (0 for masked-off rows)."""
    pix = tl.load(ids_ptr + rows % n_img, mask=mask, other=0).to(tl.int64)
    return (rows // n_img).to(tl.int64) * s_b + (pix // width) * s_h + (pix % width) * s_w


@triton.jit
def gather_project_forward_kernel(
    fmap_ptr, ids_ptr, w_ptr, b_ptr, out_ptr,
    n_rows, n_img, width, F, D,
    s_b, s_c, s_h, s_w, s_wd, s_wf, s_out,
    HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr,
):
    """``out[r, d] = Σ_f fmap[r // N, f, ids[r % N]] · weight[d, f] (+ bias[d])``.

    Grid: ``(cdiv(R, BLOCK_R), cdiv(D, BLOCK_D))``; ``out`` is ``[R, D]`` with row stride ``s_out``.
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_mask = rows < n_rows
    col_mask = cols < D
    offs = _pixel_offsets(rows, row_mask, ids_ptr, n_img, width, s_b, s_h, s_w)
    acc = tl.full([BLOCK_R, BLOCK_D], 0.0, tl.float32)
    for f0 in range(0, F, BLOCK_F):
        f = f0 + tl.arange(0, BLOCK_F)
        f_mask = f < F
        x = tl.load(fmap_ptr + offs[:, None] + f[None, :].to(tl.int64) * s_c,
                    mask=row_mask[:, None] & f_mask[None, :], other=0.0)
        w_t = tl.load(w_ptr + cols[None, :].to(tl.int64) * s_wd + f[:, None].to(tl.int64) * s_wf,
                      mask=f_mask[:, None] & col_mask[None, :], other=0.0)
        acc = _dot_acc(x, w_t, acc, IEEE)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None].to(tl.int64) * s_out + cols[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def gather_project_grad_fmap_kernel(
    grad_ptr, w_ptr, ids_ptr, dfmap_ptr,
    n_rows, n_img, width, F, D,
    s_gr, s_gd, s_wd, s_wf, s_b, s_c, s_h, s_w,
    IEEE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``dfmap[r // N, f, ids[r % N]] = Σ_d grad[r, d] · weight[d, f]`` (other pixels untouched).

    Grid: ``(cdiv(R, BLOCK_R), cdiv(F, BLOCK_F))``; ``s_b, s_c, s_h, s_w`` are dfmap's strides.
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    row_mask = rows < n_rows
    f_mask = f < F
    acc = tl.full([BLOCK_R, BLOCK_F], 0.0, tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_mask = d < D
        g = tl.load(grad_ptr + rows[:, None].to(tl.int64) * s_gr + d[None, :].to(tl.int64) * s_gd,
                    mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        w = tl.load(w_ptr + d[:, None].to(tl.int64) * s_wd + f[None, :].to(tl.int64) * s_wf,
                    mask=d_mask[:, None] & f_mask[None, :], other=0.0)
        acc = _dot_acc(g, w, acc, IEEE)
    offs = _pixel_offsets(rows, row_mask, ids_ptr, n_img, width, s_b, s_h, s_w)
    tl.store(dfmap_ptr + offs[:, None] + f[None, :].to(tl.int64) * s_c,
             acc.to(dfmap_ptr.dtype.element_ty), mask=row_mask[:, None] & f_mask[None, :])


@triton.jit
def gather_project_grad_weight_kernel(
    grad_ptr, fmap_ptr, ids_ptr, dw_ptr, db_ptr,
    n_rows, n_img, width, F, D,
    s_gr, s_gd, s_b, s_c, s_h, s_w,
    HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """``dw[d, f] = Σ_r grad[r, d] · fmap[r // N, f, ids[r % N]]`` into a contiguous ``[D, F]``;
    with ``HAS_BIAS`` the programs of the first F tile also write ``db[d] = Σ_r grad[r, d]``.

    Grid: ``(cdiv(D, BLOCK_D), cdiv(F, BLOCK_F))``; each program sums over all ``R`` rows.
    """
    d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    d_mask = d < D
    f_mask = f < F
    acc = tl.full([BLOCK_D, BLOCK_F], 0.0, tl.float32)
    bias_acc = tl.full([BLOCK_D], 0.0, tl.float32)
    for r0 in range(0, n_rows, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_mask = rows < n_rows
        g_t = tl.load(grad_ptr + d[:, None].to(tl.int64) * s_gd + rows[None, :].to(tl.int64) * s_gr,
                      mask=d_mask[:, None] & row_mask[None, :], other=0.0)
        offs = _pixel_offsets(rows, row_mask, ids_ptr, n_img, width, s_b, s_h, s_w)
        x = tl.load(fmap_ptr + offs[:, None] + f[None, :].to(tl.int64) * s_c,
                    mask=row_mask[:, None] & f_mask[None, :], other=0.0)
        acc = _dot_acc(g_t, x, acc, IEEE)
        if HAS_BIAS:
            bias_acc += tl.reduce(g_t.to(tl.float32), 1, tl.standard._sum_combine)
    tl.store(dw_ptr + d[:, None].to(tl.int64) * F + f[None, :], acc.to(dw_ptr.dtype.element_ty),
             mask=d_mask[:, None] & f_mask[None, :])
    if HAS_BIAS:
        tl.store(db_ptr + d, bias_acc.to(db_ptr.dtype.element_ty), mask=d_mask & (tl.program_id(1) == 0))
