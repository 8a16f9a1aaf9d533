#pragma once
// Shared pieces of the fused multi-step neuron kernels (lif.cpp, stm.cpp).
#include <type_traits>

#include "fast_math.h"

namespace lrkern::cpu {

// Runtime flag -> compile-time constant: the kernels are templated on every flag (reset mode, surrogate, decay_input,
// ...) so their inner loops carry no branches; this turns one bool into std::true_type / std::false_type.
template <typename F>
inline void dispatch_bool(bool b, F&& f) {
  if (b) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// surrogate(d) of lrkern/reference/lif.py, d = h - threshold, for any constants struct with alpha, atan_c =
// fp32(pi / 2 * alpha) and atan_half = fp32(alpha / 2) (formed in double, as the reference's Python floats).
// 0 = sigmoid: alpha sg (1 - sg), sg = 1 / (1 + exp(-alpha d)); 1 = atan: reciprocal(1 + (pi/2 alpha d)^2) * (alpha / 2)
// (Python's float / tensor is reciprocal() * float).
template <bool ATAN, typename Consts>
inline float surrogate(float d, const Consts& c) {
  if constexpr (ATAN) {
    const float u = c.atan_c * d;
    const float den = 1.0f + u * u;
    return (1.0f / den) * c.atan_half;
  } else {
    const float z = c.alpha * d;
    const float sg = 1.0f / (1.0f + exp_f32(0.0f - z));
    return c.alpha * sg * (1.0f - sg);
  }
}

}  // namespace lrkern::cpu
