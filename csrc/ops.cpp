// Host side of the ops: validate every input, allocate outputs, pick the device and stream, and
// call the launchers of kernels.h. Only this file and bindings.cpp see ATen.
#include "ops.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "kernels.h"

namespace opd {
namespace {

DType dtype_of(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kHalf: return DType::kHalf;
    case at::kBFloat16: return DType::kBFloat16;
    default: return DType::kFloat;
  }
}

// Rows of x can be read with 16-byte vector loads: aligned base and row stride.
bool vec_ok(const at::Tensor& x) {
  const auto addr = reinterpret_cast<std::uintptr_t>(x.data_ptr());
  return addr % 16 == 0 && (x.stride(0) * x.element_size()) % 16 == 0;
}

Logits view(const at::Tensor& x) {
  if (!x.defined()) return Logits{nullptr, 0, DType::kFloat, false};
  return Logits{x.data_ptr(), x.stride(0), dtype_of(x), vec_ok(x)};
}

// A [N, V] logits tensor on a CUDA device, float32/float16/bfloat16, last dim contiguous.
void check_logits(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.is_cuda(), "opd_kernels_C: ", name, " must be a CUDA tensor, got device ", x.device());
  TORCH_CHECK(x.dim() == 2, "opd_kernels_C: ", name, " must be 2-D [N, V], got shape ", x.sizes());
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, "opd_kernels_C: ", name,
              " must be float32, float16 or bfloat16, got ", st);
  TORCH_CHECK(x.stride(1) == 1 || x.size(1) <= 1, "opd_kernels_C: ", name,
              " must have a contiguous last dim, got strides ", x.strides());
  TORCH_CHECK(x.stride(0) >= 0, "opd_kernels_C: ", name, " must have a non-negative row stride");
  TORCH_CHECK(x.size(0) <= std::numeric_limits<int32_t>::max(), "opd_kernels_C: ", name,
              " has more rows than one grid holds: ", x.size(0));
}

// Another [N, V] logits tensor with s's device and shape.
void check_like(const at::Tensor& x, const char* name, const at::Tensor& s) {
  check_logits(x, name);
  TORCH_CHECK(x.device() == s.device(), "opd_kernels_C: ", name, " is on ", x.device(),
              " but s is on ", s.device());
  TORCH_CHECK(x.sizes() == s.sizes(), "opd_kernels_C: ", name, " must have s's shape ", s.sizes(),
              ", got ", x.sizes());
}

// Optional teacher t and reference r (r needs t and t's dtype); undefined tensors when absent.
void check_teacher(const std::optional<at::Tensor>& t_opt, const std::optional<at::Tensor>& r_opt,
                   const at::Tensor& s, at::Tensor& t, at::Tensor& r) {
  if (t_opt.has_value() && t_opt->defined()) {
    t = *t_opt;
    check_like(t, "t", s);
  }
  if (r_opt.has_value() && r_opt->defined()) {
    TORCH_CHECK(t.defined(), "opd_kernels_C: r (reference logits) requires t");
    r = *r_opt;
    check_like(r, "r", s);
    TORCH_CHECK(r.scalar_type() == t.scalar_type(), "opd_kernels_C: r must have t's dtype ",
                t.scalar_type(), ", got ", r.scalar_type());
  }
}

// int64 [N] target ids on s's device (returned contiguous); undefined when absent.
at::Tensor check_targets(const std::optional<at::Tensor>& targets, const at::Tensor& s) {
  if (!targets.has_value() || !targets->defined()) return at::Tensor();
  const at::Tensor& y = *targets;
  TORCH_CHECK(y.device() == s.device(), "opd_kernels_C: targets is on ", y.device(),
              " but s is on ", s.device());
  TORCH_CHECK(y.scalar_type() == at::kLong, "opd_kernels_C: targets must be int64, got ",
              y.scalar_type());
  TORCH_CHECK(y.dim() == 1 && y.size(0) == s.size(0), "opd_kernels_C: targets must have shape [",
              s.size(0), "], got ", y.sizes());
  return y.contiguous();
}

