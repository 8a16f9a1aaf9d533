// Asymmetric min-max group quantization with uint8 code packing, and its inverse. The arithmetic follows
// lrkern/reference/quant.py step by step so the codes are bit-identical to every other backend: fp32 min/max,
// scale = dtype((mx - mn) / qmax) by IEEE division, zero = dtype(mn), code = clamp(rint((x - z) / s), 0, qmax)
// with the *stored* s and z (fp32 subtract, IEEE division, round half to even), code 0 where s == 0.
// setup.py builds with -ffp-contract=off so no FMA changes a result (dequant is a separate multiply and add).
//
// Clamping before rounding gives the same code as rounding before clamping (rint is monotone and the bounds are
// integers) and keeps NaN quotients (inf / inf) at 0 like the reference's int conversion does.
//
// AVX2 paths handle groups (axis -1) or column blocks (axis -2) 8 elements at a time and pack 32 codes per step;
// widths that are not multiples of 8, and builds without AVX2, use the portable scalar code.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "convert.h"
#include "ops.h"

namespace lrkern::cpu {
namespace {

// Bits as a template parameter: the packing code unrolls over a constant number of codes per byte.
template <int BITS>
struct Layout {
  static constexpr int bits = BITS, per = 8 / BITS, qmax = (1 << BITS) - 1;
};

constexpr float kInf = std::numeric_limits<float>::infinity();

// ---------------------------------------------------------------------------------------------------------------
// Scalar code (portable path and tails).

// Stored scale and zero of a group with fp32 extremes mn, mx (rounded to the storage dtype T).
template <typename T>
inline void group_params(float mn, float mx, float qmax, T* scale, T* zero) {
  *scale = from_f32<T>((mx - mn) / qmax);
  *zero = from_f32<T>(mn);
}

// clamp(rint((v - z) / s), 0, qmax) for s > 0 (the caller handles s == 0).
inline int quantize1(float v, float s, float z, float qmax) {
  float y = (v - z) / s;
  y = y > 0.0f ? y : 0.0f;  // NaN -> 0
  y = y < qmax ? y : qmax;
  return static_cast<int>(std::nearbyint(y));
}

// Codes for `count` consecutive elements starting at element index e0 (a multiple of per) of a packed row.
// sv / zv give the stored scale and zero (as fp32) of element k; s <= 0 (or NaN) gives code 0.
template <typename L, typename T, typename SZ>
inline void quant_span_scalar(const T* x, uint8_t* codes, int64_t count, SZ sz) {
  const float qmax = static_cast<float>(L::qmax);
  for (int64_t b = 0; b < count / L::per; ++b) {
    int byte = 0;
    for (int k = 0; k < L::per; ++k) {
      const int64_t e = b * L::per + k;
      float s, z;
      sz(e, s, z);
      const int q = s > 0.0f ? quantize1(to_f32(x[e]), s, z, qmax) : 0;
      byte |= q << (k * L::bits);
    }
    codes[b] = static_cast<uint8_t>(byte);
  }
}

template <typename L, typename T, typename SZ>
inline void dequant_span_scalar(const uint8_t* codes, T* out, int64_t count, SZ sz) {
  for (int64_t b = 0; b < count / L::per; ++b) {
    const int byte = codes[b];
    for (int k = 0; k < L::per; ++k) {
      const int64_t e = b * L::per + k;
      float s, z;
      sz(e, s, z);
      const float q = static_cast<float>((byte >> (k * L::bits)) & L::qmax);
      const float p = q * s;
      out[e] = from_f32<T>(p + z);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// AVX2 building blocks.
#if defined(LRKERN_AVX2)

// 8 codes (int32 lanes) from 8 values: y = (v - z) / s, clamped to [0, qmax] (NaN -> 0), rounded half to even.
inline __m256i quantize8(__m256 v, __m256 s, __m256 z, __m256 qmax) {
  __m256 y = _mm256_div_ps(_mm256_sub_ps(v, z), s);
  y = _mm256_max_ps(y, _mm256_setzero_ps());  // max(NaN, 0) = 0: the second operand is returned
  y = _mm256_min_ps(y, qmax);
  return _mm256_cvtps_epi32(_mm256_round_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// Packs 32 codes (4 x 8 int32 lanes, in element order) into 32 * BITS / 8 bytes.
template <typename L>
inline void pack32(__m256i q0, __m256i q1, __m256i q2, __m256i q3, uint8_t* dst) {
  // int32 -> bytes: the packs work per 128-bit lane, the permute restores element order.
  const __m256i a = _mm256_packs_epi32(q0, q1);  // [q0 0-3, q1 0-3 | q0 4-7, q1 4-7]
  const __m256i b = _mm256_packs_epi32(q2, q3);
  const __m256i c = _mm256_packus_epi16(a, b);  // [q0 0-3, q1 0-3, q2 0-3, q3 0-3 | the 4-7 halves]
  const __m256i bytes = _mm256_permutevar8x32_epi32(c, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  if constexpr (L::bits == 8) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), bytes);
  } else if constexpr (L::bits == 4) {
    const __m256i p = _mm256_maddubs_epi16(bytes, _mm256_set1_epi16(0x1001));  // c0 + 16 c1 per int16
    const __m256i w = _mm256_packus_epi16(p, p);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm256_castsi256_si128(_mm256_permute4x64_epi64(w, 0x08)));
  } else {
    const __m256i p = _mm256_maddubs_epi16(bytes, _mm256_set1_epi16(0x0401));       // c0 + 4 c1
    const __m256i d = _mm256_madd_epi16(p, _mm256_set1_epi32(0x00100001));          // + 16 (c2 + 4 c3)
    const __m256i w = _mm256_packus_epi16(_mm256_packus_epi32(d, d), _mm256_setzero_si256());
    const __m256i o = _mm256_permutevar8x32_epi32(w, _mm256_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(dst), _mm256_castsi256_si128(o));
  }
}

// Packs 8 codes into BITS bytes.
template <typename L>
inline void pack8(__m256i q, uint8_t* dst) {
  alignas(32) int32_t c[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(c), q);
  for (int b = 0; b < L::bits; ++b) {
    int byte = 0;
    for (int k = 0; k < L::per; ++k) byte |= c[b * L::per + k] << (k * L::bits);
    dst[b] = static_cast<uint8_t>(byte);
  }
}

// 8 codes (fp32 lanes) from the BITS bytes at src.
template <typename L>
inline __m256 unpack8(const uint8_t* src) {
  __m256i q;
  if constexpr (L::bits == 8) {
    int64_t w;
    std::memcpy(&w, src, 8);
    q = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(w));
  } else {
    uint32_t w = 0;
    std::memcpy(&w, src, L::bits);  // 8 codes = BITS bytes, first code in the lowest bits
    const __m256i sh = L::bits == 4 ? _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28)
                                    : _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
    q = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(w)), sh),
                         _mm256_set1_epi32(L::qmax));
  }
  return _mm256_cvtepi32_ps(q);
}

