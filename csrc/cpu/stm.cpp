// Spiking Temporal Modulator fused over time (lrkern formulation; the maths is lrkern/reference/stm.py): an LIF
// neuron with per-channel tau / theta0 / beta, a per-(b, c) input gain and a dynamic threshold driven by a spike trace.
//
// Tensors are [T, B, C, S] (S: the flattened spatial dims), so the neurons of one (b, c) pair are a contiguous row of
// S per time step and share every parameter. Work items are groups of whole rows (at::parallel_for over them): as
// many rows as fit in a chunk of kBlock neurons when rows are short (a 6x6 map is 36 neurons), else one row walked in
// chunks of kBlock. Per chunk the time loop runs inside with the membrane (forward) or the gradient carries
// (backward) in fp32 buffers that stay in L1, and each lane's parameters (its row's tau, theta0, beta, gain) sit in
// per-lane arrays, so the inner `omp simd` loop is the LIF kernel's loop (lif.cpp) plus the threshold and trace terms
// over the whole chunk. Flags that change the loop's shape are template parameters; detach_reset is a factor of 0 or
// 1 on the reset term.
//
// Exactness: every value is computed in fp32 with the reference's operations in the reference's order (tau divides,
// never a reciprocal multiply; the fire test is the non-strict h >= theta; rho, v_reset and the surrogate constants
// are rounded to fp32 as torch rounds a wrapped Python float). setup.py builds with -ffp-contract=off, so fp32 spikes,
// h and v_last are bit-identical to the reference. A missing gain is a gain of 1 (1 * u is u exactly); a missing beta
// drops the trace.
//
// Backward: with beta, the trace before each step is first rebuilt by a forward sweep over the saved spikes into a
// per-task fp32 scratch [T, kBlock] (the same fp32 operations as the forward, so theta is bit-identical), then the
// reverse sweep reads it. Parameter gradients are accumulated per neuron over t in fp32 buffers, then summed over each
// row in double; a row lies in one work item, so the sums are deterministic for any thread count. With u the backward
// also rebuilds V[t-1] from the stored H[t-1] and S[t-1] (v0 at t = 0) for the tau gradient; the H / S rows loaded
// for it are reused by the next (earlier) step, so each is still read once.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "convert.h"
#include "fast_math.h"
#include "neuron.h"
#include "ops.h"

