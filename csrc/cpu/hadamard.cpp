// Orthonormal fast Walsh-Hadamard transform along the last dim: y = x @ H_n, n a power of two.
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "convert.h"
#include "ops.h"

namespace lrkern::cpu {
namespace {

// In-place unnormalised FWHT of n floats (Sylvester order).
inline void fwht(float* __restrict v, int64_t n) {
  int64_t h = 1;
  if (n >= 4) {
    // Stages h = 1 and 2 fused as 4-point butterflies: their stride is too short for the vector loop below.
    for (int64_t i = 0; i < n; i += 4) {
      const float s0 = v[i] + v[i + 1], d0 = v[i] - v[i + 1];
      const float s1 = v[i + 2] + v[i + 3], d1 = v[i + 2] - v[i + 3];
      v[i] = s0 + s1;
      v[i + 1] = d0 + d1;
      v[i + 2] = s0 - s1;
      v[i + 3] = d0 - d1;
    }
    h = 4;
  }
  for (; h < n; h <<= 1) {
    for (int64_t i = 0; i < n; i += 2 * h) {
      float* __restrict a = v + i;
      float* __restrict b = v + i + h;
#pragma omp simd
      for (int64_t j = 0; j < h; ++j) {
        const float x = a[j], y = b[j];
        a[j] = x + y;
        b[j] = x - y;
      }
    }
  }
}

template <typename T>
void hadamard_rows(const T* x, T* out, int64_t rows, int64_t n) {
  const float scale = 1.0f / std::sqrt(static_cast<float>(n));
  // ~32K elements per task keeps thread start-up negligible for small inputs.
  const int64_t grain = std::max<int64_t>(1, 32768 / n);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(n);
    for (int64_t r = begin; r < end; ++r) {
      load_f32(x + r * n, buf.data(), n);
      fwht(buf.data(), n);
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) buf[j] *= scale;
      store_f32(buf.data(), out + r * n, n);
    }
  });
}

}  // namespace

void hadamard_out(const at::Tensor& x, at::Tensor& out) {
  TORCH_CHECK(x.device().is_cpu() && out.device().is_cpu(), "hadamard_out: CPU tensors expected");
  TORCH_CHECK(x.is_contiguous() && out.is_contiguous(), "hadamard_out: contiguous tensors expected");
  TORCH_CHECK(x.sizes() == out.sizes() && x.scalar_type() == out.scalar_type(), "hadamard_out: out must match x");
  const int64_t n = x.size(-1);
  TORCH_CHECK(n >= 2 && (n & (n - 1)) == 0, "hadamard_out: last dim must be a power of two, got ", n);
  const int64_t rows = x.numel() / n;
  dispatch_float(x.scalar_type(), "hadamard_out", [&](auto tag) {
    using T = typename decltype(tag)::type;
    hadamard_rows<T>(x.const_data_ptr<T>(), out.mutable_data_ptr<T>(), rows, n);
  });
}

}  // namespace lrkern::cpu
