// Launch interface between the host code (ops.cpp: checks, allocation, guards; needs ATen) and
// the kernels (*.cu: CUDA headers only, so nvcc never parses ATen — it keeps the build short).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace opd {

enum class DType : int { kFloat = 0, kHalf = 1, kBFloat16 = 2 };
enum Kind : int { kLogprob = 0, kForwardKL = 1, kReverseKL = 2, kJSD = 3 };

// One model's logit transform with the temperature folded in (opd_kernels.backends'
// transform_consts): a = post * tanh(pre * x) when cap (-inf stays -inf), else a = post * x;
// pre = scale / softcap, post = softcap * inv_temp (capped) or scale * inv_temp.
struct Transform {
  float pre, post;
  bool cap;
};

// One [N, V] logits operand: rows at ptr + i * stride (elements), last dim contiguous.
// ptr == nullptr means "not given". vec: rows may be read with 16-byte vector loads.
struct Logits {
  const void* ptr;
  int64_t stride;
  DType dtype;
  bool vec;
};

// Kernels are launched asynchronously on `stream`; the caller checks cudaGetLastError().
// ts, tt, tr: the student's, teacher's and reference's transforms (inv_temp folded in).
void launch_row_stats(Logits s, Logits t, Logits r, const int64_t* targets, float* out, int64_t N,
                      int64_t V, Transform ts, Transform tt, Transform tr, float lam,
                      int64_t vocab_start, cudaStream_t stream);
void launch_jsd_sums(Logits s, Logits t, const float* AB, float* out, int64_t N, int64_t V,
                     Transform ts, Transform tt, float beta, cudaStream_t stream);
// `out` has s's dtype; out.ptr may equal s.ptr (in place).
void launch_grad_logits(int kind, Logits out, Logits s, Logits t, Logits r, const int64_t* targets,
                        const float* rs, const float* g, int64_t N, int64_t V, Transform ts,
                        Transform tt, Transform tr, float lam, float beta, int64_t vocab_start,
                        bool with_entropy, cudaStream_t stream);

}  // namespace opd
