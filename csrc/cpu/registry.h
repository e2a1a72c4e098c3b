// Each op family adds its bindings to the one pybind11 module `_C_cpu` through a register function.
#pragma once
#include <pybind11/pybind11.h>

namespace fi {
void register_common(pybind11::module_& m);     // build_info, thread helpers (module.cpp)
void register_embedding(pybind11::module_& m);  // embedding_cpu.cpp
void register_lstm(pybind11::module_& m);       // lstm_cpu.cpp
void register_loss(pybind11::module_& m);       // loss_cpu.cpp
void register_probes(pybind11::module_& m);     // probe_avx2.cpp (x86-64 only)
}  // namespace fi
