// Embedding-bag kernels (CUDA): forward, deterministic sort-based backward with fused optimizers,
// and an atomic backward variant (dense / sparse gradient and SGD).
//
// Pointer conventions are those of csrc/cpu/embedding_types.h: weight [V, D] (float, double, half,
// bf16), idx [N] int32/int64, off [B + 1] or null (bag b = {idx[b]}), psw [N] or null, out [B, D] in
// the accumulation type (double for double tables, float otherwise), maxpos [B, D] int64 positions.
// Python allocates every buffer (including the workspace) with torch; nothing here calls cudaMalloc.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_select.cuh>

#include <cstdint>
#include <type_traits>
#include <stdexcept>
#include <vector>

#include "cuda/registry.h"

namespace py = pybind11;

namespace fi {
namespace {

enum : int { kF32 = 0, kF64 = 1, kF16 = 2, kBF16 = 3, kI32 = 4, kI64 = 5 };
enum : int { kSum = 0, kMean = 1, kMax = 2 };
enum : int { kOptSparse = 0, kOptDense = 1, kOptSGD = 2, kOptAdagrad = 3, kOptRowWise = 4, kOptAdam = 5 };

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;
constexpr int kMaxColsPerLane = 8;  // D <= 256 keeps a row's accumulators in registers; larger D loops

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename W> __device__ __forceinline__ W from_acc(float v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename W, typename A> struct Store {
  __device__ static void put(W* p, A v) { *p = from_acc<W>(v); }
};
template <> struct Store<double, double> {
  __device__ static void put(double* p, double v) { *p = v; }
};

template <typename A> __device__ __forceinline__ A neg_inf();
template <> __device__ __forceinline__ float neg_inf<float>() { return -INFINITY; }
template <> __device__ __forceinline__ double neg_inf<double>() { return -INFINITY; }

template <typename O>
__device__ __forceinline__ void bag_range(const O* off, int64_t b, int64_t& start, int64_t& end) {
  if (off) {
    start = static_cast<int64_t>(off[b]);
    end = static_cast<int64_t>(off[b + 1]);
  } else {
    start = b;
    end = b + 1;
  }
}

// ---------------------------------------------------------------- forward: one warp per bag
// Lane l owns columns l, l+32, ... (coalesced 128-byte row reads for float32). Indices are read a
// warp-width at a time and broadcast with shuffles, so 32 row loads can be in flight per warp.
template <typename W, typename A, typename I, typename O>
__global__ void bag_forward_kernel(const W* __restrict__ w, int64_t D, const I* __restrict__ idx, const O* off,
                                   int64_t B, const A* __restrict__ psw, int mode, int64_t skip, A* __restrict__ out,
                                   int64_t* __restrict__ maxpos) {
  const int lane = threadIdx.x % kWarp;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (b >= B) return;
  int64_t start, end;
  bag_range(off, b, start, end);
  for (int64_t c0 = 0; c0 < D; c0 += kWarp * kMaxColsPerLane) {
    A acc[kMaxColsPerLane];
    int64_t arg[kMaxColsPerLane];
#pragma unroll
    for (int k = 0; k < kMaxColsPerLane; ++k) {
      acc[k] = mode == kMax ? neg_inf<A>() : A(0);
      arg[k] = -1;
    }
    int count = 0;
    for (int64_t j0 = start; j0 < end; j0 += kWarp) {
      const int64_t jl = j0 + lane;
      const int64_t my_r = jl < end ? static_cast<int64_t>(idx[jl]) : -1;
      const A my_s = (psw && jl < end) ? psw[jl] : A(1);
      const int n = static_cast<int>((end - j0) < kWarp ? (end - j0) : kWarp);
      for (int t = 0; t < n; ++t) {
        const int64_t r = __shfl_sync(0xffffffffu, my_r, t);
        const A s = __shfl_sync(0xffffffffu, my_s, t);
        if (r == skip) continue;
        ++count;
        const W* row = w + r * D;
#pragma unroll
        for (int k = 0; k < kMaxColsPerLane; ++k) {
          const int64_t d = c0 + lane + static_cast<int64_t>(k) * kWarp;
          if (d < D) {
            const A v = to_acc(row[d]);
            if (mode == kMax) {
              if (arg[k] < 0 || v > acc[k]) {
                acc[k] = v;
                arg[k] = j0 + t;
              }
            } else {
              acc[k] += s * v;
            }
          }
        }
      }
    }
#pragma unroll
    for (int k = 0; k < kMaxColsPerLane; ++k) {
      const int64_t d = c0 + lane + static_cast<int64_t>(k) * kWarp;
      if (d >= D) continue;
      A v = acc[k];
      if (mode == kMean) v = count > 0 ? v / static_cast<A>(count) : A(0);
      if (mode == kMax) {
        if (arg[k] < 0) v = A(0);
        maxpos[b * D + d] = arg[k];
      }
      out[b * D + d] = v;
    }
  }
}

// ---------------------------------------------------------------- forward, sum / mean, D <= 256
// The general kernel above issues one row load per lane per iteration (a shuffle, a skip test and a
// dependent load), so a warp has ~NC loads in flight and the gather runs latency-bound (H200, V = 1M,
// D = 64: ~230 GB/s against torch's ~900). Here the columns per lane are a compile-time NC and U rows
// are loaded before any is accumulated, so a warp keeps U * NC loads in flight. Rows are still added
// in position order: the result is bit-identical to the general kernel.
template <typename W, typename A, typename I, int NC>
__global__ void __launch_bounds__(kWarp * kWarpsPerBlock)
    bag_sum_kernel(const W* __restrict__ w, int64_t D, const I* __restrict__ idx, const I* __restrict__ off,
                   int64_t B, const A* __restrict__ psw, bool mean, int64_t skip, A* __restrict__ out) {
  constexpr int U = NC <= 2 ? 8 : 4;
  const int lane = threadIdx.x % kWarp;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (b >= B) return;
  int64_t start, end;
  bag_range(off, b, start, end);
  A acc[NC];
#pragma unroll
  for (int k = 0; k < NC; ++k) acc[k] = A(0);
  int count = 0;
  for (int64_t j0 = start; j0 < end; j0 += kWarp) {
    const int64_t jl = j0 + lane;
    const int64_t my_r = jl < end ? static_cast<int64_t>(idx[jl]) : 0;
    const A my_s = (psw && jl < end) ? psw[jl] : A(1);
    const int n = static_cast<int>((end - j0) < kWarp ? (end - j0) : kWarp);
    int t = 0;
    for (; t + U <= n; t += U) {
      int64_t r[U];
      A v[U][NC];
#pragma unroll
      for (int u = 0; u < U; ++u) r[u] = __shfl_sync(0xffffffffu, my_r, t + u);
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const W* row = w + r[u] * D;  // a padding row is in range: loaded, then left out below
#pragma unroll
        for (int k = 0; k < NC; ++k) {
          const int64_t d = lane + static_cast<int64_t>(k) * kWarp;
          v[u][k] = d < D ? to_acc(row[d]) : A(0);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const A sc = __shfl_sync(0xffffffffu, my_s, t + u);
        if (r[u] == skip) continue;
        ++count;
#pragma unroll
        for (int k = 0; k < NC; ++k) acc[k] += sc * v[u][k];
      }
    }
    for (; t < n; ++t) {
      const int64_t r = __shfl_sync(0xffffffffu, my_r, t);
      const A sc = __shfl_sync(0xffffffffu, my_s, t);
      if (r == skip) continue;
      ++count;
      const W* row = w + r * D;
#pragma unroll
      for (int k = 0; k < NC; ++k) {
        const int64_t d = lane + static_cast<int64_t>(k) * kWarp;
        if (d < D) acc[k] += sc * to_acc(row[d]);
      }
    }
  }
#pragma unroll
  for (int k = 0; k < NC; ++k) {
    const int64_t d = lane + static_cast<int64_t>(k) * kWarp;
    if (d >= D) continue;
    A v = acc[k];
    if (mean) v = count > 0 ? v / static_cast<A>(count) : A(0);
    out[b * D + d] = v;
  }
}

// ---------------------------------------------------------------- backward helpers
// keys[j] = row (or V for skipped positions, which sorts last), vals[j] = j
template <typename I>
__global__ void make_pairs_kernel(const I* __restrict__ idx, int64_t N, int64_t V, int64_t skip,
                                  uint32_t* __restrict__ keys, int32_t* __restrict__ vals) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= N) return;
  const int64_t r = static_cast<int64_t>(idx[j]);
  keys[j] = r == skip ? static_cast<uint32_t>(V) : static_cast<uint32_t>(r);
  vals[j] = static_cast<int32_t>(j);
}

__global__ void segment_flags_kernel(const uint32_t* __restrict__ keys, int64_t N, uint8_t* __restrict__ flags) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= N) return;
  flags[i] = (i == 0 || keys[i] != keys[i - 1]) ? 1 : 0;
}

