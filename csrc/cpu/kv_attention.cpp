// Attention over a quantized KV cache plus its full-precision window (lrkern/reference/kv_attention.py), for decode
// (t = 1) and the cache half of chunked prefill (t > 1).
//
// The query rows of one KV head (its g heads times the t queries, r = i * t + j) share every key and value, so the
// work is organised per KV head and each token's codes are unpacked once for all of its rows. Tokens go in blocks
// of up to kBlock, each one online-softmax step: scores S[r][j] = scale * q_r . k_j, the running max m_r, sum l_r
// and accumulator acc_r rescaled when m_r moves, P = e^{S - m}, then acc_r += P[r][j] v_j.
//
// The cache is never dequantized into memory:
//   per-channel keys (scale s_c, zero z_c per group of G tokens): q . k = sum_c (q_c s_c) code_c + q . z, with q * s
//     and q . z formed once per group. A block's code dwords are transposed so that one vector holds a dword of 8
//     tokens: the scores come out with tokens in lanes, no horizontal sums (key_scores_tile);
//   per-token values: code * s + z in registers, bit for bit the reference's dequantization; at 2 bits a token has
//     four possible values, picked by code with one permute (ValueRows);
//   per-token keys and the window are widened per block into small fp32 buffers and scored with register tiles of
//     rows x tokens (scores_tile).
// With more than kFusedRows query rows (prefill), values are dequantized per block into an fp32 buffer instead,
// which every tile of rows then reads.
//
// Work items are (batch row, KV head, tile of query rows, token split): the token splits (flash-decoding) keep every
// thread busy when B * Hkv is small, and a second pass merges their partial (m, l, acc), adds the linear correction,
// normalises, applies the value rotation and stores. Results differ from the reference by fp32 summation order, the
// exp, and the rounding of q * s (per-channel keys) only.
//
// The AVX2 path needs d and channel_group to be multiples of 8 and whole code dwords per token; other shapes, and
// builds without AVX2/FMA, take the portable scalar path, which shares the driver.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "convert.h"
#include "ops.h"

namespace lrkern::cpu {
namespace {

constexpr int64_t kBlock = 32;      // tokens per online-softmax step (a multiple of 8)
constexpr int64_t kRowTile = 16;    // query rows per work item; more rows only repeat the per-row work
constexpr int64_t kFusedRows = 4;   // up to this many rows, value codes are unpacked in registers
constexpr int64_t kMinSplit = 512;  // fewest tokens worth a work item of their own (the merge costs ~d per split)
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Everything a work item reads, as raw pointers and sizes (all tensors contiguous).
template <typename T>
struct Problem {
  const T *q, *k_scale, *k_zero, *v_scale, *v_zero, *k_win, *v_win;
  const uint8_t *k_codes, *v_codes;
  const int32_t *n_quant, *n_win;
  const float *corr_s, *corr_z, *phi;  // null without the correction
  T* out;
  float* lse;
  int64_t B, Hkv, R, d, Tq, W, D;
  int64_t G, Gc, nG, nb;  // key token group (per channel), channel group, channel groups per token, code bytes
  bool per_channel, rotate_keys, value_rotation;
  float scale;
  int64_t splits, row_tiles;
};

// Per-thread scratch, allocated once per parallel chunk (one fp32 buffer carved into arrays). Per-block token arrays
// are [channel group][kBlock].
struct Scratch {
  std::vector<float> buf;
  std::vector<uint32_t> kt;  // transposed key code dwords (transpose_codes)
  float *q, *qs, *qz, *zero, *k, *v, *s, *vs, *vz, *vl, *ks, *kz, *acc, *m, *l;
  Scratch(int64_t d, int64_t nG) : kt(d / 4 * kBlock) {
    const int64_t ksz = std::max(d, nG * kBlock);
    const std::pair<float**, int64_t> parts[] = {
        {&q, kRowTile * d},   {&qs, kRowTile * d},     {&qz, kRowTile},     {&zero, kRowTile},
        {&k, kBlock * d},     {&v, kBlock * d},        {&s, kRowTile * kBlock}, {&vs, nG * kBlock},
        {&vz, nG * kBlock},   {&vl, 4 * nG * kBlock},  {&ks, ksz},          {&kz, ksz},
        {&acc, kRowTile * d}, {&m, kRowTile},          {&l, kRowTile}};
    int64_t total = 0;
    for (const auto& part : parts) total += part.second;
    buf.assign(total, 0.0f);
    float* at = buf.data();
    for (const auto& part : parts) {
      *part.first = at;
      at += part.second;
    }
  }
};

// In-place orthonormal Walsh-Hadamard rotation of one fp32 row: blocks of b = d & -d, the reference's butterflies
// (stride 1, 2, 4, ...) and its one multiply by fp32(1/sqrt(b)).
void rotate_row(float* x, int64_t d) {
  const int64_t b = d & -d;
  const float norm = static_cast<float>(1.0 / std::sqrt(static_cast<double>(b)));
  for (int64_t base = 0; base < d; base += b) {
    float* y = x + base;
    for (int64_t h = 1; h < b; h <<= 1) {
      for (int64_t i = 0; i < b; i += 2 * h) {
        for (int64_t j = i; j < i + h; ++j) {
          const float u = y[j], w = y[j + h];
          y[j] = u + w;
          y[j + h] = u - w;
        }
      }
    }
  }
  for (int64_t c = 0; c < d; ++c) x[c] *= norm;
}

// Scale/zero values of n consecutive tokens (nG per token, storage dtype) as fp32 [group][kBlock].
template <typename T>
void load_token_groups(const T* src, int64_t n, int64_t nG, float* dst) {
  if (nG == 1) return load_f32(src, dst, n);
  for (int64_t j = 0; j < n; ++j)
    for (int64_t g = 0; g < nG; ++g) dst[g * kBlock + j] = to_f32(src[j * nG + g]);
}

template <int BITS>
inline float code_at(const uint8_t* codes, int64_t c) {
  constexpr int per = 8 / BITS;
  return static_cast<float>((codes[c / per] >> ((c % per) * BITS)) & ((1 << BITS) - 1));
}

#if defined(LRKERN_AVX2) && defined(__FMA__)
#define LRKERN_KV_AVX2 1
#endif

// Key or value rows already in fp32 (row stride d). The AVX2 kernels read rows of every kind through
// row(j).vec(c): 8 fp32 channels from c of token j.
struct FloatRows {
  const float* p;
  int64_t stride;
  const float* at(int64_t j) const { return p + j * stride; }
#if defined(LRKERN_KV_AVX2)
  struct Row {
    const float* p;
    __m256 vec(int64_t c) const { return _mm256_loadu_ps(p + c); }
  };
  Row row(int64_t j) const { return {at(j)}; }
#endif
};

// ---------------------------------------------------------------------------------------------------------------
// Portable primitives (scalar). The AVX2 twins below have the same contracts.

struct Scalar {
  static constexpr bool kFused = false;

