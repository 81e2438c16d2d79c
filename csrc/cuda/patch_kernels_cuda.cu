// CUDA kernels of the pdml ops (declared in patch_kernels.h; math in patch_math.h).
//
// What the kernels do: float32, float16 and bfloat16 features are gathered and normalised
// into float32 rows (one warp per row); the n×n similarities are then swept in 64×64
// tiles by a SIMT kernel (shared-memory tiles, 4×4 register blocks per thread, FMA in
// float32) that keeps the tile in registers and shared memory only, with an online
// logsumexp (PatchNCE forward) or running exp-sums (PatchMetric), and accumulates
// gradients tile by tile (dA_I += W_IJ B_J) in rows owned by one block, so there are no
// atomics and no B·N·N buffer. Everything runs on the current stream with no host
// synchronisation (the metric's loss is reduced on the device by one small block).
//
// These kernels do NOT use tensor cores: half/bf16 inputs are converted to float32 at the
// gather and the tile products are float32 FMAs. An mma.sync/wgmma path for half/bf16
// tiles is the next step.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/macros/Macros.h>

#include "patch_kernels.h"
#include "patch_math.h"

namespace pdml {
namespace cuda {
namespace {

using at::Tensor;

constexpr int kWarp = 32;
constexpr int kThreads = 256;      // 16 × 16 threads per tile kernel block
constexpr int kTile = 64;          // rows of A (i) and of B (j) per tile
constexpr int kChunk = 16;         // channels per shared-memory step of S = A Bᵀ
constexpr int kOutChunk = 64;      // channels per step of the gradient product W B
constexpr int kPer = 4;            // a thread owns rows ty + 16·i and columns tx + 16·j

cudaStream_t stream() { return at::cuda::getCurrentCUDAStream(); }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

// Reductions over the 16 lanes that share a tile row (lanes ty·16 .. ty·16+15).
__device__ __forceinline__ float row16_sum(float v) {
#pragma unroll
  for (int off = 8; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

__device__ __forceinline__ float row16_max(float v) {
#pragma unroll
  for (int off = 8; off > 0; off /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

// One step of a tile product in a thread's kPer×kPer register block (rows ty + 16·i,
// columns tx + 16·j): acc[i][j] += a[i·a_stride] · b[16·j] in float32 FMAs. `a` points
// into shared memory at the operand of the thread's first row, `a_stride` elements apart
// from row to row (its tiles store rows along either axis); `b` at the operand of its
// first column, the columns 16 elements apart.
__device__ __forceinline__ void fma_register_block(float (&acc)[kPer][kPer], const float* a, int a_stride,
                                                   const float* b) {
  float av[kPer], bv[kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) av[i] = a[i * a_stride];
#pragma unroll
  for (int j = 0; j < kPer; ++j) bv[j] = b[16 * j];
#pragma unroll
  for (int i = 0; i < kPer; ++i)
#pragma unroll
    for (int j = 0; j < kPer; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
}

// out[r, c] += acc[i][j] at the thread's rows r = row + 16·i and columns c = col + 16·j
// of a row-major [rows, cols] matrix, those inside it only.
__device__ __forceinline__ void add_register_block(float* out, const float (&acc)[kPer][kPer], int64_t row,
                                                   int64_t col, int64_t rows, int64_t cols) {
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int64_t r = row + 16 * i;
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      const int64_t c = col + 16 * j;
      if (r < rows && c < cols) out[r * cols + c] += acc[i][j];
    }
  }
}

// ------------------------------------------------------------------ gather / scatter

// One warp per row r = b·N + i: rows[r] = fmap[b, :, ids[i]] / (‖·‖ + eps).
template <typename scalar_t>
__global__ void gather_normalise_kernel(const scalar_t* __restrict__ fmap, const int64_t* __restrict__ ids,
                                        float* __restrict__ rows, float* __restrict__ norms, int64_t total_rows,
                                        int64_t n, int64_t channels, int64_t height, int64_t width,
                                        int64_t sb, int64_t sc, int64_t sh, int64_t sw) {
  const int64_t r = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (r >= total_rows) return;
  const int64_t pos = ids[r % n];
  float* y = rows + r * channels;
  if (pos < 0 || pos >= height * width) {  // pdml.ops rejects such ids; never read out of bounds
    CUDA_KERNEL_ASSERT(false && "pdml: ids out of range");
    for (int64_t c = lane; c < channels; c += kWarp) y[c] = 0.f;
    if (lane == 0) norms[r] = 0.f;
    return;
  }
  const scalar_t* x = fmap + (r / n) * sb + (pos / width) * sh + (pos % width) * sw;
  float absmax = 0.f;
  for (int64_t c = lane; c < channels; c += kWarp) absmax = fmaxf(absmax, fabsf(static_cast<float>(x[c * sc])));
  const auto scale = math::norm_scale(warp_max(absmax));
  float sumsq = 0.f;
  for (int64_t c = lane; c < channels; c += kWarp) {
    const float v = static_cast<float>(x[c * sc]) * scale.down;
    sumsq += v * v;
  }
  const float norm = math::norm_from_scaled_sumsq(warp_sum(sumsq), scale);
  for (int64_t c = lane; c < channels; c += kWarp) y[c] = math::normalised(static_cast<float>(x[c * sc]), norm);
  if (lane == 0) norms[r] = norm;
}

// One warp per row: grad[b, :, ids[i]] = normaliser backward of d_rows[r] (ids distinct).
template <typename scalar_t>
__global__ void normalise_backward_scatter_kernel(const float* __restrict__ d_rows, const float* __restrict__ xhat,
                                                  const float* __restrict__ norms, const int64_t* __restrict__ ids,
                                                  scalar_t* __restrict__ grad, int64_t total_rows, int64_t n,
                                                  int64_t channels, int64_t hw) {
  const int64_t r = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (r >= total_rows) return;
  const int64_t pos = ids[r % n];
  if (pos < 0 || pos >= hw) {
    CUDA_KERNEL_ASSERT(false && "pdml: ids out of range");
    return;
  }
  const float* g = d_rows + r * channels;
  const float* x = xhat + r * channels;
  float dot = 0.f;
  for (int64_t c = lane; c < channels; c += kWarp) dot += g[c] * x[c];
  const auto s = math::normalise_backward_scales(norms[r], warp_sum(dot));
  scalar_t* dst = grad + (r / n) * channels * hw + pos;
  for (int64_t c = lane; c < channels; c += kWarp) dst[c * hw] = static_cast<scalar_t>(g[c] * s.scale_g - x[c] * s.scale_xhat);
}

// One warp per row: out[r] = a[r]·b[r].
__global__ void row_dot_kernel(const float* __restrict__ a, const float* __restrict__ b, float* __restrict__ out,
                               int64_t total_rows, int64_t channels) {
  const int64_t r = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (r >= total_rows) return;
  float dot = 0.f;
  for (int64_t c = lane; c < channels; c += kWarp) dot += a[r * channels + c] * b[r * channels + c];
  dot = warp_sum(dot);
  if (lane == 0) out[r] = dot;
}

// ------------------------------------------------------------------ tile sweep

enum class Sweep { kNceForward, kNceBackward, kMetric };

struct SweepArgs {
  const float* a;       // [G, n, C] rows along i (q̂; or the metric's q̂ or k̂)
  const float* b;       // [G, n, C] rows along j (k̂; or a again for the metric)
  const float* lse;     // [G·n] NCE backward: the forward's logsumexp
  const float* row_loss;  // [G·n] NCE backward: the forward's loss
  const float* pos;     // [G·n] NCE forward: s_ii = q̂_i·k̂_i
  float* grad;          // [G, n, C] zero-initialised ∂/∂a accumulation, or nullptr
  float* loss;          // [G·n] NCE forward
  float* out_lse;       // [G·n] NCE forward
  float* partial;       // [gridDim.y · gridDim.x] metric: Σ_{i in tile, j≠i} e^{s_ij/τ}
  int64_t n;
  int64_t channels;
  float inv_tau;
};

// Block (blockIdx.x, blockIdx.y) owns rows [64·blockIdx.x, +64) of group blockIdx.y and
// sweeps all column tiles j. Rows/columns past n are zero-padded and masked.
template <Sweep kMode>
__global__ void __launch_bounds__(kThreads) tile_sweep_kernel(SweepArgs args) {
  __shared__ float a_s[kChunk][kTile];
  __shared__ float b_s[kChunk][kTile];
  __shared__ float w_s[kTile][kTile + 1];
  __shared__ float v_s[kTile][kOutChunk + 1];
  __shared__ float red_s[kThreads / kWarp];

  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t n = args.n, channels = args.channels, group = blockIdx.y;
  const int64_t row0 = int64_t(blockIdx.x) * kTile;
  const float* a = args.a + group * n * channels;
  const float* b = args.b + group * n * channels;
  float* grad = args.grad ? args.grad + group * n * channels : nullptr;
  const float inv_tau = args.inv_tau;

  math::Lse<float> running[kPer];
  float row_lse[kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    running[i] = math::lse_init<float>();
    const int64_t row = row0 + ty + 16 * i;
    row_lse[i] = (kMode == Sweep::kNceBackward && row < n) ? args.lse[group * n + row] : 0.f;
  }
  float pair_sum = 0.f;

  for (int64_t col0 = 0; col0 < n; col0 += kTile) {
    // S tile = A_I B_Jᵀ, 16 channels at a time through shared memory.
    float s[kPer][kPer] = {};
    for (int64_t k0 = 0; k0 < channels; k0 += kChunk) {
#pragma unroll
      for (int l = 0; l < kTile * kChunk / kThreads; ++l) {
        const int e = tid + l * kThreads, r = e / kChunk, kk = e % kChunk;
        const int64_t ch = k0 + kk, ra = row0 + r, rb = col0 + r;
        a_s[kk][r] = (ra < n && ch < channels) ? a[ra * channels + ch] : 0.f;
        b_s[kk][r] = (rb < n && ch < channels) ? b[rb * channels + ch] : 0.f;
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kChunk; ++kk) fma_register_block(s, &a_s[kk][ty], 16, &b_s[kk][tx]);
      __syncthreads();
    }

    if constexpr (kMode == Sweep::kNceForward) {
#pragma unroll
      for (int i = 0; i < kPer; ++i) {
        // the sweep covers the negatives only: columns past n and j = i are masked
        const int64_t row = row0 + ty + 16 * i;
        bool live[kPer];
#pragma unroll
        for (int j = 0; j < kPer; ++j) live[j] = col0 + tx + 16 * j < n && col0 + tx + 16 * j != row;
        float block_max = -INFINITY;
#pragma unroll
        for (int j = 0; j < kPer; ++j)
          if (live[j]) block_max = fmaxf(block_max, s[i][j] * inv_tau);
        block_max = row16_max(block_max);
        float block_sum = 0.f;
#pragma unroll
        for (int j = 0; j < kPer; ++j)
          if (live[j]) block_sum += math::nce_weight(s[i][j], block_max, inv_tau);
        running[i] = math::lse_merge(running[i], block_max, row16_sum(block_sum));
      }
    } else {
      // W tile: NCE p_ij = e^{s_ij/τ − lse_i}; metric e^{s_ij/τ} with j ≠ i.
#pragma unroll
      for (int i = 0; i < kPer; ++i) {
        const int64_t row = row0 + ty + 16 * i;
#pragma unroll
        for (int j = 0; j < kPer; ++j) {
          const int64_t col = col0 + tx + 16 * j;
          float w = 0.f;
          if (col < n) {
            if constexpr (kMode == Sweep::kNceBackward) {
              // j = i is the positive: the epilogue's nce_grad_finish adds it exactly
              w = row != col ? math::nce_weight(s[i][j], row_lse[i], inv_tau) : 0.f;
            } else {
              w = row != col ? math::metric_pair_term(s[i][j], inv_tau) : 0.f;
              if (row < n) pair_sum += w;
            }
          }
          s[i][j] = w;
        }
      }
      if (grad != nullptr) {  // uniform over the block
        // dA_I += W B_J, 64 output channels at a time; this block alone writes these rows.
#pragma unroll
        for (int i = 0; i < kPer; ++i)
#pragma unroll
          for (int j = 0; j < kPer; ++j) w_s[ty + 16 * i][tx + 16 * j] = s[i][j];
        for (int64_t c0 = 0; c0 < channels; c0 += kOutChunk) {
          for (int e = tid; e < kTile * kOutChunk; e += kThreads) {
            const int jj = e / kOutChunk, cc = e % kOutChunk;
            const int64_t rb = col0 + jj, ch = c0 + cc;
            v_s[jj][cc] = (rb < n && ch < channels) ? b[rb * channels + ch] : 0.f;
          }
          __syncthreads();
          float o[kPer][kPer] = {};
          for (int jj = 0; jj < kTile; ++jj) fma_register_block(o, &w_s[ty][jj], 16 * (kTile + 1), &v_s[jj][tx]);
          add_register_block(grad, o, row0 + ty, c0 + tx, n, channels);
          __syncthreads();
        }
      }
    }
  }

  if constexpr (kMode == Sweep::kNceForward) {
    if (tx == 0) {
#pragma unroll
      for (int i = 0; i < kPer; ++i) {
        const int64_t row = row0 + ty + 16 * i;
        if (row < n) {
          const float s_pos = args.pos[group * n + row];
          const float loss = math::nce_row_loss(running[i], s_pos, inv_tau);
          args.loss[group * n + row] = loss;
          args.out_lse[group * n + row] = math::nce_row_lse(loss, s_pos, inv_tau);
        }
      }
    }
  } else if constexpr (kMode == Sweep::kNceBackward) {
    __syncthreads();  // this block's accumulations into grad are visible to all its threads
    const int64_t rows = n - row0 < kTile ? n - row0 : int64_t(kTile);
    for (int64_t e = tid; e < rows * channels; e += kThreads) {
      const int64_t idx = row0 * channels + e;
      const float loss = args.row_loss[group * n + row0 + e / channels];
      grad[idx] = math::nce_grad_finish(grad[idx], b[idx], loss, inv_tau);
    }
  } else {
    pair_sum = warp_sum(pair_sum);
    if (tid % kWarp == 0) red_s[tid / kWarp] = pair_sum;
    __syncthreads();
    if (tid == 0) {
      float total = 0.f;
      for (int w = 0; w < kThreads / kWarp; ++w) total += red_s[w];
      args.partial[int64_t(blockIdx.y) * gridDim.x + blockIdx.x] = total;
    }
  }
}

template <Sweep kMode>
void launch_sweep(const SweepArgs& args, int64_t groups) {
  TORCH_CHECK(groups <= 65535, "pdml CUDA kernels: at most 65535 groups, got ", groups);
  const dim3 grid(static_cast<unsigned>(ceil_div(args.n, kTile)), static_cast<unsigned>(groups));
  tile_sweep_kernel<kMode><<<grid, kThreads, 0, stream()>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Metric gradients, elementwise: dA = pair_scale·dA + pos_scale(p_i)·partner.
__global__ void metric_grad_finish_kernel(float* __restrict__ dq, float* __restrict__ dk, const float* __restrict__ q,
                                          const float* __restrict__ k, const float* __restrict__ pos, int64_t total,
                                          int64_t channels, float groups, float n, float inv_tau) {
  const int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= total) return;
  const float pair_scale = math::metric_pair_grad_scale<float>(groups, n, float(channels), inv_tau);
  const float pos_scale = math::metric_pos_grad_scale<float>(pos[e / channels], groups, n, float(channels), inv_tau);
  const float dq_e = dq[e], dk_e = dk[e];
  dq[e] = pair_scale * dq_e + pos_scale * k[e];
  dk[e] = pair_scale * dk_e + pos_scale * q[e];
}

// One block: the loss from the per-block pair sums and the positives, summed in double
// in a fixed order (deterministic), written to a 0-dim tensor (no host round trip).
__global__ void metric_loss_kernel(const float* __restrict__ partial_kk, const float* __restrict__ partial_qq,
                                   int64_t partials, const float* __restrict__ pos, int64_t rows, float* __restrict__ out,
                                   double groups, double n, double channels, double inv_tau) {
  __shared__ double red_s[3][kThreads];
  double kk = 0, qq = 0, p = 0;
  for (int64_t i = threadIdx.x; i < partials; i += blockDim.x) {
    kk += partial_kk[i];
    qq += partial_qq[i];
  }
  for (int64_t i = threadIdx.x; i < rows; i += blockDim.x) p += math::metric_pair_term<double>(pos[i], inv_tau);
  red_s[0][threadIdx.x] = kk;
  red_s[1][threadIdx.x] = qq;
  red_s[2][threadIdx.x] = p;
  __syncthreads();
  for (int half = kThreads / 2; half > 0; half /= 2) {
    if (threadIdx.x < half)
      for (int v = 0; v < 3; ++v) red_s[v][threadIdx.x] += red_s[v][threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    out[0] = static_cast<float>(
        math::metric_loss<double>(red_s[2][0], red_s[0][0], red_s[1][0], groups, n, channels, inv_tau));
  }
}

void check_slabs(const Tensor& q, const Tensor& k) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat,
              "pdml CUDA kernels compute in float32 (float64 CUDA tensors are not supported)");
  TORCH_INTERNAL_ASSERT(q.dim() == 3 && q.sizes() == k.sizes() && q.is_contiguous() && k.is_contiguous());
}

int64_t warp_blocks(int64_t rows) { return ceil_div(rows * kWarp, kThreads); }

}  // namespace

// ------------------------------------------------------------------ entry points

std::tuple<Tensor, Tensor> gather_normalise(const Tensor& fmap, const Tensor& ids) {
  const c10::cuda::CUDAGuard guard(fmap.device());
  const int64_t batch = fmap.size(0), channels = fmap.size(1), n = ids.numel();
  Tensor rows = at::empty({batch * n, channels}, fmap.options().dtype(at::kFloat));
  Tensor norms = at::empty({batch * n}, fmap.options().dtype(at::kFloat));
  const Tensor ids_c = ids.contiguous();
  const int64_t total = batch * n;
  const dim3 grid(static_cast<unsigned>(warp_blocks(total)));
#define PDML_GATHER(scalar_t)                                                                               \
  gather_normalise_kernel<scalar_t><<<grid, kThreads, 0, stream()>>>(                                       \
      fmap.const_data_ptr<scalar_t>(), ids_c.const_data_ptr<int64_t>(), rows.data_ptr<float>(),              \
      norms.data_ptr<float>(), total, n, channels, fmap.size(2), fmap.size(3), fmap.stride(0), fmap.stride(1), \
      fmap.stride(2), fmap.stride(3))
  switch (fmap.scalar_type()) {
    case at::kFloat: PDML_GATHER(float); break;
    case at::kHalf: PDML_GATHER(at::Half); break;
    case at::kBFloat16: PDML_GATHER(at::BFloat16); break;
    default: TORCH_CHECK(false, "pdml CUDA kernels take float32, float16 or bfloat16 features, got ", fmap.scalar_type());
  }
#undef PDML_GATHER
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {rows, norms};
}

Tensor normalise_backward_scatter(const Tensor& d_rows, const Tensor& rows_hat, const Tensor& norms,
                                  const Tensor& ids, at::IntArrayRef map_sizes, at::ScalarType out_dtype) {
  const c10::cuda::CUDAGuard guard(d_rows.device());
  Tensor grad = at::zeros(map_sizes, d_rows.options().dtype(out_dtype));
  const Tensor g = d_rows.to(at::kFloat).contiguous(), x = rows_hat.contiguous(), nr = norms.contiguous();
  const Tensor ids_c = ids.contiguous();
  const int64_t total = g.size(0), channels = map_sizes[1], hw = map_sizes[2] * map_sizes[3];
  const dim3 grid(static_cast<unsigned>(warp_blocks(total)));
#define PDML_SCATTER(scalar_t)                                                                               \
  normalise_backward_scatter_kernel<scalar_t><<<grid, kThreads, 0, stream()>>>(                              \
      g.const_data_ptr<float>(), x.const_data_ptr<float>(), nr.const_data_ptr<float>(),                        \
      ids_c.const_data_ptr<int64_t>(), grad.data_ptr<scalar_t>(), total, ids.numel(), channels, hw)
  switch (out_dtype) {
    case at::kFloat: PDML_SCATTER(float); break;
    case at::kHalf: PDML_SCATTER(at::Half); break;
    case at::kBFloat16: PDML_SCATTER(at::BFloat16); break;
    default: TORCH_CHECK(false, "pdml CUDA kernels take float32, float16 or bfloat16 features, got ", out_dtype);
  }
#undef PDML_SCATTER
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grad;
}

namespace {
Tensor row_dots(const Tensor& q, const Tensor& k) {
  const int64_t total = q.size(0) * q.size(1), channels = q.size(2);
  Tensor pos = at::empty({total}, q.options());
  row_dot_kernel<<<static_cast<unsigned>(warp_blocks(total)), kThreads, 0, stream()>>>(
      q.const_data_ptr<float>(), k.const_data_ptr<float>(), pos.data_ptr<float>(), total, channels);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return pos;
}

SweepArgs sweep_args(const Tensor& a, const Tensor& b, double tau) {
  SweepArgs args{};
  args.a = a.const_data_ptr<float>();
  args.b = b.const_data_ptr<float>();
  args.n = a.size(1);
  args.channels = a.size(2);
  args.inv_tau = static_cast<float>(1.0 / tau);
  return args;
}
}  // namespace

std::tuple<Tensor, Tensor> nce_forward(const Tensor& q, const Tensor& k, double tau) {
  check_slabs(q, k);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t groups = q.size(0), total = groups * q.size(1);
  Tensor loss = at::empty({total}, q.options()), lse = at::empty({total}, q.options());
  const Tensor pos = row_dots(q, k);
  SweepArgs args = sweep_args(q, k, tau);
  args.pos = pos.const_data_ptr<float>();
  args.loss = loss.data_ptr<float>();
  args.out_lse = lse.data_ptr<float>();
  launch_sweep<Sweep::kNceForward>(args, groups);
  return {loss, lse};
}

Tensor nce_backward(const Tensor& q, const Tensor& k, const Tensor& loss, const Tensor& lse, double tau) {
  check_slabs(q, k);
  const c10::cuda::CUDAGuard guard(q.device());
  Tensor dq = at::zeros_like(q);
  const Tensor lse_c = lse.to(at::kFloat).contiguous(), loss_c = loss.to(at::kFloat).contiguous();
  SweepArgs args = sweep_args(q, k, tau);
  args.lse = lse_c.const_data_ptr<float>();
  args.row_loss = loss_c.const_data_ptr<float>();
  args.grad = dq.data_ptr<float>();
  launch_sweep<Sweep::kNceBackward>(args, q.size(0));
  return dq;
}

std::tuple<Tensor, Tensor, Tensor> metric_forward(const Tensor& q, const Tensor& k, double tau, bool compute_grad) {
  check_slabs(q, k);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t groups = q.size(0), n = q.size(1), channels = q.size(2), total = groups * n;
  Tensor dq = compute_grad ? at::zeros_like(q) : at::empty({0}, q.options());
  Tensor dk = compute_grad ? at::zeros_like(k) : at::empty({0}, k.options());
  const int64_t partials = groups * ceil_div(n, kTile);
  Tensor partial_kk = at::empty({partials}, q.options()), partial_qq = at::empty({partials}, q.options());
  const Tensor pos = row_dots(q, k);
  SweepArgs args_kk = sweep_args(k, k, tau);
  args_kk.grad = compute_grad ? dk.data_ptr<float>() : nullptr;
  args_kk.partial = partial_kk.data_ptr<float>();
  launch_sweep<Sweep::kMetric>(args_kk, groups);
  SweepArgs args_qq = sweep_args(q, q, tau);
  args_qq.grad = compute_grad ? dq.data_ptr<float>() : nullptr;
  args_qq.partial = partial_qq.data_ptr<float>();
  launch_sweep<Sweep::kMetric>(args_qq, groups);
  if (compute_grad) {
    const int64_t elems = total * channels;
    metric_grad_finish_kernel<<<static_cast<unsigned>(ceil_div(elems, kThreads)), kThreads, 0, stream()>>>(
        dq.data_ptr<float>(), dk.data_ptr<float>(), q.const_data_ptr<float>(), k.const_data_ptr<float>(),
        pos.const_data_ptr<float>(), elems, channels, float(groups), float(n), static_cast<float>(1.0 / tau));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  Tensor loss = at::empty({}, q.options());
  metric_loss_kernel<<<1, kThreads, 0, stream()>>>(partial_kk.const_data_ptr<float>(), partial_qq.const_data_ptr<float>(),
                                                  partials, pos.const_data_ptr<float>(), total, loss.data_ptr<float>(),
                                                  double(groups), double(n), double(channels), 1.0 / tau);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, dq, dk};
}

}  // namespace cuda
}  // namespace pdml
