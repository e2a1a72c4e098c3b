// Embedding kernels for any x86-64 (or other) CPU. See embedding_kernels.h.
#define FI_KERNEL_NS fi::generic
#include "cpu/embedding_entries.h"
