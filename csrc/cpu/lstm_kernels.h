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
#pragma once

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
  inline T* at(int64_t row, int64_t b, int64_t t) const {
    return padded ? ptr + b * sb + t * st : ptr + row * ld;
  }
  explicit operator bool() const { return ptr != nullptr; }
};

// Length plan, shared by every layer and direction of one call.
struct Plan {
  int64_t B = 0, T = 0, N = 0, maxlen = 0;
  const int64_t* perm = nullptr;         // [B] position -> batch row
  const int64_t* batch_sizes = nullptr;  // [T] (entries >= maxlen are 0)
  const int64_t* offsets = nullptr;      // [T+1] exclusive prefix sums of batch_sizes
  std::vector<int64_t> Ls;               // [B] length at each position (descending)
  inline int64_t time_of(int64_t s, int64_t p, bool reverse) const { return reverse ? Ls[p] - 1 - s : s; }
  inline int64_t row(int64_t s, int64_t p, bool reverse) const {
    return offsets[time_of(s, p, reverse)] + p;
  }
};

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
  std::vector<const T*> tables;
  std::vector<int64_t> vocab;
  std::vector<const void*> ids;       // int32 or int64, padded [B, T] with strides below
  std::vector<int> ids64;
  std::vector<int64_t> ids_sb, ids_st;
  inline int64_t id(int f, int64_t b, int64_t t) const {
    int64_t off = b * ids_sb[f] + t * ids_st[f];
    return ids64[f] ? static_cast<const int64_t*>(ids[f])[off] : static_cast<const int32_t*>(ids[f])[off];
  }
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
  T* dh0 = nullptr;                // [B, H] batch order, or null
  T* dc0 = nullptr;                // [B, H] batch order, or null
};

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
};

// ---------------------------------------------------------------- forward driver
// Policy P provides, for element type T:
//   static constexpr int MR;                  // max rows per tile
//   static void fwd_tile(const FwdArgs<T>&, const TileRows<T>&, int mr, int64_t jb,
//                        const T* hprev, T* hnext, T* cstate, int64_t ldst);
template <class P, typename T>
void forward_driver(FwdArgs<T>& a) {
  Plan& pl = *a.plan;
  const int64_t H = a.H, B = pl.B;
  const int64_t ldst = ceil_div(H, 8) * 8;
  const int64_t nb = ceil_div(H, 8);
  std::vector<T> hA(static_cast<size_t>(std::max<int64_t>(B, 1) * ldst), T(0));
  std::vector<T> hB(hA.size(), T(0));
  std::vector<T> cS(hA.size(), T(0));
  for (int64_t p = 0; p < B; ++p) {
    const int64_t b = pl.perm[p];
    if (a.h0) std::memcpy(&hA[p * ldst], a.h0 + b * H, sizeof(T) * H);
    if (a.c0) std::memcpy(&cS[p * ldst], a.c0 + b * H, sizeof(T) * H);
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
  parallel(nthreads, [&](int tid, int nthr) {
    T* hp = hA.data();
    T* hn = hB.data();
    const int64_t jb0 = row_split ? 0 : nb * tid / nthr, jb1 = row_split ? nb : nb * (tid + 1) / nthr;
    const int64_t kstep = row_split ? nthr : 1, k0 = row_split ? tid : 0;
    for (int64_t s = 0; s < pl.maxlen; ++s) {
      const int64_t n = pl.batch_sizes[s];
      for (int64_t jb = jb0; jb < jb1; ++jb) {
        for (int64_t p0 = k0 * P::MR; p0 < n; p0 += kstep * P::MR) {
          const int mr = static_cast<int>(std::min<int64_t>(P::MR, n - p0));
          TileRows<T> tr;
          for (int r = 0; r < mr; ++r) {
            const int64_t p = p0 + r;
            tr.p[r] = p;
            tr.t[r] = pl.time_of(s, p, a.reverse);
            tr.row[r] = pl.offsets[tr.t[r]] + p;
            tr.b[r] = pl.perm[p];
          }
          P::fwd_tile(a, tr, mr, jb, hp + p0 * ldst, hn + p0 * ldst, cS.data() + p0 * ldst, ldst);
        }
      }
      std::swap(hp, hn);
      if (!row_split) barrier(nthr);
    }
  });
  // Final states and padding.
  for (int64_t p = 0; p < B; ++p) {
    const int64_t b = pl.perm[p], L = pl.Ls[p];
    if (a.h_n) {
      if (L == 0) {
        if (a.h0) std::memcpy(a.h_n + b * H, a.h0 + b * H, sizeof(T) * H);
        else std::fill(a.h_n + b * H, a.h_n + (b + 1) * H, T(0));
      } else {
        const int64_t s = L - 1;
        const int64_t t = pl.time_of(s, p, a.reverse);
        std::memcpy(a.h_n + b * H, a.out.at(pl.offsets[t] + p, b, t), sizeof(T) * H);
      }
    }
    if (a.c_n) {
      if (L == 0) {
        if (a.c0) std::memcpy(a.c_n + b * H, a.c0 + b * H, sizeof(T) * H);
        else std::fill(a.c_n + b * H, a.c_n + (b + 1) * H, T(0));
      } else {
        std::memcpy(a.c_n + b * H, &cS[p * ldst], sizeof(T) * H);
      }
    }
    if (a.zero_padding && a.out.padded) {
      for (int64_t t = L; t < pl.T; ++t) std::fill(a.out.at(0, b, t), a.out.at(0, b, t) + H, T(0));
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
  std::vector<T> dc(static_cast<size_t>(std::max<int64_t>(B, 1) * ldst), T(0));
  // Initial carries for every position: dL/dc_n (dh_n is added when the sequence becomes active).
  for (int64_t p = 0; p < B; ++p) {
    if (a.grad_cn) std::memcpy(&dc[p * ldst], a.grad_cn + pl.perm[p] * H, sizeof(T) * H);
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
      for (int64_t jb = jb0; jb < jb1; ++jb) {
        for (int64_t t0 = k0 * P::MRB; t0 < n; t0 += kstep * P::MRB) {
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
                cur.t[r] = pl.time_of(s, p, a.reverse);
                cur.row[r] = pl.offsets[cur.t[r]] + p;
              }
              if (use_gemm) {
                nxt.t[r] = pl.time_of(s + 1, p, a.reverse);
                nxt.row[r] = pl.offsets[nxt.t[r]] + p;
              }
            }
            P::bwd_tile(a, cur, nxt, mr, jb, use_gemm, s, dc.data() + p0 * ldst, ldst, s < 0 ? a.dh0 : nullptr);
            p0 += mr;
          }
        }
      }
      if (!row_split) barrier(nthr);
    }
  });
  for (int64_t p = 0; p < B; ++p) {
    const int64_t b = pl.perm[p];
    if (a.dc0) std::memcpy(a.dc0 + b * H, &dc[p * ldst], sizeof(T) * H);
    if (a.dh0 && pl.Ls[p] == 0) {
      if (a.grad_hn) std::memcpy(a.dh0 + b * H, a.grad_hn + b * H, sizeof(T) * H);
      else std::fill(a.dh0 + b * H, a.dh0 + (b + 1) * H, T(0));
    }
  }
}

