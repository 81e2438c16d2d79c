// CPU kernels of the pdml ops (declared in patch_kernels.h; math in patch_math.h).
//
// Each group's n×n similarity is swept in kTile×kTile tiles: a tile S = A_I A_Jᵀ is one
// small GEMM (ATen's BLAS, single-threaded inside the parallel region) into per-thread
// scratch, the per-element math runs over that cache-resident tile, and gradients are
// accumulated with a second GEMM (dA_I += W A_J). Memory beyond the O(B·N·C) rows is
// one tile per thread; the n×n matrix never exists.
//
// Gather and scatter run plane by plane ((image, channel) planes of the map): a row's
// channels lie a whole plane apart, so a row-by-row walk would miss cache and TLB on every
// entry; the scatter writes into a map of fresh zeroed pages (zeroed_pages.h).
//
// Parallelism (at::parallel_for):
// - PatchNCE (forward and backward): over (group, row tile) tasks, each writing only its
//   own rows; the backward recomputes the tiles. nce_forward_with_grad skips that
//   recomputation: a row's loss depends on its own q̂_i only (k is detached), so its
//   gradient for a unit upstream gradient comes out of the forward sweep and the backward
//   of any per-row upstream gradient is a row scale (2 tile GEMMs per tile pair, not 3);
//   the map form (patch_nce_with_grad) also takes it through the normaliser's backward
//   (normalise_backward_rows_), so its backward is a scale and a scatter (scatter_rows).
// - PatchMetric: its gradient needs no global normaliser (unlike PatchNCE's logsumexp),
//   so the forward computes it in the same sweep when asked (compute_grad), and the
//   backward only scales it. The similarity of q with q (and k with k) is symmetric, so each
//   unordered tile pair {I, J} is computed once and feeds both dA_I and dA_J. The pairs
//   are scheduled in round-robin rounds (the circle method) in which every tile appears
//   at most once, so tasks of a round never write the same rows: no atomics, no
//   per-thread copies of the gradient, and a fixed, thread-count-independent order of
//   accumulation (deterministic results).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/zeroed_pages.h"
#include "patch_kernels.h"
#include "patch_math.h"

