// Multi-step LIF neuron fused over time (SpikingJelly LIFNode semantics; the maths is lrkern/reference/lif.py).
//
// Both directions give each task a range of neuron blocks; per block of kBlock neurons the time loop runs inside,
// with the membrane (forward) or the gradient carry (backward) in an fp32 block buffer that stays in L1. The inner
// loop over the block is branch-free (fire / reset and the option choices are selects or compile-time) and
// vectorises under `omp simd`. Every value is computed in fp32 with the reference's operations in the reference's
// order: tau divides (never a reciprocal multiply), the fire test is the non-strict h >= v_threshold, and every
// Python-float constant is rounded to fp32 the way torch rounds a wrapped scalar (1 - 1/tau and pi/2 * alpha are
// formed in double first, as Python does). setup.py builds with -ffp-contract=off, so no FMA merges two of the
// reference's operations: fp32 spikes, H, v_last and v_seq are bit-identical to the reference.
//
// fp16 / bf16: x rows are widened to fp32 buffers, H is rounded once to x's dtype on store, and the spikes come from
// the fp32 compare (never from the rounded H). The backward reads H and S in their storage dtype, as the reference
// does, and rounds grad_x once.
//
// The sigmoid surrogate's exp is exp_f32 from fast_math.h (branch-free, so it vectorises; std::exp is a libm call
// that would not): within 1 ulp, like torch's vectorised exp, far inside the gradients' error-ratio tolerance.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "convert.h"
#include "fast_math.h"
#include "neuron.h"
#include "ops.h"

namespace lrkern::cpu {
namespace {

// Neurons per block: the fp32 state and row buffers of a block (5 x 2 KiB in the backward) stay in L1, and each
// row segment read or written per time step is two pages' worth of contiguous memory for the prefetchers.
constexpr int64_t kBlock = 512;

// The reference's Python-float constants as torch uses them in fp32 ops.
struct LifConsts {
  float tau;        // divisor of the charge and of grad_x
  float v_th;       // fire threshold (and soft-reset subtrahend)
  float v_reset;    // hard reset value, and v_reset in dV/dH
  float v_charge;   // the charge's v_reset: 0 under soft reset
  float alpha;      // surrogate slope
  float atan_c;     // fp32(pi / 2 * alpha), formed in double
  float atan_half;  // fp32(alpha / 2)
  float carry_k;    // fp32(1 - 1 / tau), formed in double
};

LifConsts make_consts(double tau, double v_threshold, double v_reset, bool soft_reset, double alpha) {
  LifConsts c;
  c.tau = static_cast<float>(tau);
  c.v_th = static_cast<float>(v_threshold);
  c.v_reset = static_cast<float>(v_reset);
  c.v_charge = soft_reset ? 0.0f : static_cast<float>(v_reset);
  c.alpha = static_cast<float>(alpha);
  c.atan_c = static_cast<float>(M_PI / 2.0 * alpha);
  c.atan_half = static_cast<float>(alpha / 2.0);
  c.carry_k = static_cast<float>(1.0 - 1.0 / tau);
  return c;
}

// One time step over a block: x in, membrane v updated in place, h / s / v_seq out (all fp32).
template <bool SOFT, bool DECAY, bool STORE>
inline void forward_step(const float* __restrict x, float* __restrict v, float* __restrict h, float* __restrict s,
                         float* __restrict vs, int64_t len, const LifConsts& c) {
  const float tau = c.tau, v_th = c.v_th, v_reset = c.v_reset, vr = c.v_charge;
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) {
    const float vv = v[j];
    const float hh = DECAY ? vv + (x[j] - (vv - vr)) / tau : vv - (vv - vr) / tau + x[j];
    const bool fire = hh >= v_th;
    const float vn = SOFT ? (fire ? hh - v_th : hh) : (fire ? v_reset : hh);
    h[j] = hh;
    s[j] = fire ? 1.0f : 0.0f;
    v[j] = vn;
    if constexpr (STORE) vs[j] = vn;
  }
}

// Per-task fp32 block buffers (zeroed once per task; every use writes a prefix before reading it).
struct alignas(64) BlockBuffers {
  float b[5][kBlock];
};

template <typename T, bool SOFT, bool DECAY, bool STORE>
void forward_block(const T* x, const float* v0, T* s, T* h, float* v_last, float* v_seq, int64_t steps, int64_t n,
                   int64_t j0, int64_t len, const LifConsts& c, BlockBuffers& buf) {
  constexpr bool kF32 = std::is_same_v<T, float>;
  float *v = buf.b[0], *xb = buf.b[1], *hb = buf.b[2], *sb = buf.b[3];
  std::memcpy(v, v0 + j0, len * sizeof(float));
  for (int64_t t = 0; t < steps; ++t) {
    const int64_t off = t * n + j0;
    float* vs = STORE ? v_seq + off : nullptr;
    if constexpr (kF32) {
      forward_step<SOFT, DECAY, STORE>(x + off, v, h + off, s + off, vs, len, c);
    } else {
      load_f32(x + off, xb, len);
      forward_step<SOFT, DECAY, STORE>(xb, v, hb, sb, vs, len, c);
      store_f32(hb, h + off, len);
      store_f32(sb, s + off, len);  // 0 / 1: exact in every dtype
    }
  }
  std::memcpy(v_last + j0, v, len * sizeof(float));
}

// One reverse time step over a block: carry (the gradient reaching V after step t) updated in place, gx out.
template <bool SOFT, bool DECAY, bool DETACH, bool ATAN, bool SEQ>
inline void backward_step(const float* __restrict gs, const float* __restrict gvs, const float* __restrict h,
                          const float* __restrict s, float* __restrict carry, float* __restrict gx, int64_t len,
                          const LifConsts& c) {
  const float tau = c.tau, v_th = c.v_th, v_reset = c.v_reset, k = c.carry_k;
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) {
    const float hh = h[j];
    const float gv = SEQ ? carry[j] + gvs[j] : carry[j];
    const float psi = surrogate<ATAN>(hh - v_th, c);
    float dvdh;
    if constexpr (SOFT) {
      dvdh = DETACH ? 1.0f : 1.0f - v_th * psi;
    } else {
      dvdh = DETACH ? 1.0f - s[j] : (1.0f - s[j]) + (v_reset - hh) * psi;
    }
    const float gh = gs[j] * psi + gv * dvdh;
    gx[j] = DECAY ? gh / tau : gh;
    carry[j] = gh * k;
  }
}