namespace lrkern::cpu {
namespace {

// Neurons per chunk: the backward's 19 fp32 chunk buffers (lanes included) take 38 KiB, its trace scratch T * 2 KiB.
constexpr int64_t kBlock = 512;

// The reference's Python-float constants as torch uses them in fp32 ops.
struct StmConsts {
  float rho;        // trace decay
  float v_reset;    // hard reset value, and v_reset in dV/dH
  float v_charge;   // the charge's v_reset: 0 under soft reset
  float alpha;      // surrogate slope
  float atan_c;     // fp32(pi / 2 * alpha), formed in double
  float atan_half;  // fp32(alpha / 2)
  bool detach;      // detach_reset
};

// Per-lane parameters of a chunk, [kBlock] floats each: every lane holds its (b, c) row's values, so one chunk can
// span several short rows (a 6x6 map is 36 neurons: alone, it would leave the vector loop mostly to its scalar tail).
struct Lanes {
  float* g;     // gain (1 without one)
  float* tau;   // tau_c
  float* th0;   // theta0_c
  float* beta;  // beta_c (unused without beta)
  float* k;     // 1 - 1 / tau_c in fp32, as the reference forms it
};
constexpr int64_t kLaneArrays = 5;

Lanes lanes_at(float* p) { return Lanes{p, p + kBlock, p + 2 * kBlock, p + 3 * kBlock, p + 4 * kBlock}; }

// The problem: T steps of n = rows * row_len neurons, rows = B * C; parameter pointers (gain, beta may be null).
struct Geometry {
  int64_t steps, n, rows, row_len, nc;
  const float *gain, *tau, *theta0, *beta;
};

// Fills the lanes of the chunk [j0, j0 + len) (flat neuron indices of one time step) with its rows' parameters.
void fill_lanes(const Lanes& l, int64_t j0, int64_t len, const Geometry& geo) {
  for (int64_t j = 0; j < len;) {
    const int64_t r = (j0 + j) / geo.row_len;
    const int64_t end = std::min(len, (r + 1) * geo.row_len - j0);
    const int64_t ch = r % geo.nc;
    const float tau = geo.tau[ch];
    std::fill(l.g + j, l.g + end, geo.gain ? geo.gain[r] : 1.0f);
    std::fill(l.tau + j, l.tau + end, tau);
    std::fill(l.th0 + j, l.th0 + end, geo.theta0[ch]);
    std::fill(l.beta + j, l.beta + end, geo.beta ? geo.beta[ch] : 0.0f);
    std::fill(l.k + j, l.k + end, 1.0f - 1.0f / tau);
    j = end;
  }
}

StmConsts make_consts(double rho, double v_reset, bool soft_reset, double alpha, bool detach) {
  StmConsts c;
  c.rho = static_cast<float>(rho);
  c.v_reset = static_cast<float>(v_reset);
  c.v_charge = soft_reset ? 0.0f : static_cast<float>(v_reset);
  c.alpha = static_cast<float>(alpha);
  c.atan_c = static_cast<float>(M_PI / 2.0 * alpha);
  c.atan_half = static_cast<float>(alpha / 2.0);
  c.detach = detach;
  return c;
}


// A row segment as fp32: the tensor's own memory for fp32, else widened into buf.
template <typename T>
inline const float* as_f32(const T* src, float* buf, int64_t len) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    load_f32(src, buf, len);
    return buf;
  }
}

// One time step over a chunk: u in, membrane v and trace a updated in place, h / s out (all fp32).
template <bool SOFT, bool DECAY, bool BETA>
inline void forward_step(const float* __restrict u, float* __restrict v, float* __restrict a, float* __restrict h,
                         float* __restrict s, int64_t len, const StmConsts& c, const Lanes& l) {
  const float *__restrict g = l.g, *__restrict tau = l.tau, *__restrict th0 = l.th0, *__restrict beta = l.beta;
  const float vr = c.v_charge, v_reset = c.v_reset, rho = c.rho;
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) {
    const float x = g[j] * u[j];
    const float vv = v[j];
    const float hh = DECAY ? vv + (x - (vv - vr)) / tau[j] : vv - (vv - vr) / tau[j] + x;
    const float th = BETA ? th0[j] + beta[j] * a[j] : th0[j];
    const bool fire = hh >= th;
    const float sp = fire ? 1.0f : 0.0f;
    v[j] = SOFT ? (fire ? hh - th : hh) : (fire ? v_reset : hh);
    h[j] = hh;
    s[j] = sp;
    if constexpr (BETA) a[j] = rho * a[j] + sp;
  }
}

template <typename T, bool SOFT, bool DECAY, bool BETA>
void forward_chunk(const T* u, const float* v0, T* s, T* h, float* v_last, int64_t steps, int64_t n, int64_t j0,
                   int64_t len, const StmConsts& c, const Lanes& l, float* buf) {
  constexpr bool kF32 = std::is_same_v<T, float>;
  float *v = buf, *a = buf + kBlock, *xb = buf + 2 * kBlock, *hb = buf + 3 * kBlock, *sb = buf + 4 * kBlock;
  std::memcpy(v, v0 + j0, len * sizeof(float));
  if constexpr (BETA) std::fill(a, a + len, 0.0f);
  for (int64_t t = 0; t < steps; ++t) {
    const int64_t off = t * n + j0;
    if constexpr (kF32) {
      forward_step<SOFT, DECAY, BETA>(u + off, v, a, h + off, s + off, len, c, l);
    } else {
      load_f32(u + off, xb, len);
      forward_step<SOFT, DECAY, BETA>(xb, v, a, hb, sb, len, c, l);
      store_f32(hb, h + off, len);
      store_f32(sb, s + off, len);  // 0 / 1: exact in every dtype
    }
  }
  std::memcpy(v_last + j0, v, len * sizeof(float));
}

