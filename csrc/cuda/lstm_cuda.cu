// Fused LSTM kernels (CUDA). Filled in by the LSTM work; bindings are added in register_lstm_cuda.
#include "cuda/registry.h"

namespace fi {
void register_lstm_cuda(pybind11::module_& m) { (void)m; }
}  // namespace fi
