// Backward: d(loss)/d(student logits) recomputed tile by tile from per-row statistics
// rs = (A, B, C, H) and upstream coefficients g = (g_main, g_ent). Never stores anything [N, V]
// besides the gradient itself, which may be written over the student logits (out == s).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "common.cuh"
#include "ops.h"

namespace opd {
namespace {

enum Kind : int { kLogprob = 0, kForwardKL = 1, kReverseKL = 2, kJSD = 3 };

struct RowConsts {
  float A, B, C, H, g_main, g_ent, inv_temp, lam, beta, log_beta, log_1m_beta;
  int64_t y;  // target column in this shard (may be out of [0, V))
  bool has_r, main, ent;
};

// inv_temp * (g_main * d(main)/da + g_ent * dH/da) for one vocabulary column. `s`, `t`, `r` are
// raw logits; terms with q == 0 (and p == 0 where p is the weight) give 0.
template <int KIND>
__device__ __forceinline__ float grad_elem(float s, float t, float r, int64_t col,
                                           const RowConsts& k) {
  const float a = s * k.inv_temp;
  const float log_q = a - k.A, q = __expf(log_q);
  float d = 0.f;
  if (k.main) {
    float dm;
    if (KIND == kLogprob) {
      dm = (col == k.y ? 1.f : 0.f) - q;
    } else {
      const float bt = t * k.inv_temp;
      const float b = k.has_r ? k.lam * bt + (1.f - k.lam) * (r * k.inv_temp) : bt;
      const float log_p = b - k.B;
      if (KIND == kForwardKL) {
        dm = q - __expf(log_p);
      } else if (KIND == kReverseKL) {
        dm = q > 0.f ? q * (log_q - log_p - k.C) : 0.f;
      } else {
        const float log_m = logaddexp(log_p + k.log_beta, log_q + k.log_1m_beta);
        dm = q > 0.f ? (1.f - k.beta) * q * (log_q - log_m - k.C) : 0.f;
      }
    }
    d = k.g_main * dm;
  }
  if (k.ent && q > 0.f) d += k.g_ent * (-q * (log_q + k.H));
  return d * k.inv_temp;
}

// `s` and `out` may alias (in-place gradient), so neither is __restrict__; each thread reads a
// chunk of s before it writes the same chunk of out.
template <typename TS, typename TT, typename TO, int KIND>
__global__ void grad_logits_kernel(TO* out, int64_t o_stride, bool o_vec, const TS* s,
                                   int64_t s_stride, bool s_vec, const TT* __restrict__ t,
                                   int64_t t_stride, bool t_vec, const TT* __restrict__ r,
                                   int64_t r_stride, bool r_vec,
                                   const int64_t* __restrict__ targets,
                                   const float* __restrict__ rs, const float* __restrict__ g,
                                   int64_t V, float inv_temp, float lam, float beta,
                                   float log_beta, float log_1m_beta, int64_t vocab_start,
                                   bool with_entropy) {
  constexpr int E = chunk_elems<TS, TT>();
  const int64_t row = blockIdx.x;
  RowConsts k;
  k.A = rs[row * 4], k.B = rs[row * 4 + 1], k.C = rs[row * 4 + 2], k.H = rs[row * 4 + 3];
  k.g_main = g[row * 2], k.g_ent = g[row * 2 + 1];
  k.inv_temp = inv_temp, k.lam = lam, k.beta = beta, k.log_beta = log_beta;
  k.log_1m_beta = log_1m_beta;
  k.y = KIND == kLogprob ? targets[row] - vocab_start : -1;
  k.has_r = r != nullptr;
  // A zero coefficient drops its term (masked rows get exact zeros even where a term is inf).
  k.main = k.g_main != 0.f;
  k.ent = with_entropy && k.g_ent != 0.f;

  const TS* srow = s + row * s_stride;
  const TT* trow = KIND == kLogprob ? nullptr : t + row * t_stride;
  const TT* rrow = k.has_r ? r + row * r_stride : nullptr;
  TO* orow = out + row * o_stride;

  const int64_t nchunks = V / E;
  for (int64_t c = threadIdx.x; c < nchunks; c += blockDim.x) {
    float a[E], b[E], x[E];
    load_chunk<TS, E>(srow + c * E, s_vec, a);
    if (KIND != kLogprob) {
      load_chunk<TT, E>(trow + c * E, t_vec, b);
      if (k.has_r) load_chunk<TT, E>(rrow + c * E, r_vec, x);
    }
#pragma unroll
    for (int j = 0; j < E; ++j) {
      a[j] = grad_elem<KIND>(a[j], KIND == kLogprob ? 0.f : b[j], k.has_r ? x[j] : 0.f, c * E + j, k);
    }
    store_chunk<TO, E>(orow + c * E, o_vec, a);
  }
  for (int64_t col = nchunks * E + threadIdx.x; col < V; col += blockDim.x) {
    const float tv = KIND == kLogprob ? 0.f : static_cast<float>(trow[col]);
    const float rv = k.has_r ? static_cast<float>(rrow[col]) : 0.f;
    orow[col] = static_cast<TO>(grad_elem<KIND>(static_cast<float>(srow[col]), tv, rv, col, k));
  }
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

template <int KIND>
void launch(at::Tensor& out, const at::Tensor& s, const at::Tensor& t, const at::Tensor& r,
            const at::Tensor& targets, const at::Tensor& rs, const at::Tensor& g, double inv_temp,
            double lam, double beta, int64_t vocab_start, bool with_entropy) {
  const int64_t N = s.size(0), V = s.size(1);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const bool has_t = KIND != kLogprob, has_r = r.defined();
  // beta is only used by JSD (0 < beta < 1 there); keep the logs finite otherwise.
  const double bb = KIND == kJSD ? beta : 0.5;
  const auto t_type = has_t ? t.scalar_type() : s.scalar_type();
  dispatch_float(s.scalar_type(), "s", [&](auto s_tag) {
    using TS = decltype(s_tag);
    dispatch_float(t_type, "t", [&](auto t_tag) {
      using TT = decltype(t_tag);
      const int threads = threads_for(V, chunk_elems<TS, TT>());
      // The gradient is written in s's dtype (out must have it), so TO = TS.
      grad_logits_kernel<TS, TT, TS, KIND><<<N, threads, 0, stream>>>(
          out.data_ptr<TS>(), out.stride(0), vec_ok(out), s.data_ptr<TS>(), s.stride(0), vec_ok(s),
          has_t ? t.data_ptr<TT>() : nullptr, has_t ? t.stride(0) : 0, vec_ok(t),
          has_r ? r.data_ptr<TT>() : nullptr, has_r ? r.stride(0) : 0, vec_ok(r),
          targets.defined() ? targets.data_ptr<int64_t>() : nullptr, rs.data_ptr<float>(),
          g.data_ptr<float>(), V, static_cast<float>(inv_temp), static_cast<float>(lam),
          static_cast<float>(bb), static_cast<float>(std::log(bb)),
          static_cast<float>(std::log1p(-bb)), vocab_start, with_entropy);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace

void grad_logits_out(at::Tensor& out, const at::Tensor& s, const std::optional<at::Tensor>& t_opt,
                     const std::optional<at::Tensor>& r_opt,
                     const std::optional<at::Tensor>& targets_opt, const at::Tensor& rs_in,
                     const at::Tensor& g_in, const std::string& kind, double inv_temp, double lam,
                     double beta, int64_t vocab_start, bool with_entropy) {
  const int k = kind_id(kind);
  check_logits(s, "s");
  check_like(out, "out", s);
  TORCH_CHECK(out.scalar_type() == s.scalar_type(), "opd_kernels_C.grad_logits: out must have s's "
              "dtype ", s.scalar_type(), ", got ", out.scalar_type());
  const at::Tensor rs = check_rows(rs_in, "rs", s, 4);
  const at::Tensor g = check_rows(g_in, "g", s, 2);
  at::Tensor t, r, targets;
  if (k != kLogprob) {  // logprob ignores t and r
    TORCH_CHECK(t_opt.has_value() && t_opt->defined(), "opd_kernels_C.grad_logits: kind '", kind,
                "' needs teacher logits t");
    t = *t_opt;
    check_like(t, "t", s);
    if (r_opt.has_value() && r_opt->defined()) {
      r = *r_opt;
      check_like(r, "r", s);
      TORCH_CHECK(r.scalar_type() == t.scalar_type(), "opd_kernels_C.grad_logits: r must have t's "
                  "dtype ", t.scalar_type(), ", got ", r.scalar_type());
    }
  } else {
    TORCH_CHECK(targets_opt.has_value() && targets_opt->defined(),
                "opd_kernels_C.grad_logits: kind 'logprob' needs targets");
    targets = check_targets(*targets_opt, s);
  }
  if (k == kJSD) {
    TORCH_CHECK(beta > 0.0 && beta < 1.0, "opd_kernels_C.grad_logits: jsd needs beta in (0, 1), got ",
                beta);
  }
  if (s.size(0) == 0 || s.size(1) == 0) return;

  const c10::cuda::CUDAGuard guard(s.device());
  switch (k) {
    case kLogprob: launch<kLogprob>(out, s, t, r, targets, rs, g, inv_temp, lam, beta, vocab_start, with_entropy); break;
    case kForwardKL: launch<kForwardKL>(out, s, t, r, targets, rs, g, inv_temp, lam, beta, vocab_start, with_entropy); break;
    case kReverseKL: launch<kReverseKL>(out, s, t, r, targets, rs, g, inv_temp, lam, beta, vocab_start, with_entropy); break;
    default: launch<kJSD>(out, s, t, r, targets, rs, g, inv_temp, lam, beta, vocab_start, with_entropy); break;
  }
}

at::Tensor grad_logits(const at::Tensor& s, const std::optional<at::Tensor>& t,
                       const std::optional<at::Tensor>& r, const std::optional<at::Tensor>& targets,
                       const at::Tensor& rs, const at::Tensor& g, const std::string& kind,
                       double inv_temp, double lam, double beta, int64_t vocab_start,
                       bool with_entropy) {
  check_logits(s, "s");
  at::Tensor out = at::empty_like(s, at::MemoryFormat::Contiguous);
  grad_logits_out(out, s, t, r, targets, rs, g, kind, inv_temp, lam, beta, vocab_start,
                  with_entropy);
  return out;
}

}  // namespace opd
