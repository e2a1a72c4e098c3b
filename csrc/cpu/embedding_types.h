// Types and call records shared by the embedding kernels and their bindings.
#pragma once
#include <cstdint>

namespace fi {

struct bf16_t {
  uint16_t bits;
};

// dtype codes passed from Python (fastinterest/backends/ext_embedding.py keeps the same table)
enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3, kInt32 = 4, kInt64 = 5 };
enum class Mode : int { kSum = 0, kMean = 1, kMax = 2 };
enum class Opt : int { kSparse = 0, kDense = 1, kSGD = 2, kAdagrad = 3, kRowWiseAdagrad = 4, kAdam = 5 };

// One forward call. Pointers are addresses of contiguous tensors; 0 = absent.
struct FwdCall {
  std::uintptr_t weight;  // [V, D] of wdtype
  int wdtype;
  int64_t V, D;
  std::uintptr_t idx;     // [N] int32/int64 (idtype)
  int idtype;
  int64_t N;
  std::uintptr_t off;     // [B + 1] int32/int64 (odtype), or 0: bag b = {idx[b]} (plain embedding)
  int odtype;
  int64_t B;
  std::uintptr_t psw;     // [N] accumulation type, or 0
  int mode;
  int64_t skip_idx;       // row skipped in bags (padding_idx), or -1
  std::uintptr_t out;     // [B, D] accumulation type (float64 for float64 tables, float32 otherwise)
  std::uintptr_t maxpos;  // [B, D] int64 (mode max), or 0
  int nthreads;
};

// One backward call (see bag_backward in embedding_kernels.h for the meaning of opt and hp).
struct BwdCall {
  std::uintptr_t grad_out;  // [B, D] accumulation type
  std::uintptr_t weight;    // [V, D] of wdtype (updated in place by the fused optimizers)
  int wdtype;
  int64_t V, D;
  std::uintptr_t idx;
  int idtype;
  int64_t N;
  std::uintptr_t off;
  int odtype;
  int64_t B;
  std::uintptr_t psw;
  int mode;
  int64_t skip_idx;
  std::uintptr_t maxpos;    // [B, D] int64 positions (mode max)
  int opt;
  double hp[4];
  std::uintptr_t s1, s2;    // optimizer state (accumulation type)
  std::uintptr_t step;      // [1] int64 step counter (Adam; incremented by the call)
  std::uintptr_t out_rows;  // [N] int64 (opt sparse)
  std::uintptr_t out_vals;  // [N, D] accumulation type (opt sparse)
  std::uintptr_t dense;     // [V, D] accumulation type (opt dense)
  int nthreads;
};

#define FI_DECLARE_EMBEDDING_ENTRIES(NS)                               \
  namespace NS {                                                       \
  bool embedding_forward(const ::fi::FwdCall& c);                      \
  int64_t embedding_backward(const ::fi::BwdCall& c);                  \
  int64_t first_bad_index(std::uintptr_t idx, int idtype, int64_t N, int64_t V); \
  }

FI_DECLARE_EMBEDDING_ENTRIES(generic)
FI_DECLARE_EMBEDDING_ENTRIES(avx2)

}  // namespace fi
