// Bodies of the ops gather_project and gather_project_backward (schemas in pdml.cpp):
// input checks, then the kernel of the tensors' device (gather_project.h). Fake impls and
// autograd are registered in Python (pdml/backends/ext.py).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "op_checks.h"
#include "gather_project.h"

namespace pdml {
namespace {

using at::Tensor;

#ifdef PDML_WITH_CUDA
#define PDML_GATHER_ON_DEVICE(t, fn, ...) ((t).is_cuda() ? cuda::fn(__VA_ARGS__) : cpu::fn(__VA_ARGS__))
#else
#define PDML_GATHER_ON_DEVICE(t, fn, ...) cpu::fn(__VA_ARGS__)
#endif

void check_fmap(const Tensor& fmap) {
  TORCH_CHECK(fmap.dim() == 4, "fmap must have shape [B, F, H, W], got ", fmap.sizes());
  TORCH_CHECK(fmap.numel() > 0, "fmap must not be empty");
  const auto dt = fmap.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              "fmap must be float32, float64, float16 or bfloat16, got ", dt);
  TORCH_CHECK(fmap.is_cpu() || fmap.is_cuda(), "fmap must be a CPU or CUDA tensor");
}

void check_operand(const char* name, const Tensor& t, const Tensor& fmap) {
  TORCH_CHECK(t.scalar_type() == fmap.scalar_type(), name, " must have fmap's dtype ", fmap.scalar_type(),
              ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == fmap.device(), name, " must be on fmap's device");
}

void check_weight(const Tensor& weight, const Tensor& fmap) {
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == fmap.size(1) && weight.size(0) > 0,
              "weight must have shape [D, F] with F = fmap.size(1) = ", fmap.size(1), ", got ", weight.sizes());
  check_operand("weight", weight, fmap);
}

Tensor gather_project(const Tensor& fmap, const Tensor& ids, const Tensor& weight,
                      const std::optional<Tensor>& bias) {
  check_fmap(fmap);
  check_ids(ids, fmap);
  check_weight(weight, fmap);
  Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = *bias;
    TORCH_CHECK(b.dim() == 1 && b.size(0) == weight.size(0), "bias must have shape [D] = [", weight.size(0),
                "], got ", b.sizes());
    check_operand("bias", b, fmap);
  }
  return PDML_GATHER_ON_DEVICE(fmap, gather_project_forward, fmap, ids, weight, b);
}

std::tuple<Tensor, Tensor, Tensor> gather_project_backward(const Tensor& grad, const Tensor& fmap,
                                                           const Tensor& ids, const Tensor& weight,
                                                           bool bias_grad) {
  check_fmap(fmap);
  check_ids(ids, fmap);
  check_weight(weight, fmap);
  const int64_t rows = fmap.size(0) * ids.numel();
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == rows && grad.size(1) == weight.size(0),
              "grad must have shape [B*N, D] = [", rows, ", ", weight.size(0), "], got ", grad.sizes());
  check_operand("grad", grad, fmap);
  return PDML_GATHER_ON_DEVICE(fmap, gather_project_backward, grad, fmap, ids, weight, bias_grad);
}

void register_impls(torch::Library& m) {
  m.impl("gather_project", &gather_project);
  m.impl("gather_project_backward", &gather_project_backward);
}

}  // namespace

TORCH_LIBRARY_IMPL(pdml, CPU, m) { register_impls(m); }

#ifdef PDML_WITH_CUDA
TORCH_LIBRARY_IMPL(pdml, CUDA, m) { register_impls(m); }
#endif

}  // namespace pdml