// ---------------------------------------------------------------- input projection (all steps at once)
// out[r] = x(r) W_ih^T + bias for every packed row r of one direction: [N, 4H] rows (ld ldo), x rows
// packed or padded (RowMat), W_ih as "fwd" panels (K = E). For tiny batches, where the recurrence
// would otherwise apply W_ih one row at a time (a GEMV), this runs it as a register-blocked GEMM over
// all N rows first. Rows are split across threads (no synchronisation).
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
};

// Policy P provides: static constexpr int MR; static void proj_tile(const ProjArgs<T>&, const T* const* xrows,
//   T* const* orows, int mr, int64_t jb).
template <class P, typename T>
void projection_driver(ProjArgs<T>& a) {
  Plan& pl = *a.plan;
  const int64_t nb = ceil_div(a.H, 8);
  // enumerate (row, b, t) of every packed row in row order
  std::vector<int64_t> rb(static_cast<size_t>(pl.N)), rt(static_cast<size_t>(pl.N));
  for (int64_t s = 0; s < pl.maxlen; ++s)
    for (int64_t p = 0; p < pl.batch_sizes[s]; ++p) {
      const int64_t t = pl.time_of(s, p, a.reverse);
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
        xr[r] = a.x.at(r0 + r, rb[r0 + r], rt[r0 + r]);
        orow[r] = a.out + (r0 + r) * a.ldo;
      }
      for (int64_t jb = 0; jb < nb; ++jb) P::proj_tile(a, xr, orow, mr, jb);
    }
  });
}

// ---------------------------------------------------------------- AVX2 entry points (lstm_avx2.cpp)
bool avx2_compiled();
void forward_avx2(FwdArgs<float>& a);
void backward_avx2(BwdArgs<float>& a);
void projection_avx2(ProjArgs<float>& a);

}  // namespace lstm
}  // namespace fi