namespace pdml {
namespace cpu {
namespace {

using at::Tensor;

// 128 rows × C=128 channels of float is 64 KiB per operand tile: two operand tiles and
// the S tile stay in L2, and a 128³ GEMM is large enough for BLAS to run near peak.
constexpr int64_t kTile = 128;

int64_t num_tiles(int64_t n) { return (n + kTile - 1) / kTile; }

struct TileSpan {
  int64_t begin;
  int64_t size;
};

TileSpan tile_span(int64_t tile, int64_t n) {
  const int64_t begin = tile * kTile;
  return {begin, std::min(kTile, n - begin)};
}

// One tile of similarities, row_tile · col_tileᵀ ([rows, C] · [cols, C]ᵀ), written into the
// first rows·cols entries of a flat per-thread scratch buffer: a contiguous [rows, cols].
Tensor similarity_tile(const Tensor& scratch, const Tensor& row_tile, const Tensor& col_tile) {
  Tensor s = scratch.narrow(0, 0, row_tile.size(0) * col_tile.size(0))
                 .view({row_tile.size(0), col_tile.size(0)});
  at::mm_out(s, row_tile, col_tile.t());
  return s;
}

Tensor rows_of(const Tensor& x, int64_t group, TileSpan span) {
  return x.select(0, group).narrow(0, span.begin, span.size);
}

// A tile pair {first, second} of one matrix (0: k·kᵀ, 1: q·qᵀ) of one group.
struct PairTask {
  int matrix;
  int64_t group;
  int64_t first;
  int64_t second;
};

// Round-robin schedule of the unordered tile pairs of `tiles` tiles: round 0 holds the
// diagonal pairs {I, I}; rounds 1.. hold the off-diagonal pairs by the circle method
// (a dummy tile completes an odd count). Within a round no tile appears twice.
std::vector<std::vector<std::pair<int64_t, int64_t>>> pair_rounds(int64_t tiles) {
  std::vector<std::vector<std::pair<int64_t, int64_t>>> rounds;
  rounds.emplace_back();
  for (int64_t t = 0; t < tiles; ++t) rounds[0].push_back({t, t});
  const int64_t even = tiles + (tiles % 2);
  for (int64_t r = 0; r + 1 < even; ++r) {
    std::vector<std::pair<int64_t, int64_t>> round;
    if (even - 1 < tiles) round.push_back({r, even - 1});
    for (int64_t s = 1; s < even / 2; ++s) {
      const int64_t a = (r + s) % (even - 1);
      const int64_t b = (r - s + even - 1) % (even - 1);
      if (a < tiles && b < tiles) round.push_back({std::min(a, b), std::max(a, b)});
    }
    rounds.push_back(std::move(round));
  }
  return rounds;
}

void check_slabs(const Tensor& q, const Tensor& k) {
  TORCH_INTERNAL_ASSERT(q.dim() == 3 && q.sizes() == k.sizes() && q.is_contiguous() && k.is_contiguous());
  TORCH_INTERNAL_ASSERT(q.scalar_type() == k.scalar_type());
}

// ---- per-tile elementwise loops: raw loops over a cache-resident tile, written so the
// compiler vectorises them (the float exp is patch_math.h's polynomial; sums and maxima
// keep 8 independent lanes because float reductions are not reassociated otherwise).
// On x86-64 GCC also emits an AVX2+FMA clone picked at load time.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PDML_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define PDML_VECTOR_CLONES
#endif

constexpr int kLanes = 8;

// x[i] = exp(x[i]·inv_tau − shift)
template <typename acc_t>
void exp_shifted(acc_t* x, int64_t count, acc_t inv_tau, acc_t shift) {
  for (int64_t i = 0; i < count; ++i) x[i] = math::nce_weight(x[i], shift, inv_tau);
}

template <>
PDML_VECTOR_CLONES void exp_shifted<float>(float* x, int64_t count, float inv_tau, float shift) {
  for (int64_t i = 0; i < count; ++i) x[i] = math::nce_weight(x[i], shift, inv_tau);
}

// x[i] = scale · exp(x[i]·inv_tau − shift)
template <typename acc_t>
void exp_shifted_scaled(acc_t* x, int64_t count, acc_t inv_tau, acc_t shift, acc_t scale) {
  for (int64_t i = 0; i < count; ++i) x[i] = scale * math::nce_weight(x[i], shift, inv_tau);
}

template <>
PDML_VECTOR_CLONES void exp_shifted_scaled<float>(float* x, int64_t count, float inv_tau, float shift,
                                                  float scale) {
  for (int64_t i = 0; i < count; ++i) x[i] = scale * math::nce_weight(x[i], shift, inv_tau);
}

template <typename acc_t>
acc_t sum_of(const acc_t* x, int64_t count) {
  acc_t s = 0;
  for (int64_t i = 0; i < count; ++i) s += x[i];
  return s;
}

template <>
PDML_VECTOR_CLONES float sum_of<float>(const float* x, int64_t count) {
  float lanes[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + kLanes <= count; i += kLanes)
    for (int l = 0; l < kLanes; ++l) lanes[l] += x[i + l];
  float s = 0;
  for (; i < count; ++i) s += x[i];
  for (int l = 0; l < kLanes; ++l) s += lanes[l];
  return s;
}

template <typename acc_t>
acc_t max_of(const acc_t* x, int64_t count) {
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  for (int64_t i = 0; i < count; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

template <>
PDML_VECTOR_CLONES float max_of<float>(const float* x, int64_t count) {
  float lanes[kLanes];
  for (int l = 0; l < kLanes; ++l) lanes[l] = -std::numeric_limits<float>::infinity();
  int64_t i = 0;
  for (; i + kLanes <= count; i += kLanes)
    for (int l = 0; l < kLanes; ++l) lanes[l] = x[i + l] > lanes[l] ? x[i + l] : lanes[l];
  float m = -std::numeric_limits<float>::infinity();
  for (; i < count; ++i) m = x[i] > m ? x[i] : m;
  for (int l = 0; l < kLanes; ++l) m = lanes[l] > m ? lanes[l] : m;
  return m;
}

template <typename acc_t>
acc_t row_dot(const acc_t* a, const acc_t* b, int64_t c) {
  acc_t s = 0;
  for (int64_t j = 0; j < c; ++j) s += a[j] * b[j];
  return s;
}

// One dependent add per channel would make the positives' dot products (one per row of the
// batch) a latency-bound loop about as long as a tile's exp; independent lanes vectorise.
template <>
PDML_VECTOR_CLONES float row_dot<float>(const float* a, const float* b, int64_t c) {
  float lanes[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + kLanes <= c; j += kLanes)
    for (int l = 0; l < kLanes; ++l) lanes[l] += a[j + l] * b[j + l];
  float s = 0;
  for (; j < c; ++j) s += a[j] * b[j];
  for (int l = 0; l < kLanes; ++l) s += lanes[l];
  return s;
}

// x[c] *= scale
template <typename acc_t>
void scale_row(acc_t* x, int64_t count, acc_t scale) {
  for (int64_t c = 0; c < count; ++c) x[c] *= scale;
}

// out[c] = a[c]·a_scale + b[c]·b_scale
template <typename acc_t>
void combine_rows(acc_t* out, const acc_t* a, acc_t a_scale, const acc_t* b, acc_t b_scale, int64_t count) {
  for (int64_t c = 0; c < count; ++c) out[c] = a[c] * a_scale + b[c] * b_scale;
}

}  // namespace

// ------------------------------------------------------------------ gather / scatter

std::tuple<Tensor, Tensor> gather_normalise(const Tensor& fmap, const Tensor& ids) {
  const auto acc = fmap.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t batch = fmap.size(0), channels = fmap.size(1), width = fmap.size(3);
  const int64_t n = ids.numel();
  Tensor rows = at::empty({batch * n, channels}, fmap.options().dtype(acc));
  Tensor norms = at::empty({batch * n}, fmap.options().dtype(acc));
  const Tensor ids_c = ids.contiguous();
  const int64_t* id = ids_c.const_data_ptr<int64_t>();
  const int64_t sb = fmap.stride(0), sc = fmap.stride(1), sh = fmap.stride(2), sw = fmap.stride(3);
  std::vector<int64_t> offset(n);  // each id's element offset inside one channel plane
  for (int64_t i = 0; i < n; ++i) offset[i] = (id[i] / width) * sh + (id[i] % width) * sw;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, fmap.scalar_type(), "pdml_gather_normalise", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* src = fmap.const_data_ptr<scalar_t>();
    acc_t* out = rows.data_ptr<acc_t>();
    acc_t* out_norm = norms.data_ptr<acc_t>();
    if (sc == 1) {
      // channels innermost (channels-last): a row's channels are adjacent, gather by rows
      at::parallel_for(0, batch * n, 64, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const scalar_t* x = src + (r / n) * sb + offset[r % n];
          acc_t* y = out + r * channels;
          for (int64_t c = 0; c < channels; ++c) y[c] = static_cast<acc_t>(x[c]);
        }
      });
    } else {
      // A row's channels lie a plane apart (H*W elements for a contiguous map): reading
      // them row by row misses the cache and the TLB on every entry. Read plane by plane
      // instead, the N sampled pixels of one (image, channel) plane at a time, and write
      // them as column c of the image's [N, C] rows (which stay in cache).
      at::parallel_for(0, batch * channels, 16, [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p) {
          const int64_t b = p / channels, c = p % channels;
          const scalar_t* plane = src + b * sb + c * sc;
          acc_t* y = out + b * n * channels + c;
          for (int64_t i = 0; i < n; ++i) y[i * channels] = static_cast<acc_t>(plane[offset[i]]);
        }
      });
    }
    at::parallel_for(0, batch * n, 64, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        acc_t* y = out + r * channels;
        acc_t absmax = 0;
        for (int64_t c = 0; c < channels; ++c) absmax = std::max(absmax, std::abs(y[c]));
        const auto scale = math::norm_scale(absmax);
        acc_t sumsq = 0;
        for (int64_t c = 0; c < channels; ++c) {
          const acc_t v = y[c] * scale.down;
          sumsq += v * v;
        }
        const acc_t norm = math::norm_from_scaled_sumsq(sumsq, scale);
        for (int64_t c = 0; c < channels; ++c) y[c] = math::normalised(y[c], norm);
        out_norm[r] = norm;
      }
    });
  });
  return {rows, norms};
}

