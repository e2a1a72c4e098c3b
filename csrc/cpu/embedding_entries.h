// Type dispatch from dtype codes to the kernel templates; included once per SIMD translation unit
// with FI_KERNEL_NS set (fi::generic or fi::avx2).
#pragma once
#include <stdexcept>

#include "cpu/embedding_kernels.h"

namespace FI_KERNEL_NS {

template <typename F>
inline void with_index_type(int code, F&& f) {
  if (code == static_cast<int>(fi::DType::kInt32)) f(int32_t{});
  else if (code == static_cast<int>(fi::DType::kInt64)) f(int64_t{});
  else throw std::invalid_argument("fastinterest: index dtype must be int32 or int64");
}

template <typename F>
inline void with_weight_type(int code, F&& f) {
  switch (static_cast<fi::DType>(code)) {
    case fi::DType::kFloat32: f(float{}, float{}); break;
    case fi::DType::kFloat64: f(double{}, double{}); break;
    case fi::DType::kFloat16: f(_Float16{}, float{}); break;
    case fi::DType::kBFloat16: f(fi::bf16_t{}, float{}); break;
    default: throw std::invalid_argument("fastinterest: weight dtype must be float32/64, float16 or bfloat16");
  }
}

bool embedding_forward(const fi::FwdCall& c) {
  bool bad = false;
  with_weight_type(c.wdtype, [&](auto w0, auto a0) {
    using W = decltype(w0);
    using A = decltype(a0);
    with_index_type(c.idtype, [&](auto i0) {
      using I = decltype(i0);
      with_index_type(c.off ? c.odtype : c.idtype, [&](auto o0) {
        using O = decltype(o0);
        bad = bag_forward<W, A, I, O>(reinterpret_cast<const W*>(c.weight), c.V, c.D,
                                      reinterpret_cast<const I*>(c.idx), c.N, reinterpret_cast<const O*>(c.off), c.B,
                                      reinterpret_cast<const A*>(c.psw), c.mode, c.skip_idx,
                                      reinterpret_cast<A*>(c.out), reinterpret_cast<int64_t*>(c.maxpos), c.nthreads);
      });
    });
  });
  return bad;
}

int64_t embedding_backward(const fi::BwdCall& c) {
  int64_t U = 0;
  BackwardArgs a{c.V, c.D, c.N, c.B, c.mode, c.skip_idx, c.opt, {c.hp[0], c.hp[1], c.hp[2], c.hp[3]}, c.nthreads};
  with_weight_type(c.wdtype, [&](auto w0, auto a0) {
    using W = decltype(w0);
    using A = decltype(a0);
    with_index_type(c.idtype, [&](auto i0) {
      using I = decltype(i0);
      with_index_type(c.off ? c.odtype : c.idtype, [&](auto o0) {
        using O = decltype(o0);
        U = bag_backward<W, A, I, O>(
            reinterpret_cast<const A*>(c.grad_out), reinterpret_cast<W*>(c.weight), reinterpret_cast<const I*>(c.idx),
            reinterpret_cast<const O*>(c.off), reinterpret_cast<const A*>(c.psw),
            reinterpret_cast<const int64_t*>(c.maxpos), reinterpret_cast<A*>(c.s1), reinterpret_cast<A*>(c.s2),
            reinterpret_cast<int64_t*>(c.step),
            reinterpret_cast<int64_t*>(c.out_rows), reinterpret_cast<A*>(c.out_vals), reinterpret_cast<A*>(c.dense),
            a);
      });
    });
  });
  return U;
}

int64_t first_bad_index(std::uintptr_t idx, int idtype, int64_t N, int64_t V) {
  int64_t r = -1;
  with_index_type(idtype, [&](auto i0) {
    using I = decltype(i0);
    r = first_bad_index<I>(reinterpret_cast<const I*>(idx), N, V);
  });
  return r;
}

}  // namespace FI_KERNEL_NS
