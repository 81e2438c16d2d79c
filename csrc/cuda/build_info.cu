// The CUDA architectures this translation unit was compiled for (nvcc defines
// __CUDA_ARCH_LIST__ in host code too), so `pdml.info` can report the real build.
#include <string>

#define PDML_STR2(...) #__VA_ARGS__
#define PDML_STR(...) PDML_STR2(__VA_ARGS__)

namespace pdml {
std::string cuda_arch_list() {
#ifdef __CUDA_ARCH_LIST__
  return PDML_STR(__CUDA_ARCH_LIST__);
#else
  return "unknown";
#endif
}
}  // namespace pdml