template <typename T, bool SOFT, bool DECAY, bool DETACH, bool ATAN, bool SEQ>
void backward_block(const T* gs, const float* gv_last, const float* gv_seq, const T* h, const T* s, T* gx,
                    float* gv0, int64_t steps, int64_t n, int64_t j0, int64_t len, const LifConsts& c,
                    BlockBuffers& buf) {
  constexpr bool kF32 = std::is_same_v<T, float>;
  float *carry = buf.b[0], *gsb = buf.b[1], *hb = buf.b[2], *sb = buf.b[3], *gxb = buf.b[4];
  std::memcpy(carry, gv_last + j0, len * sizeof(float));
  for (int64_t t = steps - 1; t >= 0; --t) {
    const int64_t off = t * n + j0;
    const float* gvs = SEQ ? gv_seq + off : nullptr;
    if constexpr (kF32) {
      backward_step<SOFT, DECAY, DETACH, ATAN, SEQ>(gs + off, gvs, h + off, s + off, carry, gx + off, len, c);
    } else {
      load_f32(gs + off, gsb, len);
      load_f32(h + off, hb, len);
      load_f32(s + off, sb, len);
      backward_step<SOFT, DECAY, DETACH, ATAN, SEQ>(gsb, gvs, hb, sb, carry, gxb, len, c);
      store_f32(gxb, gx + off, len);
    }
  }
  std::memcpy(gv0 + j0, carry, len * sizeof(float));
}

// Runs body(j0, len, buffers) over the neuron blocks of [0, n) in parallel; ~64K element-steps per task at least,
// so small problems stay on the calling thread.
template <typename F>
void for_blocks(int64_t n, int64_t steps, F&& body) {
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  const int64_t grain = std::max<int64_t>(1, 65536 / (kBlock * std::max<int64_t>(steps, 1)));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    BlockBuffers buf{};
    for (int64_t b = begin; b < end; ++b) {
      const int64_t j0 = b * kBlock;
      body(j0, std::min(kBlock, n - j0), buf);
    }
  });
}

void check_cpu_contiguous(const char* op, std::initializer_list<const at::Tensor*> ts) {
  for (const at::Tensor* t : ts) {
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous(), op, ": contiguous CPU tensors expected");
  }
}

}  // namespace

