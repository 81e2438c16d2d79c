// Per-element math of the pdml ops (docs/ops.md), shared by the CPU kernels (cpu/) and
// the CUDA kernels (cuda/), so that the CPU tests exercise the same arithmetic the GPU
// runs. Everything here is scalar, branch-light and templated on the accumulation type
// `acc_t` (float everywhere; double in the CPU float64 path used by gradcheck).
//
// Notation: a group holds n rows; q̂, k̂ are the normalised rows; s_ij = q̂_i·k̂_j (NCE)
// or a_i·a_j with a = q̂ or k̂ (metric); τ is the temperature.
#pragma once

#include <cmath>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define PDML_HD __host__ __device__ __forceinline__
#else
#define PDML_HD inline
#endif

namespace pdml {
namespace math {

// CUT's Normalize: x / (‖x‖₂ + 1e-7).
constexpr double kNormEps = 1e-7;
// CUT's / DML_CT's value of the filled self-similarity entries.
constexpr double kDiagFill = -10.0;

// exp(x) in float without a library call, so that host loops over a tile vectorise
// (glibc's expf is a scalar call the compiler cannot vectorise without -ffast-math).
// Cody–Waite reduction x = m·ln2 + r, |r| ≤ ln2/2, then Cephes' degree-6 polynomial of
// expf (relative error ≈ 1e-7, about 1 ulp) and 2^m built in the exponent bits.
// Exact at the edges: NaN -> NaN, x > 88.7228 -> inf, x < -87 -> 0 (true value
// below 1.7e-38, a subnormal).
PDML_HD float exp_poly(float x) {
  const bool big = x > 88.0f;                     // 2^m would overflow: use e^(x-1)·e
  float xr = big ? x - 1.0f : x;
  xr = xr < -87.0f ? -87.0f : (xr > 88.0f ? 88.0f : xr);
  const float shifter = 12582912.0f;              // 1.5·2^23: adding it rounds to an integer
  const float m = (xr * 1.44269504088896341f + shifter) - shifter;
  const float r = (xr - m * 0.693359375f) - m * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int bits = (static_cast<int>(m) + 127) << 23;
#if defined(__CUDA_ARCH__)
  const float scale = __int_as_float(bits);
#else
  float scale;
  __builtin_memcpy(&scale, &bits, sizeof(scale));
#endif
  float y = p * scale;
  y = big ? y * 2.71828182845904524f : y;
  y = x > 88.72283905f ? INFINITY : y;
  y = x < -87.0f ? 0.0f : y;
  return x != x ? x : y;
}

template <typename acc_t>
PDML_HD acc_t exp_(acc_t x) {
#if defined(__CUDA_ARCH__)
  return ::exp(x);  // overloaded on float/double by CUDA's math headers
#else
  return std::exp(x);
#endif
}

// float, host and device: the polynomial. On the host it vectorises; on the device it
// keeps one-ulp accuracy although the extension is built with --use_fast_math (which
// turns expf into __expf, whose error grows with |x|: ~10 ulp at the metric's x = 1/0.15),
// and the CPU tests exercise exactly the exp the GPU runs.
template <>
PDML_HD float exp_<float>(float x) {
  return exp_poly(x);
}

template <typename acc_t>
PDML_HD acc_t log_(acc_t x) {
#if defined(__CUDA_ARCH__)
  return ::log(x);
#else
  return std::log(x);
#endif
}

// ---------------------------------------------------------------- normalisation

// ‖x‖₂ without overflow: Σx² overflows (float: once |x| ≳ 1.8e19) although ‖x‖ is
// representable, so the squares are summed of x·2^-e, with 2^e the power of two just above
// max|x| (docs/ops.md, step 2):  ‖x‖ = 2^e · sqrt(Σ (x·2^-e)²).  Multiplying by a power of
// two is exact (and needs no division, which --use_fast_math would approximate), so the
// norm is the unscaled one wherever that one does not overflow. A row's kernel takes
// max|x| first, then norm_scale(max|x|), then the scaled sum of squares.
template <typename acc_t>
struct NormScale {
  acc_t down;  // 2^-e: multiplies the entries before squaring
  acc_t up;    // 2^e: multiplies the root of their sum
};

template <typename acc_t>
PDML_HD NormScale<acc_t> norm_scale(acc_t absmax) {
  int e = 0;
#if defined(__CUDA_ARCH__)
  ::frexp(absmax, &e);  // absmax = f·2^e, f in [0.5, 1); e = 0 for 0 (and unspecified for inf/NaN,
#else                   // whose rows come out non-finite anyway)
  std::frexp(absmax, &e);
#endif
  // Keep both factors normal numbers (subnormals flush to zero under --use_fast_math).
  const int limit = sizeof(acc_t) == sizeof(float) ? 126 : 1022;
  e = e > limit ? limit : (e < -limit ? -limit : e);
  NormScale<acc_t> s;
#if defined(__CUDA_ARCH__)
  s.down = ::ldexp(acc_t(1), -e);
  s.up = ::ldexp(acc_t(1), e);
#else
  s.down = std::ldexp(acc_t(1), -e);
  s.up = std::ldexp(acc_t(1), e);
#endif
  return s;
}

// ‖x‖₂ from Σ (x·scale.down)²; the forward multiplies x by 1 / (‖x‖ + eps).
template <typename acc_t>
PDML_HD acc_t norm_from_scaled_sumsq(acc_t scaled_sumsq, NormScale<acc_t> scale) {
#if defined(__CUDA_ARCH__)
  return ::sqrt(scaled_sumsq) * scale.up;
#else
  return std::sqrt(scaled_sumsq) * scale.up;
#endif
}

template <typename acc_t>
PDML_HD acc_t inv_norm_plus_eps(acc_t norm) {
  return acc_t(1) / (norm + acc_t(kNormEps));
}

// One normalised entry, x / (‖x‖ + eps), divided exactly as CUT does.
template <typename acc_t>
PDML_HD acc_t normalised(acc_t x, acc_t norm) {
  return x / (norm + acc_t(kNormEps));
}

// Backward of x̂ = x / (‖x‖ + eps), per row: with g = ∂L/∂x̂, n = ‖x‖,
//   ∂L/∂x = g / (n + eps) − x̂ (g·x̂) / n,
// written as  ∂L/∂x_c = g_c · scale_g − x̂_c · scale_xhat.
// At n = 0 the second term is 0 (torch's norm backward masks a zero norm the same way).
template <typename acc_t>
struct NormaliseBackwardScales {
  acc_t scale_g;
  acc_t scale_xhat;
};

template <typename acc_t>
PDML_HD NormaliseBackwardScales<acc_t> normalise_backward_scales(acc_t norm, acc_t g_dot_xhat) {
  NormaliseBackwardScales<acc_t> s;
  s.scale_g = inv_norm_plus_eps(norm);
  s.scale_xhat = norm > acc_t(0) ? g_dot_xhat / norm : acc_t(0);
  return s;
}

// ---------------------------------------------------------------- PatchNCE
// Row i's logits are [s_ii, s_i0 .. s_i(n-1) with entry i := -10] / τ. The sweep keeps a
// running logsumexp of the NEGATIVES only, lse_neg = lse_{j≠i}(s_ij/τ) merged with the
// filled entry −10/τ; with l0 = s_ii/τ,
//   loss_i = lse_i − l0 = softplus(lse_neg − l0),   lse_i = l0 + loss_i,
// which never subtracts two nearly equal numbers (lse_i ≈ l0 when q̂_i ≈ k̂_i).
// A running log-sum-exp (max m, sum s of exp(x − m)); start from lse_init().
template <typename acc_t>
struct Lse {
  acc_t max;
  acc_t sum;
};

template <typename acc_t>
PDML_HD Lse<acc_t> lse_init() {
  Lse<acc_t> r;
  r.max = -INFINITY;
  r.sum = acc_t(0);
  return r;
}

// Merges a block summarised as (block_max, Σ exp(x − block_max)) into the running lse.
template <typename acc_t>
PDML_HD Lse<acc_t> lse_merge(Lse<acc_t> a, acc_t block_max, acc_t block_sum) {
  if (block_max == -INFINITY) return a;
  if (a.max == -INFINITY) {
    a.max = block_max;
    a.sum = block_sum;
    return a;
  }
  if (block_max > a.max) {
    a.sum = a.sum * exp_(a.max - block_max) + block_sum;
    a.max = block_max;
  } else {
    a.sum += block_sum * exp_(block_max - a.max);
  }
  return a;
}

template <typename acc_t>
PDML_HD acc_t lse_value(Lse<acc_t> a) {
  return a.max + log_(a.sum);
}

// log(1 + e^x), without overflow for large x or loss of precision for very negative x.
template <typename acc_t>
PDML_HD acc_t softplus(acc_t x) {
#if defined(__CUDA_ARCH__)
  return x > acc_t(0) ? x + ::log1p(exp_(-x)) : ::log1p(exp_(x));
#else
  return x > acc_t(0) ? x + std::log1p(exp_(-x)) : std::log1p(exp_(x));
#endif
}

// Per-row loss from the swept negatives (j ≠ i) and the positive similarity s_ii.
template <typename acc_t>
PDML_HD acc_t nce_row_loss(Lse<acc_t> swept_negatives, acc_t s_pos, acc_t inv_tau) {
  const Lse<acc_t> negatives = lse_merge(swept_negatives, acc_t(kDiagFill) * inv_tau, acc_t(1));
  return softplus(lse_value(negatives) - s_pos * inv_tau);
}

// The full row's logsumexp (what the backward's softmax weights are relative to).
template <typename acc_t>
PDML_HD acc_t nce_row_lse(acc_t loss, acc_t s_pos, acc_t inv_tau) {
  return s_pos * inv_tau + loss;
}

// Backward (k detached), unit upstream gradient, p_ij = exp(s_ij/τ − lse_i):
//   ∂loss_i/∂q̂_i = (1/τ) [ Σ_{j≠i} p_ij k̂_j + (p_0 − 1) k̂_i ]
// (p_0 the positive's softmax weight; the filled entry is a constant). p_0 − 1 is
// expm1(−loss_i) exactly, as p_0 = e^{l0 − lse_i} = e^{−loss_i}: computing it as
// e^{s_ii/τ − lse_i} − 1 would cancel (p_0 ≈ 1) and lose ~1e-6·(1/τ) in float32.
// nce_weight gives p_ij (j ≠ i); nce_positive_weight gives p_0 − 1, the coefficient of
// k̂_i (one per row); nce_grad_finish adds the positive's term and the 1/τ.
template <typename acc_t>
PDML_HD acc_t nce_weight(acc_t s, acc_t lse, acc_t inv_tau) {
  return exp_(s * inv_tau - lse);
}

template <typename acc_t>
PDML_HD acc_t nce_positive_weight(acc_t loss) {
#if defined(__CUDA_ARCH__)
  return ::expm1(-loss);
#else
  return std::expm1(-loss);
#endif
}

template <typename acc_t>
PDML_HD acc_t nce_grad_finish(acc_t weighted_negatives, acc_t k_own, acc_t loss, acc_t inv_tau) {
  return (weighted_negatives + nce_positive_weight(loss) * k_own) * inv_tau;
}

// ---------------------------------------------------------------- PatchMetric
// L = ( −(1/R) Σ_i e^{p_i/τ} + (1/(G n²)) [Σ_g Σ_{i≠j} e^{s^kk_ij/τ} + R e^{−10/τ}]
//       + (same for qq) ) / C,   R = G·n rows, p_i = q̂_i·k̂_i.
// Per unordered pair the forward adds e^{s_ij/τ} twice; the backward gives
//   ∂L/∂q̂_i = (1/C) [ −(1/(Rτ)) e^{p_i/τ} k̂_i + (2/(G n² τ)) Σ_{j≠i} e^{s^qq_ij/τ} q̂_j ]
// (and the same with q, k swapped).

template <typename acc_t>
PDML_HD acc_t metric_pair_term(acc_t s, acc_t inv_tau) {
  return exp_(s * inv_tau);
}

// Combines the three sums into the loss.
//   pos_sum = Σ_i e^{p_i/τ};  offdiag_sum_kk/qq = Σ_g Σ_{i≠j} e^{s_ij/τ}.
template <typename acc_t>
PDML_HD acc_t metric_loss(acc_t pos_sum, acc_t offdiag_sum_kk, acc_t offdiag_sum_qq,
                          acc_t groups, acc_t n, acc_t channels, acc_t inv_tau) {
  const acc_t rows = groups * n;
  const acc_t diag = rows * exp_(acc_t(kDiagFill) * inv_tau);
  const acc_t pair_mean = (offdiag_sum_kk + offdiag_sum_qq + acc_t(2) * diag) / (groups * n * n);
  return (-pos_sum / rows + pair_mean) / channels;
}

// Coefficient of Σ_{j≠i} e^{s_ij/τ} a_j in ∂L/∂â_i.
template <typename acc_t>
PDML_HD acc_t metric_pair_grad_scale(acc_t groups, acc_t n, acc_t channels, acc_t inv_tau) {
  return acc_t(2) * inv_tau / (groups * n * n * channels);
}

// Coefficient of the partner row (k̂_i for q̂_i, q̂_i for k̂_i) in ∂L/∂â_i.
template <typename acc_t>
PDML_HD acc_t metric_pos_grad_scale(acc_t s_pos, acc_t groups, acc_t n, acc_t channels,
                                    acc_t inv_tau) {
  return -exp_(s_pos * inv_tau) * inv_tau / (groups * n * channels);
}

}  // namespace math
}  // namespace pdml
