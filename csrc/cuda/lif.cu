// Multi-step LIF neuron fused over time, CUDA C (SpikingJelly LIFNode semantics; the maths is
// lrkern/reference/lif.py). Compiled at run time by CuPy's NVRTC (lrkern/kernels/cuda_lif.py); no header is
// included, so no CUDA toolkit header has to be found on the user's machine.
//
// One thread per neuron walks all T steps with the membrane (forward) or the gradient carry (backward) in an fp32
// register: the forward reads x once and writes s and h once (and v_seq when asked); the backward walks t from T - 1
// down to 0, reading grad_s, h, s (and grad_v_seq) once and writing grad_x once. Consecutive threads own consecutive
// neurons, so every load and store of a warp is one contiguous segment.
//
// Every fp32 operation is the reference's, in the reference's order, each one rounded on its own: division by tau
// is the IEEE __fdiv_rn (never a reciprocal multiply, never the approximate '/'), products and sums are __fmul_rn /
// __fadd_rn / __fsub_rn, which are never contracted into an FMA (and the launcher also passes --fmad=false), the fire
// test is the non-strict h >= v_threshold on the fp32 h, the reset is a select. Scalars the reference forms in Python
// doubles (1 - 1/tau, pi/2 * alpha, alpha/2) arrive precomputed by the host, rounded once to fp32. So fp32 spikes,
// h, v_last and v_seq are bit-identical to the reference; only the surrogate's expf differs from torch's exp, which
// the gradients' error-ratio comparison absorbs.
//
// Storage dtypes: float, lk_f16 and lk_bf16 (16-bit words). Loads widen exactly; stores round to nearest even
// (fp16 through the hardware cvt.rn, bf16 with integer ops, as torch rounds). Spikes come from the fp32 compare,
// never from a rounded h.
//
// The same file compiles as plain C++ with csrc/cuda/cpu_shim.h included first (g++ -x c++ -ffp-contract=off
// -include cpu_shim.h): tests/test_lif_cuda_source.py runs these kernels over a simulated grid on the CPU and checks
// them against the reference, so a change here is tested without a GPU.
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define LK_ON_DEVICE 1
#elif !defined(LRKERN_CPU_SHIM)
#error "lif.cu compiles with NVRTC / nvcc, or as C++ with -include csrc/cuda/cpu_shim.h"
#endif

// lk-common begin: storage types, conversions and the surrogate, kept verbatim in every .cu of this folder (NVRTC
// compiles each file alone, without includes); tests/test_stm_cuda_source.py checks that the copies agree.
// 16-bit storage words. Distinct types, so the templates below pick the right conversion.
struct lk_f16 {
  unsigned short bits;
};
struct lk_bf16 {
  unsigned short bits;
};

#ifdef LK_ON_DEVICE
// fp16 <-> fp32 by the hardware conversions (round to nearest even), without cuda_fp16.h.
__device__ __forceinline__ float lk_f16_to_f32(unsigned short b) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(b));
  return f;
}
__device__ __forceinline__ unsigned short lk_f32_to_f16(float f) {
  unsigned short b;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(b) : "f"(f));
  return b;
}
#endif  // on the CPU, cpu_shim.h defines the same two functions in software

