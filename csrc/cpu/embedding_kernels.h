// Embedding-bag kernels (CPU), written once as templates and compiled twice: embedding_generic.cpp
// (baseline x86-64) and embedding_avx2.cpp (-mavx2 -mfma -mf16c). Each TU wraps this file in its own
// namespace (fi::generic / fi::avx2); embedding_cpu.cpp picks one at run time.
//
// Conventions shared by every function here:
//   weight   [V, D] row-major, storage type W (float, double, _Float16, bf16)
//   A        the arithmetic type: double for double tables, float otherwise (fp16/bf16 rows are
//            converted on load and accumulated in float32)
//   idx      [N] row indices (int32 or int64); the forward checks each against [0, V) as it reads it
//            (bag_forward's contract), the backward relies on the forward having done so
//   off      [B + 1] bag boundaries (bag b = idx[off[b] .. off[b+1])), or nullptr: bag b = {idx[b]}
//   psw      [N] per-sample weights (sum mode only) or nullptr
//   skip_idx a row that contributes nothing (EmbeddingBag's padding_idx), or -1
//   maxpos   [B, D] for mode max: the POSITION j in idx of the winning element per (bag, dim), -1 for
//            an empty bag (positions, not rows, so duplicates of a row inside a bag stay exact)
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#ifdef FI_HAVE_OPENMP
#include <omp.h>
#endif

#include "cpu/embedding_types.h"

#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#include <immintrin.h>
#define FI_SIMD_AVX2 1
#endif

