// Fused LSTM kernels (CUDA), mirroring csrc/cpu/lstm_kernels.h: the packed, length-sorted layout
// (row(t, p) = offsets[t] + p; a reverse direction runs step s of position p at t = L_p - 1 - s),
// gates i, f, g, o as torch.nn.LSTM, the input projection x W_ih^T + b done by torch (one GEMM).
//
// Two recurrences per direction:
//   * fused (H <= 256): one cooperative, persistent kernel for the whole sequence. Block (ub, rg)
//     owns UNITS hidden units and a group of RG positions; it keeps its 4*UNITS rows of W_hh (forward)
//     or columns (backward) in shared memory for the whole sequence, stages the previous step's h (or
//     dgates) rows through shared memory, fuses the GEMM with the gate pointwise, and the grid syncs
//     once per step.
//   * alternating (any H, or when the fused grid cannot be co-resident): per step, torch computes
//     hW = h_state[:n] W_hh^T (or dh = dg_state[:n] W_hh) with cuBLAS, then one pointwise kernel
//     launch (lstm_pointwise_forward / _backward) applies the gates.
// State is kept in float (double for float64) in workspaces Python allocates; data tensors may be
// float32, float64 or bfloat16. dtype codes: 0 = float32, 1 = float64, 2 = bfloat16. Every launch is
// checked; all work goes to the given stream.
#include <pybind11/pybind11.h>

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda/registry.h"

namespace py = pybind11;
namespace cg = cooperative_groups;

