// Shared device helpers for the opd_kernels._C CUDA kernels.
//
// Every kernel here walks one row (one token position) per thread block over the vocabulary in
// "chunks" of E consecutive elements per thread: E = 16 bytes / the smaller element size of the
// tensors read together, so each tensor is read with whole 16-byte vector loads (1 or 2 per
// chunk) when its rows are 16-byte aligned, and element by element otherwise. The V % E tail is
// done one element per thread. All math is fp32; indices and offsets are int64.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "kernels.h"

// Device code that is also compiled for the host, so csrc/emulate/ can run the kernels' per-thread
// arithmetic on the CPU (the block reductions and launches are GPU-only).
#define OPD_HD __host__ __device__ __forceinline__

namespace opd {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int kMaxThreads = 512;

// ---------------------------------------------------------------- loads and stores

// e^x: the fast SFU approximation on the GPU (as --use_fast_math would pick), libm on the host.
OPD_HD float fast_exp(float x) {
#ifdef __CUDA_ARCH__
  return __expf(x);
#else
  return std::exp(x);
#endif
}

// Explicit conversions (torch builds with __CUDA_NO_HALF_CONVERSIONS__ and friends).
OPD_HD float to_float(float x) { return x; }
OPD_HD float to_float(__half x) { return __half2float(x); }
OPD_HD float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T>
OPD_HD T from_float(float x);
template <>
OPD_HD float from_float<float>(float x) { return x; }
template <>
OPD_HD __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
OPD_HD __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// Elements per chunk when reading a TS tensor and a TT tensor side by side.
template <typename TS, typename TT>
constexpr int chunk_elems() {
  return 16 / (sizeof(TS) < sizeof(TT) ? sizeof(TS) : sizeof(TT));
}

// x[0..E) = float(p[0..E)); `vec` says p is 16-byte aligned (E * sizeof(T) is a multiple of 16).
template <typename T, int E>
OPD_HD void load_chunk(const T* p, bool vec, float (&x)[E]) {
  static_assert((E * sizeof(T)) % 16 == 0, "a chunk must be whole 16-byte vectors");
  constexpr int PER = 16 / sizeof(T);
  if (vec) {
#pragma unroll
    for (int k = 0; k < E / PER; ++k) {
      const Vec<T, PER> u = *reinterpret_cast<const Vec<T, PER>*>(p + k * PER);
#pragma unroll
      for (int j = 0; j < PER; ++j) x[k * PER + j] = to_float(u.v[j]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < E; ++j) x[j] = to_float(p[j]);
  }
}

template <typename T, int E>
OPD_HD void store_chunk(T* p, bool vec, const float (&x)[E]) {
  static_assert((E * sizeof(T)) % 16 == 0, "a chunk must be whole 16-byte vectors");
  constexpr int PER = 16 / sizeof(T);
  if (vec) {
#pragma unroll
    for (int k = 0; k < E / PER; ++k) {
      Vec<T, PER> u;
#pragma unroll
      for (int j = 0; j < PER; ++j) u.v[j] = from_float<T>(x[k * PER + j]);
      *reinterpret_cast<Vec<T, PER>*>(p + k * PER) = u;
    }
  } else {
#pragma unroll
    for (int j = 0; j < E; ++j) p[j] = from_float<T>(x[j]);
  }
}

// ---------------------------------------------------------------- online softmax pieces

// x * f, where a factor that underflowed to 0 drops the term (so +inf * 0 never makes NaN).
OPD_HD float rescale(float x, float f) { return f == 0.f ? 0.f : x * f; }

// m_old - m_new for a running max that moved up to m_new: 0 when it did not move (both -inf
// included), -inf when m_old = -inf < m_new.
OPD_HD float gap(float m_old, float m_new) { return m_old == m_new ? 0.f : m_old - m_new; }

// e^d, the factor that takes sums relative to m_old to m_new (d = gap): exactly 1 for d = 0.
OPD_HD float factor(float d) { return d == 0.f ? 1.f : fast_exp(d); }

// d * S, 0 for an empty sum (S = 0, where d may be -inf); NaN in S propagates.
OPD_HD float times(float d, float S) { return S == 0.f ? 0.f : d * S; }

// The origin that terms are taken relative to (x - origin(m)): the running max m, or 0 while m is
// -inf (the row has seen only -inf), so that a -inf logit always gives -inf, never NaN.
OPD_HD float origin(float m) { return m == kNegInf ? 0.f : m; }

// Weight e^(x - m) of a term from its relative logit x - m: exactly 0 for -inf.
OPD_HD float weight(float rel) { return rel == kNegInf ? 0.f : fast_exp(rel); }

// tanh(x) = 1 - 2 / (e^(2x) + 1), with x clamped to [-15, 15] (tanh(15) rounds to 1 in fp32), so
// e^(2x) and the division stay in range; NaN stays NaN. Not tanhf: under --use_fast_math (setup.py)
// nvcc turns tanhf into tanh.approx.f32 (relative error ~2^-11, 0.015 on a logit capped at 30);
// this form is off by ~1e-7 in absolute terms with the fast exp and division.
OPD_HD float tanh_f(float x) {
  const float u = x > 15.f ? 15.f : (x < -15.f ? -15.f : x);
  return 1.f - 2.f / (fast_exp(2.f * u) + 1.f);
}

// A model's transformed scaled logit a = T(x) / tau (kernels.h: Transform): post * x, or
// post * tanh(pre * x) under a softcap, where a banned token (-inf) stays banned (-inf, not -cap).
// `k.cap` is the same for every thread of a launch (a uniform branch).
OPD_HD float transform(const Transform& k, float x) {
  if (!k.cap) return x * k.post;
  return x == kNegInf ? kNegInf : k.post * tanh_f(k.pre * x);
}

// `transform` and its derivative da/dx (one tanh): post, or pre * post * (1 - tanh^2(pre * x))
// under a softcap (0 at -inf, where tanh = -1).
OPD_HD float transform_slope(const Transform& k, float x, float& slope) {
  if (!k.cap) {
    slope = k.post;
    return x * k.post;
  }
  const float th = tanh_f(k.pre * x);
  slope = k.pre * k.post * (1.f - th * th);
  return x == kNegInf ? kNegInf : k.post * th;
}

// The G-OPD target lam * bt + (1 - lam) * br from transformed scaled logits bt = T_t(t)/tau,
// br = T_r(r)/tau (the torch backend's order of operations); bt itself without a reference.
OPD_HD float target_logit(float bt, float br, bool has_r, float lam) {
  if (!has_r) return bt;
  // a token banned (-inf) by the teacher or the reference is banned in the target
  if (bt == kNegInf || br == kNegInf) return kNegInf;
  return lam * bt + (1.f - lam) * br;
}

// log(e^x + e^y) with -inf handled: logaddexp(-inf, -inf) = -inf.
OPD_HD float logaddexp(float x, float y) {
  const float mx = fmaxf(x, y), mn = fminf(x, y);
  return mx == kNegInf ? kNegInf : mx + log1pf(fast_exp(mn - mx));
}

// Running statistics of one row (the row_stats contract columns): the student's max m_a and
// sums S_a = sum e^(a-m_a), U_a = sum e^(a-m_a) (a-m_a), D_q = sum e^(a-m_a) ((a-m_a) - (b-m_b)),
// and the target's m_b, S_b = sum e^(b-m_b), D_p = sum e^(b-m_b) ((b-m_b) - (a-m_a)). The sums
// are relative to the maxima, so D_q depends on m_b and D_p on m_a. (Without a target the
// m_b/S_b/D_q/D_p fields hold no meaning and are never written out.)
struct RowState {
  float ma, Sa, Ua, Dq, mb, Sb, Dp;
  OPD_HD void init() { ma = mb = kNegInf, Sa = Ua = Dq = Sb = Dp = 0.f; }
  // Re-express the sums relative to new maxima Ma >= ma, Mb >= mb: with d = m - M, f = e^d,
  //   S_a *= f_a, U_a = f_a (U_a + d_a S_a), D_q = f_a (D_q + (d_a - d_b) S_a),
  //   S_b *= f_b,                             D_p = f_b (D_p + (d_b - d_a) S_b).
  // A factor that underflowed to 0 drops a sum even when it is +inf.
  OPD_HD void move_to(float Ma, float Mb) {
    const float da = gap(ma, Ma), db = gap(mb, Mb), fa = factor(da), fb = factor(db);
    Ua = rescale(Ua + times(da, Sa), fa);
    Dq = rescale(Dq + times(da - db, Sa), fa);
    Dp = rescale(Dp + times(db - da, Sb), fb);
    Sa *= fa, Sb *= fb, ma = Ma, mb = Mb;
  }
  // Combine with another part of the row (both rebased onto the common maxima, then added).
  OPD_HD void merge(RowState o) {
    const float Ma = fmaxf(ma, o.ma), Mb = fmaxf(mb, o.mb);
    move_to(Ma, Mb);
    o.move_to(Ma, Mb);
    Sa += o.Sa, Ua += o.Ua, Dq += o.Dq, Sb += o.Sb, Dp += o.Dp;
  }
};

// ---------------------------------------------------------------- block reductions

__device__ __forceinline__ void warp_merge(RowState& o) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    RowState p;
    p.ma = __shfl_xor_sync(0xffffffffu, o.ma, off);
    p.Sa = __shfl_xor_sync(0xffffffffu, o.Sa, off);
    p.Ua = __shfl_xor_sync(0xffffffffu, o.Ua, off);
    p.Dq = __shfl_xor_sync(0xffffffffu, o.Dq, off);
    p.mb = __shfl_xor_sync(0xffffffffu, o.mb, off);
    p.Sb = __shfl_xor_sync(0xffffffffu, o.Sb, off);
    p.Dp = __shfl_xor_sync(0xffffffffu, o.Dp, off);
    o.merge(p);
  }
}

