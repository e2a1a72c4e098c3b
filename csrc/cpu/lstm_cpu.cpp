// Fused LSTM kernels (CPU): length plan, weight packing, the whole-sequence recurrence (forward
// and BPTT) of one direction of one layer, and a multi-layer single step for serving.
//
// All pointers are raw addresses (std::uintptr_t from tensor.data_ptr()); Python allocates every
// output and workspace. Layouts and conventions: see lstm_kernels.h. dtype codes: 0 = float32,
// 1 = float64. The input projection of a whole sequence (x W_ih^T, one large GEMM) and the weight
// gradients (dgates^T x, dgates^T hprev, one GEMM each) run in torch from Python; the recurrence
// (h W_hh^T fused with the gate pointwise, step after step) runs here.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#define FI_LSTM_ISA generic
#include "cpu/lstm_kernels.h"
#include "cpu/registry.h"
#include "cpu/simd.h"

namespace py = pybind11;

namespace fi {
namespace lstm {
namespace {
using namespace ::fi::lstm::generic;

// ---------------------------------------------------------------- portable tiles (float, double)
template <typename T>
inline T sigm(T x) { return T(1) / (T(1) + std::exp(-x)); }

template <typename T>
struct GenericPolicy {
  static constexpr int MR = 4;
  static constexpr int MRB = 4;

  static void fwd_tile(const FwdArgs<T>& a, const TileRows<T>& tr, int mr, int64_t jb, const T* hprev,
                       T* hnext, T* cst, int64_t ldst) {
    const int64_t H = a.H, j0 = jb * 8;
    const int nu = static_cast<int>(std::min<int64_t>(8, H - j0));
    T acc[MR][32];
    for (int r = 0; r < MR; ++r)
      for (int q = 0; q < 32; ++q) acc[r][q] = T(0);
    const T* panel = a.whh_packed + jb * H * 32;
    for (int64_t k = 0; k < H; ++k) {
      const T* pk = panel + k * 32;
      for (int r = 0; r < mr; ++r) {
        const T av = hprev[r * ldst + k];
        for (int q = 0; q < 32; ++q) acc[r][q] += av * pk[q];
      }
    }
    const GateInput<T>& in = a.in;
    for (int r = 0; r < mr; ++r) {
      const int64_t row = tr.row[r], b = tr.b[r], t = tr.t[r];
      if (in.xproj.ptr) {
        const T* xr = mat_at(in.xproj, row, b, t);
        for (int g = 0; g < 4; ++g)
          for (int u = 0; u < nu; ++u) acc[r][g * 8 + u] += xr[g * H + j0 + u];
      } else if (in.x.ptr) {
        const T* xr = mat_at(in.x, row, b, t);
        const T* pw = in.wih_packed + jb * in.E * 32;
        for (int64_t k = 0; k < in.E; ++k) {
          const T xv = xr[k];
          for (int q = 0; q < 32; ++q) acc[r][q] += xv * pw[k * 32 + q];
        }
        if (in.bias)
          for (int g = 0; g < 4; ++g)
            for (int u = 0; u < nu; ++u) acc[r][g * 8 + u] += in.bias[g * H + j0 + u];
      } else if (a.gbuf) {
        const T* grow = tr.in[r];
        for (int g = 0; g < 4; ++g)
          for (int u = 0; u < nu; ++u) acc[r][g * 8 + u] += grow[g * H + j0 + u];
      } else {
        for (int f = 0; f < in.nfields; ++f) {
          const T* tr_ = in.tables[f] + input_id(in, f, b, t) * 4 * H;
          for (int g = 0; g < 4; ++g)
            for (int u = 0; u < nu; ++u) acc[r][g * 8 + u] += tr_[g * H + j0 + u];
        }
      }
      T* orow = mat_at(a.out, row, b, t);
      for (int u = 0; u < nu; ++u) {
        const T ig = sigm(acc[r][u]), fg = sigm(acc[r][8 + u]), gg = std::tanh(acc[r][16 + u]),
                og = sigm(acc[r][24 + u]);
        const T c = fg * cst[r * ldst + j0 + u] + ig * gg;
        const T h = og * std::tanh(c);
        cst[r * ldst + j0 + u] = c;
        hnext[r * ldst + j0 + u] = h;
        orow[j0 + u] = h;
        if (a.gates_ws) {
          T* gw = a.gates_ws + row * 4 * H + j0 + u;
          gw[0] = ig;
          gw[H] = fg;
          gw[2 * H] = gg;
          gw[3 * H] = og;
        }
        if (a.c_ws) a.c_ws[row * H + j0 + u] = c;
      }
    }
  }

  static void proj_tile(const ProjArgs<T>& a, const T* const* xr, T* const* orow, int mr, int64_t jb) {
    const int64_t H = a.H, j0 = jb * 8;
    const int nu = static_cast<int>(std::min<int64_t>(8, H - j0));
    const T* pw = a.wih_packed + jb * a.E * 32;
    for (int r = 0; r < mr; ++r) {
      T acc[32];
      for (int q = 0; q < 32; ++q) acc[q] = T(0);
      for (int64_t k = 0; k < a.E; ++k) {
        const T xv = xr[r][k];
        for (int q = 0; q < 32; ++q) acc[q] += xv * pw[k * 32 + q];
      }
      for (int g = 0; g < 4; ++g)
        for (int u = 0; u < nu; ++u) orow[r][g * H + j0 + u] = acc[g * 8 + u] + (a.bias ? a.bias[g * H + j0 + u] : T(0));
    }
  }