  // The rows per-channel key codes are scored against: qs[r][c] = q[r][c] * s[c].
  template <int BITS>
  static void key_weights(const float* q, const float* s, float* qs, int64_t nr, int64_t d) {
    for (int64_t r = 0; r < nr; ++r)
      for (int64_t c = 0; c < d; ++c) qs[r * d + c] = q[r * d + c] * s[c];
  }

  // S[r][j] = qs[r] . codes_j + off[r] for n tokens of per-channel key codes (rows nb bytes apart).
  template <int BITS>
  static void key_scores(const float* qs, const float* off, const uint8_t* codes, int64_t nb, float* S, int64_t nr,
                         int64_t n, int64_t d, Scratch& w) {
    for (int64_t j = 0; j < n; ++j)
      for (int64_t c = 0; c < d; ++c) w.k[j * d + c] = code_at<BITS>(codes + j * nb, c);
    scores(qs, off, FloatRows{w.k, d}, S, nr, n, d);
  }

  // dst[j][c] = code_jc * s + z with s, z the token's channel-group values ([group][kBlock]): the reference's
  // dequantization, bit for bit.
  template <int BITS>
  static void dequant(const uint8_t* codes, int64_t nb, int64_t n, int64_t d, int64_t Gc, const float* s,
                      const float* z, float* dst) {
    for (int64_t j = 0; j < n; ++j) {
      for (int64_t c = 0; c < d; ++c) {
        const float p = code_at<BITS>(codes + j * nb, c) * s[(c / Gc) * kBlock + j];
        dst[j * d + c] = p + z[(c / Gc) * kBlock + j];
      }
    }
  }

  static float dot(const float* a, const float* b, int64_t n) {
    float acc = 0.0f;
    for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
    return acc;
  }

  // S[r][j] = Q[r] . K[j] + off[r] for r < nr, j < n.
  static void scores(const float* Q, const float* off, FloatRows K, float* S, int64_t nr, int64_t n, int64_t d) {
    for (int64_t r = 0; r < nr; ++r)
      for (int64_t j = 0; j < n; ++j) S[r * kBlock + j] = dot(Q + r * d, K.at(j), d) + off[r];
  }

  // Scales a row's n scores, returns their max.
  static float scale_max(float* s, int64_t n, float scale) {
    float mx = kNegInf;
    for (int64_t j = 0; j < n; ++j) {
      s[j] *= scale;
      mx = std::max(mx, s[j]);
    }
    return mx;
  }

  // s[j] = e^{s[j] - m}; returns their sum.
  static float exp_sum(float* s, int64_t n, float m) {
    float sum = 0.0f;
    for (int64_t j = 0; j < n; ++j) {
      s[j] = std::exp(s[j] - m);
      sum += s[j];
    }
    return sum;
  }

  static void scale_row(float* x, int64_t n, float a) {
    for (int64_t c = 0; c < n; ++c) x[c] *= a;
  }