// V[t-1] of the forward, rebuilt from H[t-1], S[t-1] and the trace before step t-1 (a_prev).
template <bool SOFT, bool BETA>
inline void rebuild_v(const float* __restrict hp, const float* __restrict sp, const float* __restrict a_prev,
                      float* __restrict vp, int64_t len, const StmConsts& c, const Lanes& l) {
  const float *__restrict th0 = l.th0, *__restrict beta = l.beta;
  const float v_reset = c.v_reset;
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) {
    const float th = BETA ? th0[j] + beta[j] * a_prev[j] : th0[j];
    const bool fired = sp[j] != 0.0f;
    vp[j] = SOFT ? (fired ? hp[j] - th : hp[j]) : (fired ? v_reset : hp[j]);
  }
}

// Per-chunk fp32 accumulators of the parameter gradients (sums over t per neuron).
struct Acc {
  float* gain;
  float* tau;
  float* theta0;
  float* beta;
};

// One reverse time step over a chunk: the carries gV (carry) and gA (ga) updated in place, gu out, sums accumulated.
template <bool SOFT, bool DECAY, bool BETA, bool ATAN, bool PARAMS>
inline void backward_step(const float* __restrict gs, const float* __restrict h, const float* __restrict s,
                          const float* __restrict a, const float* __restrict u, const float* __restrict vp,
                          float* __restrict carry, float* __restrict ga, float* __restrict gu, const Acc& acc,
                          int64_t len, const StmConsts& c, const Lanes& l) {
  const float *__restrict g = l.g, *__restrict tau = l.tau, *__restrict th0 = l.th0, *__restrict beta = l.beta,
                          *__restrict k = l.k;
  const float v_reset = c.v_reset, vr = c.v_charge, rho = c.rho;
  const float keep = c.detach ? 0.0f : 1.0f;  // a factor, not a select: a bool in the loop blocks vectorisation
  float *__restrict acc_g = acc.gain, *__restrict acc_tau = acc.tau, *__restrict acc_th = acc.theta0,
                    *__restrict acc_b = acc.beta;
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) {
    const float hh = h[j];
    const float ss = s[j];
    const float gv = carry[j];
    const float th = BETA ? th0[j] + beta[j] * a[j] : th0[j];
    const float psi = surrogate<ATAN>(hh - th, c);
    const float gsum = BETA ? gs[j] + ga[j] : gs[j];
    const float gsp = gsum * psi;
    const float q = keep * (SOFT ? -(th * psi) : (v_reset - hh) * psi);  // detach_reset: 0 (a signed zero)
    const float dvdh = SOFT ? 1.0f + q : (1.0f - ss) + q;
    const float gh = gsp + gv * dvdh;
    float gth = -(gsp + gv * q);
    if constexpr (SOFT) gth = gth - gv * ss;
    const float gx = DECAY ? gh / tau[j] : gh;
    gu[j] = g[j] * gx;
    carry[j] = gh * k[j];
    acc_th[j] += gth;
    if constexpr (BETA) {
      acc_b[j] += gth * a[j];
      ga[j] = rho * ga[j] + beta[j] * gth;
    }
    if constexpr (PARAMS) {
      const float uu = u[j];
      const float x = g[j] * uu;
      acc_g[j] += uu * gx;
      acc_tau[j] += gh * (DECAY ? x - (vp[j] - vr) : vp[j] - vr);
    }
  }
}

// Chunk buffers, in floats. Forward: v, a, u, h, s, then the lanes. Backward: carry, ga, gs, two h and two s (the
// current step's and the previous step's), u, v_prev, gu, 4 accumulators, the lanes, then the trace scratch
// [steps, kBlock].
constexpr int64_t kFwdFloats = (5 + kLaneArrays) * kBlock;
constexpr int64_t kBwdBuffers = 14;
constexpr int64_t kBwdFloats = (kBwdBuffers + kLaneArrays) * kBlock;