  static void bwd_tile(const BwdArgs<T>& a, const TileRows<T>& cur, const TileRows<T>& nxt, int mr, int64_t jb,
                       bool use_gemm, int64_t s, T* dc, int64_t ldst, T* dh_final) {
    const int64_t H = a.H, j0 = jb * 16, H4 = 4 * H;
    const int nu = static_cast<int>(std::min<int64_t>(16, H - j0));
    T dh[MRB][16];
    for (int r = 0; r < MRB; ++r)
      for (int u = 0; u < 16; ++u) dh[r][u] = T(0);
    if (use_gemm) {
      const T* panel = a.whh_bwd + jb * H4 * 16;
      for (int r = 0; r < mr; ++r) {
        const T* dg = a.dgates + nxt.row[r] * H4;
        for (int64_t k = 0; k < H4; ++k) {
          const T dv = dg[k];
          for (int u = 0; u < 16; ++u) dh[r][u] += dv * panel[k * 16 + u];
        }
      }
    } else if (a.grad_hn) {
      for (int r = 0; r < mr; ++r)
        for (int u = 0; u < nu; ++u) dh[r][u] = a.grad_hn[cur.b[r] * H + j0 + u];
    }
    if (dh_final) {
      for (int r = 0; r < mr; ++r)
        for (int u = 0; u < nu; ++u) dh_final[nxt.b[r] * H + j0 + u] = dh[r][u];
      return;
    }
    const Plan& pl = *a.plan;
    for (int r = 0; r < mr; ++r) {
      const int64_t row = cur.row[r], b = cur.b[r], p = cur.p[r];
      const T* go = a.grad_out.ptr ? mat_at(a.grad_out, row, b, cur.t[r]) + j0 : nullptr;
      const T* gw = a.gates_ws + row * H4 + j0;
      const T* cw = a.c_ws + row * H + j0;
      const T* cprev = nullptr;
      const T* hprev = nullptr;
      if (s > 0) {
        const int64_t tp = time_of(pl, s - 1, p, a.reverse);
        const int64_t prow = pl.offsets[tp] + p;
        cprev = a.c_ws + prow * H + j0;
        hprev = mat_at(a.out, prow, b, tp) + j0;
      } else {
        cprev = a.c0 ? a.c0 + b * H + j0 : nullptr;
        hprev = a.h0 ? a.h0 + b * H + j0 : nullptr;
      }
      T* dgo = a.dgates + row * H4 + j0;
      for (int u = 0; u < nu; ++u) {
        const T dhv = dh[r][u] + (go ? go[u] : T(0));
        const T ig = gw[u], fg = gw[H + u], gg = gw[2 * H + u], og = gw[3 * H + u];
        const T tc = std::tanh(cw[u]);
        const T dcv = dc[r * ldst + j0 + u] + dhv * og * (T(1) - tc * tc);
        const T cp = cprev ? cprev[u] : T(0);
        dgo[u] = dcv * gg * ig * (T(1) - ig);
        dgo[H + u] = dcv * cp * fg * (T(1) - fg);
        dgo[2 * H + u] = dcv * ig * (T(1) - gg * gg);
        dgo[3 * H + u] = dhv * tc * og * (T(1) - og);
        dc[r * ldst + j0 + u] = dcv * fg;
        if (a.hprev) a.hprev[row * a.hprev_ld + j0 + u] = hprev ? hprev[u] : T(0);
      }
    }
  }
};

// ---------------------------------------------------------------- packing
template <typename T>
void pack_fwd(const T* w, int64_t ldw, int64_t H, int64_t K, T* dst) {
  const int64_t nb = ceil_div(H, 8);
  for (int64_t jb = 0; jb < nb; ++jb)
    for (int64_t k = 0; k < K; ++k)
      for (int g = 0; g < 4; ++g)
        for (int u = 0; u < 8; ++u) {
          const int64_t j = jb * 8 + u;
          dst[(jb * K + k) * 32 + g * 8 + u] = j < H ? w[(g * H + j) * ldw + k] : T(0);
        }
}

template <typename T>
void pack_bwd(const T* w, int64_t H, T* dst) {
  const int64_t nb = ceil_div(H, 16), H4 = 4 * H;
  for (int64_t jb = 0; jb < nb; ++jb)
    for (int64_t k = 0; k < H4; ++k)
      for (int u = 0; u < 16; ++u) {
        const int64_t j = jb * 16 + u;
        dst[(jb * H4 + k) * 16 + u] = j < H ? w[k * H + j] : T(0);
      }
}

// ---------------------------------------------------------------- argument parsing helpers
using MatDesc = std::tuple<std::uintptr_t, int64_t, int64_t, int64_t, bool>;  // ptr, ld, sb, st, padded
using PlanDesc = std::tuple<std::uintptr_t, std::uintptr_t, std::uintptr_t, std::uintptr_t, int64_t, int64_t>;
// table: (table ptr [V, 4H], V, ids ptr, ids is int64, ids stride b, ids stride t)
using TableDesc = std::tuple<std::uintptr_t, int64_t, std::uintptr_t, bool, int64_t, int64_t>;

template <typename T>
RowMat<T> to_mat(const std::optional<MatDesc>& d) {
  RowMat<T> m;
  if (!d) return m;
  m.ptr = reinterpret_cast<T*>(std::get<0>(*d));
  m.ld = std::get<1>(*d);
  m.sb = std::get<2>(*d);
  m.st = std::get<3>(*d);
  m.padded = std::get<4>(*d);
  return m;
}

template <typename T>
T* ptr(std::uintptr_t p) { return reinterpret_cast<T*>(p); }

void check_dtype(int dtype) {
  if (dtype != 0 && dtype != 1)
    throw std::invalid_argument("fastinterest lstm (cpu): dtype code " + std::to_string(dtype) +
                                " is not supported (0 = float32, 1 = float64)");
}

// lengths [B] int64 (batch order), perm [B], batch_sizes [T], offsets [T+1] as written by lstm_plan.
// The plan's sorted lengths live in `Ls` (owned here, in the generic TU).
struct PlanOwner {
  Plan pl;
  std::vector<int64_t> Ls;
  explicit PlanOwner(const PlanDesc& d) {
    const int64_t* lengths = ptr<const int64_t>(std::get<0>(d));
    pl.perm = ptr<const int64_t>(std::get<1>(d));
    pl.batch_sizes = ptr<const int64_t>(std::get<2>(d));
    pl.offsets = ptr<const int64_t>(std::get<3>(d));
    pl.B = std::get<4>(d);
    pl.T = std::get<5>(d);
    Ls.resize(static_cast<size_t>(pl.B));
    for (int64_t p = 0; p < pl.B; ++p) Ls[p] = lengths[pl.perm[p]];
    pl.Ls = Ls.data();
    pl.maxlen = pl.B > 0 ? Ls[0] : 0;
    pl.N = pl.offsets[pl.T];
  }
  PlanOwner(const PlanOwner&) = delete;
  PlanOwner& operator=(const PlanOwner&) = delete;
};

// Builds the plan; validates lengths. Returns (N, maxlen).
std::pair<int64_t, int64_t> build_plan(const int64_t* lengths, int64_t B, int64_t T, int64_t* perm,
                                       int64_t* batch_sizes, int64_t* offsets, int64_t* pack_index,
                                       bool batch_first) {
  int64_t maxlen = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t L = lengths[b];
    if (L < 0 || L > T)
      throw std::invalid_argument("fastinterest lstm: lengths[" + std::to_string(b) + "] = " + std::to_string(L) +
                                  " is outside [0, T = " + std::to_string(T) + "]");
    maxlen = std::max(maxlen, L);
  }
  // Counting sort by length, descending, stable.
  std::vector<int64_t> count(static_cast<size_t>(T + 2), 0);
  for (int64_t b = 0; b < B; ++b) count[lengths[b]]++;
  std::vector<int64_t> start(static_cast<size_t>(T + 2), 0);
  int64_t acc = 0;
  for (int64_t L = T; L >= 0; --L) {
    start[L] = acc;
    acc += count[L];
  }
  for (int64_t b = 0; b < B; ++b) perm[start[lengths[b]]++] = b;
  // batch_sizes[t] = #{L > t}
  int64_t active = B - count[0];
  for (int64_t t = 0; t < T; ++t) {
    batch_sizes[t] = active;
    active -= count[t + 1];
  }
  offsets[0] = 0;
  for (int64_t t = 0; t < T; ++t) offsets[t + 1] = offsets[t] + batch_sizes[t];
  if (pack_index) {
    for (int64_t t = 0; t < maxlen; ++t)
      for (int64_t p = 0; p < batch_sizes[t]; ++p) {
        const int64_t b = perm[p];
        pack_index[offsets[t] + p] = batch_first ? b * T + t : t * B + b;
      }
  }
  return {offsets[T], maxlen};
}

// The BLAS for the float32 recurrence (see forward_gemm in lstm_avx2.cpp): the address of a Fortran
// sgemm_ (Python hands over the one inside torch's own library), and the smallest batch it is used
// for (below it the register-blocked tiles win). Tunable: lstm_set_sgemm / FASTINTEREST_LSTM_GEMM_MIN_ROWS.
void*& sgemm_ptr() {
  static void* p = nullptr;
  return p;
}
int64_t& gemm_min_rows() {
  static int64_t v = 32;
  return v;
}

// Fill the BLAS fields of a float32 forward when that path applies (a no-op for float64).
template <typename T>
void use_blas(FwdArgs<T>& a, std::uintptr_t whh_raw, std::uintptr_t wih_raw, std::vector<T>& xbuf) {
  if constexpr (std::is_same<T, float>::value) {
    const int64_t n0 = a.plan->maxlen > 0 ? a.plan->batch_sizes[0] : 0;
    if (!sgemm_ptr() || !whh_raw || n0 < gemm_min_rows() || (a.in.x.ptr && !wih_raw)) return;
#ifdef FI_HAVE_AVX2_TU
    if (!(cpu_has_avx2() && avx2_compiled())) return;
#else
    return;
#endif
    a.sgemm = sgemm_ptr();
    a.whh_raw = ptr<const T>(whh_raw);
    if (a.in.x.ptr) {
      a.wih_raw = ptr<const T>(wih_raw);
      xbuf.resize(static_cast<size_t>(std::max<int64_t>(a.plan->B, 1) * a.in.E));
      a.xbuf = xbuf.data();
    }
  } else {
    (void)a, (void)whh_raw, (void)wih_raw, (void)xbuf;
  }
}

template <typename T>
void run_forward(FwdArgs<T>& a) {
#ifdef FI_HAVE_AVX2_TU
  if constexpr (std::is_same<T, float>::value) {
    if (cpu_has_avx2() && avx2_compiled()) {
      if (a.sgemm) forward_gemm_avx2(a);
      else forward_avx2(a);
      return;
    }
  }
#endif
  forward_driver<GenericPolicy<T>, T>(a);
}

template <typename T>
void run_backward(BwdArgs<T>& a) {
#ifdef FI_HAVE_AVX2_TU
  if constexpr (std::is_same<T, float>::value) {
    if (cpu_has_avx2() && avx2_compiled()) {
      backward_avx2(a);
      return;
    }
  }
#endif
  backward_driver<GenericPolicy<T>, T>(a);
}

template <typename T>
void run_projection(ProjArgs<T>& a) {
#ifdef FI_HAVE_AVX2_TU
  if constexpr (std::is_same<T, float>::value) {
    if (cpu_has_avx2() && avx2_compiled()) {
      projection_avx2(a);
      return;
    }
  }
#endif
  projection_driver<GenericPolicy<T>, T>(a);
}

template <typename T>
void fill_input(GateInput<T>& in, const std::optional<MatDesc>& xproj, const std::optional<MatDesc>& x, int64_t E,
                std::uintptr_t wih_packed, std::uintptr_t bias, const std::vector<TableDesc>& tables, int64_t H,
                const Plan* plan) {
  const int modes = (xproj ? 1 : 0) + (x ? 1 : 0) + (tables.empty() ? 0 : 1);
  if (modes != 1)
    throw std::invalid_argument("fastinterest lstm (cpu): give exactly one gate input (xproj, x or tables), got " +
                                std::to_string(modes));
  in.xproj = to_mat<const T>(xproj);
  in.x = to_mat<const T>(x);
  if (x) {
    if (!wih_packed) throw std::invalid_argument("fastinterest lstm (cpu): x input needs the packed W_ih");
    in.E = E;
    in.wih_packed = ptr<const T>(wih_packed);
    in.bias = bias ? ptr<const T>(bias) : nullptr;
  }
  if (tables.size() > static_cast<size_t>(kMaxFields))
    throw std::invalid_argument("fastinterest lstm (cpu): at most " + std::to_string(kMaxFields) +
                                " id fields, got " + std::to_string(tables.size()));
  in.nfields = static_cast<int>(tables.size());
  for (int f = 0; f < in.nfields; ++f) {
    const auto& td = tables[f];
    in.tables[f] = ptr<const T>(std::get<0>(td));
    in.vocab[f] = std::get<1>(td);
    in.ids[f] = reinterpret_cast<const void*>(std::get<2>(td));
    in.ids64[f] = std::get<3>(td) ? 1 : 0;
    in.ids_sb[f] = std::get<4>(td);
    in.ids_st[f] = std::get<5>(td);
  }
  // Validate every id that will be read (valid steps only): out of range -> IndexError.
  if (plan && in.nfields) {
    for (int f = 0; f < in.nfields; ++f)
      for (int64_t p = 0; p < plan->B; ++p) {
        const int64_t b = plan->perm[p];
        for (int64_t t = 0; t < plan->Ls[p]; ++t) {
          const int64_t id = input_id(in, f, b, t);
          if (id < 0 || id >= in.vocab[f])
            throw std::out_of_range("fastinterest lstm: index " + std::to_string(id) + " at [" + std::to_string(b) +
                                    ", " + std::to_string(t) + "] of id field " + std::to_string(f) +
                                    " is out of range for a table of " + std::to_string(in.vocab[f]) + " rows");
        }
      }
  }
  (void)H;
}

template <typename T>
void forward_impl(int nthreads, int64_t H, bool reverse, const PlanDesc& plan_d, const std::optional<MatDesc>& xproj,
                  const std::optional<MatDesc>& x, int64_t E, std::uintptr_t wih_packed, std::uintptr_t bias,
                  const std::vector<TableDesc>& tables, std::uintptr_t whh_packed, std::uintptr_t h0,
                  std::uintptr_t c0, const MatDesc& out, bool zero_padding, std::uintptr_t gates_ws,
                  std::uintptr_t c_ws, std::uintptr_t h_n, std::uintptr_t c_n, std::uintptr_t whh_raw,
                  std::uintptr_t wih_raw) {
  PlanOwner po(plan_d);
  Plan& pl = po.pl;
  std::vector<T> scratch(static_cast<size_t>(fwd_scratch_numel(pl.B, H)));
  std::vector<T> xbuf;
  FwdArgs<T> a;
  a.plan = &pl;
  a.scratch = scratch.data();
  a.H = H;
  a.reverse = reverse;
  a.nthreads = std::max(1, nthreads);
  fill_input<T>(a.in, xproj, x, E, wih_packed, bias, tables, H, &pl);
  a.whh_packed = ptr<const T>(whh_packed);
  a.h0 = h0 ? ptr<const T>(h0) : nullptr;
  a.c0 = c0 ? ptr<const T>(c0) : nullptr;
  a.out = to_mat<T>(out);
  a.zero_padding = zero_padding;
  a.gates_ws = gates_ws ? ptr<T>(gates_ws) : nullptr;
  a.c_ws = c_ws ? ptr<T>(c_ws) : nullptr;
  a.h_n = h_n ? ptr<T>(h_n) : nullptr;
  a.c_n = c_n ? ptr<T>(c_n) : nullptr;
  use_blas<T>(a, whh_raw, wih_raw, xbuf);
  py::gil_scoped_release nogil;
  run_forward<T>(a);
}

template <typename T>
void backward_impl(int nthreads, int64_t H, bool reverse, const PlanDesc& plan_d, const std::optional<MatDesc>& grad_out,
                   std::uintptr_t grad_hn, std::uintptr_t grad_cn, std::uintptr_t gates_ws, std::uintptr_t c_ws,
                   const MatDesc& out, std::uintptr_t h0, std::uintptr_t c0, std::uintptr_t whh_bwd,
                   std::uintptr_t dgates, std::uintptr_t hprev, std::uintptr_t dh0, std::uintptr_t dc0, int64_t hprev_ld) {
  PlanOwner po(plan_d);
  Plan& pl = po.pl;
  std::vector<T> scratch(static_cast<size_t>(bwd_scratch_numel(pl.B, H)));
  BwdArgs<T> a;
  a.plan = &pl;
  a.scratch = scratch.data();
  a.H = H;
  a.reverse = reverse;
  a.nthreads = std::max(1, nthreads);
  a.grad_out = to_mat<const T>(grad_out);
  a.grad_hn = grad_hn ? ptr<const T>(grad_hn) : nullptr;
  a.grad_cn = grad_cn ? ptr<const T>(grad_cn) : nullptr;
  if (!gates_ws || !c_ws || !dgates)
    throw std::invalid_argument("fastinterest lstm (cpu) backward: gates_ws, c_ws and dgates are required");
  a.gates_ws = ptr<const T>(gates_ws);
  a.c_ws = ptr<const T>(c_ws);
  a.out = to_mat<const T>(std::optional<MatDesc>(out));
  a.h0 = h0 ? ptr<const T>(h0) : nullptr;
  a.c0 = c0 ? ptr<const T>(c0) : nullptr;
  a.whh_bwd = ptr<const T>(whh_bwd);
  a.dgates = ptr<T>(dgates);
  a.hprev = hprev ? ptr<T>(hprev) : nullptr;
  if (hprev_ld != 0 && hprev_ld < H) throw std::invalid_argument("fastinterest lstm (cpu) backward: hprev_ld < H");
  a.hprev_ld = hprev_ld ? hprev_ld : H;
  a.dh0 = dh0 ? ptr<T>(dh0) : nullptr;
  a.dc0 = dc0 ? ptr<T>(dc0) : nullptr;
  py::gil_scoped_release nogil;
  run_backward<T>(a);
}

// One step of a stack of unidirectional layers for B users (serving). Per layer l:
//   whh_packed[l], wih_packed[l] ("fwd" panels), bias[l] [4H] (b_ih + b_hh) or 0;
//   h_in[l], c_in[l]: [B, H] state before the step; h_out[l], c_out[l]: [B, H] after (may alias
//   the inputs only if they are distinct buffers from the other layers' - written per layer).
// Layer 0 reads x [B, E0] (row stride ldx) through W_ih, or sums projected table rows (tables:
// ids of shape [B], stride sb); layer l > 0 reads h_out[l-1].
template <typename T>
void step_impl(int nthreads, int64_t B, int64_t H, const std::optional<MatDesc>& x, int64_t E0,
               const std::vector<TableDesc>& tables, const std::vector<std::uintptr_t>& whh_packed,
               const std::vector<std::uintptr_t>& wih_packed, const std::vector<std::uintptr_t>& bias,
               const std::vector<std::uintptr_t>& h_in, const std::vector<std::uintptr_t>& c_in,
               const std::vector<std::uintptr_t>& h_out, const std::vector<std::uintptr_t>& c_out) {
  const size_t L = whh_packed.size();
  if (L == 0 || wih_packed.size() != L || bias.size() != L || h_in.size() != L || c_in.size() != L ||
      h_out.size() != L || c_out.size() != L)
    throw std::invalid_argument("fastinterest lstm_step (cpu): per-layer lists must all have num_layers entries");
  std::vector<int64_t> perm(static_cast<size_t>(B)), lengths(static_cast<size_t>(B), 1);
  for (int64_t b = 0; b < B; ++b) perm[b] = b;
  int64_t bs[1] = {B};
  int64_t offs[2] = {0, B};
  Plan pl;
  pl.B = B;
  pl.T = 1;
  pl.N = B;
  pl.maxlen = B > 0 ? 1 : 0;
  pl.perm = perm.data();
  pl.batch_sizes = bs;
  pl.offsets = offs;
  pl.Ls = lengths.data();
  std::vector<T> scratch(static_cast<size_t>(fwd_scratch_numel(B, H)));
  std::vector<FwdArgs<T>> args(L);
  for (size_t l = 0; l < L; ++l) {
    FwdArgs<T>& a = args[l];
    a.plan = &pl;
    a.scratch = scratch.data();
    a.H = H;
    a.nthreads = std::max(1, nthreads);
    if (l == 0) {
      fill_input<T>(a.in, std::nullopt, x, E0, x ? wih_packed[0] : 0, bias[0], tables, H, &pl);
    } else {
      std::optional<MatDesc> xl = MatDesc{h_out[l - 1], H, 0, 0, false};
      fill_input<T>(a.in, std::nullopt, xl, H, wih_packed[l], bias[l], {}, H, nullptr);
    }
    a.whh_packed = ptr<const T>(whh_packed[l]);
    a.h0 = ptr<const T>(h_in[l]);
    a.c0 = ptr<const T>(c_in[l]);
    RowMat<T> o;
    o.ptr = ptr<T>(h_out[l]);
    o.ld = H;
    a.out = o;
    a.c_n = ptr<T>(c_out[l]);
  }
  py::gil_scoped_release nogil;
  for (size_t l = 0; l < L; ++l) run_forward<T>(args[l]);
}


// Whole-sequence inference of a stack of layers (both directions) in one call, no autograd: the
// length plan, then per layer the gate input (layer 0: projected tables or x through the packed
// W_ih; tiny batches project every step first, one blocked GEMM instead of a GEMV per step) and the
// recurrence of each direction. Layer outputs below the top live in scratch owned here. One call
// instead of a Python loop of plan / projection / forward calls: at B = 1 the per-call Python work
// was several times the recurrence itself.
//   x: padded descriptor of the input [*, E] (layer 0, x mode) or none (tables mode)
//   tables[d]: per direction, the projected tables of layer 0 (tables mode)
//   whh/wih/bias: per layer*dirs + d; h0/c0/h_n/c_n: [num_layers*dirs, B, H] contiguous or 0
//   out: padded descriptor of the top output, dirs*H columns (direction d at column d*H)
template <typename T>
void infer_impl(int nthreads, int64_t B, int64_t Tlen, int64_t H, int64_t num_layers, int dirs, bool batch_first,
                std::uintptr_t lengths_p, const std::optional<MatDesc>& x, int64_t E,
                const std::vector<std::vector<TableDesc>>& tables, const std::vector<std::uintptr_t>& whh,
                const std::vector<std::uintptr_t>& wih, const std::vector<std::uintptr_t>& bias, std::uintptr_t h0,
                std::uintptr_t c0, const MatDesc& out, std::uintptr_t h_n, std::uintptr_t c_n,
                int64_t project_below, const std::vector<std::uintptr_t>& whh_raw,
                const std::vector<std::uintptr_t>& wih_raw) {
  const size_t K = static_cast<size_t>(num_layers * dirs);
  if (H <= 0 || num_layers <= 0 || (dirs != 1 && dirs != 2) || B < 0 || Tlen < 0)
    throw std::invalid_argument("fastinterest lstm_infer: bad sizes");
  if (whh.size() != K || wih.size() != K || bias.size() != K)
    throw std::invalid_argument("fastinterest lstm_infer: per-layer lists must have num_layers * dirs entries");
  const bool mode_tables = !tables.empty();
  if (mode_tables == static_cast<bool>(x))
    throw std::invalid_argument("fastinterest lstm_infer: give exactly one of x and tables");
  if (mode_tables && tables.size() != static_cast<size_t>(dirs))
    throw std::invalid_argument("fastinterest lstm_infer: tables must hold one list of fields per direction");
  // length plan (all T when no lengths are given)
  std::vector<int64_t> lengths(static_cast<size_t>(B), Tlen);
  if (lengths_p) std::memcpy(lengths.data(), ptr<const int64_t>(lengths_p), sizeof(int64_t) * B);
  std::vector<int64_t> perm(static_cast<size_t>(B)), bs(static_cast<size_t>(Tlen)), offs(static_cast<size_t>(Tlen) + 1);
  const auto nm = build_plan(lengths.data(), B, Tlen, perm.data(), bs.data(), offs.data(), nullptr, batch_first);
  Plan pl;
  pl.B = B;
  pl.T = Tlen;
  pl.N = nm.first;
  pl.maxlen = nm.second;
  pl.perm = perm.data();
  pl.batch_sizes = bs.data();
  pl.offsets = offs.data();
  std::vector<int64_t> Ls(static_cast<size_t>(B));
  for (int64_t p = 0; p < B; ++p) Ls[p] = lengths[perm[p]];
  pl.Ls = Ls.data();
  const int64_t N = pl.N;
  const int64_t BH = B * H;
  // Gate input and arguments of every (layer, direction), validated (ids included) before any work.
  const bool tiny = !mode_tables && B < project_below;
  std::vector<T> scratch(static_cast<size_t>(fwd_scratch_numel(B, H)));
  std::vector<T> lo[2];        // layer outputs [N, dirs*H], ping-pong between layers
  std::vector<T> xproj;        // tiny batches: [N, dirs*4H]
  std::vector<int64_t> pscratch;
  if (num_layers > 1) {
    lo[0].resize(static_cast<size_t>(std::max<int64_t>(N, 1) * dirs * H));
    if (num_layers > 2) lo[1].resize(lo[0].size());
  }
  if (tiny) {
    xproj.resize(static_cast<size_t>(std::max<int64_t>(N, 1) * dirs * 4 * H));
    pscratch.resize(static_cast<size_t>(2 * std::max<int64_t>(N, 1)));
  }
  if (mode_tables) {  // validate the ids once (fill_input checks them against the plan)
    for (int d = 0; d < dirs; ++d) {
      GateInput<T> in;
      fill_input<T>(in, std::nullopt, std::nullopt, 0, 0, 0, tables[d], H, &pl);
    }
  }
  if ((!whh_raw.empty() && whh_raw.size() != K) || (!wih_raw.empty() && wih_raw.size() != K))
    throw std::invalid_argument("fastinterest lstm_infer: raw weight lists must be empty or have num_layers * dirs "
                                "entries");
  std::vector<T> xbuf;
  const int nthr = std::max(1, nthreads);
  py::gil_scoped_release nogil;
  for (int64_t layer = 0; layer < num_layers; ++layer) {
    const bool top = layer == num_layers - 1;
    T* const lout = top ? nullptr : lo[layer % 2].data();
    const T* const lin = layer == 0 ? nullptr : lo[(layer - 1) % 2].data();
    const int64_t Ein = layer == 0 ? E : dirs * H;
    // the layer's input rows: layer 0 padded x, later layers packed [N, dirs*H]
    RowMat<const T> src;
    if (layer == 0 && x) src = to_mat<const T>(x);
    else if (layer > 0) { src.ptr = lin; src.ld = dirs * H; }
    if (tiny && !(layer == 0 && mode_tables)) {
      for (int d = 0; d < dirs; ++d) {
        ProjArgs<T> a;
        a.plan = &pl;
        a.scratch = pscratch.data();
        a.H = H;
        a.E = Ein;
        a.reverse = d == 1;
        a.nthreads = nthr;
        a.x = src;
        a.wih_packed = ptr<const T>(wih[layer * dirs + d]);
        a.bias = bias[layer * dirs + d] ? ptr<const T>(bias[layer * dirs + d]) : nullptr;
        a.out = xproj.data() + d * 4 * H;
        a.ldo = dirs * 4 * H;
        if (N > 0) run_projection<T>(a);
      }
    }
    for (int d = 0; d < dirs; ++d) {
      const size_t k = static_cast<size_t>(layer * dirs + d);
      FwdArgs<T> a;
      a.plan = &pl;
      a.scratch = scratch.data();
      a.H = H;
      a.reverse = d == 1;
      a.nthreads = nthr;
      if (layer == 0 && mode_tables) {
        const auto& tf = tables[d];
        a.in.nfields = static_cast<int>(tf.size());
        for (int f = 0; f < a.in.nfields; ++f) {
          a.in.tables[f] = ptr<const T>(std::get<0>(tf[f]));
          a.in.vocab[f] = std::get<1>(tf[f]);
          a.in.ids[f] = reinterpret_cast<const void*>(std::get<2>(tf[f]));
          a.in.ids64[f] = std::get<3>(tf[f]) ? 1 : 0;
          a.in.ids_sb[f] = std::get<4>(tf[f]);
          a.in.ids_st[f] = std::get<5>(tf[f]);
        }
      } else if (tiny) {
        a.in.xproj.ptr = xproj.data() + d * 4 * H;
        a.in.xproj.ld = dirs * 4 * H;
      } else {
        a.in.x = src;
        a.in.E = Ein;
        a.in.wih_packed = ptr<const T>(wih[k]);
        a.in.bias = bias[k] ? ptr<const T>(bias[k]) : nullptr;
      }
      a.whh_packed = ptr<const T>(whh[k]);
      a.h0 = h0 ? ptr<const T>(h0) + k * BH : nullptr;
      a.c0 = c0 ? ptr<const T>(c0) + k * BH : nullptr;
      if (top) {
        a.out = to_mat<T>(std::optional<MatDesc>(out));
        a.out.ptr += d * H;
        a.zero_padding = true;
      } else {
        a.out.ptr = lout + d * H;
        a.out.ld = dirs * H;
      }
      a.h_n = h_n ? ptr<T>(h_n) + k * BH : nullptr;
      a.c_n = c_n ? ptr<T>(c_n) + k * BH : nullptr;
      if (!whh_raw.empty()) use_blas<T>(a, whh_raw[k], wih_raw.empty() ? 0 : wih_raw[k], xbuf);
      run_forward<T>(a);
    }
  }
}

}  // namespace
}  // namespace lstm