Tensor normalise_backward_rows_(Tensor& d_rows, const Tensor& rows_hat, const Tensor& norms) {
  TORCH_INTERNAL_ASSERT(d_rows.dim() == 2 && d_rows.is_contiguous() && d_rows.sizes() == rows_hat.sizes());
  const int64_t rows = d_rows.size(0), channels = d_rows.size(1);
  const Tensor x_c = rows_hat.contiguous(), n_c = norms.contiguous();
  AT_DISPATCH_FLOATING_TYPES(d_rows.scalar_type(), "pdml_normalise_backward_rows", [&] {
    using acc_t = scalar_t;
    acc_t* g = d_rows.data_ptr<acc_t>();
    const acc_t* xhat = x_c.const_data_ptr<acc_t>();
    const acc_t* norm = n_c.const_data_ptr<acc_t>();
    at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        acc_t* gr = g + r * channels;
        const acc_t* xr = xhat + r * channels;
        const auto s = math::normalise_backward_scales(norm[r], row_dot<acc_t>(gr, xr, channels));
        for (int64_t c = 0; c < channels; ++c) gr[c] = gr[c] * s.scale_g - xr[c] * s.scale_xhat;
      }
    });
  });
  return d_rows;
}

namespace {

// The scatter of scatter_rows and normalise_backward_scatter: -> a contiguous map
// [map_sizes] of out_dtype, zero except at the sampled pixels, where (r = b·N + i)
//   grad[b, c, ids[i]] = g[r, c]·g_scale[r] − x[r, c]·x_scale[r]
// (g, x: [B·N, C] acc rows; g_scale null means 1, x null drops the second term).
// The map starts as zeroed pages (zeroed_pages.h: no fill here, no heap-dependent page
// faults); one task per (image, channel) plane writes its N sampled pixels. ids are
// distinct, so no pixel is written twice.
template <typename acc_t>
Tensor scatter_planes(const acc_t* g, const acc_t* g_scale, const acc_t* x, const acc_t* x_scale, const Tensor& ids,
                      at::IntArrayRef map_sizes, const at::TensorOptions& options) {
  const int64_t batch = map_sizes[0], channels = map_sizes[1], hw = map_sizes[2] * map_sizes[3];
  const int64_t n = ids.numel();
  Tensor grad = zeroed_pages(map_sizes, options);
  const Tensor ids_c = ids.contiguous();
  const int64_t* id = ids_c.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "pdml_scatter_planes", [&] {
    TORCH_INTERNAL_ASSERT((std::is_same_v<acc_t, at::opmath_type<scalar_t>>));
    scalar_t* out = grad.data_ptr<scalar_t>();
    at::parallel_for(0, batch * channels, 16, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t b = p / channels, c = p % channels;
        scalar_t* plane = out + p * hw;
        for (int64_t i = 0, r = b * n; i < n; ++i, ++r) {
          acc_t v = g[r * channels + c];
          if (g_scale != nullptr) v *= g_scale[r];
          if (x != nullptr) v -= x[r * channels + c] * x_scale[r];
          plane[id[i]] = static_cast<scalar_t>(v);
        }
      }
    });
  });
  return grad;
}

}  // namespace

