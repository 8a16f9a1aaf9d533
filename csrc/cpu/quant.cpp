// Asymmetric min-max group quantization with uint8 code packing, and its inverse. The arithmetic follows
// lrkern/reference/quant.py step by step so the codes are bit-identical to every other backend: fp32 min/max,
// scale = dtype((mx - mn) / qmax) by IEEE division, zero = dtype(mn), code = clamp(rint((x - z) / s), 0, qmax)
// with the *stored* s and z, code 0 where s == 0. setup.py builds with -ffp-contract=off so no FMA changes a result.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "convert.h"
#include "ops.h"

namespace lrkern::cpu {
namespace {

// Bits as a template parameter: the packing loops unroll over a constant number of codes per byte.
template <int BITS>
struct Layout {
  static constexpr int64_t bits = BITS, per = 8 / BITS, qmax = (int64_t{1} << BITS) - 1;
};

// Stored scale and zero of a group with fp32 extremes mn, mx (rounded to the storage dtype T).
template <typename T>
inline void group_params(float mn, float mx, float qmax, T* scale, T* zero) {
  *scale = from_f32<T>((mx - mn) / qmax);
  *zero = from_f32<T>(mn);
}

// code = clamp(rint((v - z) / s), 0, qmax), or 0 where s == 0. Division, not a reciprocal multiply: bit-exactness.
// Clamping before rounding is equivalent (rint is monotone, the bounds are integers) and keeps y in [0, 2^23), where
// (y + 2^23) - 2^23 is an exact round-half-to-even made of two adds, which vectorise where nearbyint may not.
inline float quantize(float v, float s, float z, float qmax) {
  float y = (v - z) / (s > 0.0f ? s : 1.0f);
  y = y > 0.0f ? y : 0.0f;
  y = y < qmax ? y : qmax;
  y = (y + 8388608.0f) - 8388608.0f;
  return s > 0.0f ? y : 0.0f;
}

// Packs per-element codes (as floats, already integral) into bytes: first element in the lowest bits.
template <typename L>
inline void pack(const float* q, uint8_t* dst, int64_t count, L) {
#pragma omp simd
  for (int64_t b = 0; b < count / L::per; ++b) {
    int32_t byte = 0;
    // Through int32: AVX2 has no float -> uint32 vector conversion, so a direct cast keeps this loop scalar.
    for (int64_t k = 0; k < L::per; ++k) byte |= static_cast<int32_t>(q[b * L::per + k]) << (k * L::bits);
    dst[b] = static_cast<uint8_t>(byte);
  }
}

// Unpacks count codes from bytes into floats.
template <typename L>
inline void unpack(const uint8_t* src, float* q, int64_t count, L) {
  const uint32_t mask = static_cast<uint32_t>(L::qmax);
#pragma omp simd
  for (int64_t b = 0; b < count / L::per; ++b) {
    const uint32_t byte = src[b];
    for (int64_t k = 0; k < L::per; ++k) q[b * L::per + k] = static_cast<float>((byte >> (k * L::bits)) & mask);
  }
}

// axis = -1: x viewed as [groups, gs]; each group is contiguous and packs into gs / per whole bytes.
template <typename T, typename L>
void quant_rows(const T* x, uint8_t* codes, T* scale, T* zero, int64_t groups, int64_t gs, L layout) {
  const float qmax = static_cast<float>(L::qmax);
  const int64_t grain = std::max<int64_t>(1, 16384 / gs);
  at::parallel_for(0, groups, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> v(gs), q(gs);
    for (int64_t g = begin; g < end; ++g) {
      load_f32(x + g * gs, v.data(), gs);
      float mn = std::numeric_limits<float>::infinity(), mx = -mn;
#pragma omp simd reduction(min : mn) reduction(max : mx)
      for (int64_t j = 0; j < gs; ++j) {
        mn = v[j] < mn ? v[j] : mn;
        mx = v[j] > mx ? v[j] : mx;
      }
      group_params<T>(mn, mx, qmax, scale + g, zero + g);
      const float s = to_f32(scale[g]), z = to_f32(zero[g]);
#pragma omp simd
      for (int64_t j = 0; j < gs; ++j) q[j] = quantize(v[j], s, z, qmax);
      pack(q.data(), codes + g * (gs / L::per), gs, layout);
    }
  });
}

// axis = -2: x viewed as [outer, t, n]; groups are gs consecutive rows of one column. Work is split into
// (outer, row group, column block) tiles so a single long group still uses every thread; access is along n.
template <typename T, typename L>
void quant_cols(const T* x, uint8_t* codes, T* scale, T* zero, int64_t outer, int64_t t, int64_t n, int64_t gs,
                L layout) {
  const float qmax = static_cast<float>(L::qmax);
  const int64_t tg = t / gs, nb = n / L::per;
  const int64_t cb = std::min<int64_t>(n, 512);  // a multiple of per: n is, and 512 is
  const int64_t col_blocks = (n + cb - 1) / cb;
  const int64_t tiles = outer * tg * col_blocks;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> v(cb), mn(cb), mx(cb), s(cb), z(cb), q(cb);
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t c0 = (tile % col_blocks) * cb, grp = tile / col_blocks;  // grp = o * tg + row group
      const int64_t w = std::min(cb, n - c0), o = grp / tg, r0 = (grp % tg) * gs;
      const T* xg = x + (o * t + r0) * n + c0;
      std::fill(mn.begin(), mn.begin() + w, std::numeric_limits<float>::infinity());
      std::fill(mx.begin(), mx.begin() + w, -std::numeric_limits<float>::infinity());
      for (int64_t r = 0; r < gs; ++r) {
        load_f32(xg + r * n, v.data(), w);
#pragma omp simd
        for (int64_t c = 0; c < w; ++c) {
          mn[c] = std::min(mn[c], v[c]);
          mx[c] = std::max(mx[c], v[c]);
        }
      }
      T* sg = scale + grp * n + c0;
      T* zg = zero + grp * n + c0;
      for (int64_t c = 0; c < w; ++c) {
        group_params<T>(mn[c], mx[c], qmax, sg + c, zg + c);
        s[c] = to_f32(sg[c]);
        z[c] = to_f32(zg[c]);
      }
      for (int64_t r = 0; r < gs; ++r) {
        load_f32(xg + r * n, v.data(), w);
#pragma omp simd
        for (int64_t c = 0; c < w; ++c) q[c] = quantize(v[c], s[c], z[c], qmax);
        pack(q.data(), codes + (o * t + r0 + r) * nb + c0 / L::per, w, layout);
      }
    }
  });
}