  // A[r][c] += sum_j P[r][j] V[j][c] for r < nr, c in [c0, c1).
  static void values(const float* P, FloatRows V, float* A, int64_t nr, int64_t n, int64_t d, int64_t c0,
                     int64_t c1) {
    for (int64_t r = 0; r < nr; ++r) {
      for (int64_t j = 0; j < n; ++j) {
        const float p = P[r * kBlock + j];
        const float* v = V.at(j);
        for (int64_t c = c0; c < c1; ++c) A[r * d + c] += p * v[c];
      }
    }
  }
};

// ---------------------------------------------------------------------------------------------------------------
#if defined(LRKERN_KV_AVX2)

// Register tiles are sized for the register file: with AVX-512VL (e.g. -march=native on Zen 4 or recent Xeons) the
// compiler encodes these 256-bit operations with EVEX and has 32 vector registers instead of 16.
#if defined(__AVX512VL__)
constexpr int kVecRegs = 32;
#else
constexpr int kVecRegs = 16;
#endif

// The codes of channels c..c+7 of one code row as int32 lanes, each shifted so that its code sits in the lowest
// bits with the codes of later channels above it (unmasked): one dword broadcast (a plain load) and one variable
// shift. At 2 bits the dword holds 16 channels, and channels 8..15 are shifted 16 further.
alignas(32) constexpr int32_t kShift2[2][8] = {{0, 2, 4, 6, 8, 10, 12, 14}, {16, 18, 20, 22, 24, 26, 28, 30}};
alignas(32) constexpr int32_t kShift4[8] = {0, 4, 8, 12, 16, 20, 24, 28};

template <int BITS>
inline __m256i shifted_codes8(const uint8_t* row, int64_t c) {
  int32_t u;
  if constexpr (BITS == 2) {
    std::memcpy(&u, row + (c >> 4) * 4, 4);
    return _mm256_srlv_epi32(_mm256_set1_epi32(u),
                             _mm256_load_si256(reinterpret_cast<const __m256i*>(kShift2[(c >> 3) & 1])));
  } else {
    std::memcpy(&u, row + (c >> 1), 4);
    return _mm256_srlv_epi32(_mm256_set1_epi32(u), _mm256_load_si256(reinterpret_cast<const __m256i*>(kShift4)));
  }
}

template <int BITS>
inline __m256 float_codes8(const uint8_t* row, int64_t c) {
  return _mm256_cvtepi32_ps(_mm256_and_si256(shifted_codes8<BITS>(row, c), _mm256_set1_epi32((1 << BITS) - 1)));
}

// Per-token quantized value rows of one channel group, read as the reference's dequantized fp32 values
// code * s + z, bit for bit. At 2 bits a token has only four such values: table[j] holds them (formed once per
// block) and vpermps picks one per lane. It reads only an index's low 3 bits, code + 4 * (next code's low bit), so
// the table, repeated twice in the register, needs no mask. At 4 bits: convert, multiply, add.
template <int BITS>
struct ValueRows {
  const uint8_t* p;
  int64_t stride;
  const float *table, *s, *z;  // table: [kBlock][4] (2 bits); s, z: [kBlock] (4 bits)
  struct Row {
    const uint8_t* p;
    __m256 a, b;  // 2 bits: the table twice; 4 bits: s and z
    __m256 vec(int64_t c) const {
      if constexpr (BITS == 2) {
        return _mm256_permutevar8x32_ps(a, shifted_codes8<2>(p, c));
      } else {
        return _mm256_add_ps(_mm256_mul_ps(float_codes8<4>(p, c), a), b);
      }
    }
  };
  Row row(int64_t j) const {
    if constexpr (BITS == 2) {
      const __m128 t = _mm_loadu_ps(table + 4 * j);
      return {p + j * stride, _mm256_set_m128(t, t), _mm256_setzero_ps()};
    } else {
      return {p + j * stride, _mm256_set1_ps(s[j]), _mm256_set1_ps(z[j])};
    }
  }
};

inline float hsum8(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}

// The four horizontal sums of a, b, c, d in one register.
inline __m128 hsum4x8(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 ab = _mm256_hadd_ps(a, b), cd = _mm256_hadd_ps(c, d);
  const __m256 abcd = _mm256_hadd_ps(ab, cd);  // per 128-bit half: [a b c d] partial sums
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

// e^x for x <= 0 (Cephes expf: e^x = 2^n e^r, |r| <= ln2 / 2, degree-6 polynomial, ~1 ulp); 0 below -87.3 (where
// e^x leaves the normal range) and for -inf.
inline __m256 exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.3365478515625f);
  const __m256 xc = _mm256_max_ps(x, lo);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  const __m256 y = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(y, _mm256_castsi256_ps(e)), _mm256_cmp_ps(x, lo, _CMP_GE_OQ));
}

// GCC folds a reused load into each FMA that uses it as a memory operand, which makes the load ports the bottleneck
// of the score tiles; an empty asm keeps the value in a register instead.
inline __m256 in_register(__m256 v) {
  __asm__("" : "+v"(v));
  return v;
}

// Scores against fp32 key rows: RR rows x JJ tokens of accumulators, each key vector loaded once for the RR rows.
// Sums of four tokens are reduced together and stored with one vector store.
template <int RR, int JJ>
inline void scores_tile(const float* Q, const float* off, FloatRows keys, int64_t j0, float* S, int64_t d) {
  __m256 acc[RR][JJ];
  for (int rr = 0; rr < RR; ++rr)
    for (int jj = 0; jj < JJ; ++jj) acc[rr][jj] = _mm256_setzero_ps();
  for (int64_t c = 0; c < d; c += 8) {
    __m256 q[RR];
    for (int rr = 0; rr < RR; ++rr) q[rr] = in_register(_mm256_loadu_ps(Q + rr * d + c));
    for (int jj = 0; jj < JJ; ++jj) {
      const __m256 k = in_register(keys.row(j0 + jj).vec(c));
      for (int rr = 0; rr < RR; ++rr) acc[rr][jj] = _mm256_fmadd_ps(q[rr], k, acc[rr][jj]);
    }
  }
  for (int rr = 0; rr < RR; ++rr) {
    float* s = S + rr * kBlock + j0;
    if constexpr (JJ % 4 == 0) {
      for (int jj = 0; jj < JJ; jj += 4) {
        const __m128 sums = hsum4x8(acc[rr][jj], acc[rr][jj + 1], acc[rr][jj + 2], acc[rr][jj + 3]);
        _mm_storeu_ps(s + jj, _mm_add_ps(sums, _mm_set1_ps(off[rr])));
      }
    } else {
      for (int jj = 0; jj < JJ; ++jj) s[jj] = hsum8(acc[rr][jj]) + off[rr];
    }
  }
}

// Tokens [j, n) in tiles of JJ, then halves of it for the rest.
template <int RR, int JJ>
inline void scores_cols(const float* Q, const float* off, FloatRows keys, float* S, int64_t j, int64_t n,
                        int64_t d) {
  for (; j + JJ <= n; j += JJ) scores_tile<RR, JJ>(Q, off, keys, j, S, d);
  if constexpr (JJ > 1) scores_cols<RR, JJ / 2>(Q, off, keys, S, j, n, d);
}

template <int RR>
inline void scores_rows(const float* Q, const float* off, FloatRows keys, float* S, int64_t n, int64_t d) {
  constexpr int JJ = kVecRegs == 32 ? (RR == 4 ? 4 : 8) : (RR >= 3 ? 2 : 4);  // RR * (JJ + 1) + 1 registers
  scores_cols<RR, JJ>(Q, off, keys, S, 0, n, d);
}

