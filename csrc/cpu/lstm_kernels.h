// LSTM recurrence on CPU: data layouts, argument blocks and the step drivers.
//
// The drivers are templates over a "tile" policy: lstm_cpu.cpp instantiates them with portable
// scalar tiles (float and double), lstm_avx2.cpp with AVX2+FMA tiles (float). Policies live in
// anonymous namespaces, so the two instantiations never collide (no ODR mixing of ISA levels).
//
// Conventions (torch.nn.LSTM): gates ordered i, f, g, o; W_ih [4H, E], W_hh [4H, H], bias [4H].
//   i = sigmoid(x W_ii^T + h W_hi^T + b_i), f = sigmoid(...), g = tanh(...), o = sigmoid(...)
//   c' = f * c + i * g,   h' = o * tanh(c')
//
// Packed ("time-major, length-sorted") layout, as torch's PackedSequence: sequences are sorted by
// length, descending and stable (position p holds batch row perm[p]); batch_sizes[t] = #{L > t};
// row(t, p) = offsets[t] + p for p < batch_sizes[t]; N = sum(L) rows in all. Only valid steps are
// stored, so padding costs nothing. A reverse direction processes step s of sequence p at time
// t = L_p - 1 - s, i.e. at packed row offsets[L_p - 1 - s] + p.
//
// Packed weights (pack once, reuse):
//   "fwd" panels, for W [4H, K] (W_hh with K = H, or W_ih with K = E): unit blocks of 8 hidden
//     units; panel jb is [K][32] with column g*8+u = W[g*H + 8*jb + u][k] (0 for units >= H).
//     numel = ceil(H/8) * K * 32.
//   "bwd" panels, for W_hh [4H, H]: unit blocks of 16; panel jb is [4H][16] with column u =
//     W_hh[k][16*jb + u] (0 for units >= H). numel = ceil(H/16) * 4H * 16.
//
// ISA safety: this header is compiled into the generic TU and into the -mavx2 TU. Everything with
// code in it lives in namespace fi::lstm::FI_LSTM_ISA (a different name per TU), and the argument
// blocks shared between the TUs are plain data (no member functions, no std containers), so the linker
// can never fold an AVX2-compiled copy of shared inline code into the generic path (which would fault
// on pre-AVX2 CPUs). Scratch memory is allocated by the generic TU and passed in.
#pragma once

#ifndef FI_LSTM_ISA
#define FI_LSTM_ISA generic
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef FI_HAVE_OPENMP
#include <omp.h>
#endif

