// CUDA kernels of gather_project (declared in gather_project.h).
//
// All three products (forward rows @ weightᵀ, backward grad @ weight scattered to the
// sampled pixels, gradᵀ @ rows for grad_weight) run through one SIMT tile kernel:
// 64×64 output tiles per 256-thread block, operands staged through shared memory in
// 16-deep chunks, 4×4 register blocks per thread, multiply-adds in acc (float32 for
// float32/float16/bfloat16, float64 for float64). The operand loaders read the sampled
// pixels straight from the map (row r = fmap[r / N, :, ids[r % N]]), so neither a
// gathered nor a permuted copy of the map exists; the scatter writes only the sampled
// pixels of a zero map (ids are distinct: one writer per pixel, no atomics); grad_weight
// sums over all rows inside each output tile's block (fixed order: deterministic).
// Everything runs on the current stream with no host synchronisation; an id out of range
// (which pdml's Python checks reject before any launch) trips a device assert and is
// never dereferenced. No tensor cores: half/bf16 operands are converted to float32 on
// load.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/macros/Macros.h>

#include "gather_project.h"

namespace pdml {
namespace cuda {
namespace {

using at::Tensor;

constexpr int kTile = 64;      // output rows and columns per block
constexpr int kChunk = 16;     // summed index per shared-memory step
constexpr int kSide = 16;      // 16 × 16 threads
constexpr int kThreads = kSide * kSide;
constexpr int kPer = kTile / kSide;  // a thread owns rows ty + 16·i and columns tx + 16·j

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Row r of the gathered rows -> element offset of channel 0 of its pixel (-1: bad id).
struct PixelRows {
  const int64_t* ids;
  int64_t n, width, hw, sb, sh, sw;