namespace fi {
namespace lstm_cuda {

__host__ __device__ __forceinline__ int64_t lmin(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ int64_t lmax(int64_t a, int64_t b) { return a > b ? a : b; }

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

template <typename A> __device__ __forceinline__ A to_acc(float v) { return static_cast<A>(v); }
__device__ __forceinline__ float ld(const float* p) { return *p; }
__device__ __forceinline__ double ld(const double* p) { return *p; }
__device__ __forceinline__ float ld(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ void st(float* p, float v) { *p = v; }
__device__ __forceinline__ void st(double* p, double v) { *p = v; }
__device__ __forceinline__ void st(__nv_bfloat16* p, float v) { *p = __float2bfloat16(v); }

template <typename A> __device__ __forceinline__ A sigm(A x) { return A(1) / (A(1) + exp(-x)); }
__device__ __forceinline__ float sigm(float x) { return 1.0f / (1.0f + __expf(-x)); }
template <typename A> __device__ __forceinline__ A tanh_(A x) { return tanh(x); }
__device__ __forceinline__ float tanh_(float x) { return tanhf(x); }

// Packed-layout plan, device pointers (int64).
struct DPlan {
  const int64_t* lengths;      // [B] batch order
  const int64_t* perm;         // [B] position -> batch row
  const int64_t* batch_sizes;  // [T]
  const int64_t* offsets;      // [T+1]
  int64_t B, maxlen;
};

__device__ __forceinline__ int64_t time_of(const DPlan& pl, int64_t s, int64_t p, bool reverse) {
  return reverse ? pl.lengths[pl.perm[p]] - 1 - s : s;
}

template <typename T>
struct FwdP {
  DPlan pl;
  int64_t H;
  bool reverse;
  const T* xproj; int64_t ldx;      // [N, ldx]: 4H gate columns (x W_ih^T + b)
  const T* whh;                     // [4H, H]
  const T* h0; const T* c0;         // [B, H] batch order or null
  T* out; int64_t ldo;              // [N, ldo]: H columns
  T* gates_ws; T* c_ws;             // [N, 4H], [N, H] or null
  T* h_n; T* c_n;                   // [B, H] batch order
  typename Acc<T>::type* hA;        // [B, H] state by position (workspace)
  typename Acc<T>::type* hB;        // [B, H]
  typename Acc<T>::type* cS;        // [B, H]
  const typename Acc<T>::type* hw;  // alternating path: [n, 4H] = h_state W_hh^T for this step
};

template <typename T>
struct BwdP {
  DPlan pl;
  int64_t H;
  bool reverse;
  const T* grad_out; int64_t ldg;   // [N, ldg] or null
  const T* grad_hn; const T* grad_cn;
  const T* gates_ws; const T* c_ws; // [N, 4H], [N, H]
  const T* out; int64_t ldo;        // forward h, [N, ldo]
  const T* h0; const T* c0;
  const T* whh;                     // [4H, H]
  T* dgates;                        // [N, 4H]
  T* hprev;                         // [N, H] or null
  T* dh0; T* dc0;                   // [B, H] batch order or null
  typename Acc<T>::type* dgS;       // [B, 4H] dgates of the later step, by position (read)
  typename Acc<T>::type* dgSn;      // [B, 4H] dgates of this step, by position (written; = dgS on the
                                    // alternating path, the other buffer in the fused kernel)
  typename Acc<T>::type* dcS;       // [B, H] dL/dc carry by position
  const typename Acc<T>::type* dhw; // alternating path: [n_next, H] = dgS[:n_next] W_hh for this step
};

// ---------------------------------------------------------------- shared pointwise
template <typename T, typename A>
__device__ __forceinline__ void fwd_point(const FwdP<T>& q, int64_t s, int64_t p, int64_t j, A gi, A gf, A gg, A go,
                                          A* hnext) {
  const int64_t H = q.H;
  const int64_t t = time_of(q.pl, s, p, q.reverse);
  const int64_t row = q.pl.offsets[t] + p;
  const T* xr = q.xproj + row * q.ldx;
  gi += ld(xr + j);
  gf += ld(xr + H + j);
  gg += ld(xr + 2 * H + j);
  go += ld(xr + 3 * H + j);
  const A ig = sigm(gi), fg = sigm(gf), g_ = tanh_(gg), og = sigm(go);
  const A c = fg * q.cS[p * H + j] + ig * g_;
  const A h = og * tanh_(c);
  q.cS[p * H + j] = c;
  hnext[p * H + j] = h;
  st(q.out + row * q.ldo + j, h);
  if (q.gates_ws) {
    T* gw = q.gates_ws + row * 4 * H + j;
    st(gw, ig);
    st(gw + H, fg);
    st(gw + 2 * H, g_);
    st(gw + 3 * H, og);
  }
  if (q.c_ws) st(q.c_ws + row * H + j, c);
}

template <typename T, typename A>
__device__ __forceinline__ void bwd_point(const BwdP<T>& q, int64_t s, int64_t p, int64_t j, A dh) {
  const int64_t H = q.H;
  const DPlan& pl = q.pl;
  const int64_t b = pl.perm[p];
  const int64_t t = time_of(pl, s, p, q.reverse);
  const int64_t row = pl.offsets[t] + p;
  if (q.grad_out) dh += ld(q.grad_out + row * q.ldg + j);
  const T* gw = q.gates_ws + row * 4 * H + j;
  const A ig = ld(gw), fg = ld(gw + H), gg = ld(gw + 2 * H), og = ld(gw + 3 * H);
  const A tc = tanh_(static_cast<A>(ld(q.c_ws + row * H + j)));
  const A dc = q.dcS[p * H + j] + dh * og * (A(1) - tc * tc);
  A cp = 0, hp = 0;
  if (s > 0) {
    const int64_t tp = time_of(pl, s - 1, p, q.reverse);
    const int64_t prow = pl.offsets[tp] + p;
    cp = ld(q.c_ws + prow * H + j);
    hp = ld(q.out + prow * q.ldo + j);
  } else {
    if (q.c0) cp = ld(q.c0 + b * H + j);
    if (q.h0) hp = ld(q.h0 + b * H + j);
  }
  const A di = dc * gg * ig * (A(1) - ig);
  const A df = dc * cp * fg * (A(1) - fg);
  const A dg = dc * ig * (A(1) - gg * gg);
  const A do_ = dh * tc * og * (A(1) - og);
  T* d = q.dgates + row * 4 * H + j;
  st(d, di);
  st(d + H, df);
  st(d + 2 * H, dg);
  st(d + 3 * H, do_);
  A* ds = q.dgSn + p * 4 * H + j;
  ds[0] = di;
  ds[H] = df;
  ds[2 * H] = dg;
  ds[3 * H] = do_;
  q.dcS[p * H + j] = dc * fg;
  if (q.hprev) st(q.hprev + row * H + j, hp);
}

// ---------------------------------------------------------------- state init / finish
template <typename T>
__global__ void init_fwd_state(FwdP<T> q) {
  using A = typename Acc<T>::type;
  const int64_t H = q.H;
  for (int64_t i = blockIdx.x * blockDim.x + threadIdx.x; i < q.pl.B * H; i += gridDim.x * blockDim.x) {
    const int64_t p = i / H, j = i % H, b = q.pl.perm[p];
    q.hA[i] = q.h0 ? static_cast<A>(ld(q.h0 + b * H + j)) : A(0);
    q.cS[i] = q.c0 ? static_cast<A>(ld(q.c0 + b * H + j)) : A(0);
  }
}

// h_n / c_n: h after each sequence's last step (its output row), c from the state; h0/c0 for L = 0.
template <typename T>
__global__ void finish_fwd(FwdP<T> q) {
  const int64_t H = q.H;
  for (int64_t i = blockIdx.x * blockDim.x + threadIdx.x; i < q.pl.B * H; i += gridDim.x * blockDim.x) {
    const int64_t p = i / H, j = i % H, b = q.pl.perm[p];
    const int64_t L = q.pl.lengths[b];
    if (L == 0) {
      st(q.h_n + b * H + j, q.h0 ? ld(q.h0 + b * H + j) : 0.0f);
      st(q.c_n + b * H + j, q.c0 ? ld(q.c0 + b * H + j) : 0.0f);
    } else {
      const int64_t t = time_of(q.pl, L - 1, p, q.reverse);
      st(q.h_n + b * H + j, ld(q.out + (q.pl.offsets[t] + p) * q.ldo + j));
      st(q.c_n + b * H + j, q.cS[i]);
    }
  }
}

template <typename T>
__global__ void init_bwd_state(BwdP<T> q) {
  using A = typename Acc<T>::type;
  const int64_t H = q.H;
  for (int64_t i = blockIdx.x * blockDim.x + threadIdx.x; i < q.pl.B * H; i += gridDim.x * blockDim.x) {
    const int64_t p = i / H, j = i % H, b = q.pl.perm[p];
    q.dcS[i] = q.grad_cn ? static_cast<A>(ld(q.grad_cn + b * H + j)) : A(0);
  }
}

// dh0 for positions past n0 (length 0): dL/dh_n; dc0 from the carry. dh0 of the others comes from
// the last recurrent product (dh0_from).
template <typename T>
__global__ void finish_bwd(BwdP<T> q, const typename Acc<T>::type* dh0_from, int64_t n0) {
  const int64_t H = q.H;
  for (int64_t i = blockIdx.x * blockDim.x + threadIdx.x; i < q.pl.B * H; i += gridDim.x * blockDim.x) {
    const int64_t p = i / H, j = i % H, b = q.pl.perm[p];
    if (q.dc0) st(q.dc0 + b * H + j, q.dcS[i]);
    if (q.dh0) {
      if (p < n0 && dh0_from) st(q.dh0 + b * H + j, dh0_from[i]);
      else st(q.dh0 + b * H + j, q.grad_hn ? ld(q.grad_hn + b * H + j) : 0.0f);
    }
  }
}

// ---------------------------------------------------------------- alternating path: pointwise per step
template <typename T>
__global__ void pointwise_fwd(FwdP<T> q, int64_t s, int64_t n, const typename Acc<T>::type* hprev_state,
                              typename Acc<T>::type* hnext_state) {
  using A = typename Acc<T>::type;
  const int64_t H = q.H;
  for (int64_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n * H; i += gridDim.x * blockDim.x) {
    const int64_t p = i / H, j = i % H;
    const A* hw = q.hw + p * 4 * H;
    fwd_point<T, A>(q, s, p, j, hw[j], hw[H + j], hw[2 * H + j], hw[3 * H + j], hnext_state);
  }
  (void)hprev_state;
}

template <typename T>
__global__ void pointwise_bwd(BwdP<T> q, int64_t s, int64_t n, int64_t n_next) {
  using A = typename Acc<T>::type;
  const int64_t H = q.H;
  for (int64_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n * H; i += gridDim.x * blockDim.x) {
    const int64_t p = i / H, j = i % H;
    A dh;
    if (p < n_next) dh = q.dhw[p * H + j];
    else dh = q.grad_hn ? static_cast<A>(ld(q.grad_hn + q.pl.perm[p] * H + j)) : A(0);
    bwd_point<T, A>(q, s, p, j, dh);
  }
}

// ---------------------------------------------------------------- fused persistent kernels
constexpr int UNITS = 8;      // hidden units per block
constexpr int RCHUNK = 32;    // rows staged per pass
constexpr int THREADS = UNITS * RCHUNK;

// Forward. grid = (ceil(H / UNITS), row_groups); block = THREADS. Shared memory: w [4*UNITS][H + 1],
// hs [RCHUNK][H + 1] (accumulation type). The rows are padded by one element: a warp's threads read
// w rows of 8 units and hs rows of 4 positions at the same k, which with a row stride of H (a multiple
// of 32) all fall in one bank (8-way and 4-way conflicts); with H + 1 they fall in different banks.
template <typename T>
__global__ void __launch_bounds__(THREADS) fused_fwd(FwdP<T> q, int64_t rows_per_group) {
  using A = typename Acc<T>::type;
  extern __shared__ unsigned char smem_raw[];
  A* w = reinterpret_cast<A*>(smem_raw);
  const int64_t H = q.H, HP = q.H + 1;
  A* hs = w + 4 * UNITS * HP;
  const int64_t j0 = blockIdx.x * UNITS;
  for (int64_t i = threadIdx.x; i < 4 * UNITS * H; i += blockDim.x) {
    const int64_t gu = i / H, k = i % H, g = gu / UNITS, u = gu % UNITS;
    w[gu * HP + k] = (j0 + u < H) ? static_cast<A>(ld(q.whh + (g * H + j0 + u) * H + k)) : A(0);
  }
  __syncthreads();
  cg::grid_group grid = cg::this_grid();
  const int u = threadIdx.x % UNITS, rloc = threadIdx.x / UNITS;
  const int64_t j = j0 + u;
  A* hp = q.hA;
  A* hn = q.hB;
  for (int64_t s = 0; s < q.pl.maxlen; ++s) {
    const int64_t n = q.pl.batch_sizes[s];
    const int64_t r0 = blockIdx.y * rows_per_group, r1 = lmin(n, r0 + rows_per_group);
    for (int64_t c0 = r0; c0 < r1; c0 += RCHUNK) {
      const int64_t cn = lmin(RCHUNK, r1 - c0);
      for (int64_t i = threadIdx.x; i < cn * H; i += blockDim.x) hs[(i / H) * HP + i % H] = hp[(c0 + i / H) * H + i % H];
      __syncthreads();
      if (rloc < cn && j < H) {
        A gi = 0, gf = 0, gg = 0, go = 0;
        const A* hr = hs + rloc * HP;
        const A* wi = w + (0 * UNITS + u) * HP;
        const A* wf = w + (1 * UNITS + u) * HP;
        const A* wg = w + (2 * UNITS + u) * HP;
        const A* wo = w + (3 * UNITS + u) * HP;
        for (int64_t k = 0; k < H; ++k) {
          const A hv = hr[k];
          gi += hv * wi[k];
          gf += hv * wf[k];
          gg += hv * wg[k];
          go += hv * wo[k];
        }
        fwd_point<T, A>(q, s, c0 + rloc, j, gi, gf, gg, go, hn);
      }
      __syncthreads();
    }
    A* tmp = hp;
    hp = hn;
    hn = tmp;
    grid.sync();
  }
}

// Backward. Same grid; shared memory: w [UNITS][4H + 1] (W_hh columns of this block's units,
// transposed), ds [RCHUNK][4H + 1] staged dgates rows of the previous (later) step (padded as forward).
template <typename T>
__global__ void __launch_bounds__(THREADS) fused_bwd(BwdP<T> q, int64_t rows_per_group, typename Acc<T>::type* dh0_buf,
                                                     typename Acc<T>::type* dg2) {
  using A = typename Acc<T>::type;
  extern __shared__ unsigned char smem_raw[];
  A* w = reinterpret_cast<A*>(smem_raw);
  const int64_t H = q.H, H4 = 4 * q.H, H4P = 4 * q.H + 1;
  A* ds = w + UNITS * H4P;
  const int64_t j0 = blockIdx.x * UNITS;
  for (int64_t i = threadIdx.x; i < UNITS * H4; i += blockDim.x) {
    const int64_t uu = i / H4, k = i % H4;
    w[uu * H4P + k] = (j0 + uu < H) ? static_cast<A>(ld(q.whh + k * H + j0 + uu)) : A(0);
  }
  __syncthreads();
  cg::grid_group grid = cg::this_grid();
  const int u = threadIdx.x % UNITS, rloc = threadIdx.x / UNITS;
  const int64_t j = j0 + u;
  // dgS / dgS2 alternate: step s reads the later step's dgates from one and writes its own to the
  // other, so no block overwrites a row another unit block has not staged yet.
  BwdP<T> qq = q;
  for (int64_t s = q.pl.maxlen - 1; s >= -1; --s) {
    const bool odd = ((q.pl.maxlen - 1 - s) & 1) != 0;
    qq.dgS = odd ? dg2 : q.dgS;
    qq.dgSn = odd ? q.dgS : dg2;
    const int64_t n = s >= 0 ? q.pl.batch_sizes[s] : q.pl.batch_sizes[0];
    const int64_t n_next = (s + 1 < q.pl.maxlen) ? q.pl.batch_sizes[s + 1] : 0;
    const int64_t r0 = blockIdx.y * rows_per_group, r1 = lmin(n, r0 + rows_per_group);
    for (int64_t c0 = r0; c0 < r1; c0 += RCHUNK) {
      const int64_t cn = lmin(RCHUNK, r1 - c0);
      const int64_t cg_ = lmax(0, lmin(cn, n_next - c0));  // rows with a later step
      for (int64_t i = threadIdx.x; i < cg_ * H4; i += blockDim.x)
        ds[(i / H4) * H4P + i % H4] = qq.dgS[(c0 + i / H4) * H4 + i % H4];
      __syncthreads();
      A dh = 0;
      const int64_t p = c0 + rloc;
      if (rloc < cn && j < H) {
        if (rloc < cg_) {
          const A* dr = ds + rloc * H4P;
          const A* wr = w + u * H4P;
          for (int64_t k = 0; k < H4; ++k) dh += dr[k] * wr[k];
        } else if (q.grad_hn) {
          dh = ld(q.grad_hn + q.pl.perm[p] * H + j);
        }
      }
      // every row of this chunk has read dgS before any is overwritten
      __syncthreads();
      if (rloc < cn && j < H) {
        if (s >= 0) bwd_point<T, A>(qq, s, p, j, dh);
        else dh0_buf[p * H + j] = dh;
      }
      __syncthreads();
    }
    grid.sync();
  }
}

// ---------------------------------------------------------------- host side
inline cudaStream_t as_stream(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }
inline int blocks_for(int64_t n, int threads = 256) {
  const int64_t b = (n + threads - 1) / threads;
  return static_cast<int>(b < 1 ? 1 : (b > 4096 ? 4096 : b));
}

DPlan make_dplan(std::uintptr_t lengths, std::uintptr_t perm, std::uintptr_t bs, std::uintptr_t off, int64_t B,
                 int64_t maxlen) {
  DPlan pl;
  pl.lengths = reinterpret_cast<const int64_t*>(lengths);
  pl.perm = reinterpret_cast<const int64_t*>(perm);
  pl.batch_sizes = reinterpret_cast<const int64_t*>(bs);
  pl.offsets = reinterpret_cast<const int64_t*>(off);
  pl.B = B;
  pl.maxlen = maxlen;
  return pl;
}

template <typename T> size_t fwd_smem(int64_t H) {
  return sizeof(typename Acc<T>::type) * (4 * UNITS * (H + 1) + RCHUNK * (H + 1));
}
template <typename T> size_t bwd_smem(int64_t H) {
  return sizeof(typename Acc<T>::type) * (UNITS * (4 * H + 1) + RCHUNK * (4 * H + 1));
}

// Grid for the fused kernels: (unit blocks, row groups), all co-resident; 0 row groups if impossible.
template <typename K>
int64_t fused_row_groups(K kernel, size_t smem, int64_t H, int64_t n0) {
  int dev = 0, sms = 0, per_sm = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  int coop = 0;
  check_cuda(cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, dev), "cudaDeviceGetAttribute");
  if (!coop) return 0;
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), "cudaDeviceGetAttribute");
  int smem_max = 0;
  check_cuda(cudaDeviceGetAttribute(&smem_max, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev), "cudaDeviceGetAttribute");
  if (smem > static_cast<size_t>(smem_max)) return 0;  // e.g. float64 backward at H = 256: the alternating path
  if (smem > 48 * 1024)
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)),
               "cudaFuncSetAttribute");
  check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, THREADS, smem), "occupancy");
  const int64_t capacity = static_cast<int64_t>(sms) * per_sm;
  const int64_t ub = (H + UNITS - 1) / UNITS;
  if (capacity < ub) return 0;
  const int64_t want = (n0 + RCHUNK - 1) / RCHUNK;   // at most one chunk per block per step
  int64_t groups = capacity / ub;
  if (groups > want) groups = want;
  return groups < 1 ? 1 : groups;
}