#endif  // LRKERN_AVX2

// ---------------------------------------------------------------------------------------------------------------
// axis = -1: x viewed as [groups, gs]; each group is contiguous and packs into gs / per whole bytes.

// Stored scale and zero of k groups from their fp32 extremes, and the stored values back in fp32 (sf, zf).
template <typename T>
inline void groups_params(const float* mn, const float* mx, int64_t k, float qmax, T* scale, T* zero, float* sf,
                          float* zf) {
  int64_t i = 0;
#if defined(LRKERN_AVX2)
  const __m256 vq = _mm256_set1_ps(qmax);
  for (; i + 8 <= k; i += 8) {
    const __m256 vmn = _mm256_loadu_ps(mn + i);
    store8(scale + i, _mm256_div_ps(_mm256_sub_ps(_mm256_loadu_ps(mx + i), vmn), vq));
    store8(zero + i, vmn);
    _mm256_storeu_ps(sf + i, load8(scale + i));
    _mm256_storeu_ps(zf + i, load8(zero + i));
  }
#endif
  for (; i < k; ++i) {
    group_params<T>(mn[i], mx[i], qmax, scale + i, zero + i);
    sf[i] = to_f32(scale[i]);
    zf[i] = to_f32(zero[i]);
  }
}

// Portable path for one group.
template <typename T, typename L>
void quant_group_scalar(const T* x, uint8_t* codes, T* scale, T* zero, int64_t gs) {
  const float qmax = static_cast<float>(L::qmax);
  float mn = kInf, mx = -kInf;
  for (int64_t j = 0; j < gs; ++j) {
    const float v = to_f32(x[j]);
    mn = v < mn ? v : mn;
    mx = v > mx ? v : mx;
  }
  group_params<T>(mn, mx, qmax, scale, zero);
  const float s = to_f32(*scale), z = to_f32(*zero);
  quant_span_scalar<L>(x, codes, gs, [&](int64_t, float& s_, float& z_) {
    s_ = s;
    z_ = z;
  });
}

