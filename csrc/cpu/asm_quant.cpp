// Alphabet-set projection, fake quantization (forward and backward) and decomposition (spec asm.md 3.3, 3.5, 4 items
// 1-2). The arithmetic follows lrkern/reference/asm_quant.py step by step so w_int is bit-identical to every other
// backend: u = |w| / s as one IEEE fp32 division (never a multiply by 1/s), compared with the fp32 midpoints (exact:
// multiples of 0.5 below 256); P(u) = r_j with j = #{t_j < u}. The tables come from lrkern.asm.alphabet.kernel_tables:
// mid fp32 [256] (+inf past the n_mid real midpoints), delta int32 [256] (r_{j+1} - r_j), mag int32 [256] (r_j, r_max
// past them), code int32 [16] (code byte per quartet value, -1 where not representable).
//
// w_bits = 4: P = sum_j [u > t_j] * delta_j, a branch-free count over <= 15 midpoints, vectorised across elements.
// w_bits = 8: an 8-step binary search (j = #{t_k < u} built from powers of two) and one gather from mag.
//
// Tensors are viewed as [P, C, inner] (C channels along the op's axis). Elements are processed in chunks of kChunk
// converted to fp32 in a stack buffer. The scale-gradient reduction is deterministic for any thread count: a fixed
// block of rows (sized from the shapes only) per task writes its own partial sums, added afterwards in block order.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "convert.h"
#include "ops.h"

namespace lrkern::cpu {
namespace {

constexpr int64_t kChunk = 256;
constexpr int64_t kTaskElems = 16384;  // elements per parallel task at least (small tensors stay on one thread)

struct Tables {
  const float* mid;
  const int32_t* delta;
  const int32_t* mag;
  int64_t n_mid;
  int64_t w_bits;
};

// p[i] = P(u[i]) for i < n (0 for NaN u: every comparison is false).
inline void magnitudes(const float* __restrict u, int32_t* __restrict p, int64_t n, const Tables& t) {
  if (t.w_bits == 4) {
    for (int64_t i = 0; i < n; ++i) p[i] = 0;
    for (int64_t j = 0; j < t.n_mid; ++j) {
      const float tj = t.mid[j];
      const int32_t dj = t.delta[j];
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) p[i] += u[i] > tj ? dj : 0;
    }
  } else {
    // The search runs in lock-step over the chunk (step outer, element inner), so each step is one vector gather.
    int32_t lo[kChunk];
    for (int64_t i = 0; i < n; ++i) lo[i] = 0;
    for (int32_t step = 128; step > 0; step >>= 1) {
      const float* probe = t.mid + (step - 1);
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) lo[i] += probe[lo[i]] < u[i] ? step : 0;
    }
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) p[i] = t.mag[lo[i]];
  }
}

// u[i] = |x[i]| / s[i * s_stride] (s_stride 0: one scale for the span, 1: one per element).
inline void quotients(const float* __restrict x, const float* __restrict s, int64_t s_stride, float* __restrict u,
                      int64_t n) {
  if (s_stride == 0) {
    const float sc = s[0];
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) u[i] = std::fabs(x[i]) / sc;
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) u[i] = std::fabs(x[i]) / s[i];
  }
}

// Chunk conversions: convert.h's, except bf16, which is widened and rounded here with bit casts (convert.h's bf16
// helpers write the fp32 buffer through a uint32_t pointer, which GCC's alias analysis does not see for stack arrays).
template <typename T>
inline void widen(const T* src, float* dst, int64_t n) { load_f32(src, dst, n); }
template <>
inline void widen(const c10::BFloat16* src, float* dst, int64_t n) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = __builtin_bit_cast(float, static_cast<uint32_t>(s[i]) << 16);
}
template <typename T>
inline void narrow(const float* src, T* dst, int64_t n) { store_f32(src, dst, n); }
template <>
inline void narrow(const float* src, c10::BFloat16* dst, int64_t n) {
  uint16_t* d = reinterpret_cast<uint16_t*>(dst);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = __builtin_bit_cast(uint32_t, src[i]);
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;  // nearest even, as convert.h
    d[i] = (u & 0x7FFFFFFFu) > 0x7F800000u ? static_cast<uint16_t>(0x7FC0u) : static_cast<uint16_t>(rounded);
  }
}