template <typename T, typename L>
void dequant_rows(const uint8_t* codes, const T* scale, const T* zero, T* out, int64_t groups, int64_t gs,
                  L layout) {
  const int64_t grain = std::max<int64_t>(1, 16384 / gs);
  at::parallel_for(0, groups, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> q(gs);
    for (int64_t g = begin; g < end; ++g) {
      unpack(codes + g * (gs / L::per), q.data(), gs, layout);
      const float s = to_f32(scale[g]), z = to_f32(zero[g]);
#pragma omp simd
      for (int64_t j = 0; j < gs; ++j) q[j] = q[j] * s + z;
      store_f32(q.data(), out + g * gs, gs);
    }
  });
}

template <typename T, typename L>
void dequant_cols(const uint8_t* codes, const T* scale, const T* zero, T* out, int64_t outer, int64_t t, int64_t n,
                  int64_t gs, L layout) {
  const int64_t tg = t / gs, nb = n / L::per;
  const int64_t rows = outer * t;
  const int64_t grain = std::max<int64_t>(1, 16384 / n);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> q(n), s(n), z(n);
    int64_t loaded = -1;  // scale/zero row currently in s, z
    for (int64_t row = begin; row < end; ++row) {
      const int64_t grp = (row / t) * tg + (row % t) / gs;
      if (grp != loaded) {
        load_f32(scale + grp * n, s.data(), n);
        load_f32(zero + grp * n, z.data(), n);
        loaded = grp;
      }
      unpack(codes + row * nb, q.data(), n, layout);
#pragma omp simd
      for (int64_t c = 0; c < n; ++c) q[c] = q[c] * s[c] + z[c];
      store_f32(q.data(), out + row * n, n);
    }
  });
}

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
                  int64_t bits, int64_t axis, const char* op) {
  for (const at::Tensor* t : {&codes, &scale, &zero, &x}) {
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous(), op, ": contiguous CPU tensors expected");
  }
  TORCH_CHECK(codes.scalar_type() == at::kByte, op, ": codes must be uint8");
  TORCH_CHECK(scale.scalar_type() == x.scalar_type() && zero.scalar_type() == x.scalar_type(), op,
              ": scale/zero must have the float tensor's dtype");
  TORCH_CHECK(bits == 2 || bits == 4 || bits == 8, op, ": bits must be 2, 4 or 8");
  TORCH_CHECK(axis == -1 || axis == -2, op, ": axis must be -1 or -2");
  TORCH_CHECK(codes.numel() * (8 / bits) == x.numel(), op, ": codes and the float tensor disagree in size");
}

}  // namespace

void quant_pack_out(const at::Tensor& x, at::Tensor& codes, at::Tensor& scale, at::Tensor& zero, int64_t bits,
                    int64_t group_size, int64_t axis) {
  check_common(codes, scale, zero, x, bits, axis, "quant_pack_out");
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
        TORCH_CHECK(group_size % L::per == 0, "quant_pack_out: group_size must fill whole bytes");
        quant_rows<T>(xp, cp, sp, zp, x.numel() / group_size, group_size, layout);
      } else {
        const int64_t t = x.size(-2);
        quant_cols<T>(xp, cp, sp, zp, x.numel() / (t * n), t, n, group_size, layout);
      }
    });
  });
}

void dequant_out(const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& zero, at::Tensor& out,
                 int64_t bits, int64_t group_size, int64_t axis) {
  check_common(codes, scale, zero, out, bits, axis, "dequant_out");
  const int64_t n = out.size(-1);
  dispatch_bits(bits, [&](auto layout) {
    dispatch_float(out.scalar_type(), "dequant_out", [&](auto tag) {
      using T = typename decltype(tag)::type;
      const uint8_t* cp = codes.const_data_ptr<uint8_t>();
      const T* sp = scale.const_data_ptr<T>();
      const T* zp = zero.const_data_ptr<T>();
      T* op = out.mutable_data_ptr<T>();
      if (axis == -1) {
        dequant_rows<T>(cp, sp, zp, op, out.numel() / group_size, group_size, layout);
      } else {
        const int64_t t = out.size(-2);
        dequant_cols<T>(cp, sp, zp, op, out.numel() / (t * n), t, n, group_size, layout);
      }
    });
  });
}

}  // namespace lrkern::cpu