// bag of each position, and the per-bag scale (mean: 1/kept count)
template <typename I, typename O, typename A>
__global__ void bag_of_kernel(const I* __restrict__ idx, const O* off, int64_t B, int64_t skip, int mode,
                              int32_t* __restrict__ bag_of, A* __restrict__ scale) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= B) return;
  int64_t start, end;
  bag_range(off, b, start, end);
  int64_t count = 0;
  for (int64_t j = start; j < end; ++j) {
    bag_of[j] = static_cast<int32_t>(b);
    count += static_cast<int64_t>(idx[j]) != skip;
  }
  scale[b] = (mode == kMean && count > 0) ? A(1) / static_cast<A>(count) : A(1);
}

struct UpdateParams {
  int opt, mode;
  double h0, h1, h2, h3;  // see csrc/cpu/embedding_kernels.h
};

// One warp per distinct row: sum the row's gradient over its occurrences in position order
// (deterministic), then apply the update. seg[u] = first sorted slot of segment u, nseg on device.
template <typename W, typename A>
__global__ void segment_update_kernel(const A* __restrict__ go, W* __restrict__ w, int64_t V, int64_t D,
                                      const uint32_t* __restrict__ keys, const int32_t* __restrict__ pos,
                                      const int32_t* __restrict__ seg, const int32_t* __restrict__ nseg_p, int64_t N,
                                      const int32_t* __restrict__ bag_of, const A* __restrict__ bag_scale,
                                      const A* __restrict__ psw, const int64_t* __restrict__ maxpos, A* s1, A* s2,
                                      int64_t* out_rows, A* out_vals, A* dense, const int64_t* step,
                                      UpdateParams p) {
  const int lane = threadIdx.x % kWarp;
  const int64_t u = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int32_t nseg = *nseg_p;
  if (u >= nseg) return;
  const int64_t start = seg[u];
  const int64_t end = (u + 1 < nseg) ? seg[u + 1] : N;
  const int64_t r = keys[start];
  if (r >= V) return;  // the skipped positions' segment (always last)
  A h0 = static_cast<A>(p.h0);
  const A h1 = static_cast<A>(p.h1), h2 = static_cast<A>(p.h2), h3 = static_cast<A>(p.h3);
  if (p.opt == kOptAdam) {
    // bias-corrected step size from the device step counter (advanced by adam_step_kernel just before):
    // no host round trip. h0 carries the learning rate, h1/h2 the betas.
    const double t = static_cast<double>(*step);
    h0 = static_cast<A>(p.h0 * sqrt(1.0 - pow(p.h2, t)) / (1.0 - pow(p.h1, t)));
  }
  constexpr int64_t kChunk = kWarp * kMaxColsPerLane;
  // this row's gradient over columns [c0, c0 + kChunk), summed over its occurrences in position order;
  // zero in the columns past D
  auto accumulate = [&](int64_t c0, A (&g)[kMaxColsPerLane]) {
#pragma unroll
    for (int k = 0; k < kMaxColsPerLane; ++k) g[k] = A(0);
    for (int64_t i = start; i < end; ++i) {
      const int64_t j = pos[i];
      const int64_t b = bag_of[j];
      const A s = (psw ? psw[j] : A(1)) * bag_scale[b];
#pragma unroll
      for (int k = 0; k < kMaxColsPerLane; ++k) {
        const int64_t d = c0 + lane + static_cast<int64_t>(k) * kWarp;
        if (d >= D) continue;
        if (p.mode == kMax) {
          if (maxpos[b * D + d] == j) g[k] += go[b * D + d];
        } else {
          g[k] += s * go[b * D + d];
        }
      }
    }
  };
  A g[kMaxColsPerLane];
  A row_scale = A(0);
  if (p.opt == kOptRowWise) {
    // mean of g^2 over the whole row first (every chunk), then the update
    A sq = A(0);
    for (int64_t c0 = 0; c0 < D; c0 += kChunk) {
      accumulate(c0, g);
#pragma unroll
      for (int k = 0; k < kMaxColsPerLane; ++k) sq += g[k] * g[k];
    }
    for (int o = kWarp / 2; o > 0; o /= 2) sq += __shfl_xor_sync(0xffffffffu, sq, o);
    A acc_new = s1[r] + sq / static_cast<A>(D);
    __syncwarp();
    if (lane == 0) s1[r] = acc_new;
    row_scale = (-h0) / (sqrt(acc_new) + h1);
  }
  for (int64_t c0 = 0; c0 < D; c0 += kChunk) {
    if (!(p.opt == kOptRowWise && D <= kChunk)) accumulate(c0, g);  // one chunk: g still holds it
#pragma unroll
    for (int k = 0; k < kMaxColsPerLane; ++k) {
      const int64_t d = c0 + lane + static_cast<int64_t>(k) * kWarp;
      if (d >= D) continue;
      const int64_t e = r * D + d;
      switch (p.opt) {
        case kOptSparse:
          out_vals[u * D + d] = g[k];
          break;
        case kOptDense:
          dense[e] = g[k];
          break;
        case kOptSGD:
          Store<W, A>::put(w + e, static_cast<A>(to_acc(w[e])) + (-h0) * g[k]);
          break;
        case kOptAdagrad: {
          const A s = s1[e] + g[k] * g[k];
          s1[e] = s;
          Store<W, A>::put(w + e, static_cast<A>(to_acc(w[e])) + (-h0) * (g[k] / (sqrt(s) + h1)));
          break;
        }
        case kOptRowWise:
          Store<W, A>::put(w + e, static_cast<A>(to_acc(w[e])) + row_scale * g[k]);
          break;
        default: {  // Adam
          const A numer = (g[k] - s1[e]) * (A(1) - h1) + s1[e];
          const A vsq = (g[k] * g[k] - s2[e]) * (A(1) - h2) + s2[e];
          s1[e] = numer;
          s2[e] = vsq;
          Store<W, A>::put(w + e, static_cast<A>(to_acc(w[e])) + (-h0) * (numer / (sqrt(vsq) + h3)));
        }
      }
    }
  }
  if (p.opt == kOptSparse && lane == 0) out_rows[u] = r;
}

