// Registers the CUDA kernels as torch.ops.opd_kernels_C.* (schemas + CUDA impls, so they work
// under torch.compile once opd_kernels.backends.cuda_backend registers their fake impls) and
// exposes a small pybind11 module opd_kernels._C (importing it loads the library).
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include "ops.h"

#define TF2 "float s_scale=1.0, float s_cap=0.0, float t_scale=1.0, float t_cap=0.0"
#define TF3 TF2 ", float r_scale=1.0, float r_cap=0.0"

TORCH_LIBRARY(opd_kernels_C, m) {
  // x_scale, x_cap: the logit transform of model x (s, t, r); the defaults are the identity.
  m.def("row_stats(Tensor s, Tensor? t, Tensor? r, Tensor? targets, float inv_temp, float lam, "
        "int vocab_start, " TF3 ") -> Tensor");
  m.def("jsd_sums(Tensor s, Tensor t, Tensor AB, float inv_temp, float beta, " TF2 ") -> Tensor");
  m.def("grad_logits(Tensor s, Tensor? t, Tensor? r, Tensor? targets, Tensor rs, Tensor g, "
        "str kind, float inv_temp, float lam, float beta, int vocab_start, bool with_entropy, "
        TF3 ") -> Tensor");
  m.def("grad_logits_out(Tensor(a!) out, Tensor s, Tensor? t, Tensor? r, Tensor? targets, "
        "Tensor rs, Tensor g, str kind, float inv_temp, float lam, float beta, int vocab_start, "
        "bool with_entropy, " TF3 ") -> ()");
}

TORCH_LIBRARY_IMPL(opd_kernels_C, CUDA, m) {
  m.impl("row_stats", &opd::row_stats);
  m.impl("jsd_sums", &opd::jsd_sums);
  m.impl("grad_logits", &opd::grad_logits);
  m.impl("grad_logits_out", &opd::grad_logits_out);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "opd_kernels CUDA extension; the kernels are torch.ops.opd_kernels_C.*";
  m.attr("OPS") = pybind11::make_tuple("row_stats", "jsd_sums", "grad_logits", "grad_logits_out");
#ifdef OPD_CUDA_ARCHS_STR
  m.attr("CUDA_ARCHS") = OPD_CUDA_ARCHS_STR;
#endif
}