void register_lstm(py::module_& m) {
  using namespace fi::lstm;
  m.def("lstm_plan",
        [](std::uintptr_t lengths, int64_t B, int64_t T, std::uintptr_t perm, std::uintptr_t batch_sizes,
           std::uintptr_t offsets, std::uintptr_t pack_index, bool batch_first) {
          if (T < 0 || B < 0) throw std::invalid_argument("fastinterest lstm_plan: negative B or T");
          py::gil_scoped_release nogil;
          return build_plan(ptr<const int64_t>(lengths), B, T, ptr<int64_t>(perm), ptr<int64_t>(batch_sizes),
                            ptr<int64_t>(offsets), pack_index ? ptr<int64_t>(pack_index) : nullptr, batch_first);
        },
        py::arg("lengths"), py::arg("B"), py::arg("T"), py::arg("perm"), py::arg("batch_sizes"), py::arg("offsets"),
        py::arg("pack_index"), py::arg("batch_first"),
        R"doc(Length plan. lengths: [B] int64 (batch order, each in [0, T]). Writes perm [B] (position ->
batch row, lengths descending, stable), batch_sizes [T] (#{L > t}), offsets [T+1] (prefix sums), and
pack_index [N] (flat padded index b*T+t if batch_first else t*B+b of each packed row; pass 0 to skip).
Returns (N, maxlen). Raises ValueError naming the first length outside [0, T].)doc");

  m.def("lstm_packed_numel",
        [](const std::string& kind, int64_t H, int64_t K) {
          if (kind == "fwd") return fwd_packed_numel(H, K);
          if (kind == "bwd") return bwd_packed_numel(H);
          throw std::invalid_argument("fastinterest lstm_packed_numel: kind must be 'fwd' or 'bwd', not " + kind);
        },
        py::arg("kind"), py::arg("H"), py::arg("K") = 0);

  m.def("lstm_pack",
        [](int dtype, const std::string& kind, std::uintptr_t w, int64_t ldw, int64_t H, int64_t K, std::uintptr_t dst) {
          check_dtype(dtype);
          if (kind != "fwd" && kind != "bwd")
            throw std::invalid_argument("fastinterest lstm_pack: kind must be 'fwd' or 'bwd', not " + kind);
          py::gil_scoped_release nogil;
          if (dtype == 0) {
            if (kind == "fwd") pack_fwd<float>(ptr<const float>(w), ldw, H, K, ptr<float>(dst));
            else pack_bwd<float>(ptr<const float>(w), H, ptr<float>(dst));
          } else {
            if (kind == "fwd") pack_fwd<double>(ptr<const double>(w), ldw, H, K, ptr<double>(dst));
            else pack_bwd<double>(ptr<const double>(w), H, ptr<double>(dst));
          }
        },
        py::arg("dtype"), py::arg("kind"), py::arg("w"), py::arg("ldw"), py::arg("H"), py::arg("K"), py::arg("dst"),
        R"doc(Pack a weight for the recurrence. kind 'fwd': w [4H, K] (row stride ldw; W_hh with K = H or
W_ih with K = E), dst [lstm_packed_numel('fwd', H, K)]. kind 'bwd': w = W_hh [4H, H] contiguous, dst
[lstm_packed_numel('bwd', H)]. Gate rows i, f, g, o as torch.nn.LSTM.)doc");

  m.def("lstm_forward",
        [](int dtype, int nthreads, int64_t H, bool reverse, const PlanDesc& plan, const std::optional<MatDesc>& xproj,
           const std::optional<MatDesc>& x, int64_t E, std::uintptr_t wih_packed, std::uintptr_t bias,
           const std::vector<TableDesc>& tables, std::uintptr_t whh_packed, std::uintptr_t h0, std::uintptr_t c0,
           const MatDesc& out, bool zero_padding, std::uintptr_t gates_ws, std::uintptr_t c_ws, std::uintptr_t h_n,
           std::uintptr_t c_n, std::uintptr_t whh_raw, std::uintptr_t wih_raw) {
          check_dtype(dtype);
          if (H <= 0) throw std::invalid_argument("fastinterest lstm_forward: hidden size must be positive");
          if (dtype == 0)
            forward_impl<float>(nthreads, H, reverse, plan, xproj, x, E, wih_packed, bias, tables, whh_packed, h0, c0,
                                out, zero_padding, gates_ws, c_ws, h_n, c_n, whh_raw, wih_raw);
          else
            forward_impl<double>(nthreads, H, reverse, plan, xproj, x, E, wih_packed, bias, tables, whh_packed, h0,
                                 c0, out, zero_padding, gates_ws, c_ws, h_n, c_n, whh_raw, wih_raw);
        },
        py::arg("dtype"), py::arg("nthreads"), py::arg("H"), py::arg("reverse"), py::arg("plan"), py::arg("xproj"),
        py::arg("x"), py::arg("E"), py::arg("wih_packed"), py::arg("bias"), py::arg("tables"), py::arg("whh_packed"),
        py::arg("h0"), py::arg("c0"), py::arg("out"), py::arg("zero_padding"), py::arg("gates_ws"), py::arg("c_ws"),
        py::arg("h_n"), py::arg("c_n"), py::arg("whh_raw") = 0, py::arg("wih_raw") = 0,
        R"doc(Whole-sequence forward of one direction of one layer (the recurrence, fused with the gates).
plan: (lengths [B] int64, perm [B], batch_sizes [T], offsets [T+1], B, T) from lstm_plan.
Gate input, exactly one of: xproj (ptr, ld, sb, st, padded): x W_ih^T + b_ih + b_hh, 4H columns;
x (ptr, ld, sb, st, padded): [*, E] rows with wih_packed ('fwd' panels of W_ih) and bias [4H] (or 0);
tables: list of (table [V, 4H], V, ids ptr [B, T] int32/int64, ids_is_int64, stride_b, stride_t).
A matrix descriptor (ptr, ld, sb, st, padded) addresses packed row r at ptr + r*ld, or, padded,
(b, t) at ptr + b*sb + t*st (element strides).
whh_packed: 'fwd' panels of W_hh [4H, H]. h0, c0: [B, H] batch order, or 0 for zeros.
out: h of every valid step (H columns). zero_padding: with a padded out, write zeros at t >= L_b.
gates_ws [N, 4H] (activated i, f, g, o) and c_ws [N, H], packed rows, for the backward (0 = skip).
h_n, c_n: [B, H] batch order, state after each sequence's last step (h0/c0 for length 0), or 0.
whh_raw, wih_raw: W_hh [4H, H] / W_ih [4H, E] row-major, or 0: with them (float32) batches of at least
the BLAS threshold run the recurrence through the BLAS set by lstm_set_sgemm.)doc");

  m.def("lstm_backward",
        [](int dtype, int nthreads, int64_t H, bool reverse, const PlanDesc& plan, const std::optional<MatDesc>& grad_out,
           std::uintptr_t grad_hn, std::uintptr_t grad_cn, std::uintptr_t gates_ws, std::uintptr_t c_ws,
           const MatDesc& out, std::uintptr_t h0, std::uintptr_t c0, std::uintptr_t whh_bwd, std::uintptr_t dgates,
           std::uintptr_t hprev, std::uintptr_t dh0, std::uintptr_t dc0, int64_t hprev_ld) {
          check_dtype(dtype);
          if (dtype == 0)
            backward_impl<float>(nthreads, H, reverse, plan, grad_out, grad_hn, grad_cn, gates_ws, c_ws, out, h0, c0,
                                 whh_bwd, dgates, hprev, dh0, dc0, hprev_ld);
          else
            backward_impl<double>(nthreads, H, reverse, plan, grad_out, grad_hn, grad_cn, gates_ws, c_ws, out, h0, c0,
                                  whh_bwd, dgates, hprev, dh0, dc0, hprev_ld);
        },
        py::arg("dtype"), py::arg("nthreads"), py::arg("H"), py::arg("reverse"), py::arg("plan"),
        py::arg("grad_out"), py::arg("grad_hn"), py::arg("grad_cn"), py::arg("gates_ws"), py::arg("c_ws"),
        py::arg("out"), py::arg("h0"), py::arg("c0"), py::arg("whh_bwd"), py::arg("dgates"), py::arg("hprev"),
        py::arg("dh0"), py::arg("dc0"), py::arg("hprev_ld") = 0,
        R"doc(BPTT of one direction of one layer. grad_out: dL/dh per valid step (H columns) or None;
grad_hn, grad_cn: [B, H] batch order or 0; gates_ws [N, 4H], c_ws [N, H] and out (h, H columns) as
written by lstm_forward; h0, c0: [B, H] or 0; whh_bwd: 'bwd' panels of W_hh. Writes dgates [N, 4H]
(dL/d gate pre-activations, i f g o; dW_ih = dgates^T x, dW_hh = dgates^T hprev, db = sum rows),
hprev [N, H] (h entering each step; rows hprev_ld apart, 0: H) or 0 to skip, dh0 and dc0 [B, H] batch
order or 0.)doc");

  m.def("lstm_step",
        [](int dtype, int nthreads, int64_t B, int64_t H, const std::optional<MatDesc>& x, int64_t E0,
           const std::vector<TableDesc>& tables, const std::vector<std::uintptr_t>& whh_packed,
           const std::vector<std::uintptr_t>& wih_packed, const std::vector<std::uintptr_t>& bias,
           const std::vector<std::uintptr_t>& h_in, const std::vector<std::uintptr_t>& c_in,
           const std::vector<std::uintptr_t>& h_out, const std::vector<std::uintptr_t>& c_out) {
          check_dtype(dtype);
          if (dtype == 0)
            step_impl<float>(nthreads, B, H, x, E0, tables, whh_packed, wih_packed, bias, h_in, c_in, h_out, c_out);
          else
            step_impl<double>(nthreads, B, H, x, E0, tables, whh_packed, wih_packed, bias, h_in, c_in, h_out, c_out);
        },
        py::arg("dtype"), py::arg("nthreads"), py::arg("B"), py::arg("H"), py::arg("x"), py::arg("E0"),
        py::arg("tables"), py::arg("whh_packed"), py::arg("wih_packed"), py::arg("bias"), py::arg("h_in"),
        py::arg("c_in"), py::arg("h_out"), py::arg("c_out"),
        R"doc(One step of a stack of unidirectional layers for B users (serving). Layer 0 reads x [B, E0]
(descriptor, packed rows) through wih_packed[0], or sums projected table rows (tables, ids [B] with
stride_b; stride_t unused). Per layer: whh_packed/wih_packed ('fwd' panels), bias [4H] (b_ih + b_hh)
or 0, h_in/c_in [B, H] before the step, h_out/c_out [B, H] after (distinct from h_in/c_in).)doc");

  m.def("lstm_infer",
        [](int dtype, int nthreads, int64_t B, int64_t T, int64_t H, int64_t num_layers, int dirs, bool batch_first,
           std::uintptr_t lengths, const std::optional<MatDesc>& x, int64_t E,
           const std::vector<std::vector<TableDesc>>& tables, const std::vector<std::uintptr_t>& whh_packed,
           const std::vector<std::uintptr_t>& wih_packed, const std::vector<std::uintptr_t>& bias, std::uintptr_t h0,
           std::uintptr_t c0, const MatDesc& out, std::uintptr_t h_n, std::uintptr_t c_n, int64_t project_below,
           const std::vector<std::uintptr_t>& whh_raw, const std::vector<std::uintptr_t>& wih_raw) {
          check_dtype(dtype);
          if (dtype == 0)
            infer_impl<float>(nthreads, B, T, H, num_layers, dirs, batch_first, lengths, x, E, tables, whh_packed,
                              wih_packed, bias, h0, c0, out, h_n, c_n, project_below, whh_raw, wih_raw);
          else
            infer_impl<double>(nthreads, B, T, H, num_layers, dirs, batch_first, lengths, x, E, tables, whh_packed,
                               wih_packed, bias, h0, c0, out, h_n, c_n, project_below, whh_raw, wih_raw);
        },
        py::arg("dtype"), py::arg("nthreads"), py::arg("B"), py::arg("T"), py::arg("H"), py::arg("num_layers"),
        py::arg("dirs"), py::arg("batch_first"), py::arg("lengths"), py::arg("x"), py::arg("E"), py::arg("tables"),
        py::arg("whh_packed"), py::arg("wih_packed"), py::arg("bias"), py::arg("h0"), py::arg("c0"), py::arg("out"),
        py::arg("h_n"), py::arg("c_n"), py::arg("project_below"), py::arg("whh_raw") = std::vector<std::uintptr_t>{},
        py::arg("wih_raw") = std::vector<std::uintptr_t>{},
        R"doc(Whole-sequence inference of a stack (num_layers x dirs) in one call. lengths: [B] int64 batch
order, or 0 for all T. Input: x (padded descriptor of [*, E] rows) or tables (per direction, a list of
(table [V, 4H], V, ids ptr, ids_is_int64, stride_b, stride_t)) for layer 0. Per layer*dirs + d:
whh_packed / wih_packed ('fwd' panels), bias [4H] (b_ih + b_hh) or 0. h0, c0, h_n, c_n:
[num_layers*dirs, B, H] contiguous, or 0. out: padded descriptor of the top output (dirs*H columns);
steps past a sequence's length are zero. Batches smaller than project_below project every step's
input first (x mode).)doc");

  m.def("lstm_set_sgemm",
        [](std::uintptr_t fn, int64_t min_rows) {
          if (fn) {  // self-test on a 2x3x2 product before trusting the address
            const float A[4] = {1, 2, 3, 4};          // W [m=2, k=2] row-major
            const float Bm[6] = {5, 6, 7, 8, 9, 10};  // h: n=3 rows of k=2
            float C[6] = {1, 1, 1, 1, 1, 1};          // [n=3, m=2] row-major, beta = 1
            const int64_t m2 = 2, n3 = 3, k2 = 2;
            const float one = 1.0f;
            using fn_t = void (*)(const char*, const char*, const int*, const int*, const int*, const float*,
                                  const float*, const int*, const float*, const int*, const float*, float*, const int*);
            reinterpret_cast<fn_t>(fn)("T", "N", reinterpret_cast<const int*>(&m2), reinterpret_cast<const int*>(&n3),
                                       reinterpret_cast<const int*>(&k2), &one, A, reinterpret_cast<const int*>(&k2),
                                       Bm, reinterpret_cast<const int*>(&k2), &one, C,
                                       reinterpret_cast<const int*>(&m2));
            const float want[6] = {18, 40, 24, 54, 30, 68};
            for (int i = 0; i < 6; ++i)
              if (C[i] != want[i]) throw std::runtime_error("fastinterest lstm_set_sgemm: the sgemm self-test failed");
          }
          sgemm_ptr() = reinterpret_cast<void*>(fn);
          if (min_rows > 0) gemm_min_rows() = min_rows;
        },
        py::arg("fn"), py::arg("min_rows") = 0,
        "Use the Fortran sgemm_ at address fn (0: none) for float32 recurrences of at least min_rows sequences.");
  m.def("lstm_blas", []() { return py::make_tuple(reinterpret_cast<std::uintptr_t>(sgemm_ptr()), gemm_min_rows()); });

  m.def("lstm_set_unit_split_min", [](int64_t macs) { unit_split_min_macs() = macs; }, py::arg("macs"),
        "Multiply-adds per step from which a tiny batch splits hidden units across threads (barrier per step).");

#ifdef FI_HAVE_AVX2_TU
  m.def("lstm_simd", []() { return (cpu_has_avx2() && avx2_compiled()) ? "avx2" : "generic"; });
#else
  m.def("lstm_simd", []() { return "generic"; });
#endif
}

}  // namespace fi