template <typename T, bool SOFT, bool DECAY, bool BETA, bool ATAN, bool PARAMS>
void backward_chunk(const T* gs, const float* gv_last, const T* u, const float* v0, const T* h, const T* s, T* gu,
                    float* gv0, int64_t steps, int64_t n, int64_t j0, int64_t len, const StmConsts& c,
                    const Lanes& l, float* buf, int64_t row_len, int64_t r_first, double* row_sums) {
  constexpr bool kF32 = std::is_same_v<T, float>;
  float* carry = buf;
  float* ga = buf + kBlock;
  float* gsb = buf + 2 * kBlock;
  float* hbuf[2] = {buf + 3 * kBlock, buf + 4 * kBlock};
  float* sbuf[2] = {buf + 5 * kBlock, buf + 6 * kBlock};
  float* ub = buf + 7 * kBlock;
  float* vpb = buf + 8 * kBlock;
  float* gub = buf + 9 * kBlock;
  const Acc acc{buf + 10 * kBlock, buf + 11 * kBlock, buf + 12 * kBlock, buf + 13 * kBlock};
  float* scratch = buf + kBwdFloats;  // [steps, kBlock]: the trace before each step
  std::memcpy(carry, gv_last + j0, len * sizeof(float));
  std::fill(ga, ga + len, 0.0f);
  for (float* a : {acc.gain, acc.tau, acc.theta0, acc.beta}) std::fill(a, a + len, 0.0f);
  if constexpr (BETA) {
    // A[-1] = 0; A[t] = rho A[t-1] + S[t], in the forward's fp32 order.
    std::fill(scratch, scratch + len, 0.0f);
    const float rho = c.rho;
    for (int64_t t = 0; t + 1 < steps; ++t) {
      const float* st = as_f32(s + t * n + j0, sbuf[0], len);
      const float* a = scratch + t * kBlock;
      float* an = scratch + (t + 1) * kBlock;
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) an[j] = rho * a[j] + st[j];
    }
  }
  int cur = 0;
  const float* ht = nullptr;
  const float* st = nullptr;
  for (int64_t t = steps - 1; t >= 0; --t) {
    const int64_t off = t * n + j0;
    if (!PARAMS || t == steps - 1) {  // under PARAMS later steps reuse the rows loaded for the V[t-1] rebuild
      ht = as_f32(h + off, hbuf[cur], len);
      st = as_f32(s + off, sbuf[cur], len);
    }
    const float* gst = as_f32(gs + off, gsb, len);
    const float* at = BETA ? scratch + t * kBlock : nullptr;
    const float* ut = nullptr;
    const float* vp = nullptr;
    const float* hp = nullptr;
    const float* sp = nullptr;
    if constexpr (PARAMS) {
      ut = as_f32(u + off, ub, len);
      if (t > 0) {
        hp = as_f32(h + off - n, hbuf[1 - cur], len);
        sp = as_f32(s + off - n, sbuf[1 - cur], len);
        rebuild_v<SOFT, BETA>(hp, sp, BETA ? scratch + (t - 1) * kBlock : nullptr, vpb, len, c, l);
        vp = vpb;
      } else {
        vp = v0 + j0;
      }
    }
    float* gut = kF32 ? reinterpret_cast<float*>(gu + off) : gub;
    backward_step<SOFT, DECAY, BETA, ATAN, PARAMS>(gst, ht, st, at, ut, vp, carry, ga, gut, acc, len, c, l);
    if constexpr (!kF32) store_f32(gub, gu + off, len);
    if constexpr (PARAMS) {
      ht = hp;
      st = sp;
      cur = 1 - cur;
    }
  }
  std::memcpy(gv0 + j0, carry, len * sizeof(float));
  // Each row's segment of the chunk, summed in double into that row's 4 sums (row_sums[4 (r - r_first) + i]).
  const float* sums[4] = {acc.gain, acc.tau, acc.theta0, acc.beta};
  for (int64_t j = 0; j < len;) {
    const int64_t r = (j0 + j) / row_len;
    const int64_t end = std::min(len, (r + 1) * row_len - j0);
    for (int i = 0; i < 4; ++i) {
      double total = 0.0;
      for (int64_t jj = j; jj < end; ++jj) total += sums[i][jj];
      row_sums[4 * (r - r_first) + i] += total;
    }
    j = end;
  }
}

