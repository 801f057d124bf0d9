// Per-thread math of row_stats and jsd_sums (host + device, so csrc/emulate/ can run it on the
// CPU). A thread block owns one row; thread `tid` of `nthreads` takes chunks tid, tid+nthreads, ...
#pragma once

#include "common.cuh"

namespace opd {

// Adds n terms to the row state: both running maxima move first (move_to rebases the old sums),
// then each term enters relative to them. Zero-weight terms (-inf logits) are skipped, so
// 0 * inf never occurs; a term the target bans (b = -inf) makes D_q +inf, one the student bans
// makes D_p +inf.
template <int n>
OPD_HD void add_terms(RowState& st, const float (&a)[n], const float (&b)[n], bool has_t) {
  float ma = st.ma, mb = st.mb;
#pragma unroll
  for (int j = 0; j < n; ++j) {
    ma = fmaxf(ma, a[j]);
    if (has_t) mb = fmaxf(mb, b[j]);
  }
  if (ma != st.ma || mb != st.mb) st.move_to(ma, mb);
  const float oa = origin(ma), ob = origin(mb);
#pragma unroll
  for (int j = 0; j < n; ++j) {
    const float ra = a[j] - oa, rb = has_t ? b[j] - ob : 0.f;  // a - m_a, b - m_b
    const float wa = weight(ra);
    st.Sa += wa;
    if (wa > 0.f) {
      st.Ua += wa * ra;
      if (has_t) st.Dq += wa * (ra - rb);
    }
    if (has_t) {
      const float wb = weight(rb);
      st.Sb += wb;
      if (wb > 0.f) st.Dp += wb * (rb - ra);
    }
  }
}

// One thread's share of row `row`: chunks tid, tid + nthreads, ... then the V % E tail.
template <typename TS, typename TT>
OPD_HD void row_stats_thread(const Logits& s, const Logits& t, const Logits& r, int64_t row,
                             int64_t tid, int64_t nthreads, int64_t V, const Transform& ts,
                             const Transform& tt, const Transform& tr, float lam, RowState& st) {
  constexpr int E = chunk_elems<TS, TT>();
  const bool has_t = t.ptr != nullptr, has_r = r.ptr != nullptr;
  const TS* srow = row_ptr<TS>(s, row);
  const TT* trow = row_ptr<TT>(t, row);
  const TT* rrow = row_ptr<TT>(r, row);
  st.init();
  const int64_t nchunks = V / E;
  for (int64_t c = tid; c < nchunks; c += nthreads) {
    float a[E], b[E], x[E];
    load_chunk<TS, E>(srow + c * E, s.vec, a);
#pragma unroll
    for (int j = 0; j < E; ++j) a[j] = transform(ts, a[j]);
    if (has_t) {
      load_chunk<TT, E>(trow + c * E, t.vec, b);
      if (has_r) load_chunk<TT, E>(rrow + c * E, r.vec, x);
#pragma unroll
      for (int j = 0; j < E; ++j) {
        b[j] = target_logit(transform(tt, b[j]), has_r ? transform(tr, x[j]) : 0.f, has_r, lam);
      }
    }
    add_terms<E>(st, a, b, has_t);
  }
  for (int64_t col = nchunks * E + tid; col < V; col += nthreads) {  // V % E tail
    float a[1] = {transform(ts, to_float(srow[col]))}, b[1] = {0.f};
    if (has_t) {
      b[0] = target_logit(transform(tt, to_float(trow[col])),
                          has_r ? transform(tr, to_float(rrow[col])) : 0.f, has_r, lam);
    }
    add_terms<1>(st, a, b, has_t);
  }
}

// Writes out[row] = (m_a, S_a, U_a, m_b, S_b, D_q, D_p, a_y) from the merged row state;
// columns 3..6 are 0 without a teacher.
template <typename TS>
OPD_HD void row_stats_write(const Logits& s, bool has_t, const int64_t* targets, float* out,
                            int64_t row, int64_t V, const Transform& ts, int64_t vocab_start,
                            const RowState& st) {
  float* o = out + row * 8;
  o[0] = st.ma, o[1] = st.Sa, o[2] = st.Ua;
  o[3] = has_t ? st.mb : 0.f, o[4] = has_t ? st.Sb : 0.f;
  o[5] = has_t ? st.Dq : 0.f, o[6] = has_t ? st.Dp : 0.f;
  float a_y = 0.f;
  if (targets != nullptr) {
    const int64_t y = targets[row] - vocab_start;
    if (y >= 0 && y < V) a_y = transform(ts, to_float(row_ptr<TS>(s, row)[y]));
  }
  o[7] = a_y;
}

// One thread's share of (sum p (log p - log M), sum q (log q - log M)), M = beta p + (1 - beta) q,
// log M by logaddexp; terms with p == 0 (resp. q == 0) are skipped.
template <typename TS, typename TT>
OPD_HD void jsd_sums_thread(const Logits& s, const Logits& t, const float* AB, int64_t row,
                            int64_t tid, int64_t nthreads, int64_t V, const Transform& ts,
                            const Transform& tt, float log_beta, float log_1m_beta,
                            float (&acc)[2]) {
  constexpr int E = chunk_elems<TS, TT>();
  const TS* srow = row_ptr<TS>(s, row);
  const TT* trow = row_ptr<TT>(t, row);
  const float A = AB[row * 2], B = AB[row * 2 + 1];
  acc[0] = acc[1] = 0.f;
  auto add = [&](float sv, float tv) {
    const float log_q = transform(ts, sv) - A, log_p = transform(tt, tv) - B;
    const float log_m = logaddexp(log_p + log_beta, log_q + log_1m_beta);
    const float p = fast_exp(log_p), q = fast_exp(log_q);
    if (p > 0.f) acc[0] += p * (log_p - log_m);
    if (q > 0.f) acc[1] += q * (log_q - log_m);
  };
  const int64_t nchunks = V / E;
  for (int64_t c = tid; c < nchunks; c += nthreads) {
    float a[E], b[E];
    load_chunk<TS, E>(srow + c * E, s.vec, a);
    load_chunk<TT, E>(trow + c * E, t.vec, b);
#pragma unroll
    for (int j = 0; j < E; ++j) add(a[j], b[j]);
  }
  for (int64_t col = nchunks * E + tid; col < V; col += nthreads) {
    add(to_float(srow[col]), to_float(trow[col]));
  }
}

}  // namespace opd