namespace FI_KERNEL_NS {

using fi::bf16_t;
using fi::Mode;
using fi::Opt;

// ---------------------------------------------------------------- element conversion
template <typename W, typename A>
inline A load(const W* p) {
  return static_cast<A>(*p);
}
template <>
inline float load<bf16_t, float>(const bf16_t* p) {
  uint32_t u = static_cast<uint32_t>(p->bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
template <typename W, typename A>
inline void store(W* p, A v) {
  *p = static_cast<W>(v);
}
template <>
inline void store<bf16_t, float>(bf16_t* p, float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) {  // NaN stays NaN
    p->bits = static_cast<uint16_t>((u >> 16) | 0x40u);
    return;
  }
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  p->bits = static_cast<uint16_t>(u >> 16);
}

// acc[0..D) += s * row[0..D). Written as a plain loop over converted elements: GCC vectorises it
// (vcvtph2ps / shifts + vfmadd) in the AVX2 translation unit.
template <typename W, typename A>
inline void axpy_row(A* __restrict acc, const W* __restrict row, A s, int64_t D) {
#pragma GCC ivdep
  for (int64_t d = 0; d < D; ++d) acc[d] += s * load<W, A>(row + d);
}
template <typename W, typename A>
inline void add_row(A* __restrict acc, const W* __restrict row, int64_t D) {
#pragma GCC ivdep
  for (int64_t d = 0; d < D; ++d) acc[d] += load<W, A>(row + d);
}

// Prefetch of row r (the caller has not validated r yet: an out-of-range one prefetches nothing, so the
// address arithmetic never leaves the table).
template <typename W, typename I>
inline void prefetch_row(const W* weight, I r, int64_t V, int64_t D) {
  if (static_cast<uint64_t>(r) >= static_cast<uint64_t>(V)) return;
  const W* row = weight + static_cast<int64_t>(r) * D;
  const char* p = reinterpret_cast<const char*>(row);
  const int64_t bytes = D * static_cast<int64_t>(sizeof(W));
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(p + o, 0, 1);
}

// [lo, hi): the calling OpenMP thread's share of rows 0..V (all of them outside a parallel region).
// Row-range ownership is what keeps the grouped and the SGD backward independent of the thread count.
inline void thread_row_range(int64_t V, int64_t& lo, int64_t& hi) {
#ifdef FI_HAVE_OPENMP
  const int t = omp_get_thread_num(), T = omp_get_num_threads();
#else
  const int t = 0, T = 1;
#endif
  lo = V * t / T;
  hi = V * (t + 1) / T;
}

inline int threads_for(int64_t work, int nthreads) {
  // Below ~a few thousand rows a parallel region costs more than it saves.
  return work < 2048 ? 1 : std::max(1, nthreads);
}

#ifdef FI_SIMD_AVX2
// ---------------------------------------------------------------- AVX2 sum/mean path (float accumulation)
// Accumulators for a block of up to 64 columns stay in registers (NV x 8 floats) while the bag's rows
// stream through; rows are prefetched PF ahead. This is where the forward's time goes.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const _Float16* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m256 load8(const bf16_t* p) {
  const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
}

// Columns [c0, c0 + 8 NV) of one bag's sum. The per-sample weights (PSW), whether a padding row is to be
// skipped (SKIP) and, for the common widths, the row stride (DS = D; 0 = known only at run time) are
// template parameters: with them the loop body is the same handful of instructions as a hand-written
// kernel for that shape. The earlier form, with runtime psw / stride branches and a per-bag dispatch,
// benchmarked at 0.86x (uniform) / 0.79x (Zipf) torch's JIT-generated kernel on the headline case.
// The bag's indices are valid here (sum_bag checked them); the row PF positions ahead is prefetched (rows
// are random in memory) and its index, in a later bag, is not checked yet, so an out-of-range one is
// prefetched as row 0 instead: the address arithmetic stays inside the table.
template <int NV, bool PSW, bool SKIP, int DS, typename W, typename I>
inline void sum_block(const W* __restrict weight, int64_t V, int64_t Drt, int64_t c0, const I* __restrict idx,
                      int64_t start, int64_t end, int64_t N, const float* __restrict psw, int64_t skip,
                      float* __restrict out) {
  // Rows in flight: 12 of 4 lines (float rows of 64) or 16 of 2 (half rows) measured best here.
  constexpr int64_t PF = sizeof(W) >= 4 ? 12 : 16;
  constexpr int64_t lines = (NV * 8 * static_cast<int64_t>(sizeof(W)) + 63) / 64;
  const int64_t D = DS ? DS : Drt;
  __m256 acc[NV];
#pragma GCC unroll 8
  for (int k = 0; k < NV; ++k) acc[k] = _mm256_setzero_ps();
  for (int64_t j = start; j < end; ++j) {
    const int64_t pj = j + PF < N ? j + PF : j;
    const uint64_t q = static_cast<uint64_t>(idx[pj]);
    const int64_t rp = q < static_cast<uint64_t>(V) ? static_cast<int64_t>(q) : 0;
    const char* p = reinterpret_cast<const char*>(weight + rp * D + c0);
#pragma GCC unroll 8
    for (int64_t l = 0; l < lines; ++l) __builtin_prefetch(p + 64 * l, 0, 1);
    const int64_t r = static_cast<int64_t>(idx[j]);
    if (SKIP && r == skip) continue;
    const W* row = weight + r * D + c0;
    if constexpr (PSW) {
      const __m256 s = _mm256_set1_ps(psw[j]);
#pragma GCC unroll 8
      for (int k = 0; k < NV; ++k) acc[k] = _mm256_fmadd_ps(load8(row + 8 * k), s, acc[k]);
    } else {
#pragma GCC unroll 8
      for (int k = 0; k < NV; ++k) acc[k] = _mm256_add_ps(acc[k], load8(row + 8 * k));
    }
  }
#pragma GCC unroll 8
  for (int k = 0; k < NV; ++k) _mm256_storeu_ps(out + c0 + 8 * k, acc[k]);
}

// Columns [0, D - D % 8) of one bag: blocks of 64, then one block of the remaining multiple of 8.
// Returns the first column left (the scalar tail's).
template <bool SKIP, int DS, bool PSW, typename W, typename I>
inline int64_t sum_vector_columns(const W* weight, int64_t V, int64_t D, const I* idx, int64_t start, int64_t end,
                                  int64_t N, const float* psw, int64_t skip, float* out) {
  int64_t c0 = 0;
  for (; c0 + 64 <= D; c0 += 64) sum_block<8, PSW, SKIP, DS>(weight, V, D, c0, idx, start, end, N, psw, skip, out);
  switch ((D - c0) / 8) {
#define FI_SUM_TAIL(nv) \
  case nv: sum_block<nv, PSW, SKIP, DS>(weight, V, D, c0, idx, start, end, N, psw, skip, out); break;
    FI_SUM_TAIL(7) FI_SUM_TAIL(6) FI_SUM_TAIL(5) FI_SUM_TAIL(4) FI_SUM_TAIL(3) FI_SUM_TAIL(2) FI_SUM_TAIL(1)
#undef FI_SUM_TAIL
    default: break;
  }
  return c0 + (D - c0) / 8 * 8;
}

// One bag, all D columns (blocks of 64, then one block of the remaining multiple of 8, then a scalar
// tail); mean divides by the number of rows summed (padding_idx excluded). With DS > 0 the block
// structure is resolved at compile time. Returns false, touching no row, when an index of the bag is
// outside [0, V). The check is one branch-free pass over the bag's indices before any row is read:
// checking each index inside the row loop (a branch per row, as this kernel first did) cost ~8% of the
// half-precision forward (the native call on the headline batch: 1.65x -> 1.74x torch's float32 time).
template <int DS, bool PSW, typename W, typename I>
inline bool sum_bag(const W* weight, int64_t V, int64_t Drt, const I* idx, int64_t start, int64_t end, int64_t N,
                    const float* psw, int64_t skip, bool mean, float* out) {
  const int64_t D = DS ? DS : Drt;
  uint64_t invalid = 0;
  int64_t skipped = 0;
  for (int64_t j = start; j < end; ++j) {
    const uint64_t r = static_cast<uint64_t>(static_cast<int64_t>(idx[j]));
    invalid |= static_cast<uint64_t>(r >= static_cast<uint64_t>(V));
    skipped += static_cast<int64_t>(static_cast<int64_t>(r) == skip);
  }
  if (invalid) return false;
  const int64_t count = end - start - skipped;
  // padding rows in this bag (skip >= 0): the loop with the per-row test
  const int64_t c0 = skipped ? sum_vector_columns<true, DS, PSW>(weight, V, D, idx, start, end, N, psw, skip, out)
                             : sum_vector_columns<false, DS, PSW>(weight, V, D, idx, start, end, N, psw, skip, out);
  if ((DS == 0 || DS % 8 != 0) && c0 < D) {  // the last D % 8 columns
    for (int64_t d = c0; d < D; ++d) out[d] = 0.0f;
    for (int64_t j = start; j < end; ++j) {
      const int64_t r = static_cast<int64_t>(idx[j]);
      if (r == skip) continue;
      const float s = PSW ? psw[j] : 1.0f;
      for (int64_t d = c0; d < D; ++d) out[d] += s * load<W, float>(weight + r * D + d);
    }
  }
  if (mean && count > 0) {
    const float inv = 1.0f / static_cast<float>(count);
    for (int64_t d = 0; d < D; ++d) out[d] *= inv;
  }
  return true;
}

// The whole float sum/mean forward (every bag) for one (stride, psw) instantiation; same contract as
// bag_forward (returns true when some bag had bad bounds or an invalid index; such bags are zeroed).
template <int DS, bool PSW, typename W, typename I, typename O>
bool sum_bags(const W* weight, int64_t V, int64_t D, const I* idx, int64_t N, const O* off, int64_t B,
              const float* psw, int64_t skip, bool mean, float* out, int nt) {
  bool bad = false;
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static) reduction(|| : bad)
  for (int64_t b = 0; b < B; ++b) {
    const int64_t start = off ? static_cast<int64_t>(off[b]) : b;
    const int64_t end = off ? static_cast<int64_t>(off[b + 1]) : b + 1;
    float* o = out + b * D;
    const bool badrow = !(start >= 0 && start <= end && end <= N) ||
                        !sum_bag<DS, PSW>(weight, V, D, idx, start, end, N, psw, skip, mean, o);
    if (badrow) {
      bad = true;
      for (int64_t d = 0; d < D; ++d) o[d] = 0.0f;
    }
  }
  return bad;
}