// Adam's step counter lives on the device and is advanced here, on the stream, before the update
// kernel reads it (no host synchronisation; capturable in a CUDA graph).
__global__ void adam_step_kernel(int64_t* step) { *step += 1; }

__global__ void count_unique_kernel(const uint32_t* keys, const int32_t* seg, const int32_t* nseg_p, int64_t V,
                                    int64_t* num_unique) {
  const int32_t nseg = *nseg_p;
  int64_t u = nseg;
  if (nseg > 0 && keys[seg[nseg - 1]] >= V) --u;
  *num_unique = u;
}

// Atomic variant: one warp per position, atomically adds its contribution (dense gradient, or
// directly -lr * g into float/double weights for SGD). Order of additions is not fixed.
template <typename W, typename A, typename I>
__global__ void atomic_scatter_kernel(const A* __restrict__ go, W* w, int64_t D, const I* __restrict__ idx,
                                      int64_t N, const int32_t* __restrict__ bag_of, const A* __restrict__ bag_scale,
                                      const A* __restrict__ psw, const int64_t* __restrict__ maxpos, int mode,
                                      int64_t skip, A alpha, A* target_dense, bool into_weight) {
  const int lane = threadIdx.x % kWarp;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (j >= N) return;
  const int64_t r = static_cast<int64_t>(idx[j]);
  if (r == skip) return;
  const int64_t b = bag_of[j];
  const A s = alpha * (psw ? psw[j] : A(1)) * bag_scale[b];
  for (int64_t d = lane; d < D; d += kWarp) {
    A v;
    if (mode == kMax) {
      if (maxpos[b * D + d] != j) continue;
      v = alpha * go[b * D + d];
    } else {
      v = s * go[b * D + d];
    }
    A* dst = into_weight ? reinterpret_cast<A*>(w) + r * D + d : target_dense + r * D + d;
    atomicAdd(dst, v);
  }
}

