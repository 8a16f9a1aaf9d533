// Spiking Temporal Modulator fused over time, CUDA C (lrkern formulation; the maths is lrkern/reference/stm.py): an
// LIF neuron with per-channel tau / theta0 / beta, a per-(b, c) input gain and a dynamic threshold
// theta = theta0 + beta A driven by a trace A of the neuron's own spikes. Compiled at run time by CuPy's NVRTC
// (lrkern/kernels/cuda_stm.py); no header is included, so no CUDA toolkit header has to be found on the user's
// machine, and the helpers shared with lif.cu are a verbatim copy (between the lk-common markers).
//
// Tensors are [T, B, C, S] (S: the flattened spatial dims). The grid is (B * C rows, ceil(S / blockDim.x)): a block
// lies inside one (b, c) row, so the channel's tau, theta0, beta and the row's gain are the same for all its threads
// (one broadcast load each). One thread per neuron walks all T steps with the membrane and the trace (forward) or the
// gradient carries (backward) in fp32 registers; consecutive threads own consecutive neurons of the row, so every
// load and store of a warp is one contiguous segment.
//
// Backward: with beta, a thread first rebuilds its neuron's trace before each step by a forward sweep over the saved
// spikes into an fp32 scratch [T, B, C, S] (the forward's fp32 operations, so theta is bit-identical); a thread reads
// back only what it wrote, so no synchronisation is needed. Then it walks t from T - 1 down to 0, reading grad_s, h,
// s (and u) once and writing grad_u once; the H / S / trace rows of step t - 1, loaded for the V[t-1] rebuild of the
// tau gradient, are carried into the next iteration. Parameter gradients: each thread sums its neuron's terms over t
// in fp32 (the reference's order), the block adds its threads' sums in double by a fixed shared-memory tree and
// writes one partial per (parameter, row, block); the launcher adds the blocks in float64. No atomics, so the
// gradients are deterministic.
//
// Every fp32 operation is the reference's, in the reference's order, each rounded on its own (the *_rn intrinsics,
// never contracted into an FMA; the launcher also passes --fmad=false): tau divides with __fdiv_rn, never through a
// reciprocal; the fire test is the non-strict h >= theta on the fp32 h; resets are selects. Scalars the reference
// takes from Python (rho, v_reset, pi/2 alpha, alpha/2) arrive from the host rounded once to fp32. So fp32 spikes, h
// and v_last are bit-identical to the reference; only the sigmoid surrogate's expf differs from torch's exp. A
// missing gain is a gain of 1 (1 * u is u exactly).
//
// Storage dtypes and their rounding are lif.cu's. The same file compiles as plain C++ with csrc/cuda/cpu_shim.h
// included first; tests/test_stm_cuda_source.py runs the kernels over a simulated grid (barriers included) on the
// CPU and checks them against the reference, so a change here is tested without a GPU.
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define LK_ON_DEVICE 1
#elif !defined(LRKERN_CPU_SHIM)
#error "stm.cu compiles with NVRTC / nvcc, or as C++ with -include csrc/cuda/cpu_shim.h"
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

// Threads per block at most (the launcher's block sizes are powers of two up to it): sizes the reduction buffer.
#define LK_STM_MAX_BLOCK 256

// Forward. u, s, h: [T, B, C, S] in T's storage; v0, v_last: [B, C, S] fp32; gain: [B, C] fp32 or null (a gain of
// 1); tau, theta0, beta: [C] fp32 (beta read only when BETA). n = B * C * S is the stride of t.
// SOFT: soft reset (charge towards 0, subtract theta on a spike); else hard reset to v_reset.
template <typename T, bool SOFT, bool DECAY, bool BETA>
__global__ void stm_fwd(const T* __restrict__ u, const float* __restrict__ v0, const float* __restrict__ gain,
                        const float* __restrict__ tau, const float* __restrict__ theta0,
                        const float* __restrict__ beta, T* __restrict__ s, T* __restrict__ h,
                        float* __restrict__ v_last, long long steps, long long n, long long row_len,
                        long long channels, float rho, float v_reset) {
  const long long row = blockIdx.x;
  const long long p = (long long)blockIdx.y * blockDim.x + threadIdx.x;
  if (p >= row_len) return;  // no barrier follows
  const long long ch = row % channels;
  const float tc = tau[ch], th0 = theta0[ch];
  float bc = 0.0f;
  if constexpr (BETA) bc = beta[ch];
  const float g = gain != nullptr ? gain[row] : 1.0f;
  const float vr = SOFT ? 0.0f : v_reset;  // the charge's v_reset: 0 under soft reset
  const long long j = row * row_len + p;
  float v = v0[j];
  float a = 0.0f;     // the trace before this step
  long long off = j;  // element (t, j); T * N may exceed 2^31
#pragma unroll 4
  for (long long t = 0; t < steps; ++t, off += n) {
    const float x = __fmul_rn(g, lk_load(u + off));
    float hh;
    if constexpr (DECAY) {
      hh = __fadd_rn(v, __fdiv_rn(__fsub_rn(x, __fsub_rn(v, vr)), tc));  // v + (x - (v - vr)) / tau
    } else {
      hh = __fadd_rn(__fsub_rn(v, __fdiv_rn(__fsub_rn(v, vr), tc)), x);  // v - (v - vr) / tau + x
    }
    float theta = th0;
    if constexpr (BETA) theta = __fadd_rn(th0, __fmul_rn(bc, a));
    const bool fire = hh >= theta;
    if constexpr (SOFT) {
      v = fire ? __fsub_rn(hh, theta) : hh;
    } else {
      v = fire ? v_reset : hh;
    }
    if constexpr (BETA) a = __fadd_rn(__fmul_rn(rho, a), fire ? 1.0f : 0.0f);
    lk_store(s + off, fire ? 1.0f : 0.0f);
    lk_store(h + off, hh);
  }
  v_last[j] = v;
}