template <typename W, typename I, typename O>
bool sum_bags_dispatch(const W* weight, int64_t V, int64_t D, const I* idx, int64_t N, const O* off, int64_t B,
                       const float* psw, int64_t skip, bool mean, float* out, int nt) {
#define FI_SUM_BAGS(ds)                                                                                    \
  return psw ? sum_bags<ds, true, W, I, O>(weight, V, D, idx, N, off, B, psw, skip, mean, out, nt)        \
             : sum_bags<ds, false, W, I, O>(weight, V, D, idx, N, off, B, psw, skip, mean, out, nt);
  switch (D) {
    case 16: FI_SUM_BAGS(16)
    case 32: FI_SUM_BAGS(32)
    case 64: FI_SUM_BAGS(64)
    case 128: FI_SUM_BAGS(128)
    default: FI_SUM_BAGS(0)
  }
#undef FI_SUM_BAGS
}
#endif

// ---------------------------------------------------------------- forward
// out: [B, D] of A. Every output element is written (empty bag -> 0).
// Validates its input on the way (the bag's offsets and indices are checked just before the bag is
// read, while they are in L1): a bag with bounds outside [0, N] or an index outside [0, V) is not
// read (its output is zeroed) and the call returns true, so the caller raises; no row outside the
// table is ever touched. A separate validation pass in Python cost ~1 ms of a ~8 ms call.
template <typename W, typename A, typename I, typename O>
bool bag_forward(const W* weight, int64_t V, int64_t D, const I* idx, int64_t N, const O* off, int64_t B,
                 const A* psw, int mode, int64_t skip_idx, A* out, int64_t* maxpos, int nthreads) {
  constexpr int64_t PF = 8;  // rows prefetched ahead: covers DRAM latency at ~10 GB/s per core
  const int nt = threads_for(N, nthreads);
  bool bad = false;
  // offsets must start at 0 and end at N (indices after the last bag would get no bag: refused by the
  // caller); such indices are not read but must still be valid, so that the precise error names them
  if (off && B >= 0 && static_cast<int64_t>(off[0]) != 0) bad = true;
  if (off && B >= 0 && static_cast<int64_t>(off[B]) != N) bad = true;
  const int64_t tail = off ? std::max<int64_t>(0, std::min<int64_t>(static_cast<int64_t>(off[B]), N)) : N;
  for (int64_t j = off ? tail : N; j < N; ++j) {
    const int64_t r = static_cast<int64_t>(idx[j]);
    if (r < 0 || r >= V) bad = true;
  }
#ifdef FI_SIMD_AVX2
  if constexpr (std::is_same<A, float>::value) {  // float sum/mean: the vector kernels above
    if (mode != static_cast<int>(Mode::kMax))
      return sum_bags_dispatch<W, I, O>(weight, V, D, idx, N, off, B, psw, skip_idx,
                                        mode == static_cast<int>(Mode::kMean), out, nt) || bad;
  }
#endif
#pragma omp parallel num_threads(nt) if (nt > 1) reduction(|| : bad)
  {
    std::vector<A> accv(static_cast<size_t>(D));
    A* acc = accv.data();
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      const int64_t start = off ? static_cast<int64_t>(off[b]) : b;
      const int64_t end = off ? static_cast<int64_t>(off[b + 1]) : b + 1;
      A* o = out + b * D;
      bool ok = start >= 0 && start <= end && end <= N;
      for (int64_t j = start; ok && j < end; ++j) {
        const int64_t r = static_cast<int64_t>(idx[j]);
        ok = r >= 0 && r < V;
      }
      if (!ok) {
        bad = true;
        for (int64_t d = 0; d < D; ++d) o[d] = A(0);
        if (mode == static_cast<int>(Mode::kMax))
          for (int64_t d = 0; d < D; ++d) maxpos[b * D + d] = -1;
        continue;
      }
      if (mode == static_cast<int>(Mode::kMax)) {
        int64_t* mp = maxpos + b * D;
        bool any = false;
        for (int64_t j = start; j < end; ++j) {
          const int64_t r = static_cast<int64_t>(idx[j]);
          if (r == skip_idx) continue;
          if (j + PF < N) prefetch_row(weight, idx[j + PF], V, D);
          const W* row = weight + r * D;
          if (!any) {
            for (int64_t d = 0; d < D; ++d) {
              o[d] = load<W, A>(row + d);
              mp[d] = j;
            }
            any = true;
          } else {
            for (int64_t d = 0; d < D; ++d) {
              const A v = load<W, A>(row + d);
              if (v > o[d]) {  // strict: the first maximum wins, as torch
                o[d] = v;
                mp[d] = j;
              }
            }
          }
        }
        if (!any)
          for (int64_t d = 0; d < D; ++d) {
            o[d] = A(0);
            mp[d] = -1;
          }
        continue;
      }
      std::fill(acc, acc + D, A(0));
      int64_t count = 0;
      for (int64_t j = start; j < end; ++j) {
        const int64_t r = static_cast<int64_t>(idx[j]);
        if (j + PF < N) prefetch_row(weight, idx[j + PF], V, D);
        if (r == skip_idx) continue;
        ++count;
        if (psw)
          axpy_row<W, A>(acc, weight + r * D, psw[j], D);
        else
          add_row<W, A>(acc, weight + r * D, D);
      }
      if (mode == static_cast<int>(Mode::kMean) && count > 0) {
        const A inv = A(1) / static_cast<A>(count);
        for (int64_t d = 0; d < D; ++d) o[d] = acc[d] * inv;
      } else {
        std::memcpy(o, acc, sizeof(A) * static_cast<size_t>(D));
      }
    }
  }
  return bad;
}