// ---------------------------------------------------------------- host side
inline int64_t align256(int64_t x) { return (x + 255) / 256 * 256; }

struct Workspace {
  uint32_t *keys_in, *keys_out;
  int32_t *vals_in, *vals_out, *seg, *nseg, *bag_of;
  uint8_t* flags;
  void* scale;  // [B] accumulation type
  void* temp;
  size_t temp_bytes;
  int64_t total;
};

size_t cub_temp_bytes(int64_t N, int end_bit) {
  size_t sort_bytes = 0, sel_bytes = 0;
  const int n = static_cast<int>(N);
  check_cuda(cub::DeviceRadixSort::SortPairs(nullptr, sort_bytes, static_cast<uint32_t*>(nullptr),
                                             static_cast<uint32_t*>(nullptr), static_cast<int32_t*>(nullptr),
                                             static_cast<int32_t*>(nullptr), n, 0, end_bit),
             "cub SortPairs (size query)");
  check_cuda(cub::DeviceSelect::Flagged(nullptr, sel_bytes, static_cast<int32_t*>(nullptr),
                                        static_cast<uint8_t*>(nullptr), static_cast<int32_t*>(nullptr),
                                        static_cast<int32_t*>(nullptr), n),
             "cub Select (size query)");
  return sort_bytes > sel_bytes ? sort_bytes : sel_bytes;
}