Tensor scatter_rows(const Tensor& rows, const Tensor& row_scale, const Tensor& ids, at::IntArrayRef map_sizes,
                    at::ScalarType out_dtype) {
  const int64_t rows_n = map_sizes[0] * ids.numel();
  TORCH_INTERNAL_ASSERT(rows.dim() == 2 && rows.size(0) == rows_n && rows.size(1) == map_sizes[1]);
  const bool scaled = row_scale.defined();
  TORCH_INTERNAL_ASSERT(!scaled || (row_scale.numel() == rows_n && row_scale.scalar_type() == rows.scalar_type()));
  const Tensor r_c = rows.contiguous(), s_c = scaled ? row_scale.contiguous() : Tensor();
  Tensor grad;
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "pdml_scatter_rows", [&] {
    grad = scatter_planes<scalar_t>(r_c.const_data_ptr<scalar_t>(), scaled ? s_c.const_data_ptr<scalar_t>() : nullptr,
                                    nullptr, nullptr, ids, map_sizes, rows.options().dtype(out_dtype));
  });
  return grad;
}

Tensor normalise_backward_scatter(const Tensor& d_rows, const Tensor& rows_hat, const Tensor& norms,
                                  const Tensor& ids, at::IntArrayRef map_sizes, at::ScalarType out_dtype) {
  const int64_t rows = d_rows.size(0), channels = map_sizes[1];
  const Tensor g_c = d_rows.contiguous(), x_c = rows_hat.contiguous(), n_c = norms.contiguous();
  // the normaliser's backward per row, g·scale_g − x̂·scale_xhat (patch_math.h), applied as
  // the rows are scattered: two scales per row, no [B·N, C] intermediate
  Tensor scales = at::empty({2, rows}, g_c.options());
  Tensor grad;
  AT_DISPATCH_FLOATING_TYPES(g_c.scalar_type(), "pdml_normalise_backward_scatter", [&] {
    using acc_t = scalar_t;
    const acc_t* g = g_c.const_data_ptr<acc_t>();
    const acc_t* xhat = x_c.const_data_ptr<acc_t>();
    const acc_t* norm = n_c.const_data_ptr<acc_t>();
    acc_t* scale_g = scales.data_ptr<acc_t>();
    acc_t* scale_xhat = scale_g + rows;
    at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const auto s = math::normalise_backward_scales(norm[r], row_dot<acc_t>(g + r * channels, xhat + r * channels,
                                                                                 channels));
        scale_g[r] = s.scale_g;
        scale_xhat[r] = s.scale_xhat;
      }
    });
    grad = scatter_planes<acc_t>(g, scale_g, xhat, scale_xhat, ids, map_sizes, g_c.options().dtype(out_dtype));
  });
  return grad;
}