// Launches a fused kernel; false (nothing ran, the caller takes the alternating path) when the device
// refuses the grid as too large to be co-resident (fewer SMs than it reports: MPS, partitions).
inline bool cooperative_launch(void* kernel, dim3 grid, void** args, size_t smem, cudaStream_t stream,
                               const char* name) {
  const cudaError_t launched = cudaLaunchCooperativeKernel(kernel, grid, dim3(THREADS), args, smem, stream);
  if (launched == cudaErrorCooperativeLaunchTooLarge) {
    (void)cudaGetLastError();
    return false;
  }
  check_cuda(launched, name);
  return true;
}

template <typename T>
FwdP<T> fwd_params(const py::dict& a) {
  FwdP<T> q{};
  auto P = [&](const char* k) { return a[k].cast<std::uintptr_t>(); };
  q.pl = make_dplan(P("lengths"), P("perm"), P("batch_sizes"), P("offsets"), a["B"].cast<int64_t>(),
                    a["maxlen"].cast<int64_t>());
  q.H = a["H"].cast<int64_t>();
  q.reverse = a["reverse"].cast<bool>();
  q.xproj = reinterpret_cast<const T*>(P("xproj"));
  q.ldx = a["ldx"].cast<int64_t>();
  q.whh = reinterpret_cast<const T*>(P("whh"));
  q.h0 = reinterpret_cast<const T*>(P("h0"));
  q.c0 = reinterpret_cast<const T*>(P("c0"));
  q.out = reinterpret_cast<T*>(P("out"));
  q.ldo = a["ldo"].cast<int64_t>();
  q.gates_ws = reinterpret_cast<T*>(P("gates_ws"));
  q.c_ws = reinterpret_cast<T*>(P("c_ws"));
  q.h_n = reinterpret_cast<T*>(P("h_n"));
  q.c_n = reinterpret_cast<T*>(P("c_n"));
  using A = typename Acc<T>::type;
  q.hA = reinterpret_cast<A*>(P("state_a"));
  q.hB = reinterpret_cast<A*>(P("state_b"));
  q.cS = reinterpret_cast<A*>(P("state_c"));
  q.hw = reinterpret_cast<const A*>(P("hw"));
  return q;
}