int end_bit_for(int64_t V) {
  int bits = 1;
  while ((int64_t(1) << bits) <= V) ++bits;  // V itself (the skip sentinel) must fit
  return bits;
}

Workspace carve(uint8_t* base, int64_t N, int64_t B, int64_t V, size_t acc_size) {
  Workspace ws{};
  int64_t o = 0;
  auto take = [&](int64_t bytes) {
    uint8_t* p = base ? base + o : nullptr;
    o += align256(bytes > 0 ? bytes : 1);
    return p;
  };
  ws.keys_in = reinterpret_cast<uint32_t*>(take(N * 4));
  ws.keys_out = reinterpret_cast<uint32_t*>(take(N * 4));
  ws.vals_in = reinterpret_cast<int32_t*>(take(N * 4));
  ws.vals_out = reinterpret_cast<int32_t*>(take(N * 4));
  ws.seg = reinterpret_cast<int32_t*>(take(N * 4));
  ws.nseg = reinterpret_cast<int32_t*>(take(4));
  ws.bag_of = reinterpret_cast<int32_t*>(take(N * 4));
  ws.flags = take(N);
  ws.scale = take(B * static_cast<int64_t>(acc_size));
  ws.temp_bytes = N > 0 ? cub_temp_bytes(N, end_bit_for(V)) : 1;
  ws.temp = take(static_cast<int64_t>(ws.temp_bytes));
  ws.total = o;
  return ws;
}

template <typename F>
void with_index(int code, F&& f) {
  if (code == kI32) f(int32_t{});
  else if (code == kI64) f(int64_t{});
  else throw std::invalid_argument("fastinterest CUDA embedding: index dtype must be int32 or int64");
}

template <typename F>
void with_weight(int code, F&& f) {
  switch (code) {
    case kF32: f(float{}, float{}); break;
    case kF64: f(double{}, double{}); break;
    case kF16: f(__half{}, float{}); break;
    case kBF16: f(__nv_bfloat16{}, float{}); break;
    default: throw std::invalid_argument("fastinterest CUDA embedding: weight dtype must be float32/64, float16, bfloat16");
  }
}

