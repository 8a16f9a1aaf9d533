// CPU driver for the CUDA C STM kernels (tests only): compiled with cpu_shim.h included first, it includes stm.cu as
// plain C++ and exports C entry points that run one kernel over a simulated 2-D grid with barriers (lk_launch_grid),
// with the same arguments the CuPy launcher (lrkern/kernels/cuda_stm.py) passes on the GPU, then the grid and block.
// tests/test_stm_cuda_source.py builds it:
//
//   g++ -x c++ -std=c++17 -O2 -ffp-contract=off -shared -fPIC -include cpu_shim.h stm_cpu_driver.cpp
//
// dtype: 0 = float32, 1 = float16, 2 = bfloat16. reverse: run each block's threads in reverse order between barriers.
// Returns 0, -1 for an unknown dtype, -2 when a block's threads did not all reach the same barrier.
#ifndef LRKERN_CPU_SHIM
#error "compile with -include csrc/cuda/cpu_shim.h"
#endif

#include "stm.cu"
#include "cpu_driver.h"

using lk_driver::pick;
using lk_driver::pick_dtype;

extern "C" int lk_stm_fwd(int dtype, int soft, int decay, int has_beta, const void* u, const float* v0,
                          const float* gain, const float* tau, const float* theta0, const float* beta, void* s,
                          void* h, float* v_last, long long steps, long long n, long long row_len,
                          long long channels, float rho, float v_reset, unsigned int grid_x, unsigned int grid_y,
                          unsigned int block, int reverse) {
  int rc = 0;
  const int known = pick_dtype(dtype, [&](auto tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    pick(soft, [&](auto so) {
      pick(decay, [&](auto de) {
        pick(has_beta, [&](auto be) {
          rc = lk_launch_grid(grid_x, grid_y, block, reverse != 0,
                              stm_fwd<T, decltype(so)::value, decltype(de)::value, decltype(be)::value>,
                              static_cast<const T*>(u), v0, gain, tau, theta0, beta, static_cast<T*>(s),
                              static_cast<T*>(h), v_last, steps, n, row_len, channels, rho, v_reset);
        });
      });
    });
  });
  return known != 0 ? known : rc;
}

extern "C" int lk_stm_bwd(int dtype, int soft, int decay, int has_beta, int atan, int params, const void* grad_s,
                          const float* grad_v_last, const void* u, const float* v0, const void* h, const void* s,
                          const float* gain, const float* tau, const float* theta0, const float* beta, float* trace,
                          void* grad_u, float* grad_v0, double* partial, long long steps, long long n,
                          long long row_len, long long channels, float rho, float v_reset, int detach, float alpha,
                          float atan_scale, float half_alpha, unsigned int grid_x, unsigned int grid_y,
                          unsigned int block, int reverse) {
  int rc = 0;
  const int known = pick_dtype(dtype, [&](auto tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    pick(soft, [&](auto so) {
      pick(decay, [&](auto de) {
        pick(has_beta, [&](auto be) {
          pick(atan, [&](auto at) {
            pick(params, [&](auto pa) {
              rc = lk_launch_grid(grid_x, grid_y, block, reverse != 0,
                                  stm_bwd<T, decltype(so)::value, decltype(de)::value, decltype(be)::value,
                                          decltype(at)::value, decltype(pa)::value>,
                                  static_cast<const T*>(grad_s), grad_v_last, static_cast<const T*>(u), v0,
                                  static_cast<const T*>(h), static_cast<const T*>(s), gain, tau, theta0, beta, trace,
                                  static_cast<T*>(grad_u), grad_v0, partial, steps, n, row_len, channels, rho,
                                  v_reset, detach, alpha, atan_scale, half_alpha);
            });
          });
        });
      });
    });
  });
  return known != 0 ? known : rc;
}