// Work items are groups of whole rows: as many as fit in one kBlock chunk when rows are short, else one row, walked
// in chunks of kBlock. A row never spans two items, so its parameter sums come from one task, in a fixed order.
inline int64_t rows_per_item(const Geometry& geo) { return std::max<int64_t>(1, kBlock / geo.row_len); }

// Runs body(r0, r1, j0, len, buf) over every chunk [j0, j0 + len) of every item [r0, r1) in parallel, then
// done(r0, r1, dbuf) per item; ~64K element-steps per task at least, so small problems stay on the calling thread.
// Each task owns zeroed buffers of `floats` floats (the chunk's lanes filled at lanes_offset) and 4 doubles per row.
template <typename F, typename D>
void for_chunks(const Geometry& geo, int64_t floats, int64_t lanes_offset, F&& body, D&& done) {
  const int64_t per_item = rows_per_item(geo);
  const int64_t items = (geo.rows + per_item - 1) / per_item;
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, per_item * geo.row_len * geo.steps));
  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(static_cast<size_t>(floats), 0.0f);
    std::vector<double> dbuf(static_cast<size_t>(4 * per_item));
    const Lanes lanes = lanes_at(buf.data() + lanes_offset);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r0 = i * per_item, r1 = std::min(geo.rows, r0 + per_item);
      std::fill(dbuf.begin(), dbuf.end(), 0.0);
      for (int64_t j0 = r0 * geo.row_len; j0 < r1 * geo.row_len; j0 += kBlock) {
        const int64_t len = std::min(kBlock, r1 * geo.row_len - j0);
        fill_lanes(lanes, j0, len, geo);
        body(r0, j0, len, lanes, buf.data(), dbuf.data());
      }
      done(r0, r1, dbuf.data());
    }
  });
}

void check_cpu_contiguous(const char* op, std::initializer_list<const at::Tensor*> ts) {
  for (const at::Tensor* t : ts) {
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous(), op, ": contiguous CPU tensors expected");
  }
}

// Validates the parameter tensors against a [T, B, C, S] tensor; returns (B, C).
std::pair<int64_t, int64_t> check_params(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& gain,
                                         const at::Tensor& tau, const at::Tensor& theta0,
                                         const std::optional<at::Tensor>& beta) {
  TORCH_CHECK(x.dim() == 4, op, ": tensors must be [T, B, C, S]");
  const int64_t nb = x.size(1), nc = x.size(2);
  check_cpu_contiguous(op, {&tau, &theta0});
  TORCH_CHECK(tau.scalar_type() == at::kFloat && theta0.scalar_type() == at::kFloat && tau.numel() == nc &&
                  theta0.numel() == nc,
              op, ": tau and theta0 must be float32 [C]");
  if (beta) {
    check_cpu_contiguous(op, {&*beta});
    TORCH_CHECK(beta->scalar_type() == at::kFloat && beta->numel() == nc, op, ": beta must be float32 [C]");
  }
  if (gain) {
    check_cpu_contiguous(op, {&*gain});
    TORCH_CHECK(gain->scalar_type() == at::kFloat && gain->numel() == nb * nc, op, ": gain must be float32 [B, C]");
  }
  return {nb, nc};
}

}  // namespace

