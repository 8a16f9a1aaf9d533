// ASM GEMMs on the CPU (spec asm.md 3.1, 3.4, section 4 items 3-4; reference lrkern/reference/asm_gemm.py).
//
// asm_gemm_emulate_out: the bit-exact shift-add datapath, compute bound by design (a test oracle and structural
// model). OpenMP (at::parallel_for) over tiles of kRowTile rows. Per weight, once per call: for each quartet the
// alphabet index, the total shift s + 4i and a nonzero mask, plus a sign mask, stored as int32 planes [N][Q][K] so the
// inner loop over k vectorises (AVX-512/AVX2 variable shifts and blends). Per row tile and K slice: the bank
// x * a for every a in the alphabet, built by shift-add (3x = (x<<1)+x, ..., 15x = (x<<4)-x), shared by all N
// outputs. Per MAC: for each quartet a where-chain over the |A| bank entries (the mux), a shift, an add; then the sign
// ((v ^ s) - s with s = 0 or -1) and the int32 accumulate.
//
// asm_gemm_fast_out: the fast path, an ordinary integer GEMM of the projected integers. Measured on this project's
// CPU (AMD EPYC with AVX-512 VNNI, one thread, shared machine; M x K x N = 1024 x 1152 x 128): at::_int_mm
// (int8 x int8 -> int32, oneDNN/VNNI) ~0.75 ms per int8 GEMM (this whole function: ~0.75 ms W4A4, ~1.45 ms W8A8 with
// its two planes), fp32 at::matmul ~3.5-7.5 ms (and exact only in K chunks of <= 258 for W8A8), fp64 at::matmul
// ~14 ms (always exact), int64 at::matmul ~17 ms. So the fast path is at::_int_mm, as on the GPU (spec 4 item 4):
//   - activations: a_bits = 4 go in as int8 directly; a_bits = 8 as x' = x - 128 (int8), with acc = x'.w + 128*sum_k w;
//   - weights: w_bits = 4 (|w| <= 15) go in directly; w_bits = 8 are split into the quartet planes
//     w = 16 * w_hi + w_lo (each sign * quartet, in [-15, 15]), stacked along N into one GEMM of 2N outputs.
// Every product and partial sum is an exact int32 (the op guarantees K * r_max * (2^a - 1) < 2^30), so the result is
// bit-identical to the int64 reference and to the emulation.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

#include "ops.h"