inline unsigned blocks_for(int64_t items, int64_t per_block) {
  return static_cast<unsigned>((items + per_block - 1) / per_block);
}

void forward(std::uintptr_t weight, int wdtype, int64_t V, int64_t D, std::uintptr_t idx, int idtype, int64_t N,
             std::uintptr_t off, int odtype, int64_t B, std::uintptr_t psw, int mode, int64_t skip_idx,
             std::uintptr_t out, std::uintptr_t maxpos, std::uintptr_t stream_handle) {
  if (B == 0) return;
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  with_weight(wdtype, [&](auto w0, auto a0) {
    using W = decltype(w0);
    using A = decltype(a0);
    with_index(idtype, [&](auto i0) {
      using I = decltype(i0);
      // offsets share the indices' type on CUDA (Python converts them): half the instantiations
      if (off && odtype != idtype) throw std::invalid_argument("fastinterest CUDA embedding: offsets dtype must equal indices dtype");
      if (mode != kMax && D <= kWarp * kMaxColsPerLane) {
        auto launch = [&](auto nc) {
          constexpr int NC = decltype(nc)::value;
          bag_sum_kernel<W, A, I, NC><<<blocks_for(B, kWarpsPerBlock), kWarp * kWarpsPerBlock, 0, stream>>>(
              reinterpret_cast<const W*>(weight), D, reinterpret_cast<const I*>(idx),
              reinterpret_cast<const I*>(off), B, reinterpret_cast<const A*>(psw), mode == kMean, skip_idx,
              reinterpret_cast<A*>(out));
        };
        if (D <= kWarp) launch(std::integral_constant<int, 1>{});
        else if (D <= 2 * kWarp) launch(std::integral_constant<int, 2>{});
        else if (D <= 4 * kWarp) launch(std::integral_constant<int, 4>{});
        else launch(std::integral_constant<int, 8>{});
        FI_CHECK_LAUNCH("bag_sum_kernel");
      } else {
        using O = I;
        bag_forward_kernel<W, A, I, O><<<blocks_for(B, kWarpsPerBlock), kWarp * kWarpsPerBlock, 0, stream>>>(
            reinterpret_cast<const W*>(weight), D, reinterpret_cast<const I*>(idx), reinterpret_cast<const O*>(off),
            B, reinterpret_cast<const A*>(psw), mode, skip_idx, reinterpret_cast<A*>(out),
            reinterpret_cast<int64_t*>(maxpos));
        FI_CHECK_LAUNCH("bag_forward_kernel");
      }
    });
  });
  (void)V;
  (void)N;
}

