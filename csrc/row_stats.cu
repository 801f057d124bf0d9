// Forward statistics: row_stats (one streaming pass with the online max/rescale recurrence) and
// jsd_sums (JSD's second pass, given the global log-normalizers). One thread block per row.
#include "common.cuh"

namespace opd {
namespace {

// Scaled target logit b = t/tau, or the G-OPD target lam*t/tau + (1-lam)*r/tau (the torch
// backend's order of operations).
__device__ __forceinline__ float target_logit(float t, float r, bool has_r, float inv_temp,
                                              float lam) {
  const float bt = t * inv_temp;
  return has_r ? lam * bt + (1.f - lam) * (r * inv_temp) : bt;
}

// Adds n terms to the student state qa = (m_a, S_a, U_a, D_q) and the teacher state
// pb = (m_b, S_b, D_p, unused). Zero-weight terms (-inf logits) are skipped: 0 * inf never occurs.
template <int n>
__device__ __forceinline__ void add_terms(Online& qa, Online& pb, const float (&a)[n],
                                          const float (&b)[n], bool has_t) {
  float ma = qa.m;
#pragma unroll
  for (int j = 0; j < n; ++j) ma = fmaxf(ma, a[j]);
  qa.raise_max(ma);
#pragma unroll
  for (int j = 0; j < n; ++j) {
    const float w = weight(a[j], qa.m);
    qa.S += w;
    if (w > 0.f) {
      qa.X += w * a[j];
      if (has_t) qa.Y += w * (a[j] - b[j]);
    }
  }
  if (!has_t) return;
  float mb = pb.m;
#pragma unroll
  for (int j = 0; j < n; ++j) mb = fmaxf(mb, b[j]);
  pb.raise_max(mb);
#pragma unroll
  for (int j = 0; j < n; ++j) {
    const float w = weight(b[j], pb.m);
    pb.S += w;
    if (w > 0.f) pb.X += w * (b[j] - a[j]);
  }
}

// out[row] = (m_a, S_a, U_a, m_b, S_b, D_q, D_p, a_y); columns 3..6 are 0 without a teacher.
template <typename TS, typename TT>
__global__ void __launch_bounds__(kMaxThreads)
row_stats_kernel(Logits s, Logits t, Logits r, const int64_t* __restrict__ targets,
                 float* __restrict__ out, int64_t V, float inv_temp, float lam,
                 int64_t vocab_start) {
  constexpr int E = chunk_elems<TS, TT>();
  const int64_t row = blockIdx.x;
  const bool has_t = t.ptr != nullptr, has_r = r.ptr != nullptr;
  const TS* srow = row_ptr<TS>(s, row);
  const TT* trow = row_ptr<TT>(t, row);
  const TT* rrow = row_ptr<TT>(r, row);

  Online qa, pb;
  qa.init();
  pb.init();
  const int64_t nchunks = V / E;
  for (int64_t c = threadIdx.x; c < nchunks; c += blockDim.x) {
    float a[E], b[E], x[E];
    load_chunk<TS, E>(srow + c * E, s.vec, a);
#pragma unroll
    for (int j = 0; j < E; ++j) a[j] *= inv_temp;
    if (has_t) {
      load_chunk<TT, E>(trow + c * E, t.vec, b);
      if (has_r) load_chunk<TT, E>(rrow + c * E, r.vec, x);
#pragma unroll
      for (int j = 0; j < E; ++j) b[j] = target_logit(b[j], has_r ? x[j] : 0.f, has_r, inv_temp, lam);
    }
    add_terms<E>(qa, pb, a, b, has_t);
  }
  for (int64_t col = nchunks * E + threadIdx.x; col < V; col += blockDim.x) {  // V % E tail
    float a[1] = {to_float(srow[col]) * inv_temp}, b[1] = {0.f};
    if (has_t) {
      b[0] = target_logit(to_float(trow[col]), has_r ? to_float(rrow[col]) : 0.f, has_r, inv_temp,
                          lam);
    }
    add_terms<1>(qa, pb, a, b, has_t);
  }

  qa = block_merge(qa);
  if (has_t) pb = block_merge(pb);  // has_t is uniform over the block
  if (threadIdx.x == 0) {
    float* o = out + row * 8;
    o[0] = qa.m, o[1] = qa.S, o[2] = qa.X;
    o[3] = has_t ? pb.m : 0.f, o[4] = has_t ? pb.S : 0.f;
    o[5] = has_t ? qa.Y : 0.f, o[6] = has_t ? pb.X : 0.f;
    float a_y = 0.f;
    if (targets != nullptr) {
      const int64_t y = targets[row] - vocab_start;
      if (y >= 0 && y < V) a_y = to_float(srow[y]) * inv_temp;
    }
    o[7] = a_y;
  }
}

// out[row] = (sum p (log p - log M), sum q (log q - log M)), M = beta p + (1 - beta) q,
// log M by logaddexp; terms with p == 0 (resp. q == 0) are skipped.
template <typename TS, typename TT>
__global__ void __launch_bounds__(kMaxThreads)
jsd_sums_kernel(Logits s, Logits t, const float* __restrict__ AB, float* __restrict__ out,
                int64_t V, float inv_temp, float log_beta, float log_1m_beta) {
  constexpr int E = chunk_elems<TS, TT>();
  const int64_t row = blockIdx.x;
  const TS* srow = row_ptr<TS>(s, row);
  const TT* trow = row_ptr<TT>(t, row);
  const float A = AB[row * 2], B = AB[row * 2 + 1];

  float acc[2] = {0.f, 0.f};
  auto add = [&](float sv, float tv) {
    const float log_q = sv * inv_temp - A, log_p = tv * inv_temp - B;
    const float log_m = logaddexp(log_p + log_beta, log_q + log_1m_beta);
    const float p = __expf(log_p), q = __expf(log_q);
    if (p > 0.f) acc[0] += p * (log_p - log_m);
    if (q > 0.f) acc[1] += q * (log_q - log_m);
  };
  const int64_t nchunks = V / E;
  for (int64_t c = threadIdx.x; c < nchunks; c += blockDim.x) {
    float a[E], b[E];
    load_chunk<TS, E>(srow + c * E, s.vec, a);
    load_chunk<TT, E>(trow + c * E, t.vec, b);
#pragma unroll
    for (int j = 0; j < E; ++j) add(a[j], b[j]);
  }
  for (int64_t col = nchunks * E + threadIdx.x; col < V; col += blockDim.x) {
    add(to_float(srow[col]), to_float(trow[col]));
  }
  block_sum<2>(acc);
  if (threadIdx.x == 0) out[row * 2] = acc[0], out[row * 2 + 1] = acc[1];
}

}  // namespace

void launch_row_stats(Logits s, Logits t, Logits r, const int64_t* targets, float* out, int64_t N,
                      int64_t V, float inv_temp, float lam, int64_t vocab_start,
                      cudaStream_t stream) {
  // Without a teacher TT = TS (t unused), so the instantiations stay the 3 x 3 dtype pairs.
  const DType t_type = t.ptr != nullptr ? t.dtype : s.dtype;
  dispatch_float(s.dtype, [&](auto s_tag) {
    using TS = decltype(s_tag);
    dispatch_float(t_type, [&](auto t_tag) {
      using TT = decltype(t_tag);
      const int threads = threads_for(V, chunk_elems<TS, TT>());
      row_stats_kernel<TS, TT><<<static_cast<unsigned>(N), threads, 0, stream>>>(
          s, t, r, targets, out, V, inv_temp, lam, vocab_start);
    });
  });
}

void launch_jsd_sums(Logits s, Logits t, const float* AB, float* out, int64_t N, int64_t V,
                     float inv_temp, float beta, cudaStream_t stream) {
  const float log_beta = static_cast<float>(std::log(double(beta)));
  const float log_1m_beta = static_cast<float>(std::log1p(-double(beta)));
  dispatch_float(s.dtype, [&](auto s_tag) {
    using TS = decltype(s_tag);
    dispatch_float(t.dtype, [&](auto t_tag) {
      using TT = decltype(t_tag);
      const int threads = threads_for(V, chunk_elems<TS, TT>());
      jsd_sums_kernel<TS, TT><<<static_cast<unsigned>(N), threads, 0, stream>>>(
          s, t, AB, out, V, inv_temp, log_beta, log_1m_beta);
    });
  });
}

}  // namespace opd
