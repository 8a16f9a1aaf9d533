// Row conversions between storage dtypes and fp32 work buffers. The kernels compute in fp32; these helpers keep
// the dtype handling out of the arithmetic. Rounding to fp16/bf16 is round-to-nearest-even, as in torch's casts.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

#include <ATen/ATen.h>

#if defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace lrkern::cpu {

inline void load_f32(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }

inline void load_f32(const c10::Half* src, float* dst, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__) && defined(__AVX__)
  for (; i + 8 <= n; i += 8) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
  }
#endif
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

inline void load_f32(const c10::BFloat16* src, float* dst, int64_t n) {
  // bf16 is the top half of an fp32: widening is a shift, which vectorises.
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  uint32_t* d = reinterpret_cast<uint32_t*>(dst);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) d[i] = static_cast<uint32_t>(s[i]) << 16;
}

inline void store_f32(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }

inline void store_f32(const float* src, c10::Half* dst, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__) && defined(__AVX__)
  for (; i + 8 <= n; i += 8) {
    __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
  }
#endif
  for (; i < n; ++i) dst[i] = static_cast<c10::Half>(src[i]);
}

inline void store_f32(const float* src, c10::BFloat16* dst, int64_t n) {
  const uint32_t* s = reinterpret_cast<const uint32_t*>(src);
  uint16_t* d = reinterpret_cast<uint16_t*>(dst);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u = s[i];
    // Round to nearest even on the dropped 16 bits; NaN keeps a quiet payload (as c10::BFloat16 does).
    uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    bool is_nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
    d[i] = is_nan ? static_cast<uint16_t>(0x7FC0u) : static_cast<uint16_t>(rounded);
  }
}

// One scalar of a storage dtype to fp32 and back (per-group scale/zero values). c10's scalar conversions are
// branchy software routines; at four per group they cost as much as quantizing the group, hence these.
template <typename T>
inline float to_f32(T v) { return static_cast<float>(v); }
template <typename T>
inline T from_f32(float v) { return static_cast<T>(v); }

#if defined(__F16C__)
template <>
inline float to_f32<c10::Half>(c10::Half v) { return _cvtsh_ss(v.x); }
template <>
inline c10::Half from_f32<c10::Half>(float v) {
  return c10::Half(static_cast<uint16_t>(_cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT)), c10::Half::from_bits());
}
#endif

template <>
inline float to_f32<c10::BFloat16>(c10::BFloat16 v) {
  float f;
  load_f32(&v, &f, 1);
  return f;
}
template <>
inline c10::BFloat16 from_f32<c10::BFloat16>(float v) {
  c10::BFloat16 b;
  store_f32(&v, &b, 1);
  return b;
}

// 8-lane AVX2 versions of the same conversions, for the kernels' vector paths. LRKERN_AVX2 is defined where they
// exist (setup.py builds with -march=native); every kernel keeps a portable scalar path for other machines.
#if defined(__AVX2__) && defined(__F16C__)
#define LRKERN_AVX2 1

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m256 load8(const c10::BFloat16* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}

inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store8(c10::Half* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
// Same rounding as the scalar store_f32 above: nearest even on the dropped bits, NaN -> 0x7FC0.
inline __m256i bf16_round_bits(__m256 v) {  // the bf16 bits in the low half of each int32 lane
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
}
inline void store8(c10::BFloat16* p, __m256 v) {
  const __m256i r = bf16_round_bits(v);
  const __m256i p16 = _mm256_packus_epi32(r, r);  // per 128-bit lane: [r0..r3 r0..r3 | r4..r7 r4..r7]
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(_mm256_permute4x64_epi64(p16, 0x08)));
}

// 16 values at once (a: the first 8): for bf16 one pack serves both halves.
inline void store16(float* p, __m256 a, __m256 b) {
  store8(p, a);
  store8(p + 8, b);
}
inline void store16(c10::Half* p, __m256 a, __m256 b) {
  store8(p, a);
  store8(p + 8, b);
}
inline void store16(c10::BFloat16* p, __m256 a, __m256 b) {
  const __m256i w = _mm256_packus_epi32(bf16_round_bits(a), bf16_round_bits(b));  // [a0-3 b0-3 | a4-7 b4-7]
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm256_permute4x64_epi64(w, 0xD8));
}

inline float hmin8(__m256 v) {
  __m128 m = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_min_ps(m, _mm_movehl_ps(m, m));
  m = _mm_min_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}
inline float hmax8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}
#endif

}  // namespace lrkern::cpu

namespace lrkern::cpu {

template <typename T>
struct type_tag {
  using type = T;
};

// Calls f(type_tag<T>{}) for the three storage dtypes lrkern's float ops accept.
template <typename F>
inline void dispatch_float(at::ScalarType dtype, const char* op, F&& f) {
  switch (dtype) {
    case at::kFloat: f(type_tag<float>{}); break;
    case at::kHalf: f(type_tag<c10::Half>{}); break;
    case at::kBFloat16: f(type_tag<c10::BFloat16>{}); break;
    default: TORCH_CHECK(false, op, ": dtype ", dtype, " is not float32, float16 or bfloat16");
  }
}

}  // namespace lrkern::cpu