// ---------------------------------------------------------------- backward
// Groups the occurrences of each row (stable LSD radix sort on the row: occurrences keep their
// position order), sums the row's gradient in that fixed order, then applies the requested update.
// One thread owns a row from start to end, so the result is bitwise identical for any thread count.
//
// Returns the number of distinct rows U touched (skip_idx excluded).
//   opt kSparse: out_rows[U] (ascending), out_vals[U, D] = summed gradient (coalesced COO)
//   opt kDense:  dense[V, D] rows of touched indices overwritten with their gradient (others untouched)
//   opt kSGD:    w += -lr * g                                   hp = {lr}
//   opt kAdagrad: s1[V,D] += g*g; w += -lr * g / (sqrt(s1)+eps)  hp = {lr, eps}           (torch.optim.Adagrad)
//   opt kRowWiseAdagrad: s1[V] += mean(g*g); w += -lr*g/(sqrt(s1[r])+eps)  hp = {lr, eps}  (FBGEMM)
//   opt kAdam:   lazy Adam (torch.optim.SparseAdam), s1 = exp_avg [V,D], s2 = exp_avg_sq [V,D]
//                hp = {lr, beta1, beta2, eps}; *step is incremented, then
//                step_size = lr*sqrt(1-beta2^t)/(1-beta1^t) as torch computes it (in double)
struct BackwardArgs {
  int64_t V, D, N, B;
  int mode;
  int64_t skip_idx;
  int opt;
  double hp[4];
  int nthreads;
};

