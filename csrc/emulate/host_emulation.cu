// Test-only: runs the kernels' per-thread code (row_stats.cuh, grad_logits.cuh) on the CPU, so
// CI without a GPU still executes the real chunking, vector/scalar loads, tails, -inf handling
// and formulas. A row's "threads" run one after another; their states are then merged in the
// GPU's order (block_merge: an xor butterfly within each warp of 32, then one over the warps'
// results), so the merge arithmetic and its rounding match the device (the warp shuffles and
// shared memory themselves, and the launch configuration, are NOT exercised).
//
// Not part of the extension (setup.py compiles csrc/*.cu only). Built by tests/test_cuda.py:
//   nvcc -std=c++17 -O2 -shared -Xcompiler -fPIC --expt-relaxed-constexpr \
//        -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ host_emulation.cu
// and called through ctypes on CPU tensors' data pointers.
#include <cstdint>

#include "../grad_logits.cuh"
#include "../row_stats.cuh"

namespace {

using namespace opd;

Logits view(const void* ptr, int64_t stride, int dtype) {
  if (ptr == nullptr) return Logits{nullptr, 0, DType::kFloat, false};
  const int64_t size = dtype == 0 ? 4 : 2;
  const bool vec = reinterpret_cast<std::uintptr_t>(ptr) % 16 == 0 && (stride * size) % 16 == 0;
  return Logits{ptr, stride, static_cast<DType>(dtype), vec};
}

// A model's transform as ops.cpp builds it (tf = {scale, cap}; checked by the Python caller).
Transform make_transform(float inv_temp, const float* tf) {
  const double scale = tf == nullptr ? 1.0 : tf[0], cap = tf == nullptr ? 0.0 : tf[1];
  if (cap > 0.0) return Transform{float(scale / cap), float(cap * double(inv_temp)), true};
  return Transform{0.f, float(scale * double(inv_temp)), false};
}

// The three transforms of tf = {s_scale, s_cap, t_scale, t_cap, r_scale, r_cap} (nullptr: identity).
struct Transforms {
  Transform s, t, r;
  Transforms(float inv_temp, const float* tf, int n)
      : s(make_transform(inv_temp, tf)),
        t(make_transform(inv_temp, tf == nullptr || n < 2 ? nullptr : tf + 2)),
        r(make_transform(inv_temp, tf == nullptr || n < 3 ? nullptr : tf + 4)) {}
};

// block_merge's result (thread 0's) for the per-thread states st[0..n), n % 32 == 0, n <= 512.
RowState block_merge_order(RowState* st, int n) {
  auto butterfly = [](RowState* v) {  // warp_merge: lane i merges lane i ^ off into itself
    for (int off = 16; off > 0; off >>= 1) {
      RowState next[32];
      for (int i = 0; i < 32; ++i) {
        next[i] = v[i];
        next[i].merge(v[i ^ off]);
      }
      for (int i = 0; i < 32; ++i) v[i] = next[i];
    }
  };
  RowState warp0[32];
  for (int w = 0; w < 32; ++w) {
    if (w < n / 32) {
      butterfly(st + 32 * w);
      warp0[w] = st[32 * w];
    } else {
      warp0[w].init();
    }
  }
  butterfly(warp0);
  return warp0[0];
}

template <typename TS, typename TT>
void row_stats_rows(Logits s, Logits t, Logits r, const int64_t* targets, float* out, int64_t N,
                    int64_t V, const Transforms& tf, float lam, int64_t vocab_start) {
  const int nthreads = threads_for(V, chunk_elems<TS, TT>());
  for (int64_t row = 0; row < N; ++row) {
    RowState st[kMaxThreads];
    for (int tid = 0; tid < nthreads; ++tid) {
      row_stats_thread<TS, TT>(s, t, r, row, tid, nthreads, V, tf.s, tf.t, tf.r, lam, st[tid]);
    }
    row_stats_write<TS>(s, t.ptr != nullptr, targets, out, row, V, tf.s, vocab_start,
                        block_merge_order(st, nthreads));
  }
}

template <typename TS, typename TT>
void jsd_sums_rows(Logits s, Logits t, const float* AB, float* out, int64_t N, int64_t V,
                   const Transforms& tf, float beta) {
  const int nthreads = threads_for(V, chunk_elems<TS, TT>());
  const float lb = static_cast<float>(std::log(double(beta)));
  const float l1b = static_cast<float>(std::log1p(-double(beta)));
  for (int64_t row = 0; row < N; ++row) {
    float sum[2] = {0.f, 0.f}, acc[2];
    for (int tid = 0; tid < nthreads; ++tid) {
      jsd_sums_thread<TS, TT>(s, t, AB, row, tid, nthreads, V, tf.s, tf.t, lb, l1b, acc);
      sum[0] += acc[0], sum[1] += acc[1];
    }
    out[row * 2] = sum[0], out[row * 2 + 1] = sum[1];
  }
}

template <typename TS, typename TT, int KIND>
void grad_rows(Logits out, Logits s, Logits t, Logits r, const int64_t* targets, const float* rs,
               const float* g, int64_t N, int64_t V, const Transforms& tf, float lam, float beta,
               int64_t vocab_start, bool with_entropy) {
  const double bb = KIND == kJSD ? double(beta) : 0.5;
  const int nthreads = threads_for(V, chunk_elems<TS, TT>());
  for (int64_t row = 0; row < N; ++row) {
    const RowConsts k = row_consts(KIND, r, targets, rs, g, row, tf.s, tf.t, tf.r, lam, float(bb),
                                   float(std::log(bb)), float(std::log1p(-bb)), vocab_start,
                                   with_entropy);
    for (int tid = 0; tid < nthreads; ++tid) {
      grad_logits_thread<TS, TT, KIND>(out, s, t, r, k, row, tid, nthreads, V);
    }
  }
}

template <typename F>
void pair(int sd, int td, F&& f) {
  dispatch_float(static_cast<DType>(sd), [&](auto s_tag) {
    dispatch_float(static_cast<DType>(td), [&](auto t_tag) { f(s_tag, t_tag); });
  });
}

}  // namespace