void backward(std::uintptr_t grad_out, std::uintptr_t weight, int wdtype, int64_t V, int64_t D, std::uintptr_t idx,
              int idtype, int64_t N, std::uintptr_t off, int odtype, int64_t B, std::uintptr_t psw, int mode,
              int64_t skip_idx, std::uintptr_t maxpos, int opt, std::vector<double> hp, std::uintptr_t s1,
              std::uintptr_t s2, std::uintptr_t step, std::uintptr_t out_rows, std::uintptr_t out_vals,
              std::uintptr_t dense, std::uintptr_t workspace, int64_t workspace_bytes, std::uintptr_t num_unique,
              bool deterministic, std::uintptr_t stream_handle) {
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  hp.resize(4, 0.0);
  if (opt == kOptAdam && !step) throw std::invalid_argument("fastinterest CUDA embedding: Adam needs its step counter");
  with_weight(wdtype, [&](auto w0, auto a0) {
    using W = decltype(w0);
    using A = decltype(a0);
    Workspace ws = carve(reinterpret_cast<uint8_t*>(workspace), N, B, V, sizeof(A));
    if (ws.total > workspace_bytes) throw std::invalid_argument("fastinterest CUDA embedding: workspace too small");
    if (N == 0) {
      if (opt == kOptAdam) {  // the step still counts, as torch.optim.SparseAdam's
        adam_step_kernel<<<1, 1, 0, stream>>>(reinterpret_cast<int64_t*>(step));
        FI_CHECK_LAUNCH("adam_step_kernel");
      }
      if (num_unique) check_cuda(cudaMemsetAsync(reinterpret_cast<void*>(num_unique), 0, 8, stream), "memset");
      return;
    }
    with_index(idtype, [&](auto i0) {
      using I = decltype(i0);
      if (off && odtype != idtype) throw std::invalid_argument("fastinterest CUDA embedding: offsets dtype must equal indices dtype");
      {
        using O = I;
        const I* ip = reinterpret_cast<const I*>(idx);
        const O* op = reinterpret_cast<const O*>(off);
        if (B > 0) {  // (a zero-block grid is a launch error)
          bag_of_kernel<I, O, A><<<blocks_for(B, 256), 256, 0, stream>>>(ip, op, B, skip_idx, mode, ws.bag_of,
                                                                        reinterpret_cast<A*>(ws.scale));
          FI_CHECK_LAUNCH("bag_of_kernel");
        }
        const bool atomic_ok = !deterministic && (opt == kOptDense || (opt == kOptSGD && sizeof(W) == sizeof(A)));
        if (atomic_ok) {
          const bool into_weight = opt == kOptSGD;
          const A alpha = into_weight ? static_cast<A>(-hp[0]) : A(1);
          atomic_scatter_kernel<W, A, I><<<blocks_for(N, kWarpsPerBlock), kWarp * kWarpsPerBlock, 0, stream>>>(
              reinterpret_cast<const A*>(grad_out), reinterpret_cast<W*>(weight), D, ip, N, ws.bag_of,
              reinterpret_cast<const A*>(ws.scale), reinterpret_cast<const A*>(psw),
              reinterpret_cast<const int64_t*>(maxpos), mode, skip_idx, alpha, reinterpret_cast<A*>(dense),
              into_weight);
          FI_CHECK_LAUNCH("atomic_scatter_kernel");
          return;
        }
        make_pairs_kernel<I><<<blocks_for(N, 256), 256, 0, stream>>>(ip, N, V, skip_idx, ws.keys_in, ws.vals_in);
        FI_CHECK_LAUNCH("make_pairs_kernel");
        size_t tb = ws.temp_bytes;
        check_cuda(cub::DeviceRadixSort::SortPairs(ws.temp, tb, ws.keys_in, ws.keys_out, ws.vals_in, ws.vals_out,
                                                   static_cast<int>(N), 0, end_bit_for(V), stream),
                   "cub SortPairs");
        segment_flags_kernel<<<blocks_for(N, 256), 256, 0, stream>>>(ws.keys_out, N, ws.flags);
        FI_CHECK_LAUNCH("segment_flags_kernel");
        tb = ws.temp_bytes;
        // vals_in still holds 0..N-1 (cub leaves its input intact): select the segment starts
        check_cuda(cub::DeviceSelect::Flagged(ws.temp, tb, ws.vals_in, ws.flags, ws.seg, ws.nseg,
                                              static_cast<int>(N), stream),
                   "cub Select");
        if (opt == kOptAdam) {
          adam_step_kernel<<<1, 1, 0, stream>>>(reinterpret_cast<int64_t*>(step));
          FI_CHECK_LAUNCH("adam_step_kernel");
        }
        UpdateParams p{opt, mode, hp[0], hp[1], hp[2], hp[3]};
        segment_update_kernel<W, A><<<blocks_for(N, kWarpsPerBlock), kWarp * kWarpsPerBlock, 0, stream>>>(
            reinterpret_cast<const A*>(grad_out), reinterpret_cast<W*>(weight), V, D, ws.keys_out, ws.vals_out,
            ws.seg, ws.nseg, N, ws.bag_of, reinterpret_cast<const A*>(ws.scale), reinterpret_cast<const A*>(psw),
            reinterpret_cast<const int64_t*>(maxpos), reinterpret_cast<A*>(s1), reinterpret_cast<A*>(s2),
            reinterpret_cast<int64_t*>(out_rows), reinterpret_cast<A*>(out_vals), reinterpret_cast<A*>(dense),
            reinterpret_cast<const int64_t*>(step), p);
        FI_CHECK_LAUNCH("segment_update_kernel");
        if (num_unique) {
          count_unique_kernel<<<1, 1, 0, stream>>>(ws.keys_out, ws.seg, ws.nseg, V,
                                                   reinterpret_cast<int64_t*>(num_unique));
          FI_CHECK_LAUNCH("count_unique_kernel");
        }
      }
    });
  });
}

}  // namespace