// float32 [N, cols] per-row values on s's device (returned contiguous).
at::Tensor check_rows(const at::Tensor& x, const char* name, const at::Tensor& s, int64_t cols) {
  TORCH_CHECK(x.device() == s.device(), "opd_kernels_C: ", name, " is on ", x.device(),
              " but s is on ", s.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat, "opd_kernels_C: ", name, " must be float32, got ",
              x.scalar_type());
  TORCH_CHECK(x.dim() == 2 && x.size(0) == s.size(0) && x.size(1) == cols, "opd_kernels_C: ", name,
              " must have shape [", s.size(0), ", ", cols, "], got ", x.sizes());
  return x.contiguous();
}

const int64_t* ptr_or_null(const at::Tensor& y) {
  return y.defined() ? y.data_ptr<int64_t>() : nullptr;
}

// A model's logit transform (logit scale, then softcap; opd_kernels.backends) with the
// temperature folded in, as the kernels apply it (kernels.h: Transform).
Transform make_transform(double inv_temp, double scale, double cap, const char* model) {
  TORCH_CHECK(std::isfinite(scale) && scale > 0.0, "opd_kernels_C: ", model,
              "_scale (the logit scale) must be finite and > 0, got ", scale);
  TORCH_CHECK(std::isfinite(cap) && cap >= 0.0, "opd_kernels_C: ", model,
              "_cap (the softcap) must be finite and >= 0 (0 = no cap), got ", cap);
  if (cap > 0.0) {
    return Transform{static_cast<float>(scale / cap), static_cast<float>(cap * inv_temp), true};
  }
  return Transform{0.f, static_cast<float>(scale * inv_temp), false};
}

int kind_id(const std::string& kind) {
  if (kind == "logprob") return kLogprob;
  if (kind == "forward_kl") return kForwardKL;
  if (kind == "reverse_kl") return kReverseKL;
  if (kind == "jsd") return kJSD;
  TORCH_CHECK(false, "opd_kernels_C.grad_logits: kind must be one of logprob, forward_kl, "
              "reverse_kl, jsd; got '", kind, "'");
  return -1;
}

}  // namespace

