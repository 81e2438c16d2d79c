// The per-device kernels of the gather_project op: the first linear layer of a row MLP
// fused with the gather of the sampled pixels, so a head applied after sampling reads only
// the sampled pixels' channels (never a permuted copy of the whole map).
// csrc/gather_project_ops.cpp holds the op bodies (input checks, then these kernels);
// pdml::cpu lives in csrc/cpu/ (always built), pdml::cuda in csrc/cuda/ (PDML_WITH_CUDA).
//
// Shapes and dtypes ("acc": float64 for float64 inputs, float32 otherwise):
// - fmap: [B, F, H, W], any strides, float32/float64/float16/bfloat16;
//   ids: int64 [N], values in [0, H*W), distinct; rows are image-major: row b*N + i is
//   fmap[b, :, ids[i]];
// - weight: [D, F], bias: [D] or undefined, both in fmap's dtype and on its device;
// - out / grad: [B*N, D] in fmap's dtype.
// Products accumulate in acc; results are written in the dtype of their operand.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace pdml {

#define PDML_DECLARE_GATHER_PROJECT                                                            \
  /* out[b*N + i] = fmap[b, :, ids[i]] @ weight.T (+ bias): [B*N, D] in fmap's dtype */        \
  at::Tensor gather_project_forward(const at::Tensor& fmap, const at::Tensor& ids,             \
                                    const at::Tensor& weight, const at::Tensor& bias);         \
  /* -> (grad_fmap: zeros like fmap except grad_fmap[b, :, ids[i]] = grad[b*N + i] @ weight,  \
         grad_weight [D, F] = gradᵀ @ rows, grad_bias [D] = Σ_rows grad, or [0] if not        \
         bias_grad); each in its operand's dtype */                                           \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> gather_project_backward(                      \
      const at::Tensor& grad, const at::Tensor& fmap, const at::Tensor& ids,                   \
      const at::Tensor& weight, bool bias_grad);

namespace cpu {
PDML_DECLARE_GATHER_PROJECT
}  // namespace cpu

#ifdef PDML_WITH_CUDA
namespace cuda {
PDML_DECLARE_GATHER_PROJECT
}  // namespace cuda
#endif

#undef PDML_DECLARE_GATHER_PROJECT

}  // namespace pdml