template <typename T>
BwdP<T> bwd_params(const py::dict& a) {
  BwdP<T> q{};
  auto P = [&](const char* k) { return a[k].cast<std::uintptr_t>(); };
  q.pl = make_dplan(P("lengths"), P("perm"), P("batch_sizes"), P("offsets"), a["B"].cast<int64_t>(),
                    a["maxlen"].cast<int64_t>());
  q.H = a["H"].cast<int64_t>();
  q.reverse = a["reverse"].cast<bool>();
  q.grad_out = reinterpret_cast<const T*>(P("grad_out"));
  q.ldg = a["ldg"].cast<int64_t>();
  q.grad_hn = reinterpret_cast<const T*>(P("grad_hn"));
  q.grad_cn = reinterpret_cast<const T*>(P("grad_cn"));
  q.gates_ws = reinterpret_cast<const T*>(P("gates_ws"));
  q.c_ws = reinterpret_cast<const T*>(P("c_ws"));
  q.out = reinterpret_cast<const T*>(P("out"));
  q.ldo = a["ldo"].cast<int64_t>();
  q.h0 = reinterpret_cast<const T*>(P("h0"));
  q.c0 = reinterpret_cast<const T*>(P("c0"));
  q.whh = reinterpret_cast<const T*>(P("whh"));
  q.dgates = reinterpret_cast<T*>(P("dgates"));
  q.hprev = reinterpret_cast<T*>(P("hprev"));
  q.dh0 = reinterpret_cast<T*>(P("dh0"));
  q.dc0 = reinterpret_cast<T*>(P("dc0"));
  using A = typename Acc<T>::type;
  q.dgS = reinterpret_cast<A*>(P("state_dg"));
  q.dgSn = q.dgS;
  q.dcS = reinterpret_cast<A*>(P("state_dc"));
  q.dhw = reinterpret_cast<const A*>(P("dhw"));
  return q;
}

