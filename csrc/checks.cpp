// Input checks shared by the launchers: every tensor argument is validated before a launch.
#include "ops.h"

#include <cstdint>
#include <limits>

namespace opd {

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
              " has more rows than one grid can hold: ", x.size(0));
}

// Another [N, V] logits tensor on s's device with s's shape.
void check_like(const at::Tensor& x, const char* name, const at::Tensor& s) {
  check_logits(x, name);
  TORCH_CHECK(x.device() == s.device(), "opd_kernels_C: ", name, " is on ", x.device(),
              " but s is on ", s.device());
  TORCH_CHECK(x.sizes() == s.sizes(), "opd_kernels_C: ", name, " must have s's shape ", s.sizes(),
              ", got ", x.sizes());
}

// int64 [N] target ids on s's device (returned contiguous).
at::Tensor check_targets(const at::Tensor& targets, const at::Tensor& s) {
  TORCH_CHECK(targets.device() == s.device(), "opd_kernels_C: targets is on ", targets.device(),
              " but s is on ", s.device());
  TORCH_CHECK(targets.scalar_type() == at::kLong, "opd_kernels_C: targets must be int64, got ",
              targets.scalar_type());
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == s.size(0),
              "opd_kernels_C: targets must have shape [", s.size(0), "], got ", targets.sizes());
  return targets.contiguous();
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

}  // namespace opd