// kt[k][j] = code dword k of token j (kBlock tokens per row of kt) for j < n, zeros up to a multiple of 8 (those
// lanes' scores are computed but never read). Whole groups of 8 tokens go 16 bytes at a time: rows j and j + 4 in
// the two halves of a register, then a 4 x 4 dword transpose per half.
inline void transpose_codes(const uint8_t* codes, int64_t nb, int64_t n, uint32_t* kt) {
  int64_t j = 0;
  if (nb % 16 == 0) {
    for (; j + 8 <= n; j += 8) {
      for (int64_t b = 0; b < nb; b += 16) {
        __m256i a[4];
        for (int i = 0; i < 4; ++i) {
          const uint8_t* lo = codes + (j + i) * nb + b;
          a[i] = _mm256_inserti128_si256(
              _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(lo))),
              _mm_loadu_si128(reinterpret_cast<const __m128i*>(lo + 4 * nb)), 1);
        }
        const __m256i t0 = _mm256_unpacklo_epi32(a[0], a[1]), t1 = _mm256_unpackhi_epi32(a[0], a[1]);
        const __m256i t2 = _mm256_unpacklo_epi32(a[2], a[3]), t3 = _mm256_unpackhi_epi32(a[2], a[3]);
        uint32_t* dst = kt + (b / 4) * kBlock + j;
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm256_unpacklo_epi64(t0, t2));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + kBlock), _mm256_unpackhi_epi64(t0, t2));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 2 * kBlock), _mm256_unpacklo_epi64(t1, t3));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 3 * kBlock), _mm256_unpackhi_epi64(t1, t3));
      }
    }
  }
  const int64_t dwords = nb / 4;
  for (; j < n; ++j)
    for (int64_t k = 0; k < dwords; ++k) std::memcpy(kt + k * kBlock + j, codes + j * nb + 4 * k, 4);
  for (int64_t k = 0; k < dwords; ++k) std::fill(kt + k * kBlock + n, kt + k * kBlock + (n + 7) / 8 * 8, 0u);
}

// Scores against per-channel key codes, tokens in lanes: RR rows x JV vectors of 8 tokens of accumulators over the
// transposed code dwords. A channel's codes are one AND and one convert: the code is left at its bit position in its
// 16-bit half dword (the i-th channel of the half is scaled by 2^(BITS * i), below 2^16, exact), and the query
// weight carries the exact factor 2^-(BITS * i) (Avx2::key_weights).
template <int BITS, int RR, int JV>
inline void key_scores_tile(const float* qs, const float* off, const uint32_t* kt, float* S, int64_t j0, int64_t d) {
  constexpr int half = 16 / BITS;  // channels per 16-bit half dword
  __m256 acc[RR][JV];
  for (int rr = 0; rr < RR; ++rr)
    for (int jv = 0; jv < JV; ++jv) acc[rr][jv] = _mm256_setzero_ps();
  for (int64_t k = 0; k < d / (2 * half); ++k) {
    __m256i v[JV];
    for (int jv = 0; jv < JV; ++jv) {
      v[jv] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kt + k * kBlock + j0 + 8 * jv));
    }
    for (int h = 0; h < 2; ++h) {
      for (int i = 0; i < half; ++i) {
        const int64_t c = (2 * k + h) * half + i;
        const __m256i mask = _mm256_set1_epi32(((1 << BITS) - 1) << (BITS * i));
        for (int jv = 0; jv < JV; ++jv) {
          const __m256 f = _mm256_cvtepi32_ps(_mm256_and_si256(v[jv], mask));
          for (int rr = 0; rr < RR; ++rr) {
            acc[rr][jv] = _mm256_fmadd_ps(_mm256_set1_ps(qs[rr * d + c]), f, acc[rr][jv]);
          }
        }
      }
      for (int jv = 0; jv < JV; ++jv) v[jv] = _mm256_srli_epi32(v[jv], 16);
    }
  }
  for (int rr = 0; rr < RR; ++rr) {
    const __m256 o = _mm256_set1_ps(off[rr]);
    for (int jv = 0; jv < JV; ++jv) _mm256_storeu_ps(S + rr * kBlock + j0 + 8 * jv, _mm256_add_ps(acc[rr][jv], o));
  }
}

template <int BITS, int RR>
inline void key_scores_rows(const float* qs, const float* off, const uint32_t* kt, float* S, int64_t n, int64_t d) {
  constexpr int JV = kVecRegs == 32 || RR <= 2 ? 4 : 2;  // RR * JV accumulators
  const int64_t nv = (n + 7) / 8;
  int64_t jv = 0;
  for (; jv + JV <= nv; jv += JV) key_scores_tile<BITS, RR, JV>(qs, off, kt, S, 8 * jv, d);
  for (; jv < nv; ++jv) key_scores_tile<BITS, RR, 1>(qs, off, kt, S, 8 * jv, d);
}

// RR rows x CC vectors of accumulators over n tokens: each value vector is unpacked (or loaded) once for RR rows.
template <int RR, int CC, typename V>
inline void values_tile(const float* P, V vals, float* A, int64_t n, int64_t d, int64_t c0) {
  __m256 acc[RR][CC];
  for (int rr = 0; rr < RR; ++rr)
    for (int cc = 0; cc < CC; ++cc) acc[rr][cc] = _mm256_loadu_ps(A + rr * d + c0 + 8 * cc);
  for (int64_t j = 0; j < n; ++j) {
    const auto row = vals.row(j);
    for (int cc = 0; cc < CC; ++cc) {
      const __m256 v = row.vec(c0 + 8 * cc);
      for (int rr = 0; rr < RR; ++rr) {
        // set1 rather than _mm256_broadcast_ss: the builtin's pointer argument makes GCC keep acc in memory.
        acc[rr][cc] = _mm256_fmadd_ps(_mm256_set1_ps(P[rr * kBlock + j]), v, acc[rr][cc]);
      }
    }
  }
  for (int rr = 0; rr < RR; ++rr)
    for (int cc = 0; cc < CC; ++cc) _mm256_storeu_ps(A + rr * d + c0 + 8 * cc, acc[rr][cc]);
}