// ------------------------------------------------------------------ PatchNCE

namespace {

// The PatchNCE sweep of nce_forward and nce_forward_with_grad: per (group, row tile) task,
// S = Q_I K_Jᵀ tile by tile, a running max m_i and sum l_i = Σ_{j≠i} e^{s_ij/τ − m_i} of
// the negatives (the positive's column is dropped from the tile), then the row's loss and
// lse (patch_math.h). With dq (non-null, [G, n, C]) the same tiles, exponentiated relative
// to m_i, also accumulate A_I = Σ_J E_IJ K_J (rows rescaled by e^{m_old − m_new} when m_i
// grows, as in a streaming softmax); at the end
//   ∂loss_i/∂q̂_i = (1/τ)·[e^{m_i − lse_i} A_i + (p_0 − 1) k̂_i]
// — nce_backward's result without recomputing the similarities.
template <typename acc_t>
void nce_sweep(const Tensor& q, const Tensor& k, double tau, acc_t* loss_p, acc_t* lse_p, acc_t* dqp) {
  const int64_t groups = q.size(0), n = q.size(1), channels = q.size(2), tiles = num_tiles(n);
  const acc_t inv_tau = static_cast<acc_t>(1.0 / tau);
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const acc_t* qp = q.const_data_ptr<acc_t>();
  const acc_t* kp = k.const_data_ptr<acc_t>();
  at::parallel_for(0, groups * tiles, 1, [&](int64_t t0, int64_t t1) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;  // worker threads: plain ATen
    Tensor scratch = at::empty({kTile * kTile}, q.options());
    Tensor acc_tile = dqp != nullptr ? at::empty({kTile, channels}, q.options()) : Tensor();
    std::vector<acc_t> row_max(kTile), row_sum(kTile);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t g = t / tiles, own = t % tiles;
      const TileSpan rows = tile_span(own, n);
      const Tensor q_rows = rows_of(q, g, rows);
      const int64_t first = g * n + rows.begin;  // global index of the tile's first row
      Tensor acc_rows = dqp != nullptr ? acc_tile.narrow(0, 0, rows.size) : Tensor();
      acc_t* accp = dqp != nullptr ? acc_rows.data_ptr<acc_t>() : nullptr;
      std::fill(row_max.begin(), row_max.end(), kNegInf);
      std::fill(row_sum.begin(), row_sum.end(), acc_t(0));
      for (int64_t j = 0; j < tiles; ++j) {
        const TileSpan cols = tile_span(j, n);
        const Tensor k_cols = rows_of(k, g, cols);
        Tensor s = similarity_tile(scratch, q_rows, k_cols);
        acc_t* sp = s.data_ptr<acc_t>();
        if (j == own) {  // the sweep covers the negatives only: drop j = i
          for (int64_t r = 0; r < rows.size; ++r) sp[r * cols.size + r] = kNegInf;
        }
        for (int64_t r = 0; r < rows.size; ++r) {
          acc_t* row = sp + r * cols.size;
          // max of s·(1/τ) is (max s)·(1/τ) since 1/τ > 0
          const acc_t m_new = std::max(row_max[r], max_of(row, cols.size) * inv_tau);
          if (m_new == kNegInf) {  // nothing swept yet (a 1×1 diagonal tile)
            std::fill(row, row + cols.size, acc_t(0));
            continue;
          }
          if (m_new > row_max[r]) {
            const acc_t rescale = math::exp_(row_max[r] - m_new);  // 0 while row_max = -inf
            row_sum[r] *= rescale;
            if (accp != nullptr && j > 0) scale_row(accp + r * channels, channels, rescale);
            row_max[r] = m_new;
          }
          exp_shifted(row, cols.size, inv_tau, m_new);
          row_sum[r] += sum_of(row, cols.size);
        }
        if (accp != nullptr) {
          if (j == 0) {
            at::mm_out(acc_rows, s, k_cols);
          } else {
            acc_rows.addmm_(s, k_cols);
          }
        }
      }
      for (int64_t r = 0; r < rows.size; ++r) {
        const int64_t row = first + r;
        const acc_t s_pos = row_dot(qp + row * channels, kp + row * channels, channels);
        const math::Lse<acc_t> negatives{row_max[r], row_sum[r]};
        const acc_t loss = math::nce_row_loss(negatives, s_pos, inv_tau);
        loss_p[row] = loss;
        lse_p[row] = math::nce_row_lse(loss, s_pos, inv_tau);
        if (dqp == nullptr) continue;
        // p_ij = e^{s_ij/τ − m_i}·e^{m_i − lse_i}; row_max = -inf means no negative was swept
        const acc_t weight_scale = row_max[r] == kNegInf ? acc_t(0) : math::exp_(row_max[r] - lse_p[row]) * inv_tau;
        const acc_t positive_scale = math::nce_positive_weight(loss) * inv_tau;
        combine_rows(dqp + row * channels, accp + r * channels, weight_scale, kp + row * channels, positive_scale,
                     channels);
      }
    }
  });
}

}  // namespace

