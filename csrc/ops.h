// Host entry points of opd_kernels._C (CUDA implementations of the backend contract in
// opd_kernels/backends/__init__.py). Registered as torch.ops.opd_kernels_C.* in bindings.cpp.
#pragma once

#include <ATen/core/Tensor.h>
#include <optional>

#include <string>

namespace opd {

// Every op takes each model's logit transform (x_scale, x_cap) for x = s, t, r: x -> cap *
// tanh(scale * x / cap) (cap > 0) or scale * x, before the temperature; -inf stays -inf. The
// identity is (1, 0); scale must be finite and > 0, cap finite and >= 0 (TORCH_CHECK).

// [N, 8] float32: (m_a, S_a, U_a, m_b, S_b, D_q, D_p, a_y) per row over the local vocabulary.
// U_a, D_q, D_p use the logits relative to the maxima (opd_kernels/backends/__init__.py).
at::Tensor row_stats(const at::Tensor& s, const std::optional<at::Tensor>& t,
                     const std::optional<at::Tensor>& r, const std::optional<at::Tensor>& targets,
                     double inv_temp, double lam, int64_t vocab_start, double s_scale, double s_cap,
                     double t_scale, double t_cap, double r_scale, double r_cap);

// [N, 2] float32: (sum p (log p - log M), sum q (log q - log M)), M = beta p + (1 - beta) q.
at::Tensor jsd_sums(const at::Tensor& s, const at::Tensor& t, const at::Tensor& AB, double inv_temp,
                    double beta, double s_scale, double s_cap, double t_scale, double t_cap);

// d(sum_i g_main_i * main_i + g_ent_i * H_i)/ds written into `out` ([N, V], any float dtype).
void grad_logits_out(at::Tensor& out, const at::Tensor& s, const std::optional<at::Tensor>& t,
                     const std::optional<at::Tensor>& r, const std::optional<at::Tensor>& targets,
                     const at::Tensor& rs, const at::Tensor& g, const std::string& kind,
                     double inv_temp, double lam, double beta, int64_t vocab_start, bool with_entropy,
                     double s_scale, double s_cap, double t_scale, double t_cap, double r_scale,
                     double r_cap);

// As grad_logits_out into a new tensor shaped and typed like s.
at::Tensor grad_logits(const at::Tensor& s, const std::optional<at::Tensor>& t,
                       const std::optional<at::Tensor>& r, const std::optional<at::Tensor>& targets,
                       const at::Tensor& rs, const at::Tensor& g, const std::string& kind,
                       double inv_temp, double lam, double beta, int64_t vocab_start,
                       bool with_entropy, double s_scale, double s_cap, double t_scale,
                       double t_cap, double r_scale, double r_cap);

}  // namespace opd
