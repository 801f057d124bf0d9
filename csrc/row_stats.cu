// Forward statistics: row_stats (one streaming pass, online max/rescale) and jsd_sums (the
// second pass of JSD, given the global log-normalizers). One thread block per row.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "common.cuh"
#include "ops.h"

namespace opd {
namespace {

// Scaled target logits b = t/tau, or the G-OPD target lam*t/tau + (1-lam)*r/tau (same order of
// operations as the torch backend).
__device__ __forceinline__ float target_logit(float t, float r, bool has_r, float inv_temp,
                                              float lam) {
  const float bt = t * inv_temp;
  return has_r ? lam * bt + (1.f - lam) * (r * inv_temp) : bt;
}

// Adds n terms to the student state qa = (m_a, S_a, U_a, D_q) and teacher state pb =
// (m_b, S_b, D_p, -). Zero-weight terms (-inf logits) are skipped, so 0 * inf never appears.
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

template <typename TS, typename TT>
__global__ void row_stats_kernel(const TS* __restrict__ s, int64_t s_stride, bool s_vec,
                                 const TT* __restrict__ t, int64_t t_stride, bool t_vec,
                                 const TT* __restrict__ r, int64_t r_stride, bool r_vec,
                                 const int64_t* __restrict__ targets, float* __restrict__ out,
                                 int64_t V, float inv_temp, float lam, int64_t vocab_start) {
  constexpr int E = chunk_elems<TS, TT>();
  const int64_t row = blockIdx.x;
  const bool has_t = t != nullptr, has_r = r != nullptr;
  const TS* srow = s + row * s_stride;
  const TT* trow = has_t ? t + row * t_stride : nullptr;
  const TT* rrow = has_r ? r + row * r_stride : nullptr;

  Online qa, pb;
  qa.init();
  pb.init();
  const int64_t nchunks = V / E;
  for (int64_t c = threadIdx.x; c < nchunks; c += blockDim.x) {
    float a[E], b[E], x[E];
    load_chunk<TS, E>(srow + c * E, s_vec, a);
#pragma unroll
    for (int j = 0; j < E; ++j) a[j] *= inv_temp;
    if (has_t) {
      load_chunk<TT, E>(trow + c * E, t_vec, b);
      if (has_r) load_chunk<TT, E>(rrow + c * E, r_vec, x);
#pragma unroll
      for (int j = 0; j < E; ++j) b[j] = target_logit(b[j], has_r ? x[j] : 0.f, has_r, inv_temp, lam);
    }
    add_terms<E>(qa, pb, a, b, has_t);
  }
  for (int64_t col = nchunks * E + threadIdx.x; col < V; col += blockDim.x) {
    float a[1] = {static_cast<float>(srow[col]) * inv_temp}, b[1] = {0.f};
    if (has_t) {
      b[0] = target_logit(static_cast<float>(trow[col]), has_r ? static_cast<float>(rrow[col]) : 0.f,
                          has_r, inv_temp, lam);
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
      if (y >= 0 && y < V) a_y = static_cast<float>(srow[y]) * inv_temp;
    }
    o[7] = a_y;
  }
}

template <typename TS, typename TT>
__global__ void jsd_sums_kernel(const TS* __restrict__ s, int64_t s_stride, bool s_vec,
                                const TT* __restrict__ t, int64_t t_stride, bool t_vec,
                                const float* __restrict__ AB, float* __restrict__ out, int64_t V,
                                float inv_temp, float log_beta, float log_1m_beta) {
  constexpr int E = chunk_elems<TS, TT>();
  const int64_t row = blockIdx.x;
  const TS* srow = s + row * s_stride;
  const TT* trow = t + row * t_stride;
  const float A = AB[row * 2], B = AB[row * 2 + 1];

  // acc[0] = sum p (log p - log M), acc[1] = sum q (log q - log M); zero-weight terms skipped.
  float acc[2] = {0.f, 0.f};
  auto add = [&](float a, float b) {
    const float log_q = a * inv_temp - A, log_p = b * inv_temp - B;
    const float log_m = logaddexp(log_p + log_beta, log_q + log_1m_beta);
    const float p = __expf(log_p), q = __expf(log_q);
    if (p > 0.f) acc[0] += p * (log_p - log_m);
    if (q > 0.f) acc[1] += q * (log_q - log_m);
  };
  const int64_t nchunks = V / E;
  for (int64_t c = threadIdx.x; c < nchunks; c += blockDim.x) {
    float a[E], b[E];
    load_chunk<TS, E>(srow + c * E, s_vec, a);
    load_chunk<TT, E>(trow + c * E, t_vec, b);
#pragma unroll
    for (int j = 0; j < E; ++j) add(a[j], b[j]);
  }
  for (int64_t col = nchunks * E + threadIdx.x; col < V; col += blockDim.x) {
    add(static_cast<float>(srow[col]), static_cast<float>(trow[col]));
  }
  block_sum<2>(acc);
  if (threadIdx.x == 0) out[row * 2] = acc[0], out[row * 2 + 1] = acc[1];
}

}  // namespace

at::Tensor row_stats(const at::Tensor& s, const std::optional<at::Tensor>& t_opt,
                     const std::optional<at::Tensor>& r_opt,
                     const std::optional<at::Tensor>& targets_opt, double inv_temp, double lam,
                     int64_t vocab_start) {
  check_logits(s, "s");
  const bool has_t = t_opt.has_value() && t_opt->defined();
  const bool has_r = r_opt.has_value() && r_opt->defined();
  TORCH_CHECK(!has_r || has_t, "opd_kernels_C.row_stats: r (reference logits) requires t");
  at::Tensor t, r, targets;
  if (has_t) {
    t = *t_opt;
    check_like(t, "t", s);
  }
  if (has_r) {
    r = *r_opt;
    check_like(r, "r", s);
    TORCH_CHECK(r.scalar_type() == t.scalar_type(), "opd_kernels_C.row_stats: r must have t's dtype ",
                t.scalar_type(), ", got ", r.scalar_type());
  }
  if (targets_opt.has_value() && targets_opt->defined()) targets = check_targets(*targets_opt, s);

  const c10::cuda::CUDAGuard guard(s.device());
  const int64_t N = s.size(0), V = s.size(1);
  auto out = at::empty({N, 8}, s.options().dtype(at::kFloat));
  if (N == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  // Without a teacher, TT = TS (t is unused), which keeps the instantiations to the 3x3 pairs.
  const auto t_type = has_t ? t.scalar_type() : s.scalar_type();
  dispatch_float(s.scalar_type(), "s", [&](auto s_tag) {
    using TS = decltype(s_tag);
    dispatch_float(t_type, "t", [&](auto t_tag) {
      using TT = decltype(t_tag);
      const int threads = threads_for(V, chunk_elems<TS, TT>());
      row_stats_kernel<TS, TT><<<N, threads, 0, stream>>>(
          s.data_ptr<TS>(), s.stride(0), vec_ok(s),
          has_t ? t.data_ptr<TT>() : nullptr, has_t ? t.stride(0) : 0, vec_ok(t),
          has_r ? r.data_ptr<TT>() : nullptr, has_r ? r.stride(0) : 0, vec_ok(r),
          targets.defined() ? targets.data_ptr<int64_t>() : nullptr, out.data_ptr<float>(), V,
          static_cast<float>(inv_temp), static_cast<float>(lam), vocab_start);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

at::Tensor jsd_sums(const at::Tensor& s, const at::Tensor& t, const at::Tensor& AB_in,
                    double inv_temp, double beta) {
  check_logits(s, "s");
  check_like(t, "t", s);
  const at::Tensor AB = check_rows(AB_in, "AB", s, 2);
  TORCH_CHECK(beta > 0.0 && beta < 1.0, "opd_kernels_C.jsd_sums: beta must be in (0, 1), got ", beta);

  const c10::cuda::CUDAGuard guard(s.device());
  const int64_t N = s.size(0), V = s.size(1);
  auto out = at::empty({N, 2}, s.options().dtype(at::kFloat));
  if (N == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float(s.scalar_type(), "s", [&](auto s_tag) {
    using TS = decltype(s_tag);
    dispatch_float(t.scalar_type(), "t", [&](auto t_tag) {
      using TT = decltype(t_tag);
      const int threads = threads_for(V, chunk_elems<TS, TT>());
      jsd_sums_kernel<TS, TT><<<N, threads, 0, stream>>>(
          s.data_ptr<TS>(), s.stride(0), vec_ok(s), t.data_ptr<TT>(), t.stride(0), vec_ok(t),
          AB.data_ptr<float>(), out.data_ptr<float>(), V, static_cast<float>(inv_temp),
          static_cast<float>(std::log(beta)), static_cast<float>(std::log1p(-beta)));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

}  // namespace opd