// Channels [c, c1) in tiles of CC vectors, then halves of it for the rest.
template <int RR, int CC, typename V>
inline void values_cols(const float* P, V vals, float* A, int64_t n, int64_t d, int64_t c, int64_t c1) {
  for (; c + 8 * CC <= c1; c += 8 * CC) values_tile<RR, CC>(P, vals, A, n, d, c);
  if constexpr (CC > 1) values_cols<RR, CC / 2>(P, vals, A, n, d, c, c1);
}

template <int RR, typename V>
inline void values_rows(const float* P, V vals, float* A, int64_t n, int64_t d, int64_t c0, int64_t c1) {
  // RR * CC accumulators plus a value and its row's two registers.
  constexpr int CC = kVecRegs == 32 ? (RR == 4 ? 6 : 8) : (RR == 1 ? 8 : RR == 2 ? 6 : RR == 3 ? 4 : 3);
  values_cols<RR, CC>(P, vals, A, n, d, c0, c1);
}

struct Avx2 {
  static constexpr bool kFused = true;

  // qs[r][c] = q[r][c] * s[c] * 2^-(BITS * i), i the channel's place in its half dword (see key_scores_tile).
  template <int BITS>
  static void key_weights(const float* q, const float* s, float* qs, int64_t nr, int64_t d) {
    constexpr int half = 16 / BITS;
    for (int64_t r = 0; r < nr; ++r) {
      for (int64_t c = 0; c < d; ++c) {
        const float prod = q[r * d + c] * s[c];
        qs[r * d + c] = prod * (1.0f / static_cast<float>(1 << (BITS * (c % half))));
      }
    }
  }

  template <int BITS>
  static void key_scores(const float* qs, const float* off, const uint8_t* codes, int64_t nb, float* S, int64_t nr,
                         int64_t n, int64_t d, Scratch& w) {
    const uint32_t* kt = w.kt.data();
    transpose_codes(codes, nb, n, w.kt.data());
    for (int64_t r = 0; r < nr; r += 4) {
      switch (std::min<int64_t>(4, nr - r)) {
        case 4: key_scores_rows<BITS, 4>(qs + r * d, off + r, kt, S + r * kBlock, n, d); break;
        case 3: key_scores_rows<BITS, 3>(qs + r * d, off + r, kt, S + r * kBlock, n, d); break;
        case 2: key_scores_rows<BITS, 2>(qs + r * d, off + r, kt, S + r * kBlock, n, d); break;
        default: key_scores_rows<BITS, 1>(qs + r * d, off + r, kt, S + r * kBlock, n, d); break;
      }
    }
  }

  template <int BITS>
  static void dequant(const uint8_t* codes, int64_t nb, int64_t n, int64_t d, int64_t Gc, const float* s,
                      const float* z, float* dst) {
    for (int64_t j = 0; j < n; ++j) {
      for (int64_t c0 = 0, g = 0; c0 < d; c0 += Gc, ++g) {
        const __m256 vs = _mm256_set1_ps(s[g * kBlock + j]), vz = _mm256_set1_ps(z[g * kBlock + j]);
        for (int64_t c = c0; c < c0 + Gc; c += 8) {
          const __m256 p = _mm256_mul_ps(float_codes8<BITS>(codes + j * nb, c), vs);
          _mm256_storeu_ps(dst + j * d + c, _mm256_add_ps(p, vz));
        }
      }
    }
  }

  static float dot(const float* a, const float* b, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    float sum = hsum8(acc);
    for (; i < n; ++i) sum += a[i] * b[i];
    return sum;
  }

  static void scores(const float* Q, const float* off, FloatRows K, float* S, int64_t nr, int64_t n, int64_t d) {
    if (nr == 4) return scores_rows<4>(Q, off, K, S, n, d);  // decode with g = 4: one pass over the keys
    int64_t r = 0;
    for (; r + 3 <= nr; r += 3) scores_rows<3>(Q + r * d, off + r, K, S + r * kBlock, n, d);
    switch (nr - r) {
      case 2: scores_rows<2>(Q + r * d, off + r, K, S + r * kBlock, n, d); break;
      case 1: scores_rows<1>(Q + r * d, off + r, K, S + r * kBlock, n, d); break;
      default: break;
    }
  }