// Stable grouping of the kept positions by row: keys ascending, and for equal keys the carried
// values vals_in[j] in position order (that fixed order is what makes the backward deterministic).
// A counting sort (one histogram over the rows, one scatter) when the table is not much larger than
// the batch; an LSD radix sort (11-bit digits) otherwise.
template <typename I>
void group_rows(const I* idx, int64_t N, int64_t V, int64_t skip_idx, const uint32_t* vals_in,
                std::vector<uint32_t>& keys, std::vector<uint32_t>& vals, int nthreads) {
  if (V <= 4 * N + 65536) {
    // Counting sort, parallel over row ranges: each thread owns rows [lo, hi), scans all positions
    // in order and handles only its rows, so the output equals the sequential one.
    std::vector<uint32_t> start(static_cast<size_t>(V) + 1, 0u);
    const int nt = threads_for(N, nthreads);
    std::vector<uint32_t> range_total(static_cast<size_t>(nt) + 1, 0u);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
#ifdef FI_HAVE_OPENMP
      const int t = omp_get_thread_num(), T = omp_get_num_threads();
#else
      const int t = 0, T = 1;
#endif
      int64_t lo, hi;
      thread_row_range(V, lo, hi);
      for (int64_t j = 0; j < N; ++j) {
        const int64_t r = static_cast<int64_t>(idx[j]);
        if (r >= lo && r < hi && r != skip_idx) ++start[r + 1];
      }
      uint32_t run = 0;
      for (int64_t r = lo; r < hi; ++r) {  // local exclusive prefix: start[r] = first slot of r
        const uint32_t c = start[r + 1];
        start[r + 1] = run + c;
        run += c;
      }
      range_total[t + 1] = run;
#pragma omp barrier
#pragma omp single
      {
        for (int k = 0; k < T; ++k) range_total[k + 1] += range_total[k];
        keys.resize(range_total[T]);
        vals.resize(range_total[T]);
      }
      const uint32_t base = range_total[t];
      // start[r+1] holds the local end of row r; turn it into a cursor at the row's global start
      std::vector<uint32_t> cursor(static_cast<size_t>(hi - lo));
      uint32_t prev = 0;
      for (int64_t r = lo; r < hi; ++r) {
        cursor[r - lo] = base + prev;
        prev = start[r + 1];
      }
      for (int64_t j = 0; j < N; ++j) {
        const int64_t r = static_cast<int64_t>(idx[j]);
        if (r < lo || r >= hi || r == skip_idx) continue;
        const uint32_t slot = cursor[r - lo]++;
        keys[slot] = static_cast<uint32_t>(r);
        vals[slot] = vals_in[j];
      }
    }
    return;
  }
  keys.clear();
  vals.clear();
  keys.reserve(static_cast<size_t>(N));
  vals.reserve(static_cast<size_t>(N));
  for (int64_t j = 0; j < N; ++j) {
    const int64_t r = static_cast<int64_t>(idx[j]);
    if (r == skip_idx) continue;
    keys.push_back(static_cast<uint32_t>(r));
    vals.push_back(vals_in[j]);
  }
  const size_t n = keys.size();
  int bits = 1;
  while ((int64_t(1) << bits) < V) ++bits;
  const int passes = (bits + 10) / 11;
  const int digit = (bits + passes - 1) / passes;
  const uint32_t mask = (1u << digit) - 1u;
  std::vector<uint32_t> k2(n), v2(n);
  std::vector<uint32_t> hist(static_cast<size_t>(mask) + 2);
  for (int p = 0; p < passes; ++p) {
    const int shift = p * digit;
    std::fill(hist.begin(), hist.end(), 0u);
    for (size_t i = 0; i < n; ++i) ++hist[((keys[i] >> shift) & mask) + 1];
    for (size_t d = 1; d < hist.size(); ++d) hist[d] += hist[d - 1];
    for (size_t i = 0; i < n; ++i) {
      const uint32_t slot = hist[(keys[i] >> shift) & mask]++;
      k2[slot] = keys[i];
      v2[slot] = vals[i];
    }
    keys.swap(k2);
    vals.swap(v2);
  }
}

