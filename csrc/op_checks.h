// Host-side checks shared by the op bodies (patch_ops.cpp, gather_project_ops.cpp).
#pragma once
#include <ATen/ATen.h>

#include <vector>

namespace pdml {

// The ids guard every gather and scatter. On CPU their range and distinctness are checked
// here, so no caller (not even a compiled graph that skipped pdml's Python checks) can make
// a kernel index out of bounds; on CUDA that check would synchronise with the host, so the
// kernels bound-check each id with a device assert and never touch memory for a bad one.
inline void check_ids(const at::Tensor& ids, const at::Tensor& fmap) {
  TORCH_CHECK(ids.dim() == 1 && ids.numel() > 0, "ids must have shape [N], N >= 1, got ", ids.sizes());
  TORCH_CHECK(ids.scalar_type() == at::kLong, "ids must be int64, got ", ids.scalar_type());
  TORCH_CHECK(ids.device() == fmap.device(), "ids must be on the features' device");
  if (!ids.is_cpu()) return;
  const int64_t hw = fmap.size(2) * fmap.size(3);
  TORCH_CHECK(ids.numel() <= hw, "ids has more entries (", ids.numel(), ") than H*W = ", hw);
  const at::Tensor c = ids.contiguous();
  const int64_t* p = c.data_ptr<int64_t>();
  std::vector<bool> seen(hw, false);
  for (int64_t i = 0; i < c.numel(); ++i) {
    TORCH_CHECK(p[i] >= 0 && p[i] < hw, "ids must lie in [0, H*W) = [0, ", hw, "), got ", p[i]);
    TORCH_CHECK(!seen[p[i]], "ids must be distinct, got ", p[i], " twice");
    seen[p[i]] = true;
  }
}

}  // namespace pdml