// mode: "init" (state from h0/c0), "fused" (whole sequence; returns False if the fused grid cannot be
// co-resident, then nothing ran), "step" (pointwise of step s on hw; h state prev -> next given by
// "swap" parity), "finish" (h_n, c_n).
template <typename T>
bool forward_call(const py::dict& a) {
  FwdP<T> q = fwd_params<T>(a);
  const std::string mode = a["mode"].cast<std::string>();
  cudaStream_t stream = as_stream(a["stream"].cast<std::uintptr_t>());
  const int64_t BH = q.pl.B * q.H;
  using A = typename Acc<T>::type;
  if (mode == "fused") {
    if (q.H > 256) return false;
    const size_t smem = fwd_smem<T>(q.H);
    const int64_t n0 = q.pl.maxlen > 0 ? a["n0"].cast<int64_t>() : 0;
    const int64_t groups = fused_row_groups(fused_fwd<T>, smem, q.H, n0);
    if (groups == 0) return false;
    int64_t rows_per_group = (n0 + groups - 1) / groups;
    if (rows_per_group < 1) rows_per_group = 1;
    dim3 grid(static_cast<unsigned>((q.H + UNITS - 1) / UNITS), static_cast<unsigned>(groups));
    void* args[] = {&q, &rows_per_group};
    py::gil_scoped_release nogil;
    if (!cooperative_launch(reinterpret_cast<void*>(fused_fwd<T>), grid, args, smem, stream, "lstm fused_fwd"))
      return false;
    FI_CHECK_LAUNCH("lstm fused_fwd");
    return true;
  }
  // every dict read happens before the GIL is released (touching Python objects without it crashes)
  const bool step = mode == "step";
  const int64_t s = step ? a["s"].cast<int64_t>() : 0, n = step ? a["n"].cast<int64_t>() : 0;
  const bool swap = step && a["swap"].cast<bool>();
  py::gil_scoped_release nogil;
  if (mode == "init") {
    init_fwd_state<T><<<blocks_for(BH), 256, 0, stream>>>(q);
    FI_CHECK_LAUNCH("lstm init_fwd_state");
  } else if (mode == "finish") {
    // the final c lives in state_c; h_n is read from the output rows
    finish_fwd<T><<<blocks_for(BH), 256, 0, stream>>>(q);
    FI_CHECK_LAUNCH("lstm finish_fwd");
  } else if (step) {
    A* prev = swap ? q.hB : q.hA;
    A* next = swap ? q.hA : q.hB;
    pointwise_fwd<T><<<blocks_for(n * q.H), 256, 0, stream>>>(q, s, n, prev, next);
    FI_CHECK_LAUNCH("lstm pointwise_fwd");
  } else {
    throw std::invalid_argument("fastinterest lstm (cuda): unknown forward mode '" + mode + "'");
  }
  return true;
}