namespace lrkern::cpu {
namespace {

constexpr int64_t kRowTile = 8;   // rows sharing one pass over the weight codes
constexpr int64_t kKSlice = 256;  // bank length per row: kRowTile * |A| * kKSlice int32 (<= 64 KiB) stays in L2

// x * a by shift-add, as the pre-computer builds it (spec 3.1).
inline int32_t times(int32_t x, int a) {
  switch (a) {
    case 1: return x;
    case 3: return (x << 1) + x;
    case 5: return (x << 2) + x;
    case 7: return (x << 3) - x;
    case 9: return (x << 3) + x;
    case 11: return (x << 3) + ((x << 1) + x);
    case 13: return (x << 3) + ((x << 2) + x);
    default: return (x << 4) - x;  // 15 (the alphabet is validated: odd, 1..15)
  }
}

template <typename T>
void build_bank(const T* x, int64_t len, const std::vector<int>& alpha, int32_t* bank) {
  // bank[j * kKSlice + k] = x[k] * alpha[j]; one loop per alphabet entry so each vectorises.
  for (size_t j = 0; j < alpha.size(); ++j) {
    int32_t* dst = bank + j * kKSlice;
    switch (alpha[j]) {
#define LRKERN_BANK_CASE(A) \
  case A:                   \
    for (int64_t k = 0; k < len; ++k) dst[k] = times(static_cast<int32_t>(x[k]), A); \
    break;
      LRKERN_BANK_CASE(1)
      LRKERN_BANK_CASE(3)
      LRKERN_BANK_CASE(5)
      LRKERN_BANK_CASE(7)
      LRKERN_BANK_CASE(9)
      LRKERN_BANK_CASE(11)
      LRKERN_BANK_CASE(13)
      LRKERN_BANK_CASE(15)
#undef LRKERN_BANK_CASE
      default: TORCH_CHECK(false, "asm_gemm_emulate: alphabet element ", alpha[j], " is not an odd int in 1..15");
    }
  }
}

// acc[r * N + n] += sum_{k < ks} sign(w[n, k]) * sum_i (mux(bank_r, idx_i) << sh_i) & nz_i for rows r < rows.
template <int NA, int Q>
void emulate_slice(const int32_t* bank, int64_t rows, int64_t ks, int64_t k0, int64_t K, int64_t N,
                   const int32_t* idx, const int32_t* sh, const int32_t* nz, const int32_t* sg, int32_t* acc) {
  for (int64_t n = 0; n < N; ++n) {
    const int32_t* id_n = idx + n * Q * K + k0;
    const int32_t* sh_n = sh + n * Q * K + k0;
    const int32_t* nz_n = nz + n * Q * K + k0;
    const int32_t* sg_n = sg + n * K + k0;
    for (int64_t r = 0; r < rows; ++r) {
      const int32_t* b = bank + r * NA * kKSlice;
      int32_t sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t k = 0; k < ks; ++k) {
        int32_t v = 0;
#pragma GCC unroll 2
        for (int i = 0; i < Q; ++i) {
          const int32_t id = id_n[i * K + k];
          int32_t sel = b[k];
#pragma GCC unroll 8
          for (int j = 1; j < NA; ++j) sel = (id == j) ? b[j * kKSlice + k] : sel;  // the mux
          v += (sel << sh_n[i * K + k]) & nz_n[i * K + k];                          // shift, add
        }
        sum += (v ^ sg_n[k]) - sg_n[k];  // sign, accumulate
      }
      acc[r * N + n] += sum;
    }
  }
}

using SliceFn = void (*)(const int32_t*, int64_t, int64_t, int64_t, int64_t, int64_t, const int32_t*,
                         const int32_t*, const int32_t*, const int32_t*, int32_t*);

template <int Q>
SliceFn pick_slice(int na) {
  switch (na) {
    case 1: return emulate_slice<1, Q>;
    case 2: return emulate_slice<2, Q>;
    case 3: return emulate_slice<3, Q>;
    case 4: return emulate_slice<4, Q>;
    case 5: return emulate_slice<5, Q>;
    case 6: return emulate_slice<6, Q>;
    case 7: return emulate_slice<7, Q>;
    default: return emulate_slice<8, Q>;
  }
}

template <typename T>
void emulate(const at::Tensor& x, const at::Tensor& w, const std::vector<int>& alpha, int64_t w_bits, at::Tensor& out) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const int Q = static_cast<int>(w_bits / 4);
  const int na = static_cast<int>(alpha.size());
  // Quartet value -> (alphabet index, shift), -1 where the alphabet cannot represent it.
  int q_idx[16], q_sh[16];
  for (int q = 0; q < 16; ++q) {
    q_idx[q] = q == 0 ? 0 : -1;
    q_sh[q] = 0;
    if (q == 0) continue;
    int a = q, s = 0;
    while ((a & 1) == 0) a >>= 1, ++s;
    for (int j = 0; j < na; ++j)
      if (alpha[j] == a) q_idx[q] = j, q_sh[q] = s;
  }
  // Per weight, once: index, total shift s + 4i, nonzero mask per quartet; sign mask.
  std::vector<int32_t> idx(N * Q * K), sh(N * Q * K), nz(N * Q * K), sg(N * K);
  const int16_t* wp = w.data_ptr<int16_t>();
  std::atomic<bool> bad{false};
  at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t k = 0; k < K; ++k) {
        const int32_t wv = wp[n * K + k];
        const int32_t m = wv < 0 ? -wv : wv;
        sg[n * K + k] = wv < 0 ? -1 : 0;
        for (int i = 0; i < Q; ++i) {
          const int q = (m >> (4 * i)) & 15;
          const int64_t o = (n * Q + i) * K + k;
          if (q_idx[q] < 0) bad.store(true, std::memory_order_relaxed);
          idx[o] = std::max(q_idx[q], 0);
          sh[o] = q_sh[q] + 4 * i;
          nz[o] = q ? -1 : 0;
        }
        if (m >> (4 * Q)) bad.store(true, std::memory_order_relaxed);
      }
    }
  });
  TORCH_CHECK(!bad.load(),
              "asm_gemm_emulate: w_int holds a weight the alphabet cannot represent (the op validates this)");
  const SliceFn slice = Q == 1 ? pick_slice<1>(na) : pick_slice<2>(na);
  const T* xp = x.data_ptr<T>();
  int32_t* op = out.data_ptr<int32_t>();
  const int64_t tiles = (M + kRowTile - 1) / kRowTile;
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    std::vector<int32_t> bank(kRowTile * na * kKSlice);
    std::vector<int32_t> acc(kRowTile * N);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t m0 = t * kRowTile, rows = std::min(kRowTile, M - m0);
      std::fill(acc.begin(), acc.end(), 0);
      for (int64_t k0 = 0; k0 < K; k0 += kKSlice) {
        const int64_t ks = std::min(kKSlice, K - k0);
        for (int64_t r = 0; r < rows; ++r)  // the bank of each input x[m, k], shared by all N outputs
          build_bank<T>(xp + (m0 + r) * K + k0, ks, alpha, bank.data() + r * na * kKSlice);
        slice(bank.data(), rows, ks, k0, K, N, idx.data(), sh.data(), nz.data(), sg.data(), acc.data());
      }
      std::copy(acc.begin(), acc.begin() + rows * N, op + m0 * N);
    }
  });
}

