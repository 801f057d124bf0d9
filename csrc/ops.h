// Host entry points of opd_kernels._C (CUDA implementations of the backend contract in
// opd_kernels/backends/__init__.py). Registered as torch.ops.opd_kernels_C.* in bindings.cpp.
#pragma once

#include <ATen/core/Tensor.h>
#include <optional>

#include <string>

namespace opd {

// [N, 8] float32: (m_a, S_a, U_a, m_b, S_b, D_q, D_p, a_y) per row over the local vocabulary.
// U_a, D_q, D_p use the logits relative to the maxima (opd_kernels/backends/__init__.py).
at::Tensor row_stats(const at::Tensor& s, const std::optional<at::Tensor>& t,
                     const std::optional<at::Tensor>& r, const std::optional<at::Tensor>& targets,
                     double inv_temp, double lam, int64_t vocab_start);

// [N, 2] float32: (sum p (log p - log M), sum q (log q - log M)), M = beta p + (1 - beta) q.
at::Tensor jsd_sums(const at::Tensor& s, const at::Tensor& t, const at::Tensor& AB, double inv_temp,
                    double beta);

// d(sum_i g_main_i * main_i + g_ent_i * H_i)/ds written into `out` ([N, V], any float dtype).
void grad_logits_out(at::Tensor& out, const at::Tensor& s, const std::optional<at::Tensor>& t,
                     const std::optional<at::Tensor>& r, const std::optional<at::Tensor>& targets,
                     const at::Tensor& rs, const at::Tensor& g, const std::string& kind,
                     double inv_temp, double lam, double beta, int64_t vocab_start, bool with_entropy);

// As grad_logits_out into a new tensor shaped and typed like s.
at::Tensor grad_logits(const at::Tensor& s, const std::optional<at::Tensor>& t,
                       const std::optional<at::Tensor>& r, const std::optional<at::Tensor>& targets,
                       const at::Tensor& rs, const at::Tensor& g, const std::string& kind,
                       double inv_temp, double lam, double beta, int64_t vocab_start,
                       bool with_entropy);

}  // namespace opd
