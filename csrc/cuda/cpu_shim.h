// Lets the CUDA C kernels of csrc/cuda compile as plain C++ on the CPU, so CI checks them without a GPU:
//
//   g++ -x c++ -std=c++17 -O2 -ffp-contract=off -include csrc/cuda/cpu_shim.h file_that_includes_lif.cu
//
// It defines what the kernels take from CUDA: the function qualifiers, the thread-index variables (set by the
// caller, which loops a kernel over a simulated grid, see lk_launch), the IEEE-rounded arithmetic intrinsics, the
// bit casts, and fp16 conversions with round-to-nearest-even in software. -ffp-contract=off keeps g++ from fusing a
// multiply and an add into an FMA, which the GPU build forbids with --fmad=false and the *_rn intrinsics.
#pragma once

#define LRKERN_CPU_SHIM 1

#include <math.h>  // ::expf, as CUDA device code has it

#include <cstring>
#include <type_traits>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))

struct lk_uint3 {
  unsigned int x = 0, y = 0, z = 0;
};
// What a kernel reads of its position in the grid; lk_launch sets them before each simulated thread.
inline thread_local lk_uint3 threadIdx, blockIdx, blockDim, gridDim;

// The CUDA intrinsics are correctly rounded single operations; so are the C++ ones without contraction.
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }

inline unsigned int __float_as_uint(float f) {
  unsigned int u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
inline float __uint_as_float(unsigned int u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// fp16 bits -> fp32, exact (the GPU uses cvt.f32.f16).
inline float lk_f16_to_f32(unsigned short b) {
  const unsigned int sign = (unsigned int)(b & 0x8000u) << 16;
  const unsigned int e = (b >> 10) & 0x1Fu, m = b & 0x3FFu;
  if (e == 0x1Fu) return __uint_as_float(sign | 0x7F800000u | (m << 13));  // inf / NaN
  if (e == 0) {  // zero or subnormal: m * 2^-24, exact in fp32
    const float mag = (float)m * 5.9604644775390625e-8f;
    return sign ? -mag : mag;
  }
  return __uint_as_float(sign | ((e + 112u) << 23) | (m << 13));
}

// fp32 -> fp16 bits, round to nearest even (the GPU uses cvt.rn.f16.f32): overflow to inf, subnormals rounded,
// NaN made quiet.
inline unsigned short lk_f32_to_f16(float f) {
  const unsigned int u = __float_as_uint(f);
  const unsigned int sign = (u >> 16) & 0x8000u;
  const unsigned int a = u & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return (unsigned short)(sign | 0x7E00u);
  const int e = (int)(a >> 23) - 127 + 15;  // the fp16 biased exponent
  if (e >= 31) return (unsigned short)(sign | 0x7C00u);
  if (e <= 0) {  // an fp16 subnormal (or zero): value / 2^-24 = mantissa_with_1 >> (14 - e), rounded
    if (e < -10) return (unsigned short)sign;  // below half the smallest subnormal: 0
    const unsigned int m = (a & 0x7FFFFFu) | 0x800000u;
    const int shift = 14 - e;  // 14 .. 24
    unsigned int r = m >> shift;
    const unsigned int rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1u))) ++r;  // may carry into the smallest normal: still right
    return (unsigned short)(sign | r);
  }
  unsigned int r = ((unsigned int)e << 10) | ((a & 0x7FFFFFu) >> 13);
  const unsigned int rem = a & 0x1FFFu;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;  // a carry may reach the exponent, up to inf: right
  return (unsigned short)(sign | r);
}

// Runs kernel(args...) once per thread of a 1-D grid of `grid` blocks of `block` threads, in order.
template <typename Kernel, typename... Args>
inline void lk_launch(unsigned int grid, unsigned int block, Kernel kernel, Args... args) {
  gridDim = {grid, 1, 1};
  blockDim = {block, 1, 1};
  for (unsigned int b = 0; b < grid; ++b) {
    blockIdx = {b, 0, 0};
    for (unsigned int t = 0; t < block; ++t) {
      threadIdx = {t, 0, 0};
      kernel(args...);
    }
  }
}