inline int32_t signed_mag(float x, int32_t p) { return x > 0.0f ? p : (x < 0.0f ? -p : 0); }

// Calls span(offset, length, scale pointer, scale stride, channel) over every contiguous run of elements that shares
// one scale (inner > 1: the rows (p, c)) or one row of channels (inner == 1: rows p of C elements, stride 1), in
// parallel, in chunks of at most kChunk elements.
template <typename F>
void for_spans(int64_t numel, int64_t channels, int64_t inner, const float* scale, F&& span) {
  const bool per_elem = inner == 1;
  const int64_t row = per_elem ? channels : inner;
  const int64_t rows = numel / row;
  const int64_t grain = std::max<int64_t>(1, kTaskElems / row);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t base = r * row;
      for (int64_t k = 0; k < row; k += kChunk) {
        const int64_t len = std::min(kChunk, row - k);
        if (per_elem) {
          span(base + k, len, scale + k, int64_t{1});
        } else {
          span(base + k, len, scale + (r % channels), int64_t{0});
        }
      }
    }
  });
}

// GCC's -Wmaybe-uninitialized misfires on the stack buffers below (written for [0, len) before every read; it cannot
// prove len > 0), so it is silenced for this function only.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
template <typename T, bool FAKE, typename Out>
void project_impl(const T* w, const float* scale, Out* out, int64_t numel, int64_t channels, int64_t inner,
                  const Tables& t) {
  for_spans(numel, channels, inner, scale, [&](int64_t off, int64_t len, const float* s, int64_t s_stride) {
    float x[kChunk], u[kChunk];
    int32_t p[kChunk];
    widen(w + off, x, len);
    quotients(x, s, s_stride, u, len);
    magnitudes(u, p, len, t);
    if constexpr (FAKE) {
      float y[kChunk];
      for (int64_t i = 0; i < len; ++i) y[i] = s[i * s_stride] * static_cast<float>(signed_mag(x[i], p[i]));
      narrow(y, out + off, len);
    } else {
      for (int64_t i = 0; i < len; ++i) out[off + i] = static_cast<int16_t>(signed_mag(x[i], p[i]));
    }
  });
}
#pragma GCC diagnostic pop

// One chunk of the backward: writes grad_w and contrib[i] = g * sign(w) * (P(u) - u or r_max) for the caller to sum.
template <typename T>
inline void backward_chunk(const T* g, const T* w, T* gw, const float* s, int64_t s_stride, int64_t len,
                           const Tables& t, float r_max, float* contrib) {
  float x[kChunk], u[kChunk], gf[kChunk];
  int32_t p[kChunk];
  widen(w, x, len);
  widen(g, gf, len);
  quotients(x, s, s_stride, u, len);
  magnitudes(u, p, len, t);
  const T zero = from_f32<T>(0.0f);
  for (int64_t i = 0; i < len; ++i) {
    const bool inside = u[i] <= r_max;  // false for NaN
    gw[i] = inside ? g[i] : zero;
    const float sign = x[i] > 0.0f ? 1.0f : (x[i] < 0.0f ? -1.0f : 0.0f);
    const float term = (inside ? static_cast<float>(p[i]) - u[i] : r_max) * sign;
    contrib[i] = gf[i] * term;
  }
}

