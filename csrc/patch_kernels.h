// The per-device kernels behind the pdml ops. csrc/patch_ops.cpp holds the op bodies
// (input checks, gather → core → scatter); it calls the same entry points in pdml::cpu
// (csrc/cpu/, always built) and pdml::cuda (csrc/cuda/, built with PDML_WITH_CUDA).
//
// Shapes and dtypes. "acc" is the accumulation dtype: float64 for float64 inputs,
// float32 otherwise (float16/bfloat16 features are read and converted on the fly).
// - fmap: [B, C, H, W] features, any strides, float32/float64/float16/bfloat16;
//   ids: int64 [N], values in [0, H*W), distinct.
// - rows: [R, C] acc, R = B*N rows ordered image-major (row b*N + i ↔ fmap[b, :, ids[i]]).
// - q, k: [G, n, C] acc, contiguous, one group per slab (G*n = R).
// Nothing here ever allocates a [G, n, n] buffer: similarities live in per-tile scratch.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace pdml {

#define PDML_DECLARE_KERNELS                                                                   \
  /* gather + normalise: -> (rows_hat [B*N, C] acc, norms [B*N] acc) */                        \
  std::tuple<at::Tensor, at::Tensor> gather_normalise(const at::Tensor& fmap,                 \
                                                      const at::Tensor& ids);                 \
  /* backward of gather + normalise: d_rows [B*N, C] acc (∂L/∂rows_hat) -> ∂L/∂fmap,          \
     zero outside the gathered positions, contiguous, in the dtype of the features */        \
  at::Tensor normalise_backward_scatter(const at::Tensor& d_rows, const at::Tensor& rows_hat, \
                                        const at::Tensor& norms, const at::Tensor& ids,       \
                                        at::IntArrayRef map_sizes, at::ScalarType out_dtype); \
  /* PatchNCE: -> (loss [G*n] acc, lse [G*n] acc: the per-row logsumexp the backward needs) */ \
  std::tuple<at::Tensor, at::Tensor> nce_forward(const at::Tensor& q, const at::Tensor& k,    \
                                                 double tau);                                 \
  /* ∂loss_i/∂q̂_i for a unit upstream gradient: [G, n, C] acc (k is detached); loss and     \
     lse are nce_forward's outputs */                                                          \
  at::Tensor nce_backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& loss,   \
                          const at::Tensor& lse, double tau);                                 \
  /* PatchMetric: -> (0-dim acc loss, ∂L/∂q̂, ∂L/∂k̂); the gradients ([G, n, C] acc, for a    \
     unit upstream gradient) are computed in the same sweep when compute_grad, else empty */  \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> metric_forward(                               \
      const at::Tensor& q, const at::Tensor& k, double tau, bool compute_grad);

namespace cpu {
PDML_DECLARE_KERNELS
// PatchNCE forward that also returns ∂loss_i/∂q̂_i (as nce_backward: [G, n, C] acc, unit
// upstream gradient per row) from the same sweep: -> (loss, lse, d_q). Each row's loss
// depends on its own q̂_i only (k is detached), so the backward of a per-row upstream
// gradient is d_q scaled row by row — no second pass over the similarities.
std::tuple<at::Tensor, at::Tensor, at::Tensor> nce_forward_with_grad(const at::Tensor& q, const at::Tensor& k,
                                                                     double tau);
// The normaliser's backward alone, in place: d_rows [R, C] acc holds ∂L/∂rows_hat and
// becomes ∂L/∂rows (rows_hat [R, C], norms [R] from gather_normalise). Linear in d_rows.
at::Tensor normalise_backward_rows_(at::Tensor& d_rows, const at::Tensor& rows_hat, const at::Tensor& norms);
// The scatter alone: -> grad [map_sizes] (contiguous, out_dtype), zero except
// grad[b, :, ids[i]] = row_scale[b*N + i] · rows[b*N + i, :] (rows [B*N, C] acc, row_scale
// [B*N] acc or undefined for 1, ids distinct).
at::Tensor scatter_rows(const at::Tensor& rows, const at::Tensor& row_scale, const at::Tensor& ids,
                        at::IntArrayRef map_sizes, at::ScalarType out_dtype);
}  // namespace cpu

#ifdef PDML_WITH_CUDA
namespace cuda {
PDML_DECLARE_KERNELS
}  // namespace cuda
#endif

#undef PDML_DECLARE_KERNELS

}  // namespace pdml