// bf16 is the top half of an fp32: widening is a shift; narrowing rounds to nearest even on the dropped 16 bits
// (NaN becomes the quiet 0x7FC0, as in torch). Integer ops, so the same code runs on every GPU and in the CPU shim.
__device__ __forceinline__ float lk_bf16_to_f32(unsigned short b) { return __uint_as_float((unsigned int)b << 16); }
__device__ __forceinline__ unsigned short lk_f32_to_bf16(float f) {
  const unsigned int u = __float_as_uint(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (unsigned short)0x7FC0u;
  return (unsigned short)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

__device__ __forceinline__ float lk_load(const float* p) { return *p; }
__device__ __forceinline__ float lk_load(const lk_f16* p) { return lk_f16_to_f32(p->bits); }
__device__ __forceinline__ float lk_load(const lk_bf16* p) { return lk_bf16_to_f32(p->bits); }
__device__ __forceinline__ void lk_store(float* p, float v) { *p = v; }
__device__ __forceinline__ void lk_store(lk_f16* p, float v) { p->bits = lk_f32_to_f16(v); }
__device__ __forceinline__ void lk_store(lk_bf16* p, float v) { p->bits = lk_f32_to_bf16(v); }

// SpikingJelly's surrogate gradient at d = h - v_threshold, in the reference's operation order.
//   sigmoid: sg = 1 / (1 + exp(-alpha d)) (torch.sigmoid); psi = (alpha sg) (1 - sg)
//   atan:    u = (pi/2 alpha) d; psi = (1 / (1 + u u)) (alpha / 2) (Python's float / tensor is reciprocal * float)
template <bool ATAN>
__device__ __forceinline__ float lk_surrogate(float d, float alpha, float atan_scale, float half_alpha) {
  if constexpr (ATAN) {
    const float u = __fmul_rn(atan_scale, d);
    const float den = __fadd_rn(1.0f, __fmul_rn(u, u));
    return __fmul_rn(__fdiv_rn(1.0f, den), half_alpha);
  } else {
    const float z = __fmul_rn(alpha, d);
    const float sg = __fdiv_rn(1.0f, __fadd_rn(1.0f, expf(-z)));
    return __fmul_rn(__fmul_rn(alpha, sg), __fsub_rn(1.0f, sg));
  }
}
// lk-common end

// Forward. x, s, h: [T, N] in T's storage; v0, v_last: [N] fp32; v_seq: [T, N] fp32, touched only when STORE.
// SOFT: soft reset (charge towards 0, subtract the threshold on a spike); else hard reset to v_reset.
template <typename T, bool SOFT, bool DECAY, bool STORE>
__global__ void lif_fwd(const T* __restrict__ x, const float* __restrict__ v0, T* __restrict__ s,
                        T* __restrict__ h, float* __restrict__ v_last, float* __restrict__ v_seq, long long steps,
                        long long n, float tau, float v_threshold, float v_reset) {
  const long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= n) return;
  const float vr = SOFT ? 0.0f : v_reset;  // the charge's v_reset: 0 under soft reset
  float v = v0[j];
  long long off = j;  // element (t, j); T * N may exceed 2^31
#pragma unroll 4
  for (long long t = 0; t < steps; ++t, off += n) {
    const float xt = lk_load(x + off);
    float hh;
    if constexpr (DECAY) {
      hh = __fadd_rn(v, __fdiv_rn(__fsub_rn(xt, __fsub_rn(v, vr)), tau));  // v + (x - (v - vr)) / tau
    } else {
      hh = __fadd_rn(__fsub_rn(v, __fdiv_rn(__fsub_rn(v, vr), tau)), xt);  // v - (v - vr) / tau + x
    }
    const bool fire = hh >= v_threshold;
    if constexpr (SOFT) {
      v = fire ? __fsub_rn(hh, v_threshold) : hh;
    } else {
      v = fire ? v_reset : hh;
    }
    lk_store(s + off, fire ? 1.0f : 0.0f);
    lk_store(h + off, hh);
    if constexpr (STORE) v_seq[off] = v;
  }
  v_last[j] = v;
}

// Backward, reverse time: gV = carry + grad_v_seq[t]; gH = grad_s psi + gV dV/dH; grad_x = gH / tau (DECAY) or gH;
// carry = gH (1 - 1/tau). dV/dH: hard (1 - S) + (v_reset - H) psi, soft 1 - v_threshold psi; DETACH drops the psi
// term. grad_s, h, s, grad_x: [T, N] in T's storage; grad_v_last, grad_v0: [N] fp32; grad_v_seq: [T, N] fp32, read
// only when SEQ. decay = fp32(1 - 1/tau), atan_scale = fp32(pi/2 alpha), half_alpha = fp32(alpha/2), from the host.
template <typename T, bool SOFT, bool DECAY, bool DETACH, bool ATAN, bool SEQ>
__global__ void lif_bwd(const T* __restrict__ grad_s, const float* __restrict__ grad_v_last,
                        const float* __restrict__ grad_v_seq, const T* __restrict__ h, const T* __restrict__ s,
                        T* __restrict__ grad_x, float* __restrict__ grad_v0, long long steps, long long n, float tau,
                        float v_threshold, float v_reset, float decay, float alpha, float atan_scale,
                        float half_alpha) {
  const long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= n) return;
  float carry = grad_v_last[j];
  long long off = (steps - 1) * n + j;
#pragma unroll 4
  for (long long t = steps - 1; t >= 0; --t, off -= n) {
    const float hh = lk_load(h + off);
    float gv = carry;
    if constexpr (SEQ) gv = __fadd_rn(carry, grad_v_seq[off]);
    const float psi = lk_surrogate<ATAN>(__fsub_rn(hh, v_threshold), alpha, atan_scale, half_alpha);
    const float gsp = __fmul_rn(lk_load(grad_s + off), psi);
    float gh;
    if constexpr (SOFT) {
      if constexpr (DETACH) {
        gh = __fadd_rn(gsp, gv);  // dV/dH = 1
      } else {
        gh = __fadd_rn(gsp, __fmul_rn(gv, __fsub_rn(1.0f, __fmul_rn(v_threshold, psi))));
      }
    } else {
      const float keep = __fsub_rn(1.0f, lk_load(s + off));  // 1 - S
      if constexpr (DETACH) {
        gh = __fadd_rn(gsp, __fmul_rn(gv, keep));
      } else {
        gh = __fadd_rn(gsp, __fmul_rn(gv, __fadd_rn(keep, __fmul_rn(__fsub_rn(v_reset, hh), psi))));
      }
    }
    if constexpr (DECAY) {
      lk_store(grad_x + off, __fdiv_rn(gh, tau));
    } else {
      lk_store(grad_x + off, gh);
    }
    carry = __fmul_rn(gh, decay);
  }
  grad_v0[j] = carry;
}