#if defined(LRKERN_AVX2)
// Groups [g0, g0 + k) of gs elements, gs a multiple of 8: min/max of each, then the k scales and zeros together
// (one vector division and conversion instead of a scalar dependency chain per group), then the codes.
template <typename T, typename L>
void quant_groups_avx2(const T* x, uint8_t* codes, T* scale, T* zero, int64_t k, int64_t gs) {
  constexpr int64_t G = 8;
  const float qmax = static_cast<float>(L::qmax);
  alignas(32) float mn[G], mx[G], sf[G], zf[G];
  for (int64_t i = 0; i < k; ++i) {
    const T* xg = x + i * gs;
    __m256 vmn = _mm256_set1_ps(kInf), vmx = _mm256_set1_ps(-kInf);
    for (int64_t j = 0; j < gs; j += 8) {
      const __m256 v = load8(xg + j);
      vmn = _mm256_min_ps(vmn, v);
      vmx = _mm256_max_ps(vmx, v);
    }
    mn[i] = hmin8(vmn);
    mx[i] = hmax8(vmx);
  }
  groups_params<T>(mn, mx, k, qmax, scale, zero, sf, zf);
  const __m256 vq = _mm256_set1_ps(qmax);
  for (int64_t i = 0; i < k; ++i) {
    const T* xg = x + i * gs;
    uint8_t* cg = codes + i * (gs / L::per);
    if (!(sf[i] > 0.0f)) {  // max == min, or the range underflowed the storage dtype
      std::memset(cg, 0, gs / L::per);
      continue;
    }
    const __m256 vs = _mm256_set1_ps(sf[i]), vz = _mm256_set1_ps(zf[i]);
    int64_t j = 0;
    for (; j + 32 <= gs; j += 32) {
      pack32<L>(quantize8(load8(xg + j), vs, vz, vq), quantize8(load8(xg + j + 8), vs, vz, vq),
                quantize8(load8(xg + j + 16), vs, vz, vq), quantize8(load8(xg + j + 24), vs, vz, vq),
                cg + j / L::per);
    }
    for (; j < gs; j += 8) pack8<L>(quantize8(load8(xg + j), vs, vz, vq), cg + j / L::per);
  }
}
#endif

template <typename T, typename L>
void quant_rows(const T* x, uint8_t* codes, T* scale, T* zero, int64_t groups, int64_t gs) {
  const int64_t grain = std::max<int64_t>(1, 32768 / gs);
  const int64_t cg = gs / L::per;  // code bytes per group
  at::parallel_for(0, groups, grain, [&](int64_t begin, int64_t end) {
#if defined(LRKERN_AVX2)
    if (gs % 8 == 0) {
      for (int64_t g = begin; g < end; g += 8) {
        quant_groups_avx2<T, L>(x + g * gs, codes + g * cg, scale + g, zero + g, std::min<int64_t>(8, end - g), gs);
      }
      return;
    }
#endif
    for (int64_t g = begin; g < end; ++g) quant_group_scalar<T, L>(x + g * gs, codes + g * cg, scale + g, zero + g, gs);
  });
}

