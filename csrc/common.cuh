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

// e^(m_old - m_new) for m_new >= m_old, 1 when they are equal (both -inf included).
OPD_HD float shift(float m_old, float m_new) {
  return m_old == m_new ? 1.f : fast_exp(m_old - m_new);
}

// Weight e^(x - m) of one term: exactly 0 for x = -inf (also when m = -inf).
OPD_HD float weight(float x, float m) { return x == kNegInf ? 0.f : fast_exp(x - m); }

// Scaled target logit b = t/tau, or the G-OPD target lam*t/tau + (1-lam)*r/tau (the torch
// backend's order of operations).
OPD_HD float target_logit(float t, float r, bool has_r, float inv_temp, float lam) {
  const float bt = t * inv_temp;
  if (!has_r) return bt;
  // a token banned (-inf) by the teacher or the reference is banned in the target
  if (bt == kNegInf || r == kNegInf) return kNegInf;
  return lam * bt + (1.f - lam) * (r * inv_temp);
}

// log(e^x + e^y) with -inf handled: logaddexp(-inf, -inf) = -inf.
OPD_HD float logaddexp(float x, float y) {
  const float mx = fmaxf(x, y), mn = fminf(x, y);
  return mx == kNegInf ? kNegInf : mx + log1pf(fast_exp(mn - mx));
}

// Running (max, sum e^(x - max), two weighted sums) of one softmax; merges like the recurrence.
struct Online {
  float m, S, X, Y;
  OPD_HD void init() { m = kNegInf, S = 0.f, X = 0.f, Y = 0.f; }
  OPD_HD void merge(float m2, float S2, float X2, float Y2) {
    const float mn = fmaxf(m, m2), f1 = shift(m, mn), f2 = shift(m2, mn);
    S = S * f1 + S2 * f2;
    X = rescale(X, f1) + rescale(X2, f2);
    Y = rescale(Y, f1) + rescale(Y2, f2);
    m = mn;
  }
  // Move the running max up to m_new (>= m) before adding terms weighted by e^(x - m_new).
  OPD_HD void raise_max(float m_new) {
    if (m_new > m) {
      const float f = fast_exp(m - m_new);
      S *= f, X = rescale(X, f), Y = rescale(Y, f), m = m_new;
    }
  }
};

// ---------------------------------------------------------------- block reductions

__device__ __forceinline__ void warp_merge(Online& o) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, o.m, off);
    const float S2 = __shfl_xor_sync(0xffffffffu, o.S, off);
    const float X2 = __shfl_xor_sync(0xffffffffu, o.X, off);
    const float Y2 = __shfl_xor_sync(0xffffffffu, o.Y, off);
    o.merge(m2, S2, X2, Y2);
  }
}

// Merges every thread's Online state; the result is valid in thread 0. blockDim.x % 32 == 0.
__device__ __forceinline__ Online block_merge(Online o) {
  __shared__ Online part[kMaxThreads / 32];
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