// The int8 stores below may alias anything (char types), so every pointer and bound is copied into a local
// __restrict__ variable inside the lambda; read through the captured references, they would be reloaded after each
// store and the loops would not vectorise.
template <typename T>
void to_int8_activations(const at::Tensor& x, int64_t a_bits, at::Tensor& x8) {
  const T* xp = x.data_ptr<T>();
  int8_t* dp = x8.data_ptr<int8_t>();
  const int32_t off = a_bits == 8 ? 128 : 0;  // x' = x - 128 for 8-bit activations
  at::parallel_for(0, x.numel(), 65536, [&](int64_t b, int64_t e) {
    const T* __restrict__ src = xp;
    int8_t* __restrict__ dst = dp;
    const int32_t o = off;
    for (int64_t i = b; i < e; ++i) dst[i] = static_cast<int8_t>(static_cast<int32_t>(src[i]) - o);
  });
}

void check_common(const at::Tensor& x, const at::Tensor& w, const at::Tensor& out, int64_t w_bits) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "asm_gemm: x [M, K] and w [N, K] expected");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && out.is_contiguous(), "asm_gemm: contiguous tensors expected");
  TORCH_CHECK(w.scalar_type() == at::kShort, "asm_gemm: w_int must be int16");
  TORCH_CHECK(out.scalar_type() == at::kInt && out.size(0) == x.size(0) && out.size(1) == w.size(0),
              "asm_gemm: out must be int32 [M, N]");
  TORCH_CHECK(w_bits == 4 || w_bits == 8, "asm_gemm: w_bits must be 4 or 8");
}

}  // namespace

void asm_gemm_emulate_out(const at::Tensor& x, const at::Tensor& w, const std::vector<int64_t>& alphabet,
                          int64_t w_bits, at::Tensor& out) {
  check_common(x, w, out, w_bits);
  TORCH_CHECK(!alphabet.empty() && alphabet.size() <= 8, "asm_gemm_emulate: 1..8 alphabet entries expected");
  std::vector<int> alpha(alphabet.begin(), alphabet.end());
  switch (x.scalar_type()) {
    case at::kByte: emulate<uint8_t>(x, w, alpha, w_bits, out); break;
    case at::kShort: emulate<int16_t>(x, w, alpha, w_bits, out); break;
    case at::kInt: emulate<int32_t>(x, w, alpha, w_bits, out); break;
    default: TORCH_CHECK(false, "asm_gemm_emulate: x_int must be uint8, int16 or int32, got ", x.scalar_type());
  }
}