void register_embedding_cuda(py::module_& m) {
  m.def(
      "embedding_forward",
      [](std::uintptr_t weight, int wdtype, int64_t V, int64_t D, std::uintptr_t idx, int idtype, int64_t N,
         std::uintptr_t off, int odtype, int64_t B, std::uintptr_t psw, int mode, int64_t skip_idx,
         std::uintptr_t out, std::uintptr_t maxpos, std::uintptr_t stream) {
        if (D <= 0 || N < 0 || B < 0) throw std::invalid_argument("fastinterest CUDA embedding: bad sizes");
        py::gil_scoped_release nogil;
        forward(weight, wdtype, V, D, idx, idtype, N, off, odtype, B, psw, mode, skip_idx, out, maxpos, stream);
      },
      py::arg("weight"), py::arg("wdtype"), py::arg("V"), py::arg("D"), py::arg("idx"), py::arg("idtype"),
      py::arg("N"), py::arg("off"), py::arg("odtype"), py::arg("B"), py::arg("psw"), py::arg("mode"),
      py::arg("skip_idx"), py::arg("out"), py::arg("maxpos"), py::arg("stream"),
      "Embedding-bag forward on the given CUDA stream (same pointer contract as the CPU module).");
  m.def(
      "embedding_backward_workspace_bytes",
      [](int64_t N, int64_t B, int64_t V, int64_t D, bool deterministic, int wdtype) {
        (void)D;
        (void)deterministic;
        if (N >= (int64_t(1) << 31) || V >= (int64_t(1) << 32) - 1)
          throw std::invalid_argument("fastinterest CUDA embedding: N must be < 2^31 and V < 2^32 - 1");
        return carve(nullptr, N, B, V, wdtype == kF64 ? 8 : 4).total;
      },
      py::arg("N"), py::arg("B"), py::arg("V"), py::arg("D"), py::arg("deterministic"), py::arg("wdtype"));
  m.def(
      "embedding_backward",
      [](std::uintptr_t grad_out, std::uintptr_t weight, int wdtype, int64_t V, int64_t D, std::uintptr_t idx,
         int idtype, int64_t N, std::uintptr_t off, int odtype, int64_t B, std::uintptr_t psw, int mode,
         int64_t skip_idx, std::uintptr_t maxpos, int opt, std::vector<double> hp, std::uintptr_t s1,
         std::uintptr_t s2, std::uintptr_t step, std::uintptr_t out_rows, std::uintptr_t out_vals,
         std::uintptr_t dense, std::uintptr_t workspace, int64_t workspace_bytes, std::uintptr_t num_unique,
         bool deterministic, std::uintptr_t stream) {
        py::gil_scoped_release nogil;
        backward(grad_out, weight, wdtype, V, D, idx, idtype, N, off, odtype, B, psw, mode, skip_idx, maxpos, opt,
                 std::move(hp), s1, s2, step, out_rows, out_vals, dense, workspace, workspace_bytes, num_unique,
                 deterministic, stream);
      },
      py::arg("grad_out"), py::arg("weight"), py::arg("wdtype"), py::arg("V"), py::arg("D"), py::arg("idx"),
      py::arg("idtype"), py::arg("N"), py::arg("off"), py::arg("odtype"), py::arg("B"), py::arg("psw"),
      py::arg("mode"), py::arg("skip_idx"), py::arg("maxpos"), py::arg("opt"), py::arg("hp"), py::arg("s1"),
      py::arg("s2"), py::arg("step"), py::arg("out_rows"), py::arg("out_vals"), py::arg("dense"),
      py::arg("workspace"), py::arg("workspace_bytes"), py::arg("num_unique"), py::arg("deterministic"),
      py::arg("stream"),
      "Embedding-bag backward: deterministic (cub radix sort by row, one warp per row summing in position\n"
      "order, fused update) or, with deterministic=False, atomic (dense gradient / SGD into float weights).");
}

}  // namespace fi