  static float scale_max(float* s, int64_t n, float scale) {
    const __m256 sc = _mm256_set1_ps(scale);
    __m256 mx = _mm256_set1_ps(kNegInf);
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
      const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(s + j), sc);
      _mm256_storeu_ps(s + j, v);
      mx = _mm256_max_ps(mx, v);
    }
    float m = hmax8(mx);
    for (; j < n; ++j) {
      s[j] *= scale;
      m = std::max(m, s[j]);
    }
    return m;
  }

  static float exp_sum(float* s, int64_t n, float m) {
    // Pad to whole vectors with -inf, whose weight is 0: rows have room for kBlock, a multiple of 8.
    const int64_t nv = (n + 7) & ~int64_t{7};
    for (int64_t j = n; j < nv; ++j) s[j] = kNegInf;
    const __m256 vm = _mm256_set1_ps(m);
    __m256 sum = _mm256_setzero_ps();
    for (int64_t j = 0; j < nv; j += 8) {
      const __m256 p = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), vm));
      _mm256_storeu_ps(s + j, p);
      sum = _mm256_add_ps(sum, p);
    }
    return hsum8(sum);
  }

  static void scale_row(float* x, int64_t n, float a) {
    const __m256 va = _mm256_set1_ps(a);
    int64_t c = 0;
    for (; c + 8 <= n; c += 8) _mm256_storeu_ps(x + c, _mm256_mul_ps(_mm256_loadu_ps(x + c), va));
    for (; c < n; ++c) x[c] *= a;
  }

  template <typename V>
  static void values(const float* P, V vals, float* A, int64_t nr, int64_t n, int64_t d, int64_t c0, int64_t c1) {
    int64_t r = 0;
    for (; r + 4 <= nr; r += 4) values_rows<4>(P + r * kBlock, vals, A + r * d, n, d, c0, c1);
    switch (nr - r) {
      case 3: values_rows<3>(P + r * kBlock, vals, A + r * d, n, d, c0, c1); break;
      case 2: values_rows<2>(P + r * kBlock, vals, A + r * d, n, d, c0, c1); break;
      case 1: values_rows<1>(P + r * kBlock, vals, A + r * d, n, d, c0, c1); break;
      default: break;
    }
  }

  // Values of n quantized tokens straight from their codes (nr <= kFusedRows).
  template <int BITS>
  static void quant_values(const uint8_t* codes, int64_t nb, Scratch& w, int64_t nr, int64_t n, int64_t d,
                           int64_t nG, int64_t Gc) {
    for (int64_t g = 0; g < nG; ++g) {
      const float* s = w.vs + g * kBlock;
      const float* z = w.vz + g * kBlock;
      float* table = w.vl + 4 * g * kBlock;
      if constexpr (BITS == 2) {
        const __m128 k = _mm_setr_ps(0.0f, 1.0f, 2.0f, 3.0f);
        for (int64_t j = 0; j < n; ++j) {
          _mm_storeu_ps(table + 4 * j, _mm_add_ps(_mm_mul_ps(k, _mm_set1_ps(s[j])), _mm_set1_ps(z[j])));
        }
      }
      values(w.s, ValueRows<BITS>{codes, nb, table, s, z}, w.acc, nr, n, d, g * Gc, (g + 1) * Gc);
    }
  }
};
#endif  // LRKERN_KV_AVX2

// ---------------------------------------------------------------------------------------------------------------
// Driver.

// The online-softmax update for n tokens whose scores are in w.s: rescales acc when a row's maximum moves, leaves
// P in w.s.
template <typename Ops, typename T>
void softmax_block(const Problem<T>& p, Scratch& w, int64_t nr, int64_t n) {
  for (int64_t r = 0; r < nr; ++r) {
    float* s = w.s + r * kBlock;
    const float m_new = std::max(w.m[r], Ops::scale_max(s, n, p.scale));
    if (m_new != w.m[r]) {  // rescale only when the maximum moved (rare after the first blocks)
      const float alpha = w.m[r] == kNegInf ? 0.0f : std::exp(w.m[r] - m_new);
      w.l[r] *= alpha;
      Ops::scale_row(w.acc + r * p.d, p.d, alpha);
      w.m[r] = m_new;
    }
    w.l[r] += Ops::exp_sum(s, n, m_new);
  }
}

// Token range [lo, hi) of a batch row's concatenated [quantized | window] tokens for split s.
inline void split_range(int64_t total, int64_t splits, int64_t s, int64_t& lo, int64_t& hi) {
  const int64_t chunk = ((total + splits - 1) / splits + kBlock - 1) / kBlock * kBlock;
  lo = std::min(total, s * chunk);
  hi = std::min(total, lo + chunk);
}

// Quantized tokens [j, j + n) of KV slab bk (= b * Hkv + kv): one online-softmax step. Per-channel keys need
// w.qs / w.qz of the tokens' group.
template <typename Ops, typename T, int BITS>
void quant_block(const Problem<T>& p, Scratch& w, int64_t bk, int64_t j, int64_t n, int64_t nr) {
  const int64_t d = p.d, tok = bk * p.Tq + j;
  const uint8_t* kc = p.k_codes + tok * p.nb;
  const uint8_t* vc = p.v_codes + tok * p.nb;
  if (p.per_channel) {
    Ops::template key_scores<BITS>(w.qs, w.qz, kc, p.nb, w.s, nr, n, d, w);
  } else {
    load_token_groups(p.k_scale + tok * p.nG, n, p.nG, w.ks);
    load_token_groups(p.k_zero + tok * p.nG, n, p.nG, w.kz);
    Ops::template dequant<BITS>(kc, p.nb, n, d, p.Gc, w.ks, w.kz, w.k);
    Ops::scores(w.q, w.zero, FloatRows{w.k, d}, w.s, nr, n, d);
  }
  softmax_block<Ops>(p, w, nr, n);
  load_token_groups(p.v_scale + tok * p.nG, n, p.nG, w.vs);
  load_token_groups(p.v_zero + tok * p.nG, n, p.nG, w.vz);
#if defined(LRKERN_KV_AVX2)
  if constexpr (Ops::kFused) {
    if (nr <= kFusedRows) return Ops::template quant_values<BITS>(vc, p.nb, w, nr, n, d, p.nG, p.Gc);
  }
#endif
  Ops::template dequant<BITS>(vc, p.nb, n, d, p.Gc, w.vs, w.vz, w.v);
  Ops::values(w.s, FloatRows{w.v, d}, w.acc, nr, n, d, 0, d);
}