// Backward, reverse time, with psi = surrogate(H - theta), gV (carry) = dL/dV after step t, gA (ga) = dL/dA after t:
//   gS = grad_s[t] + gA; q = hard (v_reset - H) psi, soft -(theta psi), 0 with detach; dV/dH = hard (1 - S) + q,
//   soft 1 + q; gH = gS psi + gV dV/dH; gtheta = -(gS psi + gV q) - [soft] gV S; gA <- rho gA + beta gtheta;
//   gX = gH / tau (DECAY) or gH; grad_u = g gX; gV <- gH (1 - 1/tau).
// Per-neuron sums over t: theta0 += gtheta; beta += gtheta A[t-1]; with PARAMS (u given) gain += U gX and
// tau += gH (x - (V[t-1] - vr)) (DECAY) or gH (V[t-1] - vr), V[t-1] rebuilt from H[t-1], S[t-1], theta[t-1] (v0 at
// t = 0); the host scales the tau sum by -+1/tau^2.
// grad_s, u, h, s, grad_u: [T, B, C, S] in T's storage (u read only under PARAMS); grad_v_last, v0, grad_v0:
// [B, C, S] fp32 (v0 read only under PARAMS); gain, tau, theta0, beta as the forward's; trace: fp32 [T, B, C, S]
// scratch (BETA only); partial: double [4, B * C, gridDim.y], one sum per (gain, tau, theta0, beta; row; block).
// detach: detach_reset, a uniform runtime flag (it only zeroes q). atan_scale = fp32(pi/2 alpha), half_alpha =
// fp32(alpha/2), from the host. blockDim.x must be a power of two <= LK_STM_MAX_BLOCK.
template <typename T, bool SOFT, bool DECAY, bool BETA, bool ATAN, bool PARAMS>
__global__ void stm_bwd(const T* __restrict__ grad_s, const float* __restrict__ grad_v_last, const T* __restrict__ u,
                        const float* __restrict__ v0, const T* __restrict__ h, const T* __restrict__ s,
                        const float* __restrict__ gain, const float* __restrict__ tau,
                        const float* __restrict__ theta0, const float* __restrict__ beta, float* __restrict__ trace,
                        T* __restrict__ grad_u, float* __restrict__ grad_v0, double* __restrict__ partial,
                        long long steps, long long n, long long row_len, long long channels, float rho,
                        float v_reset, int detach, float alpha, float atan_scale, float half_alpha) {
  __shared__ double red[4][LK_STM_MAX_BLOCK];
  const unsigned int tid = threadIdx.x;
  const long long row = blockIdx.x;
  const long long p = (long long)blockIdx.y * blockDim.x + tid;
  // Threads past the row's end skip the sweeps but not the block reduction's barriers.
  const bool live = p < row_len;
  float acc_g = 0.0f, acc_tau = 0.0f, acc_th = 0.0f, acc_b = 0.0f;
  if (live) {
    const long long ch = row % channels;
    const float tc = tau[ch], th0 = theta0[ch];
    float bc = 0.0f;
    if constexpr (BETA) bc = beta[ch];
    const float g = gain != nullptr ? gain[row] : 1.0f;
    const float vr = SOFT ? 0.0f : v_reset;
    const float k = __fsub_rn(1.0f, __fdiv_rn(1.0f, tc));  // 1 - 1/tau, as the reference forms it in fp32
    const long long j = row * row_len + p;
    if constexpr (BETA) {
      // A[-1] = 0; A[t] = rho A[t-1] + S[t]: the forward's operations.
      float a = 0.0f;
      long long off = j;
#pragma unroll 4
      for (long long t = 0; t < steps; ++t, off += n) {
        trace[off] = a;
        a = __fadd_rn(__fmul_rn(rho, a), lk_load(s + off));
      }
    }
    float gv = grad_v_last[j];
    float ga = 0.0f;
    long long off = (steps - 1) * n + j;
    float ht = lk_load(h + off), st = lk_load(s + off), at = 0.0f;
    if constexpr (BETA) at = trace[off];
    // Not unrolled: unrolled, some instantiations need up to 78 registers, and 256-thread blocks of more than 64
    // leave fewer than 4 blocks per SM. The next step's h / s / trace are loaded one iteration ahead anyway.
    // TODO(gpu): never measured; compare with #pragma unroll 2 and __launch_bounds__ on an H100.
#pragma unroll 1
    for (long long t = steps - 1; t >= 0; --t, off -= n) {
      float theta = th0;
      if constexpr (BETA) theta = __fadd_rn(th0, __fmul_rn(bc, at));
      const float psi = lk_surrogate<ATAN>(__fsub_rn(ht, theta), alpha, atan_scale, half_alpha);
      float gs = lk_load(grad_s + off);
      if constexpr (BETA) gs = __fadd_rn(gs, ga);
      const float gsp = __fmul_rn(gs, psi);
      float q = 0.0f;
      if (!detach) q = SOFT ? -__fmul_rn(theta, psi) : __fmul_rn(__fsub_rn(v_reset, ht), psi);
      const float dvdh = SOFT ? __fadd_rn(1.0f, q) : __fadd_rn(__fsub_rn(1.0f, st), q);
      const float gh = __fadd_rn(gsp, __fmul_rn(gv, dvdh));
      float gth = -__fadd_rn(gsp, __fmul_rn(gv, q));
      if constexpr (SOFT) gth = __fsub_rn(gth, __fmul_rn(gv, st));
      const float gx = DECAY ? __fdiv_rn(gh, tc) : gh;
      lk_store(grad_u + off, __fmul_rn(g, gx));
      acc_th = __fadd_rn(acc_th, gth);
      if constexpr (BETA) {
        acc_b = __fadd_rn(acc_b, __fmul_rn(gth, at));
        ga = __fadd_rn(__fmul_rn(rho, ga), __fmul_rn(bc, gth));
      }
      // Step t - 1's rows: V[t-1] for the tau gradient now, and the next iteration's h, s and trace.
      float hp = 0.0f, sp = 0.0f, ap = 0.0f;
      if (t > 0) {
        hp = lk_load(h + off - n);
        sp = lk_load(s + off - n);
        if constexpr (BETA) ap = trace[off - n];
      }
      if constexpr (PARAMS) {
        const float uu = lk_load(u + off);
        const float x = __fmul_rn(g, uu);
        float vp;
        if (t > 0) {
          float thp = th0;
          if constexpr (BETA) thp = __fadd_rn(th0, __fmul_rn(bc, ap));
          const bool fired = sp != 0.0f;
          if constexpr (SOFT) {
            vp = fired ? __fsub_rn(hp, thp) : hp;
          } else {
            vp = fired ? v_reset : hp;
          }
        } else {
          vp = v0[j];
        }
        acc_g = __fadd_rn(acc_g, __fmul_rn(uu, gx));
        const float vd = __fsub_rn(vp, vr);
        acc_tau = __fadd_rn(acc_tau, __fmul_rn(gh, DECAY ? __fsub_rn(x, vd) : vd));
      }
      gv = __fmul_rn(gh, k);
      ht = hp;
      st = sp;
      at = ap;
    }
    grad_v0[j] = gv;
  }
  // The block's sums in double, by a tree whose shape depends only on blockDim.x: deterministic.
  red[0][tid] = acc_g;
  red[1][tid] = acc_tau;
  red[2][tid] = acc_th;
  red[3][tid] = acc_b;
  __syncthreads();
  for (unsigned int stride = blockDim.x >> 1; stride > 0; stride >>= 1) {
    if (tid < stride) {
      for (int i = 0; i < 4; ++i) red[i][tid] += red[i][tid + stride];
    }
    __syncthreads();
  }
  if (tid == 0) {
    const long long plane = (long long)gridDim.x * gridDim.y;
    const long long at_block = row * gridDim.y + blockIdx.y;
    for (int i = 0; i < 4; ++i) partial[i * plane + at_block] = red[i][0];
  }
}