  __device__ __forceinline__ int64_t offset(int64_t r) const {
    const int64_t pos = ids[r % n];
    if (pos < 0 || pos >= hw) {
      CUDA_KERNEL_ASSERT(false && "pdml: ids out of range");
      return -1;
    }
    return (r / n) * sb + (pos / width) * sh + (pos % width) * sw;
  }
};

PixelRows pixel_rows(const Tensor& map, const Tensor& ids) {
  return {ids.data_ptr<int64_t>(), ids.numel(), map.size(3), map.size(2) * map.size(3),
          map.stride(0), map.stride(2), map.stride(3)};
}

// Operand (i, j) of a strided matrix.
template <typename scalar_t, typename acc_t>
struct Strided {
  const scalar_t* p;
  int64_t s0, s1;
  __device__ __forceinline__ acc_t operator()(int64_t i, int64_t j) const {
    return static_cast<acc_t>(p[i * s0 + j * s1]);
  }
};

// Operand (r, f) = fmap[r / N, f, ids[r % N]].
template <typename scalar_t, typename acc_t>
struct Gathered {
  const scalar_t* p;
  PixelRows rows;
  int64_t sc;
  __device__ __forceinline__ acc_t operator()(int64_t r, int64_t f) const {
    const int64_t off = rows.offset(r);
    return off < 0 ? acc_t(0) : static_cast<acc_t>(p[off + f * sc]);
  }
};

// out[m, n] = v (+ bias[n]) into a contiguous [M, ld] matrix.
template <typename scalar_t, typename acc_t>
struct DenseStore {
  scalar_t* out;
  const scalar_t* bias;  // may be null
  int64_t ld;
  __device__ __forceinline__ void operator()(int64_t m, int64_t n, acc_t v) const {
    if (bias != nullptr) v += static_cast<acc_t>(bias[n]);
    out[m * ld + n] = static_cast<scalar_t>(v);
  }
};

// grad_fmap[m / N, n, ids[m % N]] = v.
template <typename scalar_t, typename acc_t>
struct ScatterStore {
  scalar_t* out;
  PixelRows rows;
  int64_t sc;
  __device__ __forceinline__ void operator()(int64_t m, int64_t n, acc_t v) const {
    const int64_t off = rows.offset(m);
    if (off >= 0) out[off + n * sc] = static_cast<scalar_t>(v);
  }
};

// C[m, n] = Σ_k A(m, k) B(k, n) for m < M, n < N, handed to store(m, n, ·).
// kAKFast / kBNFast: which index of A / B consecutive threads step along when staging a
// chunk (the operand's contiguous one, so the loads coalesce).
template <typename acc_t, bool kAKFast, bool kBNFast, typename LoadA, typename LoadB, typename Store>
__global__ void __launch_bounds__(kThreads)
    tile_product_kernel(LoadA a, LoadB b, Store store, int64_t M, int64_t N, int64_t K) {
  __shared__ acc_t a_tile[kChunk][kTile + 1];
  __shared__ acc_t b_tile[kChunk][kTile + 1];
  const int tx = threadIdx.x % kSide, ty = threadIdx.x / kSide;
  const int64_t m0 = int64_t(blockIdx.x) * kTile, n0 = int64_t(blockIdx.y) * kTile;
  acc_t acc[kPer][kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i)
#pragma unroll
    for (int j = 0; j < kPer; ++j) acc[i][j] = acc_t(0);

  for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
    for (int e = threadIdx.x; e < kChunk * kTile; e += kThreads) {
      const int kk_a = kAKFast ? e % kChunk : e / kTile, mm = kAKFast ? e / kChunk : e % kTile;
      const int64_t m = m0 + mm, ka = k0 + kk_a;
      a_tile[kk_a][mm] = (m < M && ka < K) ? a(m, ka) : acc_t(0);
      const int kk_b = kBNFast ? e / kTile : e % kChunk, nn = kBNFast ? e % kTile : e / kChunk;
      const int64_t n = n0 + nn, kb = k0 + kk_b;
      b_tile[kk_b][nn] = (n < N && kb < K) ? b(kb, n) : acc_t(0);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kChunk; ++kk) {
      acc_t av[kPer], bv[kPer];
#pragma unroll
      for (int i = 0; i < kPer; ++i) av[i] = a_tile[kk][ty + kSide * i];
#pragma unroll
      for (int j = 0; j < kPer; ++j) bv[j] = b_tile[kk][tx + kSide * j];
#pragma unroll
      for (int i = 0; i < kPer; ++i)
#pragma unroll
        for (int j = 0; j < kPer; ++j) acc[i][j] += av[i] * bv[j];
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < kPer; ++i)
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      const int64_t m = m0 + ty + kSide * i, n = n0 + tx + kSide * j;
      if (m < M && n < N) store(m, n, acc[i][j]);
    }
}

template <typename acc_t, bool kAKFast, bool kBNFast, typename LoadA, typename LoadB, typename Store>
void launch_tile_product(LoadA a, LoadB b, Store store, int64_t M, int64_t N, int64_t K) {
  const dim3 grid(ceil_div(M, kTile), ceil_div(N, kTile));
  tile_product_kernel<acc_t, kAKFast, kBNFast>
      <<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(a, b, store, M, N, K);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::ScalarType acc_dtype(const Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace

Tensor gather_project_forward(const Tensor& fmap, const Tensor& ids_in, const Tensor& weight, const Tensor& bias) {
  const c10::cuda::CUDAGuard guard(fmap.device());
  const Tensor ids = ids_in.contiguous();
  const Tensor b = bias.defined() ? bias.contiguous() : bias;
  const int64_t rows = fmap.size(0) * ids.numel(), channels = fmap.size(1), out_dim = weight.size(0);
  Tensor out = at::empty({rows, out_dim}, fmap.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, fmap.scalar_type(), "gather_project_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // out[r, d] = Σ_f x(r, f) · weight[d, f]
    launch_tile_product<acc_t, true, false>(
        Gathered<scalar_t, acc_t>{fmap.const_data_ptr<scalar_t>(), pixel_rows(fmap, ids), fmap.stride(1)},
        Strided<scalar_t, acc_t>{weight.const_data_ptr<scalar_t>(), weight.stride(1), weight.stride(0)},
        DenseStore<scalar_t, acc_t>{out.data_ptr<scalar_t>(), b.defined() ? b.const_data_ptr<scalar_t>() : nullptr,
                                    out_dim},
        rows, out_dim, channels);
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor> gather_project_backward(const Tensor& grad, const Tensor& fmap,
                                                           const Tensor& ids_in, const Tensor& weight,
                                                           bool bias_grad) {
  const c10::cuda::CUDAGuard guard(fmap.device());
  const Tensor ids = ids_in.contiguous();
  const int64_t rows = fmap.size(0) * ids.numel(), channels = fmap.size(1), out_dim = weight.size(0);
  Tensor grad_fmap = at::zeros_like(fmap);
  Tensor grad_weight = at::empty({out_dim, channels}, weight.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, fmap.scalar_type(), "gather_project_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Strided<scalar_t, acc_t> g_rows{grad.const_data_ptr<scalar_t>(), grad.stride(0), grad.stride(1)};
    // grad_fmap[pixel of r, f] = Σ_d grad[r, d] · weight[d, f]
    launch_tile_product<acc_t, true, true>(
        g_rows, Strided<scalar_t, acc_t>{weight.const_data_ptr<scalar_t>(), weight.stride(0), weight.stride(1)},
        ScatterStore<scalar_t, acc_t>{grad_fmap.data_ptr<scalar_t>(), pixel_rows(grad_fmap, ids),
                                      grad_fmap.stride(1)},
        rows, channels, out_dim);
    // grad_weight[d, f] = Σ_r grad[r, d] · x(r, f)
    launch_tile_product<acc_t, false, true>(
        Strided<scalar_t, acc_t>{grad.const_data_ptr<scalar_t>(), grad.stride(1), grad.stride(0)},
        Gathered<scalar_t, acc_t>{fmap.const_data_ptr<scalar_t>(), pixel_rows(fmap, ids), fmap.stride(1)},
        DenseStore<scalar_t, acc_t>{grad_weight.data_ptr<scalar_t>(), nullptr, channels},
        out_dim, channels, rows);
  });
  const Tensor grad_bias = bias_grad ? grad.sum(0, /*keepdim=*/false, acc_dtype(grad)).to(weight.scalar_type())
                                     : at::empty({0}, weight.options());
  return {grad_fmap, grad_weight, grad_bias};
}

}  // namespace cuda
}  // namespace pdml
