// The `_C_cpu` pybind11 module: torch-free CPU kernels driven by raw pointers from Python.
#include <pybind11/pybind11.h>

#include "cpu/registry.h"
#include "cpu/simd.h"

#ifdef FI_HAVE_OPENMP
#include <omp.h>
#endif

#if defined(__linux__)
#include <sys/mman.h>
#endif
#include <cstdint>

namespace py = pybind11;

namespace fi {
void register_common(py::module_& m) {
  m.def("build_info", []() {
    py::dict d;
    d["compiler"] = FI_COMPILER;
#ifdef FI_HAVE_OPENMP
    d["openmp"] = true;
    d["openmp_version"] = _OPENMP;
#else
    d["openmp"] = false;
#endif
    d["simd_compiled"] = "generic, avx2+fma+f16c";
    d["simd_runtime"] = cpu_has_avx2() ? "avx2+fma+f16c" : "generic";
    return d;
  });
  // Random row gathers from a large table miss the TLB on nearly every row with 4 KiB pages; asking
  // for transparent huge pages on the table's memory (before it is first written) removes most of
  // those page walks. Returns the number of bytes advised (0 where unsupported).
  m.def(
      "advise_hugepages",
      [](std::uintptr_t ptr, int64_t bytes) -> int64_t {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
        const std::uintptr_t huge = std::uintptr_t(1) << 21;
        const std::uintptr_t start = (ptr + huge - 1) & ~(huge - 1);
        const std::uintptr_t end = (ptr + static_cast<std::uintptr_t>(bytes)) & ~(huge - 1);
        if (end <= start) return 0;
        if (madvise(reinterpret_cast<void*>(start), end - start, MADV_HUGEPAGE) != 0) return 0;
        return static_cast<int64_t>(end - start);
#else
        (void)ptr;
        (void)bytes;
        return 0;
#endif
      },
      py::arg("ptr"), py::arg("bytes"), "madvise(MADV_HUGEPAGE) on the 2 MiB-aligned part of [ptr, ptr+bytes).");
}
}  // namespace fi

PYBIND11_MODULE(_C_cpu, m) {
  m.doc() = "fastinterest CPU kernels (torch-free; pointers in, pointers out)";
  fi::register_common(m);
  fi::register_embedding(m);
  fi::register_lstm(m);
  fi::register_loss(m);
#ifdef FI_HAVE_AVX2_TU
  fi::register_probes(m);
#endif
}