std::tuple<Tensor, Tensor> nce_forward(const Tensor& q, const Tensor& k, double tau) {
  check_slabs(q, k);
  const int64_t rows = q.size(0) * q.size(1);
  Tensor loss = at::empty({rows}, q.options());
  Tensor lse = at::empty({rows}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "pdml_nce_forward", [&] {
    nce_sweep<scalar_t>(q, k, tau, loss.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(), nullptr);
  });
  return {loss, lse};
}

std::tuple<Tensor, Tensor, Tensor> nce_forward_with_grad(const Tensor& q, const Tensor& k, double tau) {
  check_slabs(q, k);
  const int64_t rows = q.size(0) * q.size(1);
  Tensor loss = at::empty({rows}, q.options());
  Tensor lse = at::empty({rows}, q.options());
  Tensor dq = at::empty_like(q);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "pdml_nce_forward_with_grad", [&] {
    nce_sweep<scalar_t>(q, k, tau, loss.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(), dq.data_ptr<scalar_t>());
  });
  return {loss, lse, dq};
}

Tensor nce_backward(const Tensor& q, const Tensor& k, const Tensor& loss, const Tensor& lse, double tau) {
  check_slabs(q, k);
  const int64_t groups = q.size(0), n = q.size(1), tiles = num_tiles(n);
  // Every row tile's first column tile writes its rows with mm_out (β = 0): no zero fill.
  Tensor dq = at::empty_like(q);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "pdml_nce_backward", [&] {
    using acc_t = scalar_t;
    const acc_t inv_tau = static_cast<acc_t>(1.0 / tau);
    const acc_t* lse_p = lse.const_data_ptr<acc_t>();
    const acc_t* loss_p = loss.const_data_ptr<acc_t>();
    at::parallel_for(0, groups * tiles, 1, [&](int64_t t0, int64_t t1) {
      const at::AutoDispatchBelowADInplaceOrView below_autograd;  // worker threads: plain ATen
      Tensor scratch = at::empty({kTile * kTile}, q.options());
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t g = t / tiles;
        const TileSpan rows = tile_span(t % tiles, n);
        const Tensor q_rows = rows_of(q, g, rows);
        Tensor dq_rows = rows_of(dq, g, rows);
        const acc_t* row_lse = lse_p + g * n + rows.begin;
        const acc_t* row_loss = loss_p + g * n + rows.begin;
        for (int64_t j = 0; j < tiles; ++j) {
          const TileSpan cols = tile_span(j, n);
          const Tensor k_cols = rows_of(k, g, cols);
          // W = (1/τ)·[p_ij] with the positive's p_0 − 1 on the diagonal (the filled entry
          // is a constant): then dq̂_I = Σ_J W_IJ K_J is nce_grad_finish's sum as one GEMM.
          Tensor w = similarity_tile(scratch, q_rows, k_cols);
          acc_t* wp = w.data_ptr<acc_t>();
          for (int64_t r = 0; r < rows.size; ++r) {
            exp_shifted_scaled(wp + r * cols.size, cols.size, inv_tau, row_lse[r], inv_tau);
          }
          if (j == t % tiles) {
            for (int64_t r = 0; r < rows.size; ++r) {
              wp[r * cols.size + r] = math::nce_positive_weight(row_loss[r]) * inv_tau;
            }
          }
          if (j == 0) {
            at::mm_out(dq_rows, w, k_cols);
          } else {
            dq_rows.addmm_(w, k_cols);
          }
        }
      }
    });
  });
  return dq;
}

