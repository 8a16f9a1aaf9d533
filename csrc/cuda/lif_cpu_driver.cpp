// CPU driver for the CUDA C LIF kernels (tests only): compiled with cpu_shim.h included first, it includes lif.cu as
// plain C++ and exports C entry points that run one kernel over a simulated 1-D grid (lk_launch), with the same
// arguments the CuPy launcher (lrkern/kernels/cuda_lif.py) passes on the GPU. tests/test_lif_cuda_source.py builds it:
//
//   g++ -x c++ -std=c++17 -O2 -ffp-contract=off -shared -fPIC -include cpu_shim.h lif_cpu_driver.cpp
//
// dtype: 0 = float32, 1 = float16, 2 = bfloat16. Returns 0, or -1 for an unknown dtype.
#ifndef LRKERN_CPU_SHIM
#error "compile with -include csrc/cuda/cpu_shim.h"
#endif

#include "lif.cu"
#include "cpu_driver.h"

using lk_driver::pick;
using lk_driver::pick_dtype;

extern "C" int lk_lif_fwd(int dtype, int soft, int decay, int store, const void* x, const float* v0, void* s, void* h,
                          float* v_last, float* v_seq, long long steps, long long n, float tau, float v_threshold,
                          float v_reset, unsigned int grid, unsigned int block) {
  return pick_dtype(dtype, [&](auto tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    pick(soft, [&](auto so) {
      pick(decay, [&](auto de) {
        pick(store, [&](auto st) {
          lk_launch(grid, block, lif_fwd<T, decltype(so)::value, decltype(de)::value, decltype(st)::value>,
                    static_cast<const T*>(x), v0, static_cast<T*>(s), static_cast<T*>(h), v_last, v_seq, steps, n,
                    tau, v_threshold, v_reset);
        });
      });
    });
  });
}

extern "C" int lk_lif_bwd(int dtype, int soft, int decay, int detach, int atan, int seq, const void* grad_s,
                          const float* grad_v_last, const float* grad_v_seq, const void* h, const void* s,
                          void* grad_x, float* grad_v0, long long steps, long long n, float tau, float v_threshold,
                          float v_reset, float decay_k, float alpha, float atan_scale, float half_alpha,
                          unsigned int grid, unsigned int block) {
  return pick_dtype(dtype, [&](auto tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    pick(soft, [&](auto so) {
      pick(decay, [&](auto de) {
        pick(detach, [&](auto dt) {
          pick(atan, [&](auto at) {
            pick(seq, [&](auto sq) {
              lk_launch(grid, block,
                        lif_bwd<T, decltype(so)::value, decltype(de)::value, decltype(dt)::value,
                                decltype(at)::value, decltype(sq)::value>,
                        static_cast<const T*>(grad_s), grad_v_last, grad_v_seq, static_cast<const T*>(h),
                        static_cast<const T*>(s), static_cast<T*>(grad_x), grad_v0, steps, n, tau, v_threshold,
                        v_reset, decay_k, alpha, atan_scale, half_alpha);
            });
          });
        });
      });
    });
  });
}

// The shim's fp16 conversions, exposed so the test checks them against torch's casts.
extern "C" void lk_f32_to_f16_n(const float* src, unsigned short* dst, long long n) {
  for (long long i = 0; i < n; ++i) dst[i] = lk_f32_to_f16(src[i]);
}
extern "C" void lk_f16_to_f32_n(const unsigned short* src, float* dst, long long n) {
  for (long long i = 0; i < n; ++i) dst[i] = lk_f16_to_f32(src[i]);
}
extern "C" void lk_f32_to_bf16_n(const float* src, unsigned short* dst, long long n) {
  for (long long i = 0; i < n; ++i) dst[i] = lk_f32_to_bf16(src[i]);
}