template <typename T, typename L>
void dequant_rows(const uint8_t* codes, const T* scale, const T* zero, T* out, int64_t groups, int64_t gs) {
  const int64_t grain = std::max<int64_t>(1, 32768 / gs);
  at::parallel_for(0, groups, grain, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const uint8_t* c = codes + g * (gs / L::per);
      T* o = out + g * gs;
      const float s = to_f32(scale[g]), z = to_f32(zero[g]);
      int64_t j = 0;
#if defined(LRKERN_AVX2)
      if (gs % 8 == 0) {
        const __m256 vs = _mm256_set1_ps(s), vz = _mm256_set1_ps(z);
        for (; j + 16 <= gs; j += 16) {
          store16(o + j, _mm256_add_ps(_mm256_mul_ps(unpack8<L>(c + j / L::per), vs), vz),
                  _mm256_add_ps(_mm256_mul_ps(unpack8<L>(c + (j + 8) / L::per), vs), vz));
        }
        for (; j < gs; j += 8) store8(o + j, _mm256_add_ps(_mm256_mul_ps(unpack8<L>(c + j / L::per), vs), vz));
      }
#endif
      dequant_span_scalar<L>(c + j / L::per, o + j, gs - j, [&](int64_t, float& s_, float& z_) {
        s_ = s;
        z_ = z;
      });
    }
  });
}

// ---------------------------------------------------------------------------------------------------------------
// axis = -2: x viewed as [outer, t, n]; groups are gs consecutive rows of one column. Work is split into
// (outer, row group, column block) tiles so a single long group still uses every thread. Each tile reads its rows
// twice (min/max, then codes), along n; the block width keeps the tile in L2 between the two passes.

inline int64_t col_block(int64_t n, int64_t gs, int64_t elem) {
  int64_t cb = 1024;
  while (cb > 64 && gs * cb * elem > (256 << 10)) cb /= 2;
  return std::min(n, cb);  // a multiple of per: n is, and cb is a power of two >= 64
}

#if defined(LRKERN_AVX2)
// Min and max down `rows` rows (stride n) of 8 * V adjacent columns.
template <int V, typename T>
inline void minmax_strip(const T* x, int64_t n, int64_t rows, float* mn, float* mx) {
  __m256 lo[V], hi[V];
  for (int k = 0; k < V; ++k) {
    lo[k] = _mm256_set1_ps(kInf);
    hi[k] = _mm256_set1_ps(-kInf);
  }
  for (int64_t r = 0; r < rows; ++r) {
    for (int k = 0; k < V; ++k) {
      const __m256 v = load8(x + r * n + 8 * k);
      lo[k] = _mm256_min_ps(lo[k], v);
      hi[k] = _mm256_max_ps(hi[k], v);
    }
  }
  for (int k = 0; k < V; ++k) {
    _mm256_storeu_ps(mn + 8 * k, lo[k]);
    _mm256_storeu_ps(mx + 8 * k, hi[k]);
  }
}
#endif