void asm_gemm_fast_out(const at::Tensor& x, const at::Tensor& w, int64_t w_bits, int64_t a_bits, at::Tensor& out) {
  check_common(x, w, out, w_bits);
  TORCH_CHECK(a_bits == 4 || a_bits == 8, "asm_gemm: a_bits must be 4 or 8");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor x8;
  if (x.scalar_type() == at::kByte && a_bits == 4) {
    x8 = x.view(at::kChar);  // 0..15: the same bytes as int8
  } else {
    x8 = at::empty({M, K}, x.options().dtype(at::kChar));
    switch (x.scalar_type()) {
      case at::kByte: to_int8_activations<uint8_t>(x, a_bits, x8); break;
      case at::kShort: to_int8_activations<int16_t>(x, a_bits, x8); break;
      case at::kInt: to_int8_activations<int32_t>(x, a_bits, x8); break;
      default: TORCH_CHECK(false, "asm_gemm: x_int must be uint8, int16 or int32, got ", x.scalar_type());
    }
  }
  const int64_t planes = w_bits == 8 ? 2 : 1;
  at::Tensor w8 = at::empty({planes * N, K}, w.options().dtype(at::kChar));
  std::vector<int32_t> colsum(N, 0);  // sum_k w[n, k], for the x - 128 offset
  const int16_t* wp = w.data_ptr<int16_t>();
  int8_t* w8p = w8.data_ptr<int8_t>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    const int16_t* __restrict__ src = wp;
    int8_t* __restrict__ dst = w8p;
    int32_t* __restrict__ sums = colsum.data();
    const int64_t kk = K, nn = N;
    for (int64_t n = n0; n < n1; ++n) {
      const int16_t* __restrict__ row = src + n * kk;
      int32_t s = 0;
      for (int64_t k = 0; k < kk; ++k) s += row[k];
      sums[n] = s;
      if (planes == 1) {
        int8_t* __restrict__ d = dst + n * kk;
        for (int64_t k = 0; k < kk; ++k) d[k] = static_cast<int8_t>(row[k]);
      } else {  // quartet planes carrying the sign: v = 16 * hi + lo
        int8_t* __restrict__ dh = dst + n * kk;
        int8_t* __restrict__ dl = dst + (nn + n) * kk;
        for (int64_t k = 0; k < kk; ++k) {
          const int32_t v = row[k];
          const int32_t m = v < 0 ? -v : v;
          const int32_t hi = m >> 4, lo = m & 15;
          dh[k] = static_cast<int8_t>(v < 0 ? -hi : hi);
          dl[k] = static_cast<int8_t>(v < 0 ? -lo : lo);
        }
      }
    }
  });
  // mat2 = w8^T [K, planes * N] (column-major view). At K = 1 that view has strides (1, 1), which at::_int_mm on the
  // CPU (torch 2.13) misreads (garbage output), so there the same bytes go in as the row-major [1, planes * N].
  const at::Tensor mat2 = K == 1 ? w8.view({1, planes * N}) : w8.t();
  if (planes == 1 && a_bits == 4) {
    at::_int_mm_out(out, x8, mat2);
    return;
  }
  const at::Tensor p = at::_int_mm(x8, mat2);  // [M, planes * N] int32
  const int32_t* pp = p.data_ptr<int32_t>();
  int32_t* op = out.data_ptr<int32_t>();
  const int32_t off = a_bits == 8 ? 128 : 0;
  const int64_t ld = planes * N;
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const int32_t* row = pp + m * ld;
      int32_t* o = op + m * N;
      if (planes == 2) {
        for (int64_t n = 0; n < N; ++n) o[n] = 16 * row[n] + row[N + n] + off * colsum[n];
      } else {
        for (int64_t n = 0; n < N; ++n) o[n] = row[n] + off * colsum[n];
      }
    }
  });
}

}  // namespace lrkern::cpu