void stm_forward_out(const at::Tensor& u, const at::Tensor& v0, const std::optional<at::Tensor>& gain,
                     const at::Tensor& tau, const at::Tensor& theta0, const std::optional<at::Tensor>& beta,
                     at::Tensor& s, at::Tensor& h, at::Tensor& v_last, double rho, double v_reset, bool soft_reset,
                     bool decay_input) {
  constexpr const char* op = "stm_forward_out";
  check_cpu_contiguous(op, {&u, &v0, &s, &h, &v_last});
  const auto [nb, nc] = check_params(op, u, gain, tau, theta0, beta);
  const int64_t steps = u.size(0), row_len = u.size(3), rows = nb * nc, n = rows * row_len;
  TORCH_CHECK(s.sizes() == u.sizes() && h.sizes() == u.sizes() && s.scalar_type() == u.scalar_type() &&
                  h.scalar_type() == u.scalar_type(),
              op, ": s and h must match u");
  TORCH_CHECK(v0.scalar_type() == at::kFloat && v_last.scalar_type() == at::kFloat && v0.numel() == n &&
                  v_last.numel() == n,
              op, ": v0 and v_last must be float32 [B, C, S]");
  const StmConsts c = make_consts(rho, v_reset, soft_reset, 1.0, false);
  if (n == 0) return;
  const Geometry geo{steps, n, rows, row_len, nc, gain ? gain->const_data_ptr<float>() : nullptr,
                     tau.const_data_ptr<float>(), theta0.const_data_ptr<float>(),
                     beta ? beta->const_data_ptr<float>() : nullptr};
  dispatch_float(u.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* up = u.const_data_ptr<T>();
    const float* v0p = v0.const_data_ptr<float>();
    T* sp = s.mutable_data_ptr<T>();
    T* hp = h.mutable_data_ptr<T>();
    float* vlp = v_last.mutable_data_ptr<float>();
    dispatch_bool(soft_reset, [&](auto soft) {
      dispatch_bool(decay_input, [&](auto decay) {
        dispatch_bool(geo.beta != nullptr, [&](auto has_beta) {
          for_chunks(
              geo, kFwdFloats, 5 * kBlock,
              [&](int64_t, int64_t j0, int64_t len, const Lanes& l, float* buf, double*) {
                forward_chunk<T, decltype(soft)::value, decltype(decay)::value, decltype(has_beta)::value>(
                    up, v0p, sp, hp, vlp, steps, n, j0, len, c, l, buf);
              },
              [](int64_t, int64_t, double*) {});
        });
      });
    });
  });
}

