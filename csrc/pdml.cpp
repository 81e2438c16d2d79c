// pdml._C: op schemas of the pdml library (TORCH_LIBRARY(pdml, m)) and the Python
// module stub that lets `import pdml._C` load them. Kernels live in cpu/ and cuda/.
#include <Python.h>
#include <torch/library.h>

#include <string>

extern "C" {
// The ops register through TORCH_LIBRARY at load time; the module itself is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

#ifdef PDML_WITH_CUDA
namespace pdml { std::string cuda_arch_list(); }
#endif

namespace pdml {

// What this build contains, e.g. "cpu" or "cpu,cuda:800,900".
static std::string build_info() {
  std::string info = "cpu";
#ifdef PDML_WITH_CUDA
  info += ",cuda:" + cuda_arch_list();
#endif
  return info;
}

TORCH_LIBRARY(pdml, m) {
  m.def("build_info() -> str", &build_info);
}

}  // namespace pdml