void lif_forward_out(const at::Tensor& x, const at::Tensor& v0, at::Tensor& s, at::Tensor& h, at::Tensor& v_last,
                     at::Tensor& v_seq, double tau, double v_threshold, double v_reset, bool soft_reset,
                     bool decay_input, bool store_v_seq) {
  constexpr const char* op = "lif_forward_out";
  check_cpu_contiguous(op, {&x, &v0, &s, &h, &v_last, &v_seq});
  TORCH_CHECK(x.dim() >= 1, op, ": x must be [T, ...]");
  const int64_t steps = x.size(0);
  const int64_t n = v0.numel();
  TORCH_CHECK(x.numel() == steps * n, op, ": x must hold T * v0.numel() elements");
  TORCH_CHECK(s.sizes() == x.sizes() && h.sizes() == x.sizes() && s.scalar_type() == x.scalar_type() &&
                  h.scalar_type() == x.scalar_type(),
              op, ": s and h must match x");
  TORCH_CHECK(v0.scalar_type() == at::kFloat && v_last.scalar_type() == at::kFloat &&
                  v_seq.scalar_type() == at::kFloat,
              op, ": v0, v_last and v_seq must be float32");
  TORCH_CHECK(v_last.numel() == n, op, ": v_last must have one element per neuron");
  TORCH_CHECK(v_seq.numel() == (store_v_seq ? steps * n : 0), op, ": v_seq must be [T, N] iff store_v_seq");
  const LifConsts c = make_consts(tau, v_threshold, v_reset, soft_reset, 1.0);
  if (n == 0) return;
  dispatch_float(x.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* xp = x.const_data_ptr<T>();
    const float* v0p = v0.const_data_ptr<float>();
    T* sp = s.mutable_data_ptr<T>();
    T* hp = h.mutable_data_ptr<T>();
    float* vlp = v_last.mutable_data_ptr<float>();
    float* vsp = store_v_seq ? v_seq.mutable_data_ptr<float>() : nullptr;
    dispatch_bool(soft_reset, [&](auto soft) {
      dispatch_bool(decay_input, [&](auto decay) {
        dispatch_bool(store_v_seq, [&](auto store) {
          for_blocks(n, steps, [&](int64_t j0, int64_t len, BlockBuffers& buf) {
            forward_block<T, decltype(soft)::value, decltype(decay)::value, decltype(store)::value>(
                xp, v0p, sp, hp, vlp, vsp, steps, n, j0, len, c, buf);
          });
        });
      });
    });
  });
}

void lif_backward_out(const at::Tensor& grad_s, const at::Tensor& grad_v_last, const at::Tensor& grad_v_seq,
                      const at::Tensor& h, const at::Tensor& s, at::Tensor& grad_x, at::Tensor& grad_v0, double tau,
                      double v_threshold, double v_reset, bool soft_reset, bool decay_input, bool detach_reset,
                      int64_t surrogate_kind, double alpha) {
  constexpr const char* op = "lif_backward_out";
  check_cpu_contiguous(op, {&grad_s, &grad_v_last, &grad_v_seq, &h, &s, &grad_x, &grad_v0});
  TORCH_CHECK(h.dim() >= 1, op, ": h must be [T, ...]");
  const int64_t steps = h.size(0);
  const int64_t n = grad_v_last.numel();
  TORCH_CHECK(h.numel() == steps * n, op, ": h must hold T * grad_v_last.numel() elements");
  TORCH_CHECK(grad_s.numel() == h.numel() && s.numel() == h.numel() && grad_x.sizes() == h.sizes(), op,
              ": grad_s, s and grad_x must match h");
  TORCH_CHECK(grad_s.scalar_type() == h.scalar_type() && s.scalar_type() == h.scalar_type() &&
                  grad_x.scalar_type() == h.scalar_type(),
              op, ": grad_s, s and grad_x must have h's dtype");
  TORCH_CHECK(grad_v_last.scalar_type() == at::kFloat && grad_v0.scalar_type() == at::kFloat, op,
              ": grad_v_last and grad_v0 must be float32");
  TORCH_CHECK(grad_v0.numel() == n, op, ": grad_v0 must have one element per neuron");
  const bool has_seq = grad_v_seq.numel() > 0;  // empty: no gradient reached v_seq
  TORCH_CHECK(!has_seq || (grad_v_seq.numel() == steps * n && grad_v_seq.scalar_type() == at::kFloat), op,
              ": grad_v_seq must be float32 [T, N] or empty");
  TORCH_CHECK(surrogate_kind == 0 || surrogate_kind == 1, op, ": surrogate_kind must be 0 (sigmoid) or 1 (atan)");
  const LifConsts c = make_consts(tau, v_threshold, v_reset, soft_reset, alpha);
  if (n == 0) return;
  dispatch_float(h.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* gsp = grad_s.const_data_ptr<T>();
    const float* gvlp = grad_v_last.const_data_ptr<float>();
    const float* gvsp = has_seq ? grad_v_seq.const_data_ptr<float>() : nullptr;
    const T* hp = h.const_data_ptr<T>();
    const T* sp = s.const_data_ptr<T>();
    T* gxp = grad_x.mutable_data_ptr<T>();
    float* gv0p = grad_v0.mutable_data_ptr<float>();
    dispatch_bool(soft_reset, [&](auto soft) {
      dispatch_bool(decay_input, [&](auto decay) {
        dispatch_bool(detach_reset, [&](auto detach) {
          dispatch_bool(surrogate_kind == 1, [&](auto atan) {
            dispatch_bool(has_seq, [&](auto seq) {
              for_blocks(n, steps, [&](int64_t j0, int64_t len, BlockBuffers& buf) {
                backward_block<T, decltype(soft)::value, decltype(decay)::value, decltype(detach)::value,
                               decltype(atan)::value, decltype(seq)::value>(gsp, gvlp, gvsp, hp, sp, gxp, gv0p,
                                                                            steps, n, j0, len, c, buf);
              });
            });
          });
        });
      });
    });
  });
}

}  // namespace lrkern::cpu
