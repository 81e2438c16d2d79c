// CPU kernels of gather_project (declared in gather_project.h).
//
// The sampled pixels' channels are gathered into acc rows [B*N, F] (at::parallel_for over
// rows; each row reads only its own pixel, so the work and the memory are O(B*N*F), never
// O(B*F*H*W)), and the products run as one BLAS GEMM in acc. The backward scatters
// grad @ weight back to the sampled pixels only (ids are distinct: every row owns its
// pixel, so the parallel scatter has no conflicts) into a zero map; grad_weight is one
// GEMM over all rows (a fixed summation order: the same result for any thread count).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include "cpu/zeroed_pages.h"
#include "gather_project.h"

namespace pdml {
namespace cpu {
namespace {

using at::Tensor;

// Rows per parallel task: enough to amortise the task, small enough to balance.
constexpr int64_t kRowGrain = 16;

at::ScalarType acc_dtype(const Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Offset of pixel `pos` of image `b` in a map with strides `st` (elements).
inline int64_t pixel_offset(int64_t b, int64_t pos, int64_t width, const int64_t* st) {
  return b * st[0] + (pos / width) * st[2] + (pos % width) * st[3];
}

// rows[b*N + i, f] = fmap[b, f, ids[i]] as acc: [B*N, F].
Tensor gather_rows(const Tensor& fmap, const Tensor& ids) {
  const int64_t n = ids.numel(), channels = fmap.size(1), width = fmap.size(3);
  const int64_t total = fmap.size(0) * n;
  Tensor rows = at::empty({total, channels}, fmap.options().dtype(acc_dtype(fmap)));
  const Tensor idx = ids.contiguous();
  const int64_t* id = idx.data_ptr<int64_t>();
  const int64_t st[4] = {fmap.stride(0), fmap.stride(1), fmap.stride(2), fmap.stride(3)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, fmap.scalar_type(), "gather_rows", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = fmap.const_data_ptr<scalar_t>();
    acc_t* y = rows.data_ptr<acc_t>();
    const int64_t sc = st[1];
    at::parallel_for(0, total, kRowGrain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* src = x + pixel_offset(r / n, id[r % n], width, st);
        acc_t* dst = y + r * channels;
        if (sc == 1) {  // channels_last: a contiguous run the compiler vectorises
          for (int64_t f = 0; f < channels; ++f) dst[f] = static_cast<acc_t>(src[f]);
        } else {
          for (int64_t f = 0; f < channels; ++f) dst[f] = static_cast<acc_t>(src[f * sc]);
        }
      }
    });
  });
  return rows;
}

// grad_fmap = zeros like fmap (its memory format when dense), grad_fmap[b, :, ids[i]] =
// d_rows[b*N + i] (acc -> fmap's dtype).
Tensor scatter_rows(const Tensor& d_rows, const Tensor& fmap, const Tensor& ids) {
  Tensor out = zeroed_pages_like(fmap);
  const int64_t n = ids.numel(), channels = fmap.size(1), width = fmap.size(3);
  const int64_t total = fmap.size(0) * n;
  const Tensor idx = ids.contiguous();
  const int64_t* id = idx.data_ptr<int64_t>();
  const int64_t st[4] = {out.stride(0), out.stride(1), out.stride(2), out.stride(3)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, fmap.scalar_type(), "scatter_rows", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* src = d_rows.const_data_ptr<acc_t>();
    scalar_t* y = out.data_ptr<scalar_t>();
    const int64_t sc = st[1];
    at::parallel_for(0, total, kRowGrain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        scalar_t* dst = y + pixel_offset(r / n, id[r % n], width, st);
        const acc_t* g = src + r * channels;
        for (int64_t f = 0; f < channels; ++f) dst[f * sc] = static_cast<scalar_t>(g[f]);
      }
    });
  });
  return out;
}

}  // namespace

Tensor gather_project_forward(const Tensor& fmap, const Tensor& ids, const Tensor& weight, const Tensor& bias) {
  const Tensor rows = gather_rows(fmap, ids);
  const Tensor w = weight.to(rows.scalar_type());
  const Tensor out = bias.defined() ? at::addmm(bias.to(rows.scalar_type()), rows, w.t()) : at::mm(rows, w.t());
  return out.to(fmap.scalar_type());
}

std::tuple<Tensor, Tensor, Tensor> gather_project_backward(const Tensor& grad, const Tensor& fmap,
                                                           const Tensor& ids, const Tensor& weight,
                                                           bool bias_grad) {
  const auto acc = acc_dtype(fmap);
  const Tensor g = grad.to(acc).contiguous();
  const Tensor d_rows = at::mm(g, weight.to(acc)).contiguous();
  const Tensor grad_fmap = scatter_rows(d_rows, fmap, ids);
  const Tensor grad_weight = at::mm(g.t(), gather_rows(fmap, ids)).to(weight.scalar_type());
  const Tensor grad_bias = bias_grad ? g.sum(0).to(weight.scalar_type()) : at::empty({0}, weight.options());
  return {grad_fmap, grad_weight, grad_bias};
}

}  // namespace cpu
}  // namespace pdml
