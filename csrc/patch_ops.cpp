// Bodies of the pdml ops (schemas in pdml.cpp), shared by CPU and CUDA tensors: input
// checks, then gather + normalise -> core kernel -> normaliser backward + scatter, each
// step running on the tensors' device (patch_kernels.h). Fake impls and autograd are
// registered in Python (pdml/backends/ext.py).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "op_checks.h"
#include "patch_kernels.h"

namespace pdml {
namespace {

using at::Tensor;

#ifdef PDML_WITH_CUDA
#define PDML_ON_DEVICE(t, fn, ...) ((t).is_cuda() ? cuda::fn(__VA_ARGS__) : cpu::fn(__VA_ARGS__))
#else
#define PDML_ON_DEVICE(t, fn, ...) cpu::fn(__VA_ARGS__)
#endif

at::ScalarType acc_dtype(const Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_features(const char* name, const Tensor& t, int64_t rank) {
  TORCH_CHECK(t.dim() == rank, name, " must have ", rank, " dimensions, got ", t.dim());
  TORCH_CHECK(t.numel() > 0, name, " must not be empty");
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              name, " must be float32, float64, float16 or bfloat16, got ", dt);
  TORCH_CHECK(t.is_cpu() || t.is_cuda(), name, " must be a CPU or CUDA tensor");
}

void check_pair(const Tensor& a, const Tensor& b) {
  TORCH_CHECK(a.sizes() == b.sizes(), "features must have the same shape, got ", a.sizes(),
              " and ", b.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "features must have the same dtype");
  TORCH_CHECK(a.device() == b.device(), "features must be on the same device");
}

void check_map(const Tensor& fq, const Tensor& fk, const Tensor& ids) {
  check_features("fq", fq, 4);
  check_features("fk", fk, 4);
  check_pair(fq, fk);
  check_ids(ids, fq);
}

// The map form's number of groups of negatives: B (one per image), 1 (the whole
// minibatch) or any other divisor of B (consecutive images share a group).
int64_t check_map_groups(const Tensor& fq, int64_t groups) {
  TORCH_CHECK(groups >= 1 && fq.size(0) % groups == 0, "groups=", groups,
              " must be >= 1 and divide the batch size ", fq.size(0));
  return groups;
}

int64_t check_rows(const Tensor& feat_q, const Tensor& feat_k, int64_t groups) {
  check_features("feat_q", feat_q, 2);
  check_features("feat_k", feat_k, 2);
  check_pair(feat_q, feat_k);
  TORCH_CHECK(groups >= 1 && feat_q.size(0) % groups == 0, "groups=", groups,
              " must divide the number of rows ", feat_q.size(0));
  return groups;
}

// [R, C] rows -> [G, R/G, C] contiguous slabs in the accumulation dtype.
Tensor as_groups(const Tensor& rows, int64_t groups) {
  return rows.to(acc_dtype(rows)).contiguous().view({groups, -1, rows.size(1)});
}

// ------------------------------------------------------------------------- map form

std::tuple<Tensor, Tensor> patch_nce(const Tensor& fq, const Tensor& fk, const Tensor& ids,
                                     double tau, int64_t groups) {
  check_map(fq, fk, ids);
  const int64_t g = check_map_groups(fq, groups);
  auto [q, q_norm] = PDML_ON_DEVICE(fq, gather_normalise, fq, ids);
  auto [k, k_norm] = PDML_ON_DEVICE(fk, gather_normalise, fk, ids);
  return PDML_ON_DEVICE(fq, nce_forward, q.view({g, -1, q.size(1)}), k.view({g, -1, k.size(1)}), tau);
}

Tensor patch_nce_backward(const Tensor& grad_loss, const Tensor& fq, const Tensor& fk, const Tensor& ids,
                          const Tensor& loss, const Tensor& lse, double tau, int64_t groups) {
  check_map(fq, fk, ids);
  const int64_t g = check_map_groups(fq, groups);
  auto [q, q_norm] = PDML_ON_DEVICE(fq, gather_normalise, fq, ids);
  auto [k, k_norm] = PDML_ON_DEVICE(fk, gather_normalise, fk, ids);
  const int64_t c = q.size(1);
  Tensor dq = PDML_ON_DEVICE(fq, nce_backward, q.view({g, -1, c}), k.view({g, -1, c}),
                             loss.to(q.scalar_type()).contiguous(), lse.to(q.scalar_type()).contiguous(), tau);
  dq = dq.view({-1, c}).mul_(grad_loss.to(q.scalar_type()).reshape({-1, 1}));
  return PDML_ON_DEVICE(fq, normalise_backward_scatter, dq, q, q_norm, ids, fq.sizes(), fq.scalar_type());
}

// CPU: patch_nce plus ∂loss_r/∂q_r for a unit upstream gradient, [B·N, C] acc, where q_r =
// fq[b, :, ids[i]] is the gathered row before the normaliser: the sweep gives ∂loss_r/∂q̂_r
// (cpu::nce_forward_with_grad; a row's loss depends on its own q̂_r only, k being detached)
// and the normaliser's backward, linear in its upstream gradient, follows at once. The
// backward (patch_nce_with_grad_backward) is then a row scale and a scatter: no second
// sweep over the similarities and no second gather.
std::tuple<Tensor, Tensor, Tensor> patch_nce_with_grad(const Tensor& fq, const Tensor& fk, const Tensor& ids,
                                                       double tau, int64_t groups) {
  check_map(fq, fk, ids);
  const int64_t g = check_map_groups(fq, groups);
  auto [q, q_norm] = cpu::gather_normalise(fq, ids);
  auto [k, k_norm] = cpu::gather_normalise(fk, ids);
  const int64_t c = q.size(1);
  auto [loss, lse, dq] = cpu::nce_forward_with_grad(q.view({g, -1, c}), k.view({g, -1, c}), tau);
  Tensor d_rows = dq.view({-1, c});
  cpu::normalise_backward_rows_(d_rows, q, q_norm);
  return {loss, lse, d_rows};
}

// grad_fq from patch_nce_with_grad's d_rows: row r scaled by grad_loss[r], scattered to
// fq[b, :, ids[i]], zero elsewhere; contiguous, in fq's dtype.
Tensor patch_nce_with_grad_backward(const Tensor& grad_loss, const Tensor& d_rows, const Tensor& fq,
                                    const Tensor& ids) {
  check_features("fq", fq, 4);
  check_ids(ids, fq);
  const int64_t rows = fq.size(0) * ids.numel();
  TORCH_CHECK(d_rows.dim() == 2 && d_rows.size(0) == rows && d_rows.size(1) == fq.size(1) &&
                  d_rows.scalar_type() == acc_dtype(fq),
              "patch_nce_with_grad_backward: d_rows must be the [B·N, C] rows patch_nce_with_grad returned");
  TORCH_CHECK(grad_loss.numel() == rows, "grad_loss must have B·N = ", rows, " entries, got ", grad_loss.numel());
  return cpu::scatter_rows(d_rows, grad_loss.to(d_rows.scalar_type()).reshape({-1}), ids, fq.sizes(),
                           fq.scalar_type());
}

// PatchMetric computes its gradient in the forward sweep (see cpu/patch_kernels_cpu.cpp):
// with compute_grad the op also returns ∂L/∂q̂, ∂L/∂k̂ as [B·N, C] acc rows (O(B·N·C)),
// and patch_metric_backward scales them and takes them through normaliser and scatter.
std::tuple<Tensor, Tensor, Tensor> patch_metric(const Tensor& fq, const Tensor& fk, const Tensor& ids,
                                                double tau, int64_t groups, bool compute_grad) {
  check_map(fq, fk, ids);
  const int64_t g = check_map_groups(fq, groups);
  auto [q, q_norm] = PDML_ON_DEVICE(fq, gather_normalise, fq, ids);
  auto [k, k_norm] = PDML_ON_DEVICE(fk, gather_normalise, fk, ids);
  const int64_t c = q.size(1);
  auto [loss, dq, dk] = PDML_ON_DEVICE(fq, metric_forward, q.view({g, -1, c}), k.view({g, -1, c}), tau,
                                       compute_grad);
  if (compute_grad) {
    dq = dq.view({-1, c});
    dk = dk.view({-1, c});
  }
  return {loss, dq, dk};
}

std::tuple<Tensor, Tensor> patch_metric_backward(const Tensor& grad, const Tensor& d_q, const Tensor& d_k,
                                                 const Tensor& fq, const Tensor& fk, const Tensor& ids) {
  check_map(fq, fk, ids);
  auto [q, q_norm] = PDML_ON_DEVICE(fq, gather_normalise, fq, ids);
  auto [k, k_norm] = PDML_ON_DEVICE(fk, gather_normalise, fk, ids);
  TORCH_CHECK(d_q.sizes() == q.sizes() && d_k.sizes() == k.sizes(),
              "patch_metric_backward: d_q/d_k must be the [B·N, C] rows patch_metric returned");
  const Tensor scale = grad.to(q.scalar_type());  // 0-dim: no host sync on CUDA
  const Tensor dq = d_q.to(q.scalar_type()).mul(scale), dk = d_k.to(k.scalar_type()).mul(scale);
  return {PDML_ON_DEVICE(fq, normalise_backward_scatter, dq, q, q_norm, ids, fq.sizes(), fq.scalar_type()),
          PDML_ON_DEVICE(fk, normalise_backward_scatter, dk, k, k_norm, ids, fk.sizes(), fk.scalar_type())};
}

// The similarity IS the [B, N, N] output, so it is a plain batched product of the rows.
Tensor patch_similarity(const Tensor& fq, const Tensor& fk, const Tensor& ids) {
  check_map(fq, fk, ids);
  const int64_t b = fq.size(0), n = ids.numel();
  auto [q, q_norm] = PDML_ON_DEVICE(fq, gather_normalise, fq, ids);
  auto [k, k_norm] = PDML_ON_DEVICE(fk, gather_normalise, fk, ids);
  return at::bmm(q.view({b, n, -1}), k.view({b, n, -1}).transpose(1, 2));
}

std::tuple<Tensor, Tensor> patch_similarity_backward(const Tensor& grad, const Tensor& fq,
                                                     const Tensor& fk, const Tensor& ids) {
  check_map(fq, fk, ids);
  const int64_t b = fq.size(0), n = ids.numel();
  auto [q, q_norm] = PDML_ON_DEVICE(fq, gather_normalise, fq, ids);
  auto [k, k_norm] = PDML_ON_DEVICE(fk, gather_normalise, fk, ids);
  const int64_t c = q.size(1);
  const Tensor g = grad.to(q.scalar_type());
  const Tensor dq = at::bmm(g, k.view({b, n, c})).view({-1, c});
  const Tensor dk = at::bmm(g.transpose(1, 2), q.view({b, n, c})).view({-1, c});
  return {PDML_ON_DEVICE(fq, normalise_backward_scatter, dq, q, q_norm, ids, fq.sizes(), fq.scalar_type()),
          PDML_ON_DEVICE(fk, normalise_backward_scatter, dk, k, k_norm, ids, fk.sizes(), fk.scalar_type())};
}

// ------------------------------------------------------------------------- rows form

std::tuple<Tensor, Tensor> patch_nce_rows(const Tensor& feat_q, const Tensor& feat_k, double tau,
                                          int64_t groups) {
  check_rows(feat_q, feat_k, groups);
  return PDML_ON_DEVICE(feat_q, nce_forward, as_groups(feat_q, groups), as_groups(feat_k, groups), tau);
}

// CPU: patch_nce_rows plus ∂loss_i/∂feat_q_i for a unit upstream gradient, [R, C] acc,
// from the same sweep (cpu::nce_forward_with_grad); the backward scales row i by grad_i.
std::tuple<Tensor, Tensor, Tensor> patch_nce_rows_with_grad(const Tensor& feat_q, const Tensor& feat_k,
                                                            double tau, int64_t groups) {
  check_rows(feat_q, feat_k, groups);
  auto [loss, lse, dq] = cpu::nce_forward_with_grad(as_groups(feat_q, groups), as_groups(feat_k, groups), tau);
  return {loss, lse, dq.view({-1, feat_q.size(1)})};
}

Tensor patch_nce_rows_backward(const Tensor& grad_loss, const Tensor& feat_q, const Tensor& feat_k,
                               const Tensor& loss, const Tensor& lse, double tau, int64_t groups) {
  check_rows(feat_q, feat_k, groups);
  const Tensor q = as_groups(feat_q, groups);
  Tensor dq = PDML_ON_DEVICE(feat_q, nce_backward, q, as_groups(feat_k, groups),
                             loss.to(q.scalar_type()).contiguous(), lse.to(q.scalar_type()).contiguous(), tau);
  dq = dq.view_as(feat_q).mul_(grad_loss.to(q.scalar_type()).reshape({-1, 1}));
  return dq.to(feat_q.scalar_type());
}

// Like patch_metric: with compute_grad also (∂L/∂feat_q, ∂L/∂feat_k) as [R, C] acc rows;
// the backward (in Python) is then a scale and a cast.
std::tuple<Tensor, Tensor, Tensor> patch_metric_rows(const Tensor& feat_q, const Tensor& feat_k, double tau,
                                                     int64_t groups, bool compute_grad) {
  check_rows(feat_q, feat_k, groups);
  auto [loss, dq, dk] = PDML_ON_DEVICE(feat_q, metric_forward, as_groups(feat_q, groups),
                                       as_groups(feat_k, groups), tau, compute_grad);
  if (compute_grad) {
    dq = dq.view({-1, feat_q.size(1)});
    dk = dk.view({-1, feat_k.size(1)});
  }
  return {loss, dq, dk};
}

void register_impls(torch::Library& m) {
  m.impl("patch_nce", &patch_nce);
  m.impl("patch_nce_backward", &patch_nce_backward);
  m.impl("patch_metric", &patch_metric);
  m.impl("patch_metric_backward", &patch_metric_backward);
  m.impl("patch_similarity", &patch_similarity);
  m.impl("patch_similarity_backward", &patch_similarity_backward);
  m.impl("patch_nce_rows", &patch_nce_rows);
  m.impl("patch_nce_rows_backward", &patch_nce_rows_backward);
  m.impl("patch_metric_rows", &patch_metric_rows);
}

}  // namespace

TORCH_LIBRARY_IMPL(pdml, CPU, m) {
  register_impls(m);
  m.impl("patch_nce_rows_with_grad", &patch_nce_rows_with_grad);
  m.impl("patch_nce_with_grad", &patch_nce_with_grad);
  m.impl("patch_nce_with_grad_backward", &patch_nce_with_grad_backward);
}

#ifdef PDML_WITH_CUDA
TORCH_LIBRARY_IMPL(pdml, CUDA, m) { register_impls(m); }
#endif

}  // namespace pdml