// Work item (b, kv, row tile, split): partial m, l and unnormalised acc of its rows over its tokens.
template <typename Ops, typename T, int BITS>
void run_item(const Problem<T>& p, int64_t item, Scratch& w, float* part_m, float* part_l, float* part_acc) {
  const int64_t d = p.d, s = item % p.splits, rt = (item / p.splits) % p.row_tiles;
  const int64_t bk = item / (p.splits * p.row_tiles), b = bk / p.Hkv;
  const int64_t r0 = rt * kRowTile, nr = std::min(kRowTile, p.R - r0);
  std::fill(w.m, w.m + kRowTile, kNegInf);
  std::fill(w.l, w.l + kRowTile, 0.0f);
  std::fill(w.acc, w.acc + kRowTile * d, 0.0f);

  const int64_t nq = p.n_quant[b], nw = p.n_win[b];
  int64_t lo, hi;
  split_range(nq + nw, p.splits, s, lo, hi);
  if (lo < hi) {
    for (int64_t r = 0; r < nr; ++r) {
      float* qr = w.q + r * d;
      load_f32(p.q + (bk * p.R + r0 + r) * d, qr, d);
      if (p.rotate_keys) rotate_row(qr, d);
    }
    // Quantized tokens. A per-channel key group of G tokens shares one scale/zero row: blocks never straddle a
    // group, and q * s, q . z are formed once per group.
    int64_t group = -1;
    for (int64_t j = lo; j < std::min(hi, nq);) {
      int64_t end = std::min({j + kBlock, hi, nq});
      if (p.per_channel) {
        end = std::min(end, (j / p.G + 1) * p.G);
        if (j / p.G != group) {
          group = j / p.G;
          load_f32(p.k_scale + (bk * (p.Tq / p.G) + group) * d, w.ks, d);
          load_f32(p.k_zero + (bk * (p.Tq / p.G) + group) * d, w.kz, d);
          Ops::template key_weights<BITS>(w.q, w.ks, w.qs, nr, d);
          for (int64_t r = 0; r < nr; ++r) w.qz[r] = Ops::dot(w.q + r * d, w.kz, d);
        }
      }
      quant_block<Ops, T, BITS>(p, w, bk, j, end - j, nr);
      j = end;
    }
    // Window tokens, stored in full precision.
    for (int64_t j = std::max(lo, nq) - nq; j < hi - nq;) {
      const int64_t n = std::min(kBlock, hi - nq - j);
      load_f32(p.k_win + (bk * p.W + j) * d, w.k, n * d);
      load_f32(p.v_win + (bk * p.W + j) * d, w.v, n * d);
      Ops::scores(w.q, w.zero, FloatRows{w.k, d}, w.s, nr, n, d);
      softmax_block<Ops>(p, w, nr, n);
      Ops::values(w.s, FloatRows{w.v, d}, w.acc, nr, n, d, 0, d);
      j += n;
    }
  }
  for (int64_t r = 0; r < nr; ++r) {
    const int64_t row = (bk * p.R + r0 + r) * p.splits + s;  // partials ordered [b, kv, row, split]
    part_m[row] = w.m[r];
    part_l[row] = w.l[r];
    std::memcpy(part_acc + row * d, w.acc + r * d, d * sizeof(float));
  }
}

// Merges one query row's split partials, adds the correction, normalises, rotates and stores (the reference's
// formulas, including its handling of empty rows and of rows with only the correction).
template <typename T>
void finish_row(const Problem<T>& p, int64_t row, const float* part_m, const float* part_l, const float* part_acc,
                float* acc, float* cn) {
  const int64_t d = p.d, S = p.splits;
  float m = kNegInf;
  for (int64_t s = 0; s < S; ++s) m = std::max(m, part_m[row * S + s]);
  float L = 0.0f;
  std::fill(acc, acc + d, 0.0f);
  if (m != kNegInf) {
    for (int64_t s = 0; s < S; ++s) {
      const float ms = part_m[row * S + s];
      if (ms == kNegInf) continue;
      const float e = std::exp(ms - m);
      L += part_l[row * S + s] * e;
      const float* a = part_acc + (row * S + s) * d;
      for (int64_t c = 0; c < d; ++c) acc[c] += a[c] * e;
    }
  }
  float c_d = 0.0f;
  std::fill(cn, cn + d, 0.0f);
  if (p.phi) {
    const int64_t bk = row / p.R;
    const float* phi = p.phi + row * p.D;
    const float* cs = p.corr_s + bk * p.D * d;
    const float* cz = p.corr_z + bk * p.D;
    for (int64_t k = 0; k < p.D; ++k) {
      c_d += phi[k] * cz[k];
      for (int64_t c = 0; c < d; ++c) cn[c] += phi[k] * cs[k * d + c];
    }
    c_d = std::max(c_d, 0.0f);
  }
  const float M = c_d > 0.0f ? std::max(m, std::log(c_d)) : m;
  const float M_safe = std::isfinite(M) ? M : 0.0f;
  const float a = m != kNegInf ? std::exp(m - M_safe) : 0.0f;
  const float f = c_d > 0.0f ? std::exp(-M_safe) : 0.0f;
  const float den = L * a + c_d * f;
  if (den > 0.0f) {
    for (int64_t c = 0; c < d; ++c) acc[c] = (acc[c] * a + cn[c] * f) / den;
    p.lse[row] = M_safe + std::log(den);
  } else {
    std::fill(acc, acc + d, 0.0f);
    p.lse[row] = kNegInf;
  }
  if (p.value_rotation) rotate_row(acc, d);
  store_f32(acc, p.out + row * d, d);
}

template <typename Ops, typename T, int BITS>
void kv_attention_impl(const Problem<T>& p) {
  const int64_t items = p.B * p.Hkv * p.row_tiles * p.splits, rows = p.B * p.Hkv * p.R;
  std::vector<float> part_m(rows * p.splits), part_l(rows * p.splits), part_acc(rows * p.splits * p.d);
  // Small problems (tokens x rows x d) stay on the calling thread.
  int64_t tokens = 0;
  for (int64_t b = 0; b < p.B; ++b) tokens += p.n_quant[b] + p.n_win[b];
  const int64_t grain = tokens * p.Hkv * p.R * p.d < (1 << 16) ? items : 1;
  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
    Scratch w(p.d, p.nG);
    for (int64_t i = begin; i < end; ++i) {
      run_item<Ops, T, BITS>(p, i, w, part_m.data(), part_l.data(), part_acc.data());
    }
  });
  at::parallel_for(0, rows, std::max<int64_t>(1, 8192 / p.d), [&](int64_t begin, int64_t end) {
    std::vector<float> acc(p.d), cn(p.d);
    for (int64_t r = begin; r < end; ++r) {
      finish_row(p, r, part_m.data(), part_l.data(), part_acc.data(), acc.data(), cn.data());
    }
  });
}