template <typename T>
void backward_impl(const T* g, const T* w, const float* scale, T* gw, float* grad_scale, int64_t numel,
                   int64_t channels, int64_t inner, const Tables& t, float r_max, float gscale) {
  const int64_t outer = numel / (channels * inner);  // P
  if (inner == 1) {
    // Tasks: blocks of rb rows of C channels; partial[b][c] sums rows in order.
    const int64_t rb = std::max<int64_t>(1, kTaskElems / channels);
    const int64_t nb = (outer + rb - 1) / rb;
    std::vector<float> partial(nb * channels, 0.0f);
    at::parallel_for(0, nb, 1, [&](int64_t begin, int64_t end) {
      float contrib[kChunk];
      for (int64_t b = begin; b < end; ++b) {
        float* acc = partial.data() + b * channels;
        for (int64_t r = b * rb; r < std::min(outer, (b + 1) * rb); ++r) {
          for (int64_t k = 0; k < channels; k += kChunk) {
            const int64_t len = std::min(kChunk, channels - k), off = r * channels + k;
            backward_chunk(g + off, w + off, gw + off, scale + k, 1, len, t, r_max, contrib);
            for (int64_t i = 0; i < len; ++i) acc[k + i] += contrib[i];
          }
        }
      }
    });
    for (int64_t c = 0; c < channels; ++c) {
      float sum = 0.0f;
      for (int64_t b = 0; b < nb; ++b) sum += partial[b * channels + c];
      grad_scale[c] = sum * gscale;
    }
  } else {
    // Tasks: (block of rb rows p, channel c); each sums rb runs of `inner` contiguous elements in order.
    const int64_t rb = std::max<int64_t>(1, kTaskElems / inner);
    const int64_t nb = (outer + rb - 1) / rb;
    std::vector<float> partial(nb * channels, 0.0f);
    at::parallel_for(0, nb * channels, 1, [&](int64_t begin, int64_t end) {
      float contrib[kChunk];
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / channels, c = task % channels;
        float lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int64_t r = b * rb; r < std::min(outer, (b + 1) * rb); ++r) {
          const int64_t base = (r * channels + c) * inner;
          for (int64_t k = 0; k < inner; k += kChunk) {
            const int64_t len = std::min(kChunk, inner - k), off = base + k;
            backward_chunk(g + off, w + off, gw + off, scale + c, 0, len, t, r_max, contrib);
            for (int64_t i = 0; i < len; ++i) lanes[i & 7] += contrib[i];
          }
        }
        float sum = 0.0f;
        for (float v : lanes) sum += v;
        partial[task] = sum;
      }
    });
    for (int64_t c = 0; c < channels; ++c) {
      float sum = 0.0f;
      for (int64_t b = 0; b < nb; ++b) sum += partial[b * channels + c];
      grad_scale[c] = sum * gscale;
    }
  }
}

void check_cpu_contiguous(const char* op, std::initializer_list<const at::Tensor*> ts) {
  for (const at::Tensor* t : ts) {
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous(), op, ": contiguous CPU tensors expected");
  }
}

Tables tables(const char* op, const at::Tensor& mid, const at::Tensor& delta, const at::Tensor& mag, int64_t n_mid,
              int64_t w_bits) {
  check_cpu_contiguous(op, {&mid, &delta, &mag});
  TORCH_CHECK(w_bits == 4 || w_bits == 8, op, ": w_bits must be 4 or 8");
  TORCH_CHECK(mid.scalar_type() == at::kFloat && mid.numel() == 256 && delta.scalar_type() == at::kInt &&
                  delta.numel() == 256 && mag.scalar_type() == at::kInt && mag.numel() == 256,
              op, ": mid fp32 [256], delta and mag int32 [256] expected");
  TORCH_CHECK(n_mid >= 0 && n_mid <= (w_bits == 4 ? 15 : 255), op, ": n_mid out of range");
  return Tables{mid.data_ptr<float>(), delta.data_ptr<int32_t>(), mag.data_ptr<int32_t>(), n_mid, w_bits};
}

void check_layout(const char* op, const at::Tensor& w, const at::Tensor& scale, int64_t inner) {
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.dim() == 1, op, ": scale must be fp32 [C]");
  TORCH_CHECK(w.numel() == 0 || (inner >= 1 && w.numel() % (scale.numel() * inner) == 0), op,
              ": w must be [P, C, inner] with C = scale.numel()");
}

}  // namespace

void asm_project_out(const at::Tensor& w, const at::Tensor& scale, const at::Tensor& mid, const at::Tensor& delta,
                     const at::Tensor& mag, at::Tensor& out, int64_t inner, int64_t n_mid, int64_t w_bits) {
  constexpr const char* op = "asm_project_out";
  check_cpu_contiguous(op, {&w, &scale, &out});
  check_layout(op, w, scale, inner);
  const Tables t = tables(op, mid, delta, mag, n_mid, w_bits);
  TORCH_CHECK(out.scalar_type() == at::kShort && out.numel() == w.numel(), op, ": out must be int16 like w");
  if (w.numel() == 0) return;
  dispatch_float(w.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    project_impl<T, false>(w.data_ptr<T>(), scale.data_ptr<float>(), out.data_ptr<int16_t>(), w.numel(),
                           scale.numel(), inner, t);
  });
}