namespace fi {
namespace lstm {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
// Below this many multiply-adds per step, a tiny batch runs on one thread: a parallel region and a
// barrier per step cost more than they save (B = 1, H = 128 is 64K MACs, ~1.5 us on one core; a
// barrier ~0.3 us on an idle machine, far more when the cores are shared). Tunable at run time:
// lstm_set_unit_split_min() / FASTINTEREST_LSTM_UNIT_SPLIT_MIN.
inline int64_t& unit_split_min_macs() {
  static int64_t v = 64 * 1024;
  return v;
}
#define kUnitSplitMinMacs (::fi::lstm::unit_split_min_macs())
inline int64_t fwd_packed_numel(int64_t H, int64_t K) { return ceil_div(H, 8) * K * 32; }
inline int64_t bwd_packed_numel(int64_t H) { return ceil_div(H, 16) * 4 * H * 16; }

// A matrix whose rows are addressed either as packed rows (ptr + row * ld) or as padded (b, t)
// positions (ptr + b * sb + t * st). Element strides. Columns are contiguous.
template <typename T>
struct RowMat {
  T* ptr = nullptr;
  int64_t ld = 0, sb = 0, st = 0;
  bool padded = false;
};

// Length plan, shared by every layer and direction of one call.
struct Plan {
  int64_t B = 0, T = 0, N = 0, maxlen = 0;
  const int64_t* perm = nullptr;         // [B] position -> batch row
  const int64_t* batch_sizes = nullptr;  // [T] (entries >= maxlen are 0)
  const int64_t* offsets = nullptr;      // [T+1] exclusive prefix sums of batch_sizes
  const int64_t* Ls = nullptr;           // [B] length at each position (descending)
};

constexpr int kMaxFields = 16;

// Input to the gates of one direction, one of three modes (summed into the gate pre-activations):
//   xproj:  rows of x W_ih^T + b_ih + b_hh, [*, 4H] (packed rows or padded), or
//   x:      rows of x [*, E] times the "fwd"-packed W_ih, plus bias [4H], or
//   tables: sum over fields f of rows tables[f][ids[f][b, t]], each table [V_f, 4H] a projected
//           embedding (emb_f W_ih^T; bias folded into one of them by the caller).
template <typename T>
struct GateInput {
  RowMat<const T> xproj;
  RowMat<const T> x;
  int64_t E = 0;
  const T* wih_packed = nullptr;
  const T* bias = nullptr;
  int nfields = 0;
  const T* tables[kMaxFields] = {};
  int64_t vocab[kMaxFields] = {};
  const void* ids[kMaxFields] = {};   // int32 or int64, padded [B, T] with strides below
  int ids64[kMaxFields] = {};
  int64_t ids_sb[kMaxFields] = {}, ids_st[kMaxFields] = {};
};

template <typename T>
struct FwdArgs {
  Plan* plan = nullptr;
  int64_t H = 0;
  bool reverse = false;
  int nthreads = 1;
  GateInput<T> in;
  const T* whh_packed = nullptr;   // "fwd" panels of W_hh
  const T* h0 = nullptr;           // [B, H] batch order, or null (zeros)
  const T* c0 = nullptr;           // [B, H] batch order, or null (zeros)
  RowMat<T> out;                   // h at every valid step; H columns
  bool zero_padding = false;       // out padded: write zeros at t >= L_b (this direction's H columns)
  T* gates_ws = nullptr;           // [N, 4H] packed rows: activated gates i, f, g, o (training), or null
  T* c_ws = nullptr;               // [N, H] packed rows: c after each step (training), or null
  T* h_n = nullptr;                // [B, H] batch order: h at each sequence's last step (h0 for L = 0)
  T* c_n = nullptr;                // [B, H] batch order
  T* scratch = nullptr;            // fwd_scratch_numel(B, H): h double buffer, c, table gather, from the caller
  T* gbuf = nullptr;               // set by the driver: [B, 4H] summed table rows of the current step
  // BLAS path (float32, batches of at least gemm_min_rows()): per step one sgemm G += h W_hh^T over
  // the active rows (and G += x W_ih^T in x mode), then the fused gate pointwise. Set by the caller.
  void* sgemm = nullptr;           // Fortran sgemm_ (the BLAS torch ships), or null: the tile kernels
  const T* whh_raw = nullptr;      // W_hh [4H, H] row-major (torch's layout)
  const T* wih_raw = nullptr;      // W_ih [4H, E] row-major (x mode)
  T* xbuf = nullptr;               // [B, E] (x mode): the step's input rows, gathered
};

template <typename T>
struct BwdArgs {
  Plan* plan = nullptr;
  int64_t H = 0;
  bool reverse = false;
  int nthreads = 1;
  RowMat<const T> grad_out;        // dL/dh at every valid step (H columns), or null
  const T* grad_hn = nullptr;      // [B, H] batch order, or null
  const T* grad_cn = nullptr;      // [B, H] batch order, or null
  const T* gates_ws = nullptr;     // [N, 4H] from the forward
  const T* c_ws = nullptr;         // [N, H] from the forward
  RowMat<const T> out;             // forward h (packed rows, H columns) - for hprev
  const T* h0 = nullptr;           // [B, H] or null
  const T* c0 = nullptr;           // [B, H] or null
  const T* whh_bwd = nullptr;      // "bwd" panels of W_hh
  T* dgates = nullptr;             // [N, 4H] packed rows: dL/d(gate pre-activations), i f g o
  T* hprev = nullptr;              // [N, H] packed rows: h entering each step (for dW_hh), or null
  int64_t hprev_ld = 0;            // hprev's row stride (>= H)
  T* dh0 = nullptr;                // [B, H] batch order, or null
  T* dc0 = nullptr;                // [B, H] batch order, or null
  T* scratch = nullptr;            // [max(B, 1), ceil16(H)] (dL/dc carry), from the caller
};

template <typename T>
struct ProjArgs {
  Plan* plan = nullptr;
  int64_t H = 0, E = 0;
  bool reverse = false;
  int nthreads = 1;
  RowMat<const T> x;
  const T* wih_packed = nullptr;
  const T* bias = nullptr;
  T* out = nullptr;
  int64_t ldo = 0;
  int64_t* scratch = nullptr;      // [2, N] (batch row and time of each packed row), from the caller
};

inline int64_t fwd_scratch_numel(int64_t B, int64_t H) {
  return std::max<int64_t>(B, 1) * (3 * ceil_div(H, 8) * 8 + 4 * H);
}
inline int64_t bwd_scratch_numel(int64_t B, int64_t H) { return std::max<int64_t>(B, 1) * ceil_div(H, 16) * 16; }

namespace FI_LSTM_ISA {

template <typename T>
inline T* mat_at(const RowMat<T>& m, int64_t row, int64_t b, int64_t t) {
  return m.padded ? m.ptr + b * m.sb + t * m.st : m.ptr + row * m.ld;
}
inline int64_t time_of(const Plan& pl, int64_t s, int64_t p, bool reverse) { return reverse ? pl.Ls[p] - 1 - s : s; }
template <typename T>
inline int64_t input_id(const GateInput<T>& in, int f, int64_t b, int64_t t) {
  const int64_t off = b * in.ids_sb[f] + t * in.ids_st[f];
  return in.ids64[f] ? static_cast<const int64_t*>(in.ids[f])[off] : static_cast<const int32_t*>(in.ids[f])[off];
}

// ---------------------------------------------------------------- thread helpers
template <typename F>
inline void parallel(int nthreads, F&& body) {
#ifdef FI_HAVE_OPENMP
  if (nthreads > 1) {
#pragma omp parallel num_threads(nthreads)
    body(omp_get_thread_num(), omp_get_num_threads());
    return;
  }
#endif
  body(0, 1);
}

inline void barrier(int nthr) {
#ifdef FI_HAVE_OPENMP
  if (nthr > 1) {
#pragma omp barrier
  }
#else
  (void)nthr;
#endif
}

// ---------------------------------------------------------------- pointer-array input gathering
// Row pointers for a tile of MR positions at step s.
template <typename T>
struct TileRows {
  int64_t p[8];
  int64_t row[8];
  int64_t b[8];
  int64_t t[8];
  const T* in[8];   // forward with projected tables: the row's 4H gate input (a table row or gbuf's)
};

template <typename T>
void forward_epilogue(FwdArgs<T>& a, const T* cS, int64_t ldst);

// ---------------------------------------------------------------- forward driver
// Policy P provides, for element type T:
//   static constexpr int MR;                  // max rows per tile
//   static void fwd_tile(const FwdArgs<T>&, const TileRows<T>&, int mr, int64_t jb,
//                        const T* hprev, T* hnext, T* cstate, int64_t ldst);
// Row tiles per W_hh panel read in the forward recurrence (see forward_driver).
constexpr int kTileGroup = 8;

template <class P, typename T>
void forward_driver(FwdArgs<T>& a) {
  Plan& pl = *a.plan;
  const int64_t H = a.H, B = pl.B;
  const int64_t ldst = ceil_div(H, 8) * 8;
  const int64_t nb = ceil_div(H, 8);
  const int64_t plane = std::max<int64_t>(B, 1) * ldst;
  T* const hA = a.scratch;
  T* const hB = a.scratch + plane;
  T* const cS = a.scratch + 2 * plane;
  std::memset(a.scratch, 0, sizeof(T) * 3 * plane);
  for (int64_t p = 0; p < B; ++p) {
    const int64_t b = pl.perm[p];
    if (a.h0) std::memcpy(hA + p * ldst, a.h0 + b * H, sizeof(T) * H);
    if (a.c0) std::memcpy(cS + p * ldst, a.c0 + b * H, sizeof(T) * H);
  }
  // Threads: with enough rows, each thread owns fixed row tiles (tile k -> thread k % nthr) for the
  // whole sequence. A position's recurrence reads only its own rows, so no synchronisation is needed
  // between steps (robust when cores are shared). Tiny batches split the hidden units instead, with a
  // barrier per step, and only when a step has enough work to pay for it.
  const int64_t n0 = pl.maxlen > 0 ? pl.batch_sizes[0] : 0;
  const int64_t tiles0 = ceil_div(n0, P::MR);
  const bool row_split = a.nthreads > 1 && tiles0 >= 2 * a.nthreads;
  int nthreads = 1;
  if (row_split) nthreads = a.nthreads;
  else if (n0 * H * 4 * H >= kUnitSplitMinMacs) nthreads = static_cast<int>(std::min<int64_t>(a.nthreads, nb));
  // Projected-table input, a group of positions at a time (below): with one field the tiles read the
  // 4H-wide table rows in place, with several their sum gathered into gbuf; either way the rows were
  // prefetched while the previous group computed (read cold, a row was touched in ceil(H/8) scattered
  // 128-byte pieces, nearly all DRAM misses).
  const GateInput<T>& in = a.in;
  const bool gather = in.nfields > 0 && (row_split || nthreads == 1);
  a.gbuf = gather ? a.scratch + 3 * plane : nullptr;
  const int64_t H4 = 4 * H;
  const int64_t row_bytes = static_cast<int64_t>(sizeof(T)) * H4;
  const int64_t row_lines = ceil_div(row_bytes, int64_t(64));
  parallel(nthreads, [&](int tid, int nthr) {
    T* hp = hA;
    T* hn = hB;
    const int64_t jb0 = row_split ? 0 : nb * tid / nthr, jb1 = row_split ? nb : nb * (tid + 1) / nthr;
    const int64_t kstep = row_split ? nthr : 1, k0 = row_split ? tid : 0;
    const int64_t gstride = kTileGroup * kstep * P::MR;   // from one of this thread's groups to its next
    // The table rows of this thread's next group (prefetched while the current group computes).
    std::vector<const char*> next_rows;
    if (gather) next_rows.reserve(static_cast<size_t>(kTileGroup * P::MR * in.nfields));
    // Rows of the group starting at position g0 of step s (its tiles: g0, g0 + kstep MR, ...).
    auto group_rows = [&](int64_t s, int64_t g0, auto&& fn) {
      const int64_t n = pl.batch_sizes[s];
      int64_t p0 = g0;
      for (int i = 0; i < kTileGroup && p0 < n; ++i, p0 += kstep * P::MR)
        for (int64_t p = p0; p < std::min<int64_t>(p0 + P::MR, n); ++p) fn(p);
    };
    for (int64_t s = 0; s < pl.maxlen; ++s) {
      const int64_t n = pl.batch_sizes[s];
      // Groups of kTileGroup of this thread's row tiles outer, unit blocks in the middle, the group's
      // tiles inner: a W_hh panel (H x 32) is read from L2 once per group and then from L1 by the
      // group's other tiles, while the group's h and input rows (kTileGroup x MR rows) stay in L1.
      // One tile per panel read (the earlier order) streamed W_hh from L2 for every MR rows: ~21 bytes
      // of L2 traffic per cycle at H = 128, about what this core's L2 delivers, so the FMAs waited.
      // (Unit blocks outer and all rows inner cycled the rows and states through L2 instead.)
      for (int64_t g0 = k0 * P::MR; g0 < n; g0 += gstride) {
        if (gather) {
          // Several fields: the group's summed table rows into gbuf, ~kTileGroup MR rows of 4H that stay
          // in L1/L2 next to W_hh. (Gathering the whole step's rows at once, 2 KB per position, filled
          // L2 and pushed W_hh out of it.)
          if (in.nfields > 1)
            group_rows(s, g0, [&](int64_t p) {
              const int64_t b = pl.perm[p], t = time_of(pl, s, p, a.reverse);
              T* dst = a.gbuf + p * H4;
              std::memcpy(dst, in.tables[0] + input_id(in, 0, b, t) * H4, sizeof(T) * H4);
              for (int f = 1; f < in.nfields; ++f) {
                const T* src = in.tables[f] + input_id(in, f, b, t) * H4;
                for (int64_t j = 0; j < H4; ++j) dst[j] += src[j];
              }
            });
          // The next group's rows (this step's, or the first group of the next step), prefetched a few
          // lines before each tile below: a whole group's compute ahead of their use.
          next_rows.clear();
          int64_t s2 = s, g2 = g0 + gstride;
          if (g2 >= n) s2 = s + 1, g2 = k0 * P::MR;
          if (s2 < pl.maxlen && g2 < pl.batch_sizes[s2])
            group_rows(s2, g2, [&](int64_t p) {
              const int64_t b = pl.perm[p], t = time_of(pl, s2, p, a.reverse);
              for (int f = 0; f < in.nfields; ++f)
                next_rows.push_back(reinterpret_cast<const char*>(in.tables[f] + input_id(in, f, b, t) * H4));
            });
        }
        TileRows<T> tr[kTileGroup];
        int mrs[kTileGroup];
        int64_t p0s[kTileGroup];
        int ntile = 0;
        for (int64_t p0 = g0; ntile < kTileGroup && p0 < n; p0 += kstep * P::MR, ++ntile) {
          const int mr = static_cast<int>(std::min<int64_t>(P::MR, n - p0));
          mrs[ntile] = mr;
          p0s[ntile] = p0;
          for (int r = 0; r < mr; ++r) {
            const int64_t p = p0 + r;
            tr[ntile].p[r] = p;
            tr[ntile].t[r] = time_of(pl, s, p, a.reverse);
            tr[ntile].row[r] = pl.offsets[tr[ntile].t[r]] + p;
            tr[ntile].b[r] = pl.perm[p];
            // one field: its table row itself (prefetched with the group before); several: their sum
            tr[ntile].in[r] = !gather ? nullptr
                              : in.nfields == 1 ? in.tables[0] + input_id(in, 0, tr[ntile].b[r], tr[ntile].t[r]) * H4
                                                : a.gbuf + p * H4;
          }
        }
        // The next group's lines, a few before each tile (a burst of them would stall on the
        // core's outstanding-miss slots): cursor (row ri, line li), no divisions in the loop.
        const int64_t units = static_cast<int64_t>(next_rows.size()) * row_lines;
        const int64_t slots = (jb1 - jb0) * ntile;
        const int64_t per_slot = slots > 0 ? ceil_div(units, slots) : 0;
        size_t ri = 0;
        int64_t li = 0;
        for (int64_t jb = jb0; jb < jb1; ++jb) {
          for (int i = 0; i < ntile; ++i) {
            for (int64_t u = 0; u < per_slot && ri < next_rows.size(); ++u) {
              __builtin_prefetch(next_rows[ri] + 64 * li);
              if (++li == row_lines) li = 0, ++ri;
            }
            P::fwd_tile(a, tr[i], mrs[i], jb, hp + p0s[i] * ldst, hn + p0s[i] * ldst, cS + p0s[i] * ldst, ldst);
          }
        }
      }
      std::swap(hp, hn);
      if (!row_split) barrier(nthr);
    }
  });
  forward_epilogue(a, cS, ldst);
}

// Final states (h_n, c_n) and zero padding, after the recurrence; cS = the c state per position.
template <typename T>
void forward_epilogue(FwdArgs<T>& a, const T* cS, int64_t ldst) {
  const Plan& pl = *a.plan;
  const int64_t H = a.H, B = pl.B;
  for (int64_t p = 0; p < B; ++p) {
    const int64_t b = pl.perm[p], L = pl.Ls[p];
    if (a.h_n) {
      if (L == 0) {
        if (a.h0) std::memcpy(a.h_n + b * H, a.h0 + b * H, sizeof(T) * H);
        else std::memset(a.h_n + b * H, 0, sizeof(T) * H);
      } else {
        const int64_t s = L - 1;
        const int64_t t = time_of(pl, s, p, a.reverse);
        std::memcpy(a.h_n + b * H, mat_at(a.out, pl.offsets[t] + p, b, t), sizeof(T) * H);
      }
    }
    if (a.c_n) {
      if (L == 0) {
        if (a.c0) std::memcpy(a.c_n + b * H, a.c0 + b * H, sizeof(T) * H);
        else std::memset(a.c_n + b * H, 0, sizeof(T) * H);
      } else {
        std::memcpy(a.c_n + b * H, cS + p * ldst, sizeof(T) * H);
      }
    }
    if (a.zero_padding && a.out.padded) {
      for (int64_t t = L; t < pl.T; ++t) std::memset(mat_at(a.out, 0, b, t), 0, sizeof(T) * H);
    }
  }
}

// ---------------------------------------------------------------- backward driver
// Policy P provides:
//   static constexpr int MRB;   // max rows per backward tile
//   static void bwd_tile(const BwdArgs<T>&, const TileRows<T>& cur, const TileRows<T>& nxt,
//                        int mr, int64_t jb, bool use_gemm, int64_t s, T* dc_carry, int64_t ldst,
//                        T* dh_final /*nullptr or [B,H] batch order, GEMM-only mode*/);
//   cur: rows at step s (positions p0..p0+mr-1); nxt: the same positions at step s+1 (GEMM input,
//   valid when use_gemm). With dh_final set, only the GEMM runs and its result goes to dh_final.
template <class P, typename T>
void backward_driver(BwdArgs<T>& a) {
  Plan& pl = *a.plan;
  const int64_t H = a.H, B = pl.B;
  const int64_t nb = ceil_div(H, 16);
  const int64_t ldst = nb * 16;
  T* const dc = a.scratch;
  std::memset(dc, 0, sizeof(T) * std::max<int64_t>(B, 1) * ldst);
  // Initial carries for every position: dL/dc_n (dh_n is added when the sequence becomes active).
  for (int64_t p = 0; p < B; ++p) {
    if (a.grad_cn) std::memcpy(dc + p * ldst, a.grad_cn + pl.perm[p] * H, sizeof(T) * H);
  }
  // Threads as in forward_driver: fixed row tiles of MRB positions per thread (no barriers), or the
  // hidden units split with a barrier per step for tiny batches.
  const int64_t n0 = pl.maxlen > 0 ? pl.batch_sizes[0] : 0;
  const int64_t tiles0 = ceil_div(n0, P::MRB);
  const bool row_split = a.nthreads > 1 && tiles0 >= 2 * a.nthreads;
  int nthreads = 1;
  if (row_split) nthreads = a.nthreads;
  else if (n0 * H * 4 * H >= kUnitSplitMinMacs) nthreads = static_cast<int>(std::min<int64_t>(a.nthreads, nb));
  parallel(nthreads, [&](int tid, int nthr) {
    const int64_t jb0 = row_split ? 0 : nb * tid / nthr, jb1 = row_split ? nb : nb * (tid + 1) / nthr;
    const int64_t kstep = row_split ? nthr : 1, k0 = row_split ? tid : 0;
    for (int64_t s = pl.maxlen - 1; s >= -1; --s) {
      // s == -1: the GEMM-only pass that yields dh0 from the step-0 dgates.
      if (s < 0 && !a.dh0) break;
      const int64_t n = s >= 0 ? pl.batch_sizes[s] : pl.batch_sizes[0];
      const int64_t n_next = (s + 1 < pl.maxlen) ? pl.batch_sizes[s + 1] : 0;
      for (int64_t t0 = k0 * P::MRB; t0 < n; t0 += kstep * P::MRB) {
        for (int64_t jb = jb0; jb < jb1; ++jb) {
          // A fixed tile [t0, t0 + MRB) is cut at n_next: rows below it take the recurrent GEMM,
          // rows at or above it start here (their carry is dL/dh_n, dL/dc_n).
          const int64_t tend = std::min<int64_t>(t0 + P::MRB, n);
          int64_t p0 = t0;
          while (p0 < tend) {
            const bool use_gemm = p0 < n_next;
            const int64_t lim = use_gemm ? std::min(n_next, tend) : tend;
            const int mr = static_cast<int>(lim - p0);
            TileRows<T> cur, nxt;
            for (int r = 0; r < mr; ++r) {
              const int64_t p = p0 + r;
              cur.p[r] = nxt.p[r] = p;
              cur.b[r] = nxt.b[r] = pl.perm[p];
              if (s >= 0) {
                cur.t[r] = time_of(pl, s, p, a.reverse);
                cur.row[r] = pl.offsets[cur.t[r]] + p;
              }
              if (use_gemm) {
                nxt.t[r] = time_of(pl, s + 1, p, a.reverse);
                nxt.row[r] = pl.offsets[nxt.t[r]] + p;
              }
            }
            P::bwd_tile(a, cur, nxt, mr, jb, use_gemm, s, dc + p0 * ldst, ldst, s < 0 ? a.dh0 : nullptr);
            p0 += mr;
          }
        }
      }
      if (!row_split) barrier(nthr);
    }
  });
  for (int64_t p = 0; p < B; ++p) {
    const int64_t b = pl.perm[p];
    if (a.dc0) std::memcpy(a.dc0 + b * H, dc + p * ldst, sizeof(T) * H);
    if (a.dh0 && pl.Ls[p] == 0) {
      if (a.grad_hn) std::memcpy(a.dh0 + b * H, a.grad_hn + b * H, sizeof(T) * H);
      else std::memset(a.dh0 + b * H, 0, sizeof(T) * H);
    }
  }
}

// ---------------------------------------------------------------- input projection (all steps at once)
// out[r] = x(r) W_ih^T + bias for every packed row r of one direction: [N, 4H] rows (ld ldo), x rows
// packed or padded (RowMat), W_ih as "fwd" panels (K = E). For tiny batches, where the recurrence
// would otherwise apply W_ih one row at a time (a GEMV), this runs it as a register-blocked GEMM over
// all N rows first. Rows are split across threads (no synchronisation).

// Policy P provides: static constexpr int MR; static void proj_tile(const ProjArgs<T>&, const T* const* xrows,
//   T* const* orows, int mr, int64_t jb).
template <class P, typename T>
void projection_driver(ProjArgs<T>& a) {
  Plan& pl = *a.plan;
  const int64_t nb = ceil_div(a.H, 8);
  // enumerate (row, b, t) of every packed row in row order
  int64_t* const rb = a.scratch;
  int64_t* const rt = a.scratch + pl.N;
  for (int64_t s = 0; s < pl.maxlen; ++s)
    for (int64_t p = 0; p < pl.batch_sizes[s]; ++p) {
      const int64_t t = time_of(pl, s, p, a.reverse);
      const int64_t row = pl.offsets[t] + p;
      rb[row] = pl.perm[p];
      rt[row] = t;
    }
  const int64_t tiles = ceil_div(pl.N, P::MR);
  const int nthreads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(a.nthreads, tiles / 4)));
  parallel(nthreads, [&](int tid, int nthr) {
    for (int64_t k = tid; k < tiles; k += nthr) {
      const int64_t r0 = k * P::MR;
      const int mr = static_cast<int>(std::min<int64_t>(P::MR, pl.N - r0));
      const T* xr[8];
      T* orow[8];
      for (int r = 0; r < mr; ++r) {
        xr[r] = mat_at(a.x, r0 + r, rb[r0 + r], rt[r0 + r]);
        orow[r] = a.out + (r0 + r) * a.ldo;
      }
      for (int64_t jb = 0; jb < nb; ++jb) P::proj_tile(a, xr, orow, mr, jb);
    }
  });
}

}  // namespace FI_LSTM_ISA

// ---------------------------------------------------------------- AVX2 entry points (lstm_avx2.cpp)
bool avx2_compiled();
void forward_avx2(FwdArgs<float>& a);
void backward_avx2(BwdArgs<float>& a);
void projection_avx2(ProjArgs<float>& a);
void forward_gemm_avx2(FwdArgs<float>& a);

}  // namespace lstm
}  // namespace fi