// Token splits per (b, kv, row tile): enough items for ~8 per thread (so unequal rows still balance), but none
// shorter than kMinSplit tokens.
int64_t choose_splits(int64_t units, int64_t max_tokens) {
  const int64_t threads = at::get_num_threads();
  if (threads <= 1 || units >= 8 * threads) return 1;
  const int64_t want = (8 * threads + units - 1) / units;
  return std::max<int64_t>(1, std::min(want, max_tokens / kMinSplit));
}

}  // namespace

void kv_attention_out(const at::Tensor& q, const at::Tensor& k_codes, const at::Tensor& k_scale,
                      const at::Tensor& k_zero, const at::Tensor& v_codes, const at::Tensor& v_scale,
                      const at::Tensor& v_zero, const at::Tensor& k_win, const at::Tensor& v_win,
                      const at::Tensor& n_quant, const at::Tensor& n_win, const std::optional<at::Tensor>& corr_s,
                      const std::optional<at::Tensor>& corr_z, const std::optional<at::Tensor>& phi_q, int64_t bits,
                      int64_t group_size, bool key_per_channel, int64_t channel_group, bool rotate_keys,
                      bool value_rotation, double scale, at::Tensor& out, at::Tensor& lse) {
  const bool corr = corr_s.has_value();
  TORCH_CHECK(corr == corr_z.has_value() && corr == phi_q.has_value(),
              "kv_attention_out: corr_s, corr_z and phi_q go together");
  std::vector<const at::Tensor*> all = {&q, &k_codes, &k_scale, &k_zero, &v_codes, &v_scale, &v_zero, &k_win,
                                        &v_win, &n_quant, &n_win, &out, &lse};
  if (corr) all.insert(all.end(), {&*corr_s, &*corr_z, &*phi_q});
  for (const at::Tensor* t : all) {
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous(), "kv_attention_out: contiguous CPU tensors expected");
  }
  TORCH_CHECK(bits == 2 || bits == 4, "kv_attention_out: bits must be 2 or 4");
  TORCH_CHECK(q.dim() == 4 && k_win.dim() == 4 && k_codes.dim() == 4, "kv_attention_out: 4-d q, k_win, k_codes");
  TORCH_CHECK(n_quant.scalar_type() == at::kInt && n_win.scalar_type() == at::kInt,
              "kv_attention_out: n_quant / n_win must be int32");
  TORCH_CHECK(out.sizes() == q.sizes() && out.scalar_type() == q.scalar_type() && lse.scalar_type() == at::kFloat &&
                  lse.numel() * q.size(3) == q.numel(),
              "kv_attention_out: out must match q, lse must be fp32 [B, Hq, t]");

  const int64_t B = q.size(0), Hq = q.size(1), t = q.size(2), d = q.size(3);
  const int64_t Hkv = k_win.size(1);
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0 && group_size > 0 && channel_group > 0 && d % channel_group == 0,
              "kv_attention_out: inconsistent shapes");
  if (q.numel() == 0) return;

  dispatch_float(q.scalar_type(), "kv_attention_out", [&](auto tag) {
    using T = typename decltype(tag)::type;
    Problem<T> p{};
    p.q = q.const_data_ptr<T>();
    p.k_scale = k_scale.const_data_ptr<T>();
    p.k_zero = k_zero.const_data_ptr<T>();
    p.v_scale = v_scale.const_data_ptr<T>();
    p.v_zero = v_zero.const_data_ptr<T>();
    p.k_win = k_win.const_data_ptr<T>();
    p.v_win = v_win.const_data_ptr<T>();
    p.k_codes = k_codes.const_data_ptr<uint8_t>();
    p.v_codes = v_codes.const_data_ptr<uint8_t>();
    p.n_quant = n_quant.const_data_ptr<int32_t>();
    p.n_win = n_win.const_data_ptr<int32_t>();
    if (corr) {
      p.corr_s = corr_s->const_data_ptr<float>();
      p.corr_z = corr_z->const_data_ptr<float>();
      p.phi = phi_q->const_data_ptr<float>();
      p.D = corr_s->size(2);
    }
    p.out = out.mutable_data_ptr<T>();
    p.lse = lse.mutable_data_ptr<float>();
    p.B = B;
    p.Hkv = Hkv;
    p.R = (Hq / Hkv) * t;
    p.d = d;
    p.Tq = k_codes.size(2);
    p.W = k_win.size(2);
    p.G = group_size;
    p.Gc = channel_group;
    p.nG = d / channel_group;
    p.nb = d * bits / 8;
    p.per_channel = key_per_channel;
    p.rotate_keys = rotate_keys;
    p.value_rotation = value_rotation;
    p.scale = static_cast<float>(scale);
    p.row_tiles = (p.R + kRowTile - 1) / kRowTile;
    int64_t max_tokens = 0;
    for (int64_t b = 0; b < B; ++b) max_tokens = std::max<int64_t>(max_tokens, p.n_quant[b] + p.n_win[b]);
    p.splits = choose_splits(B * Hkv * p.row_tiles, max_tokens);

    auto run = [&](auto ops) {
      using Ops = decltype(ops);
      if (bits == 2) {
        kv_attention_impl<Ops, T, 2>(p);
      } else {
        kv_attention_impl<Ops, T, 4>(p);
      }
    };
#if defined(LRKERN_KV_AVX2)
    // Whole vectors per channel group, whole code dwords per token (the unpacking reads dwords).
    if (d % 8 == 0 && channel_group % 8 == 0 && d * bits % 32 == 0) return run(Avx2{});
#endif
    run(Scalar{});
  });
}

}  // namespace lrkern::cpu
