// zeroed_pages: a zero tensor in fresh anonymous memory, for the CPU kernels' large gradient
// maps (docs/ops.md, "CPU memory of the gradient maps").
//
// A backward writes its feature-map gradient once, zero except at the sampled pixels, into
// a new tensor of a few to tens of MiB. From the C library's heap that tensor costs one
// page fault per 4 KiB whenever the heap was trimmed since the last call, plus a zero fill;
// which of the two a call meets depends on the heap's history, not on pdml. Anonymous
// memory from the kernel is zero already, and with transparent huge pages one fault maps
// 2 MiB: the cost is the kernel's zeroing alone, the same on every call.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace pdml {

constexpr int64_t kHugePageBytes = int64_t{2} << 20;

// A CPU tensor of `sizes`, `strides` (dense: numel elements of storage) and `options`, all
// zeros. Maps of at least kHugePageBytes on Linux come from mmap with MADV_HUGEPAGE (the
// kernel's zero pages; unmapped when the tensor is freed); anything else from at::zeros.
inline at::Tensor zeroed_pages(at::IntArrayRef sizes, at::IntArrayRef strides, const at::TensorOptions& options) {
#if defined(__linux__)
  int64_t numel = 1;
  for (const int64_t s : sizes) numel *= s;
  const int64_t bytes = numel * static_cast<int64_t>(c10::elementSize(c10::typeMetaToScalarType(options.dtype())));
  if (bytes >= kHugePageBytes) {
    // room to start on a 2 MiB boundary: huge pages map only whole aligned 2 MiB ranges
    const size_t length = static_cast<size_t>(bytes + kHugePageBytes);
    void* mapped = mmap(nullptr, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mapped != MAP_FAILED) {
      const auto base = reinterpret_cast<uintptr_t>(mapped);
      const auto huge = static_cast<uintptr_t>(kHugePageBytes);
      void* aligned = reinterpret_cast<void*>((base + huge - 1) & ~(huge - 1));
      madvise(aligned, static_cast<size_t>(bytes), MADV_HUGEPAGE);  // a hint: 4 KiB pages without THP
      return at::from_blob(
          aligned, sizes, strides, [mapped, length](void*) { munmap(mapped, length); }, options.device(at::kCPU));
    }
  }
#endif
  return at::empty_strided(sizes, strides, options).zero_();
}

// Contiguous (its strides from a meta tensor: no memory).
inline at::Tensor zeroed_pages(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const at::Tensor layout = at::empty(sizes, options.device(at::kMeta));
  return zeroed_pages(sizes, layout.strides(), options);
}

// Zeros of t's sizes, dtype and layout (its strides when t is dense, as at::zeros_like).
inline at::Tensor zeroed_pages_like(const at::Tensor& t) {
  const at::Tensor layout = at::empty_like(t, t.options().device(at::kMeta));
  return zeroed_pages(layout.sizes(), layout.strides(), t.options());
}

}  // namespace pdml