// Merges every thread's RowState; the result is valid in thread 0. blockDim.x % 32 == 0.
__device__ __forceinline__ RowState block_merge(RowState o) {
  __shared__ RowState part[kMaxThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  warp_merge(o);
  __syncthreads();  // `part` may be reused by a previous call in the same kernel
  if (lane == 0) part[warp] = o;
  __syncthreads();
  if (warp == 0) {
    if (lane < nwarps) {
      o = part[lane];
    } else {
      o.init();
    }
    warp_merge(o);
  }
  return o;
}

template <int K>
__device__ __forceinline__ void block_sum(float (&x)[K]) {
  __shared__ float part[K][kMaxThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
#pragma unroll
  for (int k = 0; k < K; ++k)
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) x[k] += __shfl_xor_sync(0xffffffffu, x[k], off);
  __syncthreads();
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) part[k][warp] = x[k];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      x[k] = lane < nwarps ? part[k][lane] : 0.f;
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) x[k] += __shfl_xor_sync(0xffffffffu, x[k], off);
    }
  }
}

// ---------------------------------------------------------------- host helpers

// Threads per row: enough for ~4 chunks per thread, a multiple of 32, at most kMaxThreads.
inline int threads_for(int64_t V, int E) {
  const int64_t chunks = (V + E - 1) / E;
  int t = 32;
  while (t < kMaxThreads && int64_t(t) * 4 < chunks) t <<= 1;
  return t;
}

// Calls f(T{}) with T the element type of `dt` (float, __half or __nv_bfloat16).
template <typename F>
void dispatch_float(DType dt, F&& f) {
  switch (dt) {
    case DType::kHalf: f(__half{}); break;
    case DType::kBFloat16: f(__nv_bfloat16{}); break;
    default: f(float{}); break;
  }
}

template <typename T>
OPD_HD const T* row_ptr(const Logits& x, int64_t row) {
  return x.ptr == nullptr ? nullptr : static_cast<const T*>(x.ptr) + row * x.stride;
}

}  // namespace opd
