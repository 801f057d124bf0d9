// Per-thread math of grad_logits (host + device, so csrc/emulate/ can run it on the CPU).
#pragma once

#include "common.cuh"

namespace opd {

struct RowConsts {
  float A, B, C, H, g_main, g_ent, lam, beta, log_beta, log_1m_beta;
  Transform ts, tt, tr;  // the student's, teacher's, reference's logit transforms (inv_temp in)
  int64_t y;  // target column in this shard (may lie outside [0, V): no one-hot term)
  bool has_r, main, ent;
};

// (g_main * d(main)/da + g_ent * dH/da) * da/ds at one column, from the raw logits s, t, r, with
// a = T_s(s) / tau (da/ds = inv_temp * scale, times 1 - tanh^2 under a softcap: the chain rule
// in the same chunk). Terms with q == 0 give 0 (reverse_kl, jsd, entropy), as the contract says;
// where the softcap's slope is exactly 0 (-inf, or tanh rounded to +-1) the gradient is 0.
template <int KIND>
OPD_HD float grad_elem(float s, float t, float r, int64_t col, const RowConsts& k) {
  float slope;
  const float a = transform_slope(k.ts, s, slope);
  const float log_q = a - k.A, q = fast_exp(log_q);
  float d = 0.f;
  if (k.main) {
    float dm;
    if (KIND == kLogprob) {
      dm = (col == k.y ? 1.f : 0.f) - q;
    } else {
      const float b = target_logit(transform(k.tt, t), k.has_r ? transform(k.tr, r) : 0.f, k.has_r,
                                   k.lam);
      const float log_p = b - k.B;
      if (KIND == kForwardKL) {
        dm = q - fast_exp(log_p);
      } else if (KIND == kReverseKL) {
        dm = q > 0.f ? q * (log_q - log_p - k.C) : 0.f;
      } else {  // kJSD
        const float log_m = logaddexp(log_p + k.log_beta, log_q + k.log_1m_beta);
        dm = q > 0.f ? (1.f - k.beta) * q * (log_q - log_m - k.C) : 0.f;
      }
    }
    d = k.g_main * dm;
  }
  if (k.ent && q > 0.f) d += k.g_ent * (-q * (log_q + k.H));
  if (!k.ts.cap) return d * slope;  // slope = inv_temp * scale
  return slope == 0.f ? 0.f : d * slope;
}

// Per-row constants of the gradient.
OPD_HD RowConsts row_consts(int kind, const Logits& r, const int64_t* targets, const float* rs,
                            const float* g, int64_t row, const Transform& ts,
                            const Transform& tt, const Transform& tr, float lam, float beta,
                            float log_beta, float log_1m_beta, int64_t vocab_start,
                            bool with_entropy) {
  RowConsts k;
  k.A = rs[row * 4], k.B = rs[row * 4 + 1], k.C = rs[row * 4 + 2], k.H = rs[row * 4 + 3];
  k.g_main = g[row * 2], k.g_ent = g[row * 2 + 1];
  k.ts = ts, k.tt = tt, k.tr = tr, k.lam = lam, k.beta = beta;
  k.log_beta = log_beta, k.log_1m_beta = log_1m_beta;
  k.y = kind == kLogprob ? targets[row] - vocab_start : -1;
  k.has_r = kind != kLogprob && r.ptr != nullptr;
  // A zero coefficient drops its term, so masked rows get exact zeros even where a term is inf.
  k.main = k.g_main != 0.f;
  k.ent = with_entropy && k.g_ent != 0.f;
  return k;
}

// One thread's share of row `row`: chunks tid, tid + nthreads, ... then the V % E tail.
// s and out may alias, so neither is read through __restrict__; each thread loads a chunk of s
// before it stores the same chunk of out.
template <typename TS, typename TT, int KIND>
OPD_HD void grad_logits_thread(const Logits& out, const Logits& s, const Logits& t,
                               const Logits& r, const RowConsts& k, int64_t row, int64_t tid,
                               int64_t nthreads, int64_t V) {
  constexpr int E = chunk_elems<TS, TT>();
  const TS* srow = row_ptr<TS>(s, row);
  const TT* trow = KIND == kLogprob ? nullptr : row_ptr<TT>(t, row);
  const TT* rrow = k.has_r ? row_ptr<TT>(r, row) : nullptr;
  TS* orow = const_cast<TS*>(row_ptr<TS>(out, row));

  const int64_t nchunks = V / E;
  for (int64_t c = tid; c < nchunks; c += nthreads) {
    float a[E], b[E], x[E];
    load_chunk<TS, E>(srow + c * E, s.vec, a);
    if (KIND != kLogprob) {
      load_chunk<TT, E>(trow + c * E, t.vec, b);
      if (k.has_r) load_chunk<TT, E>(rrow + c * E, r.vec, x);
    }
#pragma unroll
    for (int j = 0; j < E; ++j) {
      a[j] = grad_elem<KIND>(a[j], KIND == kLogprob ? 0.f : b[j], k.has_r ? x[j] : 0.f, c * E + j, k);
    }
    store_chunk<TS, E>(orow + c * E, out.vec, a);
  }
  for (int64_t col = nchunks * E + tid; col < V; col += nthreads) {  // V % E tail
    const float tv = KIND == kLogprob ? 0.f : to_float(trow[col]);
    const float rv = k.has_r ? to_float(rrow[col]) : 0.f;
    orow[col] = from_float<TS>(grad_elem<KIND>(to_float(srow[col]), tv, rv, col, k));
  }
}

}  // namespace opd
