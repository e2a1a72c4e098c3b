// Embedding kernels compiled with -mavx2 -mfma -mf16c (CMake sets the flags for *_avx2.cpp).
#define FI_KERNEL_NS fi::avx2
#include "cpu/embedding_entries.h"
