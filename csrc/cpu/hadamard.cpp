// Orthonormal fast Walsh-Hadamard transform along the last dim: y = x @ H_n, n a power of two.
//
// Every element goes through exactly the butterflies of lrkern/reference/hadamard.py, stage by stage (stride
// h = 1, 2, 4, ...; (a, b) -> (a + b, a - b)), in fp32, then one multiply by fp32(1/sqrt(n)) and one rounding to the
// output dtype; the stages are only regrouped so that each pass over the row does several of them in registers.
// The result is therefore bit-identical to the reference.
//
// AVX2 path, per row:
//   pass 1  blocks of min(n, 64) floats: load (converting from the storage dtype), stages h = 1, 2, 4 inside each
//           8-lane register (shuffles), stages h = 8, 16, 32 across the block's registers;
//   pass 2+ radix-8 (or radix-4/2 for the last) groups of stages h = 64, 512, ... across registers 8 * h floats
//           apart, on an fp32 row buffer; the last pass scales and stores in the output dtype.
// Rows of n <= 64 are a single pass from x to out with no buffer. n = 2, 4 and builds without AVX2 use the
// portable scalar code.
#include <ATen/Parallel.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <vector>

#include "convert.h"
#include "ops.h"

namespace lrkern::cpu {
namespace {

// Portable in-place unnormalised FWHT of n floats (Sylvester order).
inline void fwht_scalar(float* __restrict v, int64_t n) {
  int64_t h = 1;
  if (n >= 4) {
    // Stages h = 1 and 2 fused as 4-point butterflies.
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
void rows_scalar(const T* x, T* out, int64_t begin, int64_t end, int64_t n, float scale, std::vector<float>& buf) {
  for (int64_t r = begin; r < end; ++r) {
    load_f32(x + r * n, buf.data(), n);
    fwht_scalar(buf.data(), n);
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) buf[j] *= scale;
    store_f32(buf.data(), out + r * n, n);
  }
}

#if defined(LRKERN_AVX2)

// Stages h = 1, 2, 4 inside one register. Lane i pairs with lane i ^ h: the lower lane of a pair gets a + b, the
// upper one a - b, computed as a + (-b) (the same IEEE result) by flipping the sign bit of the upper lanes.
inline __m256 radix8_lanes(__m256 v) {
  const __m256 m1 = _mm256_castsi256_ps(_mm256_setr_epi32(0, INT_MIN, 0, INT_MIN, 0, INT_MIN, 0, INT_MIN));
  const __m256 m2 = _mm256_castsi256_ps(_mm256_setr_epi32(0, 0, INT_MIN, INT_MIN, 0, 0, INT_MIN, INT_MIN));
  const __m256 m4 = _mm256_castsi256_ps(_mm256_setr_epi32(0, 0, 0, 0, INT_MIN, INT_MIN, INT_MIN, INT_MIN));
  v = _mm256_add_ps(_mm256_permute_ps(v, 0xB1), _mm256_xor_ps(v, m1));
  v = _mm256_add_ps(_mm256_permute_ps(v, 0x4E), _mm256_xor_ps(v, m2));
  v = _mm256_add_ps(_mm256_permute2f128_ps(v, v, 0x01), _mm256_xor_ps(v, m4));
  return v;
}

// log2(R) stages across R registers (register m holds floats m * h .. m * h + 7 of a block of R * h).
template <int R>
inline void radix_regs(__m256* r) {
  for (int s = 1; s < R; s <<= 1) {
    for (int m = 0; m < R; ++m) {
      if (m & s) continue;
      const __m256 a = r[m], b = r[m + s];
      r[m] = _mm256_add_ps(a, b);
      r[m + s] = _mm256_sub_ps(a, b);
    }
  }
}

// Pass 1 on one block of 8 * R floats: stages h = 1 .. 4R. Reads the storage dtype; writes fp32 to buf, or (when
// the block is the whole row) scaled values in the output dtype.
template <int R, typename T, bool FINAL>
inline void first_pass_block(const T* src, float* buf, T* dst, __m256 scale) {
  __m256 r[R];
  for (int m = 0; m < R; ++m) r[m] = radix8_lanes(load8(src + 8 * m));
  radix_regs<R>(r);
  if constexpr (FINAL) {
    if constexpr (R == 1) {
      store8(dst, _mm256_mul_ps(r[0], scale));
    } else {
      for (int m = 0; m < R; m += 2) store16(dst + 8 * m, _mm256_mul_ps(r[m], scale), _mm256_mul_ps(r[m + 1], scale));
    }
  } else {
    for (int m = 0; m < R; ++m) _mm256_storeu_ps(buf + 8 * m, r[m]);
  }
}

// One later pass: log2(R) stages h, 2h, .. on the fp32 row buffer (h >= 64). The final pass takes two adjacent
// 8-float columns at a time so it stores 16 contiguous outputs at once (one pack for bf16).
template <int R>
inline void later_pass_buf(float* buf, int64_t n, int64_t h) {
  for (int64_t base = 0; base < n; base += R * h) {
    for (int64_t j = base; j < base + h; j += 8) {
      __m256 a[R];
      for (int m = 0; m < R; ++m) a[m] = _mm256_loadu_ps(buf + j + m * h);
      radix_regs<R>(a);
      for (int m = 0; m < R; ++m) _mm256_storeu_ps(buf + j + m * h, a[m]);
    }
  }
}

template <int R, typename T>
inline void later_pass_final(const float* buf, T* dst, int64_t n, int64_t h, __m256 scale) {
  for (int64_t base = 0; base < n; base += R * h) {
    for (int64_t j = base; j < base + h; j += 16) {
      __m256 a[R], b[R];
      for (int m = 0; m < R; ++m) {
        a[m] = _mm256_loadu_ps(buf + j + m * h);
        b[m] = _mm256_loadu_ps(buf + j + m * h + 8);
      }
      radix_regs<R>(a);
      radix_regs<R>(b);
      for (int m = 0; m < R; ++m) store16(dst + j + m * h, _mm256_mul_ps(a[m], scale), _mm256_mul_ps(b[m], scale));
    }
  }
}

template <typename T>
void row_avx2(const T* x, T* out, int64_t n, __m256 scale, float* buf) {
  switch (n) {  // the whole row in registers
    case 8: return first_pass_block<1, T, true>(x, nullptr, out, scale);
    case 16: return first_pass_block<2, T, true>(x, nullptr, out, scale);
    case 32: return first_pass_block<4, T, true>(x, nullptr, out, scale);
    case 64: return first_pass_block<8, T, true>(x, nullptr, out, scale);
    default: break;
  }
  for (int64_t i = 0; i < n; i += 64) first_pass_block<8, T, false>(x + i, buf + i, nullptr, scale);
  for (int64_t h = 64; h < n;) {
    const int64_t left = n / h;  // 2^(stages left)
    if (left >= 16) {
      later_pass_buf<8>(buf, n, h);
      h *= 8;
    } else {
      switch (left) {
        case 8: later_pass_final<8, T>(buf, out, n, h, scale); break;
        case 4: later_pass_final<4, T>(buf, out, n, h, scale); break;
        default: later_pass_final<2, T>(buf, out, n, h, scale); break;
      }
      return;
    }
  }
}

#endif  // LRKERN_AVX2

template <typename T>
void hadamard_rows(const T* x, T* out, int64_t rows, int64_t n) {
  // The reference multiplies by the Python float 1/sqrt(n), which torch rounds to fp32.
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(n)));
  // ~32K elements per task: small inputs stay on the calling thread.
  const int64_t grain = std::max<int64_t>(1, 32768 / n);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(n);
#if defined(LRKERN_AVX2)
    if (n >= 8) {
      const __m256 s = _mm256_set1_ps(scale);
      for (int64_t r = begin; r < end; ++r) row_avx2<T>(x + r * n, out + r * n, n, s, buf.data());
      return;
    }
#endif
    rows_scalar<T>(x, out, begin, end, n, scale, buf);
  });
}

}  // namespace

void hadamard_out(const at::Tensor& x, at::Tensor& out) {
  TORCH_CHECK(x.device().is_cpu() && out.device().is_cpu(), "hadamard_out: CPU tensors expected");
  TORCH_CHECK(x.is_contiguous() && out.is_contiguous(), "hadamard_out: contiguous tensors expected");
  TORCH_CHECK(x.sizes() == out.sizes() && x.scalar_type() == out.scalar_type(), "hadamard_out: out must match x");
  TORCH_CHECK(x.dim() >= 1, "hadamard_out: x must have at least one dim");
  const int64_t n = x.size(-1);
  TORCH_CHECK(n >= 2 && (n & (n - 1)) == 0, "hadamard_out: last dim must be a power of two, got ", n);
  const int64_t rows = x.numel() / n;
  if (rows == 0) return;
  dispatch_float(x.scalar_type(), "hadamard_out", [&](auto tag) {
    using T = typename decltype(tag)::type;
    hadamard_rows<T>(x.const_data_ptr<T>(), out.mutable_data_ptr<T>(), rows, n);
  });
}

}  // namespace lrkern::cpu