at::Tensor row_stats(const at::Tensor& s, const std::optional<at::Tensor>& t_opt,
                     const std::optional<at::Tensor>& r_opt,
                     const std::optional<at::Tensor>& targets_opt, double inv_temp, double lam,
                     int64_t vocab_start, double s_scale, double s_cap, double t_scale,
                     double t_cap, double r_scale, double r_cap) {
  check_logits(s, "s");
  const Transform ts = make_transform(inv_temp, s_scale, s_cap, "s");
  const Transform tt = make_transform(inv_temp, t_scale, t_cap, "t");
  const Transform tr = make_transform(inv_temp, r_scale, r_cap, "r");
  at::Tensor t, r;
  check_teacher(t_opt, r_opt, s, t, r);
  const at::Tensor targets = check_targets(targets_opt, s);

  const c10::cuda::CUDAGuard guard(s.device());
  const int64_t N = s.size(0), V = s.size(1);
  at::Tensor out = at::empty({N, 8}, s.options().dtype(at::kFloat));
  if (N == 0) return out;
  launch_row_stats(view(s), view(t), view(r), ptr_or_null(targets), out.data_ptr<float>(), N, V,
                   ts, tt, tr, static_cast<float>(lam), vocab_start,
                   c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor jsd_sums(const at::Tensor& s, const at::Tensor& t, const at::Tensor& AB_in,
                    double inv_temp, double beta, double s_scale, double s_cap, double t_scale,
                    double t_cap) {
  check_logits(s, "s");
  const Transform ts = make_transform(inv_temp, s_scale, s_cap, "s");
  const Transform tt = make_transform(inv_temp, t_scale, t_cap, "t");
  check_like(t, "t", s);
  const at::Tensor AB = check_rows(AB_in, "AB", s, 2);
  TORCH_CHECK(beta > 0.0 && beta < 1.0, "opd_kernels_C.jsd_sums: beta must be in (0, 1), got ", beta);

  const c10::cuda::CUDAGuard guard(s.device());
  const int64_t N = s.size(0), V = s.size(1);
  at::Tensor out = at::empty({N, 2}, s.options().dtype(at::kFloat));
  if (N == 0) return out;
  launch_jsd_sums(view(s), view(t), AB.data_ptr<float>(), out.data_ptr<float>(), N, V, ts, tt,
                  static_cast<float>(beta), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

void grad_logits_out(at::Tensor& out, const at::Tensor& s, const std::optional<at::Tensor>& t_opt,
                     const std::optional<at::Tensor>& r_opt,
                     const std::optional<at::Tensor>& targets_opt, const at::Tensor& rs_in,
                     const at::Tensor& g_in, const std::string& kind, double inv_temp, double lam,
                     double beta, int64_t vocab_start, bool with_entropy, double s_scale,
                     double s_cap, double t_scale, double t_cap, double r_scale, double r_cap) {
  const int k = kind_id(kind);
  const Transform ts = make_transform(inv_temp, s_scale, s_cap, "s");
  const Transform tt = make_transform(inv_temp, t_scale, t_cap, "t");
  const Transform tr = make_transform(inv_temp, r_scale, r_cap, "r");
  check_logits(s, "s");
  check_like(out, "out", s);
  TORCH_CHECK(out.scalar_type() == s.scalar_type(), "opd_kernels_C.grad_logits: out must have s's "
              "dtype ", s.scalar_type(), ", got ", out.scalar_type());
  const at::Tensor rs = check_rows(rs_in, "rs", s, 4);
  const at::Tensor g = check_rows(g_in, "g", s, 2);
  at::Tensor t, r, targets;
  if (k == kLogprob) {  // reads s and targets only
    targets = check_targets(targets_opt, s);
    TORCH_CHECK(targets.defined(), "opd_kernels_C.grad_logits: kind 'logprob' needs targets");
  } else {
    check_teacher(t_opt, r_opt, s, t, r);
    TORCH_CHECK(t.defined(), "opd_kernels_C.grad_logits: kind '", kind, "' needs teacher logits t");
  }
  if (k == kJSD) {
    TORCH_CHECK(beta > 0.0 && beta < 1.0, "opd_kernels_C.grad_logits: jsd needs beta in (0, 1), "
                "got ", beta);
  }
  // Partial overlap of out with an input other than s itself would race.
  TORCH_CHECK(!t.defined() || t.data_ptr() != out.data_ptr(), "opd_kernels_C.grad_logits: out must "
              "not alias t");
  TORCH_CHECK(!r.defined() || r.data_ptr() != out.data_ptr(), "opd_kernels_C.grad_logits: out must "
              "not alias r");

  const c10::cuda::CUDAGuard guard(s.device());
  const int64_t N = s.size(0), V = s.size(1);
  if (N == 0 || V == 0) return;
  launch_grad_logits(k, view(out), view(s), view(t), view(r), ptr_or_null(targets),
                     rs.data_ptr<float>(), g.data_ptr<float>(), N, V, ts, tt, tr,
                     static_cast<float>(lam), static_cast<float>(beta), vocab_start, with_entropy,
                     c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor grad_logits(const at::Tensor& s, const std::optional<at::Tensor>& t,
                       const std::optional<at::Tensor>& r, const std::optional<at::Tensor>& targets,
                       const at::Tensor& rs, const at::Tensor& g, const std::string& kind,
                       double inv_temp, double lam, double beta, int64_t vocab_start,
                       bool with_entropy, double s_scale, double s_cap, double t_scale,
                       double t_cap, double r_scale, double r_cap) {
  check_logits(s, "s");
  at::Tensor out = at::empty_like(s, at::MemoryFormat::Contiguous);
  grad_logits_out(out, s, t, r, targets, rs, g, kind, inv_temp, lam, beta, vocab_start,
                  with_entropy, s_scale, s_cap, t_scale, t_cap, r_scale, r_cap);
  return out;
}

}  // namespace opd