// mode: "init" (dc carry from grad_cn), "fused" (whole BPTT incl. dh0; False if not co-resident),
// "step" (pointwise of step s with dhw = dgS[:n_next] W_hh), "finish" (dh0 from "dh0_from" [B, H]
// by position for p < n0, dc0).
template <typename T>
bool backward_call(const py::dict& a) {
  BwdP<T> q = bwd_params<T>(a);
  const std::string mode = a["mode"].cast<std::string>();
  cudaStream_t stream = as_stream(a["stream"].cast<std::uintptr_t>());
  const int64_t BH = q.pl.B * q.H;
  using A = typename Acc<T>::type;
  A* dh0_from = reinterpret_cast<A*>(a["dh0_from"].cast<std::uintptr_t>());
  const int64_t n0 = a["n0"].cast<int64_t>();
  if (mode == "fused") {
    if (q.H > 256) return false;
    const size_t smem = bwd_smem<T>(q.H);
    const int64_t groups = fused_row_groups(fused_bwd<T>, smem, q.H, n0);
    if (groups == 0) return false;
    int64_t rows_per_group = (n0 + groups - 1) / groups;
    if (rows_per_group < 1) rows_per_group = 1;
    dim3 grid(static_cast<unsigned>((q.H + UNITS - 1) / UNITS), static_cast<unsigned>(groups));
    A* dg2 = reinterpret_cast<A*>(a["state_dg2"].cast<std::uintptr_t>());
    if (!dg2) throw std::invalid_argument("fastinterest lstm (cuda): the fused backward needs state_dg2 [B, 4H]");
    void* args[] = {&q, &rows_per_group, &dh0_from, &dg2};
    py::gil_scoped_release nogil;
    if (!cooperative_launch(reinterpret_cast<void*>(fused_bwd<T>), grid, args, smem, stream, "lstm fused_bwd"))
      return false;
    FI_CHECK_LAUNCH("lstm fused_bwd");
    return true;
  }
  const bool step = mode == "step";
  const int64_t s = step ? a["s"].cast<int64_t>() : 0, n = step ? a["n"].cast<int64_t>() : 0,
                n_next = step ? a["n_next"].cast<int64_t>() : 0;
  py::gil_scoped_release nogil;  // no Python object is touched below
  if (mode == "init") {
    init_bwd_state<T><<<blocks_for(BH), 256, 0, stream>>>(q);
    FI_CHECK_LAUNCH("lstm init_bwd_state");
  } else if (mode == "finish") {
    finish_bwd<T><<<blocks_for(BH), 256, 0, stream>>>(q, dh0_from, n0);
    FI_CHECK_LAUNCH("lstm finish_bwd");
  } else if (step) {
    pointwise_bwd<T><<<blocks_for(n * q.H), 256, 0, stream>>>(q, s, n, n_next);
    FI_CHECK_LAUNCH("lstm pointwise_bwd");
  } else {
    throw std::invalid_argument("fastinterest lstm (cuda): unknown backward mode '" + mode + "'");
  }
  return true;
}

