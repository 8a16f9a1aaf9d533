// Branch-free fp32 math for the kernels' `omp simd` loops (shared by lif.cpp and stm.cpp).
#pragma once

#include <cstdint>

namespace lrkern::cpu {

// exp(x) in fp32 without branches, floor or float->int conversions (GCC vectorises none of those under `omp simd`
// without fast-math): Cephes' expf, within 1 ulp of the correctly rounded value over the normal range. x is clamped
// to [-104, 89] as an integer min on its bits (the bound picked by sign; a float compare-and-select there lets GCC
// thread a constant path and compute the caller's division twice), so both 0 and inf come out by rounding. Then
// x = n ln2 + r with n the nearest integer (the 1.5 * 2^23 add rounds it into the low mantissa bits, which also give
// n as an integer) and ln2 split in two constants; a degree-5 polynomial for e^r; 2^n applied as two exact
// power-of-two multiplies so that n spans the whole range. NaN stays NaN.
inline float exp_f32(float x) {
  constexpr float kMagic = 12582912.0f;
  const int32_t ix = __builtin_bit_cast(int32_t, x);
  const int32_t bound = ix < 0 ? __builtin_bit_cast(int32_t, -104.0f) : __builtin_bit_cast(int32_t, 89.0f);
  const float xc = __builtin_bit_cast(float, ix < bound ? ix : bound);
  const float t = xc * 1.44269504088896341f + kMagic;
  const float fx = t - kMagic;
  float r = xc - fx * 0.693359375f;
  r = r - fx * -2.12194440e-4f;
  const float z = r * r;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * z + r;
  y = y + 1.0f;
  const int32_t n = __builtin_bit_cast(int32_t, t) - __builtin_bit_cast(int32_t, kMagic);  // in [-150, 128]
  const int32_t n1 = n >> 1, n2 = n - n1;  // each in [-75, 64]: a normal power of two
  y = y * __builtin_bit_cast(float, (n1 + 127) << 23) * __builtin_bit_cast(float, (n2 + 127) << 23);
  return x == x ? y : x;
}

}  // namespace lrkern::cpu
