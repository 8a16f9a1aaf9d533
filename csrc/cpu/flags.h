#pragma once
// Runtime flag -> compile-time constant: the fused neuron kernels are templated on every flag (reset mode, surrogate,
// decay_input, ...) so their inner loops carry no branches; this turns one bool into std::true_type/false_type.
#include <type_traits>

namespace lrkern::cpu {

template <typename F>
inline void dispatch_bool(bool b, F&& f) {
  if (b) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

}  // namespace lrkern::cpu