// ------------------------------------------------------------------ PatchMetric

std::tuple<Tensor, Tensor, Tensor> metric_forward(const Tensor& q, const Tensor& k, double tau,
                                                  bool compute_grad) {
  check_slabs(q, k);
  const int64_t groups = q.size(0), n = q.size(1), channels = q.size(2), tiles = num_tiles(n);
  Tensor dq = compute_grad ? at::zeros_like(q) : at::empty({0}, q.options());
  Tensor dk = compute_grad ? at::zeros_like(k) : at::empty({0}, k.options());
  double loss = 0;
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "pdml_metric_forward", [&] {
    using acc_t = scalar_t;
    const acc_t inv_tau = static_cast<acc_t>(1.0 / tau);
    const acc_t* qp = q.const_data_ptr<acc_t>();
    const acc_t* kp = k.const_data_ptr<acc_t>();
    // Σ_{i≠j} e^{s_ij/τ} of k·kᵀ (matrix 0) and q·qᵀ (1), one tile pair at a time;
    // with compute_grad, dA_i also accumulates Σ_{j≠i} e^{s_ij/τ} a_j (unscaled).
    double offdiag_sum[2] = {0, 0};
    for (const auto& round : pair_rounds(tiles)) {
      std::vector<PairTask> tasks;
      for (int matrix = 0; matrix < 2; ++matrix)
        for (int64_t g = 0; g < groups; ++g)
          for (const auto& pair : round) tasks.push_back({matrix, g, pair.first, pair.second});
      std::vector<double> partial(tasks.size());
      at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t t0, int64_t t1) {
        const at::AutoDispatchBelowADInplaceOrView below_autograd;  // worker threads: plain ATen
        Tensor scratch = at::empty({kTile * kTile}, q.options());
        for (int64_t t = t0; t < t1; ++t) {
          const PairTask& task = tasks[t];
          const Tensor& a = task.matrix == 0 ? k : q;
          const TileSpan rows = tile_span(task.first, n), cols = tile_span(task.second, n);
          const bool diagonal = task.first == task.second;
          const Tensor a_rows = rows_of(a, task.group, rows), a_cols = rows_of(a, task.group, cols);
          Tensor w = similarity_tile(scratch, a_rows, a_cols);
          acc_t* wp = w.data_ptr<acc_t>();
          exp_shifted(wp, rows.size * cols.size, inv_tau, acc_t(0));  // metric_pair_term
          if (diagonal) {
            for (int64_t r = 0; r < rows.size; ++r) wp[r * cols.size + r] = 0;  // j ≠ i
          }
          double sum = 0;
          for (int64_t r = 0; r < rows.size; ++r) sum += sum_of(wp + r * cols.size, cols.size);
          partial[t] = diagonal ? sum : 2 * sum;  // an off-diagonal pair stands for (I,J) and (J,I)
          if (!compute_grad) continue;
          Tensor& da = task.matrix == 0 ? dk : dq;
          rows_of(da, task.group, rows).addmm_(w, a_cols);
          if (!diagonal) rows_of(da, task.group, cols).addmm_(w.t(), a_rows);
        }
      });
      for (size_t t = 0; t < tasks.size(); ++t) offdiag_sum[tasks[t].matrix] += partial[t];
    }
    // Σ_i e^{p_i/τ} and, with compute_grad, the final scaling of the gradients.
    std::vector<double> pos_terms(groups * n);
    const acc_t pair_scale = math::metric_pair_grad_scale<acc_t>(groups, n, channels, inv_tau);
    acc_t* dqp = compute_grad ? dq.data_ptr<acc_t>() : nullptr;
    acc_t* dkp = compute_grad ? dk.data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, groups * n, 64, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t o = r * channels;
        const acc_t s_pos = row_dot(qp + o, kp + o, channels);
        pos_terms[r] = math::metric_pair_term(s_pos, inv_tau);
        if (!compute_grad) continue;
        const acc_t pos_scale = math::metric_pos_grad_scale<acc_t>(s_pos, groups, n, channels, inv_tau);
        for (int64_t c = 0; c < channels; ++c) {
          dqp[o + c] = pair_scale * dqp[o + c] + pos_scale * kp[o + c];
          dkp[o + c] = pair_scale * dkp[o + c] + pos_scale * qp[o + c];
        }
      }
    });
    double pos_sum = 0;
    for (double v : pos_terms) pos_sum += v;
    loss = math::metric_loss<double>(pos_sum, offdiag_sum[0], offdiag_sum[1], groups, n, channels, 1.0 / tau);
  });
  return {at::scalar_tensor(loss, q.options()), dq, dk};
}

}  // namespace cpu
}  // namespace pdml
