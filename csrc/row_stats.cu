// Forward statistics: row_stats (one streaming pass with the online max/rescale recurrence) and
// jsd_sums (JSD's second pass, given the global log-normalizers). One thread block per row.
#include "row_stats.cuh"

namespace opd {
namespace {

template <typename TS, typename TT>
__global__ void __launch_bounds__(kMaxThreads)
row_stats_kernel(Logits s, Logits t, Logits r, const int64_t* __restrict__ targets,
                 float* __restrict__ out, int64_t V, Transform ts, Transform tt, Transform tr,
                 float lam, int64_t vocab_start) {
  const int64_t row = blockIdx.x;
  const bool has_t = t.ptr != nullptr;
  RowState st;
  row_stats_thread<TS, TT>(s, t, r, row, threadIdx.x, blockDim.x, V, ts, tt, tr, lam, st);
  st = block_merge(st);
  if (threadIdx.x == 0) {
    row_stats_write<TS>(s, has_t, targets, out, row, V, ts, vocab_start, st);
  }
}

template <typename TS, typename TT>
__global__ void __launch_bounds__(kMaxThreads)
jsd_sums_kernel(Logits s, Logits t, const float* __restrict__ AB, float* __restrict__ out,
                int64_t V, Transform ts, Transform tt, float log_beta, float log_1m_beta) {
  const int64_t row = blockIdx.x;
  float acc[2];
  jsd_sums_thread<TS, TT>(s, t, AB, row, threadIdx.x, blockDim.x, V, ts, tt, log_beta,
                          log_1m_beta, acc);
  block_sum<2>(acc);
  if (threadIdx.x == 0) out[row * 2] = acc[0], out[row * 2 + 1] = acc[1];
}

}  // namespace

void launch_row_stats(Logits s, Logits t, Logits r, const int64_t* targets, float* out, int64_t N,
                      int64_t V, Transform ts, Transform tt, Transform tr, float lam,
                      int64_t vocab_start, cudaStream_t stream) {
  // Without a teacher TT = TS (t unused), so the instantiations stay the 3 x 3 dtype pairs.
  const DType t_type = t.ptr != nullptr ? t.dtype : s.dtype;
  dispatch_float(s.dtype, [&](auto s_tag) {
    using TS = decltype(s_tag);
    dispatch_float(t_type, [&](auto t_tag) {
      using TT = decltype(t_tag);
      const int threads = threads_for(V, chunk_elems<TS, TT>());
      row_stats_kernel<TS, TT><<<static_cast<unsigned>(N), threads, 0, stream>>>(
          s, t, r, targets, out, V, ts, tt, tr, lam, vocab_start);
    });
  });
}

void launch_jsd_sums(Logits s, Logits t, const float* AB, float* out, int64_t N, int64_t V,
                     Transform ts, Transform tt, float beta, cudaStream_t stream) {
  const float log_beta = static_cast<float>(std::log(double(beta)));
  const float log_1m_beta = static_cast<float>(std::log1p(-double(beta)));
  dispatch_float(s.dtype, [&](auto s_tag) {
    using TS = decltype(s_tag);
    dispatch_float(t.dtype, [&](auto t_tag) {
      using TT = decltype(t_tag);
      const int threads = threads_for(V, chunk_elems<TS, TT>());
      jsd_sums_kernel<TS, TT><<<static_cast<unsigned>(N), threads, 0, stream>>>(
          s, t, AB, out, V, ts, tt, log_beta, log_1m_beta);
    });
  });
}

}  // namespace opd
