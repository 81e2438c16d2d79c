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

// Schemas of the ops; their CPU/CUDA bodies are in patch_ops.cpp, their fake impls and
// autograd in pdml/backends/ext.py. `float` is a C++ double; `groups` is the number of
// groups of negatives (docs/ops.md): in the map form it must divide B (B = one group per
// image, negatives="image"; 1 = all B·N rows one group, negatives="batch"); in the rows
// form it must divide R and the groups are consecutive blocks of R/groups rows.
// The forward of PatchNCE also returns the per-row logsumexp its backward needs (with the
// loss itself, from which the backward takes the positive's weight exactly); the
// forward of PatchMetric, with compute_grad, also returns ∂L/∂q̂ and ∂L/∂k̂ (rows [B·N, C],
// computed in the same sweep), which its backward scales and scatters (the rows form's
// backward is that scale alone, done in Python).
TORCH_LIBRARY(pdml, m) {
  m.def("build_info() -> str", &build_info);
  m.def("patch_nce(Tensor fq, Tensor fk, Tensor ids, float tau, int groups) -> (Tensor, Tensor)");
  m.def("patch_nce_backward(Tensor grad_loss, Tensor fq, Tensor fk, Tensor ids, Tensor loss, Tensor lse, "
        "float tau, int groups) -> Tensor");
  // CPU only: the forward that also returns ∂loss_r/∂q_r, the gradient w.r.t. the gathered
  // row before the normaliser (unit upstream gradient per row, [B·N, C] acc), from the same
  // sweep; its backward scales the rows and scatters them into a zero map.
  m.def("patch_nce_with_grad(Tensor fq, Tensor fk, Tensor ids, float tau, int groups) -> (Tensor, Tensor, Tensor)");
  m.def("patch_nce_with_grad_backward(Tensor grad_loss, Tensor d_rows, Tensor fq, Tensor ids) -> Tensor");
  m.def("patch_metric(Tensor fq, Tensor fk, Tensor ids, float tau, int groups, bool compute_grad) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("patch_metric_backward(Tensor grad, Tensor d_q, Tensor d_k, Tensor fq, Tensor fk, Tensor ids) "
        "-> (Tensor, Tensor)");
  m.def("patch_similarity(Tensor fq, Tensor fk, Tensor ids) -> Tensor");
  m.def("patch_similarity_backward(Tensor grad, Tensor fq, Tensor fk, Tensor ids) -> (Tensor, Tensor)");
  m.def("patch_nce_rows(Tensor feat_q, Tensor feat_k, float tau, int groups) -> (Tensor, Tensor)");
  // CPU only: the forward that also returns ∂loss_i/∂feat_q_i (unit upstream gradient per
  // row, [R, C] acc) from the same sweep; its backward is a row scale.
  m.def("patch_nce_rows_with_grad(Tensor feat_q, Tensor feat_k, float tau, int groups) -> (Tensor, Tensor, Tensor)");
  m.def("patch_nce_rows_backward(Tensor grad_loss, Tensor feat_q, Tensor feat_k, Tensor loss, Tensor lse, "
        "float tau, int groups) -> Tensor");
  m.def("patch_metric_rows(Tensor feat_q, Tensor feat_k, float tau, int groups, bool compute_grad) "
        "-> (Tensor, Tensor, Tensor)");
  // Sampled-first heads (bodies in gather_project_ops.cpp): the first linear layer of a
  // row MLP fused with the gather of the rows fmap[b, :, ids[i]] -> [B*N, D].
  m.def("gather_project(Tensor fmap, Tensor ids, Tensor weight, Tensor? bias) -> Tensor");
  m.def("gather_project_backward(Tensor grad, Tensor fmap, Tensor ids, Tensor weight, bool bias_grad) "
        "-> (Tensor grad_fmap, Tensor grad_weight, Tensor grad_bias)");
}

}  // namespace pdml
