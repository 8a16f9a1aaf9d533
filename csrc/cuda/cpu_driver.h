// Helpers of the CPU drivers of the CUDA C kernels (tests only; see cpu_shim.h): they turn a driver entry point's
// runtime dtype and flags into a kernel's template arguments. Included after the kernel source, which defines the
// storage types lk_f16 and lk_bf16.
#pragma once

#include <type_traits>

namespace lk_driver {

// f(std::true_type{}) or f(std::false_type{}).
template <typename F>
void pick(bool b, F&& f) {
  if (b) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// f(T*) for dtype 0 = float32, 1 = float16, 2 = bfloat16; returns 0, or -1 for an unknown dtype (or, built with
// -DLK_DRIVER_FLOAT_ONLY, a dtype other than float32: a quicker build for tests that only need fp32).
template <typename F>
int pick_dtype(int dtype, F&& f) {
  switch (dtype) {
    case 0: f(static_cast<float*>(nullptr)); return 0;
#ifndef LK_DRIVER_FLOAT_ONLY
    case 1: f(static_cast<lk_f16*>(nullptr)); return 0;
    case 2: f(static_cast<lk_bf16*>(nullptr)); return 0;
#endif
    default: return -1;
  }
}

}  // namespace lk_driver