template <typename T, typename L>
void quant_cols(const T* x, uint8_t* codes, T* scale, T* zero, int64_t outer, int64_t t, int64_t n, int64_t gs) {
  const float qmax = static_cast<float>(L::qmax);
  const int64_t tg = t / gs, nb = n / L::per;
  const int64_t cb = col_block(n, gs, sizeof(T));
  const int64_t col_blocks = (n + cb - 1) / cb;
  const int64_t tiles = outer * tg * col_blocks;
  const int64_t grain = std::max<int64_t>(1, 32768 / (gs * cb));
  at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
    // Per column of the block: fp32 min and max, then stored scale as a divisor (1 where it is 0), zero, and a
    // mask that zeroes the codes of columns whose stored scale is not > 0.
    std::vector<float> mn(cb), mx(cb), sd(cb), zf(cb), keep(cb);
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t c0 = (tile % col_blocks) * cb, grp = tile / col_blocks;  // grp = o * tg + row group
      const int64_t w = std::min(cb, n - c0), o = grp / tg, r0 = (grp % tg) * gs;
      const T* xg = x + (o * t + r0) * n + c0;
      T* sg = scale + grp * n + c0;
      T* zg = zero + grp * n + c0;
      int64_t wv = 0;  // columns handled by the vector code
#if defined(LRKERN_AVX2)
      wv = w - w % 8;
      // Column strips of 32 (then 8): the running min/max stay in registers down the group's rows.
      int64_t c = 0;
      for (; c + 32 <= wv; c += 32) minmax_strip<4>(xg + c, n, gs, &mn[c], &mx[c]);
      for (; c < wv; c += 8) minmax_strip<1>(xg + c, n, gs, &mn[c], &mx[c]);
#endif
      // Scalar min/max for the tail columns (w % 8 of them; all of them without AVX2).
      for (int64_t c = wv; c < w; ++c) {
        float lo = kInf, hi = -kInf;
        for (int64_t r = 0; r < gs; ++r) {
          const float v = to_f32(xg[r * n + c]);
          lo = v < lo ? v : lo;
          hi = v > hi ? v : hi;
        }
        mn[c] = lo;
        mx[c] = hi;
      }
      groups_params<T>(mn.data(), mx.data(), w, qmax, sg, zg, sd.data(), zf.data());
#if defined(LRKERN_AVX2)
      // Vector columns: the stored scale as a divisor (1 where it is not > 0) and a mask that zeroes those codes.
      // The scalar tail tests s > 0 itself, so sd keeps the raw stored scale there.
      const __m256 vq = _mm256_set1_ps(qmax), one = _mm256_set1_ps(1.0f), zero8 = _mm256_setzero_ps();
      for (int64_t c = 0; c < wv; c += 8) {
        const __m256 s = _mm256_loadu_ps(&sd[c]);
        const __m256 pos = _mm256_cmp_ps(s, zero8, _CMP_GT_OQ);
        _mm256_storeu_ps(&sd[c], _mm256_blendv_ps(one, s, pos));
        _mm256_storeu_ps(&keep[c], pos);
      }
#endif
      for (int64_t r = 0; r < gs; ++r) {
        const T* xr = xg + r * n;
        uint8_t* cr = codes + (o * t + r0 + r) * nb + c0 / L::per;
#if defined(LRKERN_AVX2)
        int64_t c = 0;
        for (; c + 32 <= wv; c += 32) {
          __m256i q[4];
          for (int k = 0; k < 4; ++k) {
            const int64_t cc = c + 8 * k;
            q[k] = _mm256_and_si256(
                quantize8(load8(xr + cc), _mm256_loadu_ps(&sd[cc]), _mm256_loadu_ps(&zf[cc]), vq),
                _mm256_castps_si256(_mm256_loadu_ps(&keep[cc])));
          }
          pack32<L>(q[0], q[1], q[2], q[3], cr + c / L::per);
        }
        for (; c < wv; c += 8) {
          const __m256i q = quantize8(load8(xr + c), _mm256_loadu_ps(&sd[c]), _mm256_loadu_ps(&zf[c]), vq);
          pack8<L>(_mm256_and_si256(q, _mm256_castps_si256(_mm256_loadu_ps(&keep[c]))), cr + c / L::per);
        }
#endif
        quant_span_scalar<L>(xr + wv, cr + wv / L::per, w - wv, [&](int64_t e, float& s_, float& z_) {
          s_ = sd[wv + e];
          z_ = zf[wv + e];
        });
      }
    }
  });
}

template <typename T, typename L>
void dequant_cols(const uint8_t* codes, const T* scale, const T* zero, T* out, int64_t outer, int64_t t, int64_t n,
                  int64_t gs) {
  const int64_t tg = t / gs, nb = n / L::per;
  const int64_t rows = outer * t;
  const int64_t grain = std::max<int64_t>(1, 32768 / n);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t grp = (row / t) * tg + (row % t) / gs;
      const T* sr = scale + grp * n;
      const T* zr = zero + grp * n;
      const uint8_t* cr = codes + row * nb;
      T* orow = out + row * n;
      int64_t c = 0;
#if defined(LRKERN_AVX2)
      for (; c + 16 <= n; c += 16) {
        const int64_t d = c + 8;
        store16(orow + c, _mm256_add_ps(_mm256_mul_ps(unpack8<L>(cr + c / L::per), load8(sr + c)), load8(zr + c)),
                _mm256_add_ps(_mm256_mul_ps(unpack8<L>(cr + d / L::per), load8(sr + d)), load8(zr + d)));
      }
      for (; c + 8 <= n; c += 8) {
        store8(orow + c, _mm256_add_ps(_mm256_mul_ps(unpack8<L>(cr + c / L::per), load8(sr + c)), load8(zr + c)));
      }
#endif
      dequant_span_scalar<L>(cr + c / L::per, orow + c, n - c, [&](int64_t e, float& s_, float& z_) {
        s_ = to_f32(sr[c + e]);
        z_ = to_f32(zr[c + e]);
      });
    }
  });
}

// ---------------------------------------------------------------------------------------------------------------