// dtype codes: 0 float32, 1 float16, 2 bfloat16 (opd::DType). Absent operands: nullptr.
// The *_tf entry points take the logit transforms tf = {s_scale, s_cap, t_scale, t_cap[, r_scale,
// r_cap]}; the others are the identity.
extern "C" {

void emu_row_stats_tf(const void* s, int64_t ss, int sd, const void* t, int64_t ts, int td,
                      const void* r, int64_t rstride, const int64_t* targets, float* out,
                      int64_t N, int64_t V, float inv_temp, float lam, int64_t vocab_start,
                      const float* tf) {
  pair(sd, t ? td : sd, [&](auto s_tag, auto t_tag) {
    row_stats_rows<decltype(s_tag), decltype(t_tag)>(view(s, ss, sd), view(t, ts, td),
                                                     view(r, rstride, td), targets, out, N, V,
                                                     Transforms(inv_temp, tf, 3), lam, vocab_start);
  });
}

void emu_row_stats(const void* s, int64_t ss, int sd, const void* t, int64_t ts, int td,
                   const void* r, int64_t rstride, const int64_t* targets, float* out, int64_t N,
                   int64_t V, float inv_temp, float lam, int64_t vocab_start) {
  emu_row_stats_tf(s, ss, sd, t, ts, td, r, rstride, targets, out, N, V, inv_temp, lam,
                   vocab_start, nullptr);
}

void emu_jsd_sums_tf(const void* s, int64_t ss, int sd, const void* t, int64_t ts, int td,
                     const float* AB, float* out, int64_t N, int64_t V, float inv_temp, float beta,
                     const float* tf) {
  pair(sd, td, [&](auto s_tag, auto t_tag) {
    jsd_sums_rows<decltype(s_tag), decltype(t_tag)>(view(s, ss, sd), view(t, ts, td), AB, out, N,
                                                    V, Transforms(inv_temp, tf, 2), beta);
  });
}

void emu_jsd_sums(const void* s, int64_t ss, int sd, const void* t, int64_t ts, int td,
                  const float* AB, float* out, int64_t N, int64_t V, float inv_temp, float beta) {
  emu_jsd_sums_tf(s, ss, sd, t, ts, td, AB, out, N, V, inv_temp, beta, nullptr);
}

void emu_grad_logits_tf(int kind, void* out, int64_t os, const void* s, int64_t ss, int sd,
                        const void* t, int64_t ts, int td, const void* r, int64_t rstride,
                        const int64_t* targets, const float* rs, const float* g, int64_t N,
                        int64_t V, float inv_temp, float lam, float beta, int64_t vocab_start,
                        int with_entropy, const float* tf_in) {
  const Transforms tf(inv_temp, tf_in, 3);
  pair(sd, t ? td : sd, [&](auto s_tag, auto t_tag) {
    using TS = decltype(s_tag);
    using TT = decltype(t_tag);
    const Logits o = view(out, os, sd), sv = view(s, ss, sd), tv = view(t, ts, td),
                 rv = view(r, rstride, td);
    switch (kind) {
      case kLogprob:
        return grad_rows<TS, TS, kLogprob>(o, sv, tv, rv, targets, rs, g, N, V, tf, lam,
                                           beta, vocab_start, with_entropy);
      case kForwardKL:
        return grad_rows<TS, TT, kForwardKL>(o, sv, tv, rv, targets, rs, g, N, V, tf, lam,
                                             beta, vocab_start, with_entropy);
      case kReverseKL:
        return grad_rows<TS, TT, kReverseKL>(o, sv, tv, rv, targets, rs, g, N, V, tf, lam,
                                             beta, vocab_start, with_entropy);
      default:
        return grad_rows<TS, TT, kJSD>(o, sv, tv, rv, targets, rs, g, N, V, tf, lam, beta,
                                       vocab_start, with_entropy);
    }
  });
}

void emu_grad_logits(int kind, void* out, int64_t os, const void* s, int64_t ss, int sd,
                     const void* t, int64_t ts, int td, const void* r, int64_t rstride,
                     const int64_t* targets, const float* rs, const float* g, int64_t N,
                     int64_t V, float inv_temp, float lam, float beta, int64_t vocab_start,
                     int with_entropy) {
  emu_grad_logits_tf(kind, out, os, s, ss, sd, t, ts, td, r, rstride, targets, rs, g, N, V,
                     inv_temp, lam, beta, vocab_start, with_entropy, nullptr);
}

}  // extern "C"