void stm_backward_out(const at::Tensor& grad_s, const at::Tensor& grad_v_last, const std::optional<at::Tensor>& u,
                      const at::Tensor& v0, const at::Tensor& h, const at::Tensor& s,
                      const std::optional<at::Tensor>& gain, const at::Tensor& tau, const at::Tensor& theta0,
                      const std::optional<at::Tensor>& beta, at::Tensor& grad_u, at::Tensor& grad_v0,
                      at::Tensor& grad_params, double rho, double v_reset, bool soft_reset, bool decay_input,
                      bool detach_reset, int64_t surrogate_kind, double alpha) {
  constexpr const char* op = "stm_backward_out";
  check_cpu_contiguous(op, {&grad_s, &grad_v_last, &v0, &h, &s, &grad_u, &grad_v0, &grad_params});
  const auto [nb, nc] = check_params(op, h, gain, tau, theta0, beta);
  const int64_t steps = h.size(0), row_len = h.size(3), rows = nb * nc, n = rows * row_len;
  TORCH_CHECK(grad_s.sizes() == h.sizes() && s.sizes() == h.sizes() && grad_u.sizes() == h.sizes(), op,
              ": grad_s, s and grad_u must match h");
  TORCH_CHECK(grad_s.scalar_type() == h.scalar_type() && s.scalar_type() == h.scalar_type() &&
                  grad_u.scalar_type() == h.scalar_type(),
              op, ": grad_s, s and grad_u must have h's dtype");
  if (u) {
    check_cpu_contiguous(op, {&*u});
    TORCH_CHECK(u->sizes() == h.sizes() && u->scalar_type() == h.scalar_type(), op, ": u must match h");
    TORCH_CHECK(v0.scalar_type() == at::kFloat && v0.numel() == n, op, ": v0 must be float32 [B, C, S]");
  }
  TORCH_CHECK(grad_v_last.scalar_type() == at::kFloat && grad_v0.scalar_type() == at::kFloat &&
                  grad_v_last.numel() == n && grad_v0.numel() == n,
              op, ": grad_v_last and grad_v0 must be float32 [B, C, S]");
  TORCH_CHECK(grad_params.scalar_type() == at::kFloat && grad_params.numel() == 4 * rows, op,
              ": grad_params must be float32 [4, B, C]");
  TORCH_CHECK(surrogate_kind == 0 || surrogate_kind == 1, op, ": surrogate_kind must be 0 (sigmoid) or 1 (atan)");
  const StmConsts c = make_consts(rho, v_reset, soft_reset, alpha, detach_reset);
  float* gpp = grad_params.mutable_data_ptr<float>();
  if (n == 0 || steps == 0) {
    grad_params.zero_();
    if (n > 0) std::memcpy(grad_v0.mutable_data_ptr<float>(), grad_v_last.const_data_ptr<float>(), n * sizeof(float));
    return;
  }
  const Geometry geo{steps, n, rows, row_len, nc, gain ? gain->const_data_ptr<float>() : nullptr,
                     tau.const_data_ptr<float>(), theta0.const_data_ptr<float>(),
                     beta ? beta->const_data_ptr<float>() : nullptr};
  const bool has_beta_v = geo.beta != nullptr;
  const double tau_sign = decay_input ? -1.0 : 1.0;
  dispatch_float(h.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* gsp = grad_s.const_data_ptr<T>();
    const float* gvlp = grad_v_last.const_data_ptr<float>();
    const T* up = u ? u->const_data_ptr<T>() : nullptr;
    const float* v0p = v0.const_data_ptr<float>();
    const T* hp = h.const_data_ptr<T>();
    const T* sp = s.const_data_ptr<T>();
    T* gup = grad_u.mutable_data_ptr<T>();
    float* gv0p = grad_v0.mutable_data_ptr<float>();
    const int64_t floats = kBwdFloats + (has_beta_v ? steps : 0) * kBlock;
    dispatch_bool(soft_reset, [&](auto soft) {
      dispatch_bool(decay_input, [&](auto decay) {
        dispatch_bool(has_beta_v, [&](auto has_beta) {
          dispatch_bool(surrogate_kind == 1, [&](auto atan) {
            dispatch_bool(up != nullptr, [&](auto params) {
              for_chunks(
                  geo, floats, kBwdBuffers * kBlock,
                  [&](int64_t r0, int64_t j0, int64_t len, const Lanes& l, float* buf, double* sums) {
                    backward_chunk<T, decltype(soft)::value, decltype(decay)::value, decltype(has_beta)::value,
                                   decltype(atan)::value, decltype(params)::value>(
                        gsp, gvlp, up, v0p, hp, sp, gup, gv0p, steps, n, j0, len, c, l, buf, row_len, r0, sums);
                  },
                  [&](int64_t r0, int64_t r1, double* sums) {
                    for (int64_t r = r0; r < r1; ++r) {
                      const double* rs = sums + 4 * (r - r0);
                      const double tau64 = static_cast<double>(geo.tau[r % nc]);
                      gpp[r] = up ? static_cast<float>(rs[0]) : 0.0f;
                      gpp[rows + r] = up ? static_cast<float>(rs[1] / (tau64 * tau64) * tau_sign) : 0.0f;
                      gpp[2 * rows + r] = static_cast<float>(rs[2]);
                      gpp[3 * rows + r] = has_beta_v ? static_cast<float>(rs[3]) : 0.0f;
                    }
                  });
            });
          });
        });
      });
    });
  });
}

}  // namespace lrkern::cpu