template <typename W, typename A, typename I, typename O>
int64_t bag_backward(const A* grad_out, W* weight, const I* idx, const O* off, const A* psw,
                     const int64_t* maxpos, A* s1, A* s2, int64_t* step, int64_t* out_rows, A* out_vals, A* dense,
                     const BackwardArgs& a) {
  const int64_t D = a.D, N = a.N, B = a.B;
  // Plain SGD on full-precision rows needs no grouping: each thread owns a range of rows and applies,
  // in position order, w[r] += -lr * s_j * grad_out[bag(j)] for the occurrences j of its rows. Each
  // row is updated by one thread in position order, so the result is bitwise identical for any thread
  // count; it equals torch.optim.SGD on the coalesced gradient up to rounding (w - a - b for
  // w - (a + b)). grad_out is read in bag order (sequentially), not once per sorted occurrence, and the
  // row sort disappears. (Half-precision rows keep the grouped path: one rounding per row, not per
  // occurrence.)
  if constexpr (std::is_same<W, A>::value) {
    if (a.opt == static_cast<int>(Opt::kSGD) && a.mode != static_cast<int>(Mode::kMax)) {
      const A nlr = static_cast<A>(-a.hp[0]);
      const bool mean = a.mode == static_cast<int>(Mode::kMean);
      const int nt = threads_for(N, a.nthreads);
      constexpr int64_t PF = 8;
#pragma omp parallel num_threads(nt) if (nt > 1)
      {
        int64_t lo, hi;
        thread_row_range(a.V, lo, hi);
        for (int64_t b = 0; b < B; ++b) {
          const int64_t start = off ? static_cast<int64_t>(off[b]) : b;
          const int64_t end = off ? static_cast<int64_t>(off[b + 1]) : b + 1;
          A scale = A(1);
          if (mean) {
            int64_t count = 0;
            for (int64_t j = start; j < end; ++j) count += static_cast<int64_t>(idx[j]) != a.skip_idx;
            if (count > 0) scale = A(1) / static_cast<A>(count);
          }
          const A* __restrict go = grad_out + b * D;
          for (int64_t j = start; j < end; ++j) {
            if (j + PF < N) {
              const int64_t rn = static_cast<int64_t>(idx[j + PF]);
              if (rn >= lo && rn < hi) {
                const char* wp = reinterpret_cast<const char*>(weight + rn * D);
                for (int64_t o = 0; o < D * static_cast<int64_t>(sizeof(W)); o += 64) __builtin_prefetch(wp + o, 1, 3);
              }
            }
            const int64_t r = static_cast<int64_t>(idx[j]);
            if (r < lo || r >= hi || r == a.skip_idx) continue;
            const A sj = nlr * (psw ? psw[j] * scale : scale);
            W* __restrict w = weight + r * D;
#pragma GCC ivdep
            for (int64_t d = 0; d < D; ++d) w[d] += sj * go[d];
          }
        }
      }
      return 0;
    }
  }
  // bag of each position and the per-bag scale (mean: 1 / number of kept elements)
  std::vector<uint32_t> bag_of(static_cast<size_t>(N));
  std::vector<A> bag_scale(static_cast<size_t>(B), A(1));
  const int nt = threads_for(N, a.nthreads);
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
  for (int64_t b = 0; b < B; ++b) {
    const int64_t start = off ? static_cast<int64_t>(off[b]) : b;
    const int64_t end = off ? static_cast<int64_t>(off[b + 1]) : b + 1;
    int64_t count = 0;
    for (int64_t j = start; j < end; ++j) {
      bag_of[j] = static_cast<uint32_t>(b);
      count += static_cast<int64_t>(idx[j]) != a.skip_idx;
    }
    if (a.mode == static_cast<int>(Mode::kMean) && count > 0) bag_scale[b] = A(1) / static_cast<A>(count);
  }

  // What each occurrence carries through the sort: its bag (enough for sum/mean without weights,
  // and saves a random lookup per occurrence), or its position (per-sample weights, max).
  const bool carry_pos = psw != nullptr || a.mode == static_cast<int>(Mode::kMax);
  std::vector<uint32_t> iota;
  if (carry_pos) {
    iota.resize(static_cast<size_t>(N));
    for (int64_t j = 0; j < N; ++j) iota[j] = static_cast<uint32_t>(j);
  }
  std::vector<uint32_t> keys, pos;
  group_rows(idx, N, a.V, a.skip_idx, carry_pos ? iota.data() : bag_of.data(), keys, pos, a.nthreads);
  const int64_t n = static_cast<int64_t>(keys.size());
  std::vector<int64_t> seg;  // segment starts, plus n at the end
  seg.reserve(static_cast<size_t>(n / 2 + 2));
  for (int64_t i = 0; i < n; ++i)
    if (i == 0 || keys[i] != keys[i - 1]) seg.push_back(i);
  const int64_t U = static_cast<int64_t>(seg.size());
  seg.push_back(n);

  double hp0 = a.hp[0];
  if (a.opt == static_cast<int>(Opt::kAdam)) {
    const int64_t t = ++(*step);
    const double bc1 = 1.0 - std::pow(a.hp[1], static_cast<double>(t));
    const double bc2 = 1.0 - std::pow(a.hp[2], static_cast<double>(t));
    hp0 = a.hp[0] * std::sqrt(bc2) / bc1;
  }
  const A h0 = static_cast<A>(hp0), h1 = static_cast<A>(a.hp[1]), h2 = static_cast<A>(a.hp[2]),
          h3 = static_cast<A>(a.hp[3]);
  const bool is_max = a.mode == static_cast<int>(Mode::kMax);
  const int nt2 = threads_for(n, a.nthreads);
#pragma omp parallel num_threads(nt2) if (nt2 > 1)
  {
    std::vector<A> gv(static_cast<size_t>(D));
    A* g = gv.data();
#pragma omp for schedule(dynamic, 256)
    for (int64_t u = 0; u < U; ++u) {
      // The rows are random in memory: prefetch the weight / state rows a few segments ahead and the
      // upstream-gradient row of the coming occurrences, or every row costs a full DRAM round trip.
      if (u + 8 < U) {
        const int64_t rn = keys[seg[u + 8]];
        const char* wp = reinterpret_cast<const char*>(weight + rn * D);
        for (int64_t o = 0; o < D * static_cast<int64_t>(sizeof(W)); o += 64) __builtin_prefetch(wp + o, 1, 1);
        if (s1) {
          const bool per_row = a.opt == static_cast<int>(Opt::kRowWiseAdagrad);
          const char* sp = reinterpret_cast<const char*>(s1 + (per_row ? rn : rn * D));
          for (int64_t o = 0; o < (per_row ? 1 : D) * static_cast<int64_t>(sizeof(A)); o += 64)
            __builtin_prefetch(sp + o, 1, 1);
        }
        if (s2) {
          const char* sp = reinterpret_cast<const char*>(s2 + rn * D);
          for (int64_t o = 0; o < D * static_cast<int64_t>(sizeof(A)); o += 64) __builtin_prefetch(sp + o, 1, 1);
        }
      }
      if (u + 4 < U) {
        const uint32_t v = pos[seg[u + 4]];
        const char* gp = reinterpret_cast<const char*>(grad_out + static_cast<int64_t>(carry_pos ? bag_of[v] : v) * D);
        for (int64_t o = 0; o < D * static_cast<int64_t>(sizeof(A)); o += 64) __builtin_prefetch(gp + o, 0, 1);
      }
      const int64_t r = keys[seg[u]];
      std::fill(g, g + D, A(0));
      for (int64_t i = seg[u]; i < seg[u + 1]; ++i) {
        const int64_t j = pos[i];  // a position when carry_pos, else the bag itself
        const int64_t b = carry_pos ? static_cast<int64_t>(bag_of[j]) : j;
        const A* go = grad_out + b * D;
        if (is_max) {
          const int64_t* mp = maxpos + b * D;
          for (int64_t d = 0; d < D; ++d)
            if (mp[d] == j) g[d] += go[d];
        } else {
          const A s = (psw ? psw[j] : A(1)) * bag_scale[b];
#pragma GCC ivdep
          for (int64_t d = 0; d < D; ++d) g[d] += s * go[d];
        }
      }
      W* w = weight + r * D;
      switch (static_cast<Opt>(a.opt)) {
        case Opt::kSparse:
          out_rows[u] = r;
          std::memcpy(out_vals + u * D, g, sizeof(A) * static_cast<size_t>(D));
          break;
        case Opt::kDense:
          std::memcpy(dense + r * D, g, sizeof(A) * static_cast<size_t>(D));
          break;
        case Opt::kSGD:
          for (int64_t d = 0; d < D; ++d) store<W, A>(w + d, load<W, A>(w + d) + (-h0) * g[d]);
          break;
        case Opt::kAdagrad: {
          A* s = s1 + r * D;
          for (int64_t d = 0; d < D; ++d) {
            s[d] += g[d] * g[d];
            store<W, A>(w + d, load<W, A>(w + d) + (-h0) * (g[d] / (std::sqrt(s[d]) + h1)));
          }
          break;
        }
        case Opt::kRowWiseAdagrad: {
          A sq = 0;
          for (int64_t d = 0; d < D; ++d) sq += g[d] * g[d];
          s1[r] += sq / static_cast<A>(D);
          const A scale = (-h0) / (std::sqrt(s1[r]) + h1);
          for (int64_t d = 0; d < D; ++d) store<W, A>(w + d, load<W, A>(w + d) + scale * g[d]);
          break;
        }
        case Opt::kAdam: {
          A* m = s1 + r * D;
          A* v = s2 + r * D;
          for (int64_t d = 0; d < D; ++d) {
            const A numer = (g[d] - m[d]) * (A(1) - h1) + m[d];
            const A vsq = (g[d] * g[d] - v[d]) * (A(1) - h2) + v[d];
            m[d] = numer;
            v[d] = vsq;
            store<W, A>(w + d, load<W, A>(w + d) + (-h0) * (numer / (std::sqrt(vsq) + h3)));
          }
          break;
        }
      }
    }
  }
  return U;
}

// Position of the first index outside [0, V), or -1 when all are valid.
template <typename I>
int64_t first_bad_index(const I* idx, int64_t N, int64_t V) {
  for (int64_t j = 0; j < N; ++j) {
    const int64_t r = static_cast<int64_t>(idx[j]);
    if (r < 0 || r >= V) return j;
  }
  return -1;
}

}  // namespace FI_KERNEL_NS