void asm_fake_quant_out(const at::Tensor& w, const at::Tensor& scale, const at::Tensor& mid, const at::Tensor& delta,
                        const at::Tensor& mag, at::Tensor& out, int64_t inner, int64_t n_mid, int64_t w_bits) {
  constexpr const char* op = "asm_fake_quant_out";
  check_cpu_contiguous(op, {&w, &scale, &out});
  check_layout(op, w, scale, inner);
  const Tables t = tables(op, mid, delta, mag, n_mid, w_bits);
  TORCH_CHECK(out.scalar_type() == w.scalar_type() && out.numel() == w.numel(), op, ": out must be like w");
  if (w.numel() == 0) return;
  dispatch_float(w.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    project_impl<T, true>(w.data_ptr<T>(), scale.data_ptr<float>(), out.data_ptr<T>(), w.numel(), scale.numel(),
                          inner, t);
  });
}

void asm_fake_quant_backward_out(const at::Tensor& grad, const at::Tensor& w, const at::Tensor& scale,
                                 const at::Tensor& mid, const at::Tensor& delta, const at::Tensor& mag,
                                 at::Tensor& grad_w, at::Tensor& grad_scale, int64_t inner, int64_t n_mid,
                                 int64_t w_bits, double r_max, double gscale) {
  constexpr const char* op = "asm_fake_quant_backward_out";
  check_cpu_contiguous(op, {&grad, &w, &scale, &grad_w, &grad_scale});
  check_layout(op, w, scale, inner);
  const Tables t = tables(op, mid, delta, mag, n_mid, w_bits);
  TORCH_CHECK(grad.scalar_type() == w.scalar_type() && grad.numel() == w.numel() &&
                  grad_w.scalar_type() == w.scalar_type() && grad_w.numel() == w.numel(),
              op, ": grad and grad_w must be like w");
  TORCH_CHECK(grad_scale.scalar_type() == at::kFloat && grad_scale.numel() == scale.numel(), op,
              ": grad_scale must be fp32 [C]");
  if (w.numel() == 0) {
    grad_scale.zero_();
    return;
  }
  dispatch_float(w.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    backward_impl<T>(grad.data_ptr<T>(), w.data_ptr<T>(), scale.data_ptr<float>(), grad_w.data_ptr<T>(),
                     grad_scale.data_ptr<float>(), w.numel(), scale.numel(), inner, t, static_cast<float>(r_max),
                     static_cast<float>(gscale));
  });
}

int64_t asm_decompose_out(const at::Tensor& w_int, const at::Tensor& code, at::Tensor& codes, int64_t w_bits) {
  constexpr const char* op = "asm_decompose_out";
  check_cpu_contiguous(op, {&w_int, &code, &codes});
  TORCH_CHECK(w_bits == 4 || w_bits == 8, op, ": w_bits must be 4 or 8");
  const int64_t q = w_bits / 4, n = w_int.numel();
  TORCH_CHECK(w_int.scalar_type() == at::kShort, op, ": w_int must be int16");
  TORCH_CHECK(code.scalar_type() == at::kInt && code.numel() == 16, op, ": code must be int32 [16]");
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.numel() == n * q, op, ": codes must be uint8 [..., Q]");
  const int16_t* wp = w_int.data_ptr<int16_t>();
  const int32_t* cp = code.data_ptr<int32_t>();
  uint8_t* out = codes.data_ptr<uint8_t>();
  const int32_t qmax = (1 << w_bits) - 1;
  const int64_t blocks = (n + kTaskElems - 1) / kTaskElems;
  std::vector<int64_t> first(blocks, n);
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      int64_t f = n;
      for (int64_t e = b * kTaskElems; e < std::min(n, (b + 1) * kTaskElems); ++e) {
        const int32_t m = std::abs(static_cast<int32_t>(wp[e]));
        bool bad = m > qmax;
        for (int64_t i = 0; i < q; ++i) {
          const int32_t c = cp[(m >> (4 * i)) & 15];
          bad = bad || c < 0;
          out[e * q + i] = static_cast<uint8_t>(c < 0 ? 0 : c);
        }
        if (bad && f == n) f = e;
      }
      first[b] = f;
    }
  });
  int64_t f = n;
  for (int64_t v : first) f = std::min(f, v);
  return f;
}

}  // namespace lrkern::cpu
