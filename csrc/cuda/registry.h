// Each op family adds its bindings to the pybind11 module `_C_cuda` through a register function.
#pragma once
#include <pybind11/pybind11.h>

#include <cstdio>
#include <stdexcept>
#include <string>

#include <cuda_runtime.h>

namespace fi {
void register_embedding_cuda(pybind11::module_& m);  // embedding_cuda.cu
void register_lstm_cuda(pybind11::module_& m);       // lstm_cuda.cu

// Check the last CUDA error after every launch; throws with the kernel's name.
inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("fastinterest CUDA error in ") + what + ": " +
                             cudaGetErrorString(err));
  }
}
#define FI_CHECK_LAUNCH(name) ::fi::check_cuda(cudaGetLastError(), name)
}  // namespace fi
