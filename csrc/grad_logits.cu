// Backward: d(loss)/d(student logits), recomputed chunk by chunk from per-row statistics
// rs = (A, B, C, H) and upstream coefficients g = (g_main, g_ent). Stores nothing [N, V] but the
// gradient itself, which may overwrite the student logits (out.ptr == s.ptr).
#include "grad_logits.cuh"

namespace opd {
namespace {

template <typename TS, typename TT, int KIND>
__global__ void __launch_bounds__(kMaxThreads)
grad_logits_kernel(Logits out, Logits s, Logits t, Logits r, const int64_t* __restrict__ targets,
                   const float* __restrict__ rs, const float* __restrict__ g, int64_t V,
                   Transform ts, Transform tt, Transform tr, float lam, float beta, float log_beta,
                   float log_1m_beta, int64_t vocab_start, bool with_entropy) {
  const int64_t row = blockIdx.x;
  const RowConsts k = row_consts(KIND, r, targets, rs, g, row, ts, tt, tr, lam, beta, log_beta,
                                 log_1m_beta, vocab_start, with_entropy);
  grad_logits_thread<TS, TT, KIND>(out, s, t, r, k, row, threadIdx.x, blockDim.x, V);
}

template <int KIND>
void launch_kind(Logits out, Logits s, Logits t, Logits r, const int64_t* targets, const float* rs,
                 const float* g, int64_t N, int64_t V, Transform ts, Transform tt, Transform tr,
                 float lam, float beta, int64_t vocab_start, bool with_entropy,
                 cudaStream_t stream) {
  // beta only matters for JSD (0 < beta < 1 there); keep its logs finite otherwise.
  const double bb = KIND == kJSD ? double(beta) : 0.5;
  const float log_beta = static_cast<float>(std::log(bb));
  const float log_1m_beta = static_cast<float>(std::log1p(-bb));
  dispatch_float(s.dtype, [&](auto s_tag) {
    using TS = decltype(s_tag);
    auto run = [&](auto t_tag) {
      using TT = decltype(t_tag);
      const int threads = threads_for(V, chunk_elems<TS, TT>());
      grad_logits_kernel<TS, TT, KIND><<<static_cast<unsigned>(N), threads, 0, stream>>>(
          out, s, t, r, targets, rs, g, V, ts, tt, tr, lam, float(bb), log_beta, log_1m_beta,
          vocab_start, with_entropy);
    };
    if constexpr (KIND == kLogprob) {
      run(TS{});  // logprob reads no teacher: one instantiation per student dtype
    } else {
      dispatch_float(t.dtype, run);
    }
  });
}

}  // namespace

void launch_grad_logits(int kind, Logits out, Logits s, Logits t, Logits r, const int64_t* targets,
                        const float* rs, const float* g, int64_t N, int64_t V, Transform ts,
                        Transform tt, Transform tr, float lam, float beta, int64_t vocab_start,
                        bool with_entropy, cudaStream_t stream) {
  switch (kind) {
    case kLogprob:
      return launch_kind<kLogprob>(out, s, t, r, targets, rs, g, N, V, ts, tt, tr, lam, beta,
                                   vocab_start, with_entropy, stream);
    case kForwardKL:
      return launch_kind<kForwardKL>(out, s, t, r, targets, rs, g, N, V, ts, tt, tr, lam, beta,
                                     vocab_start, with_entropy, stream);
    case kReverseKL:
      return launch_kind<kReverseKL>(out, s, t, r, targets, rs, g, N, V, ts, tt, tr, lam, beta,
                                     vocab_start, with_entropy, stream);
    default:
      return launch_kind<kJSD>(out, s, t, r, targets, rs, g, N, V, ts, tt, tr, lam, beta,
                               vocab_start, with_entropy, stream);
  }
}

}  // namespace opd