template <typename F>
inline void dispatch_bits(int64_t bits, F&& f) {
  switch (bits) {
    case 2: f(Layout<2>{}); break;
    case 4: f(Layout<4>{}); break;
    case 8: f(Layout<8>{}); break;
    default: TORCH_CHECK(false, "bits must be 2, 4 or 8, got ", bits);
  }
}

void check_common(const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& zero, const at::Tensor& x,
                  int64_t bits, int64_t group_size, int64_t axis, const char* op) {
  for (const at::Tensor* t : {&codes, &scale, &zero, &x}) {
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous(), op, ": contiguous CPU tensors expected");
  }
  TORCH_CHECK(codes.scalar_type() == at::kByte, op, ": codes must be uint8");
  TORCH_CHECK(scale.scalar_type() == x.scalar_type() && zero.scalar_type() == x.scalar_type(), op,
              ": scale/zero must have the float tensor's dtype");
  TORCH_CHECK(bits == 2 || bits == 4 || bits == 8, op, ": bits must be 2, 4 or 8");
  TORCH_CHECK(axis == -1 || axis == -2, op, ": axis must be -1 or -2");
  TORCH_CHECK(x.dim() >= (axis == -1 ? 1 : 2), op, ": too few dims for axis ", axis);
  TORCH_CHECK(group_size >= 1, op, ": group_size must be positive");
  const int64_t per = 8 / bits;
  TORCH_CHECK(x.size(-1) % per == 0, op, ": last dim must be a multiple of ", per);
  TORCH_CHECK(codes.numel() * per == x.numel(), op, ": codes and the float tensor disagree in size");
  if (axis == -1) {
    TORCH_CHECK(x.size(-1) % group_size == 0 && group_size % per == 0, op, ": bad group_size ", group_size);
  } else {
    TORCH_CHECK(x.size(-2) % group_size == 0, op, ": bad group_size ", group_size);
  }
  TORCH_CHECK(scale.numel() * group_size == x.numel() && zero.numel() == scale.numel(), op,
              ": scale/zero have the wrong size");
}

}  // namespace

void quant_pack_out(const at::Tensor& x, at::Tensor& codes, at::Tensor& scale, at::Tensor& zero, int64_t bits,
                    int64_t group_size, int64_t axis) {
  check_common(codes, scale, zero, x, bits, group_size, axis, "quant_pack_out");
  if (x.numel() == 0) return;
  const int64_t n = x.size(-1);
  dispatch_bits(bits, [&](auto layout) {
    using L = decltype(layout);
    dispatch_float(x.scalar_type(), "quant_pack_out", [&](auto tag) {
      using T = typename decltype(tag)::type;
      const T* xp = x.const_data_ptr<T>();
      uint8_t* cp = codes.mutable_data_ptr<uint8_t>();
      T* sp = scale.mutable_data_ptr<T>();
      T* zp = zero.mutable_data_ptr<T>();
      if (axis == -1) {
        quant_rows<T, L>(xp, cp, sp, zp, x.numel() / group_size, group_size);
      } else {
        const int64_t t = x.size(-2);
        quant_cols<T, L>(xp, cp, sp, zp, x.numel() / (t * n), t, n, group_size);
      }
    });
  });
}

void dequant_out(const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& zero, at::Tensor& out,
                 int64_t bits, int64_t group_size, int64_t axis) {
  check_common(codes, scale, zero, out, bits, group_size, axis, "dequant_out");
  if (out.numel() == 0) return;
  const int64_t n = out.size(-1);
  dispatch_bits(bits, [&](auto layout) {
    using L = decltype(layout);
    dispatch_float(out.scalar_type(), "dequant_out", [&](auto tag) {
      using T = typename decltype(tag)::type;
      const uint8_t* cp = codes.const_data_ptr<uint8_t>();
      const T* sp = scale.const_data_ptr<T>();
      const T* zp = zero.const_data_ptr<T>();
      T* op = out.mutable_data_ptr<T>();
      if (axis == -1) {
        dequant_rows<T, L>(cp, sp, zp, op, out.numel() / group_size, group_size);
      } else {
        const int64_t t = out.size(-2);
        dequant_cols<T, L>(cp, sp, zp, op, out.numel() / (t * n), t, n, group_size);
      }
    });
  });
}

}  // namespace lrkern::cpu