template <typename F>
bool by_dtype(int dtype, F&& f) {
  switch (dtype) {
    case 0: return f(float{});
    case 1: return f(double{});
    case 2: return f(__nv_bfloat16{});
    default:
      throw std::invalid_argument("fastinterest lstm (cuda): dtype code " + std::to_string(dtype) +
                                  " is not supported (0 = float32, 1 = float64, 2 = bfloat16)");
  }
}

}  // namespace lstm_cuda

void register_lstm_cuda(pybind11::module_& m) {
  using namespace fi::lstm_cuda;
  m.def("lstm_forward",
        [](int dtype, const py::dict& args) {
          return by_dtype(dtype, [&](auto tag) { return forward_call<decltype(tag)>(args); });
        },
        py::arg("dtype"), py::arg("args"),
        R"doc(Recurrence of one direction of one layer on the packed layout (see csrc/cpu/lstm_kernels.h).
args (dict of ints / pointers; 0 = absent): lengths [B] int64, perm [B], batch_sizes [T], offsets [T+1]
(device), B, maxlen, n0 (= batch_sizes[0]), H, reverse, xproj [N, ldx] (x W_ih^T + b, 4H columns),
ldx, whh [4H, H], h0, c0 [B, H] batch order, out [N, ldo] (H columns), ldo, gates_ws [N, 4H], c_ws
[N, H], h_n, c_n [B, H]; state_a, state_b, state_c [B, H] accumulation-type workspaces; hw [n, 4H]
(alternating path), stream, mode ('init' | 'fused' | 'step' with s, n, swap | 'finish').
'fused' returns False (and runs nothing) when H > 256 or the grid cannot be co-resident.)doc");
  m.def("lstm_backward",
        [](int dtype, const py::dict& args) {
          return by_dtype(dtype, [&](auto tag) { return backward_call<decltype(tag)>(args); });
        },
        py::arg("dtype"), py::arg("args"),
        R"doc(BPTT of one direction of one layer. args: the plan as lstm_forward, H, reverse, grad_out [N, ldg]
(or 0), ldg, grad_hn, grad_cn [B, H], gates_ws, c_ws, out (forward h) + ldo, h0, c0, whh [4H, H],
dgates [N, 4H], hprev [N, H] (or 0), dh0, dc0 [B, H]; state_dg, state_dg2 [B, 4H], state_dc [B, H]
workspaces, dhw [n_next, H] (alternating path), dh0_from [B, H] (by position), n0, stream, mode
('init' | 'fused' | 'step' with s, n, n_next | 'finish').)doc");
}

}  // namespace fi
