// Lets the CUDA C kernels of csrc/cuda compile as plain C++ on the CPU, so CI checks them without a GPU:
//
//   g++ -x c++ -std=c++17 -O2 -ffp-contract=off -include csrc/cuda/cpu_shim.h file_that_includes_lif.cu
//
// It defines what the kernels take from CUDA: the function qualifiers, the thread-index variables (set by the
// caller, which loops a kernel over a simulated grid, see lk_launch and lk_launch_grid), the IEEE-rounded arithmetic
// intrinsics, the bit casts, fp16 conversions with round-to-nearest-even in software, and for kernels that
// synchronise, __shared__ memory and __syncthreads (lk_launch_grid). -ffp-contract=off keeps g++ from fusing a
// multiply and an add into an FMA, which the GPU build forbids with --fmad=false and the *_rn intrinsics.
#pragma once

#define LRKERN_CPU_SHIM 1

#include <math.h>  // ::expf, as CUDA device code has it

#include <ucontext.h>  // the simulated threads of lk_launch_grid are coroutines

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
// Blocks run one after another on one OS thread, so a function-local static is the running block's shared memory.
#define __shared__ static

struct lk_uint3 {
  unsigned int x = 0, y = 0, z = 0;
};
// What a kernel reads of its position in the grid; lk_launch sets them before each simulated thread.
inline thread_local lk_uint3 threadIdx, blockIdx, blockDim, gridDim;

// The CUDA intrinsics are correctly rounded single operations; so are the C++ ones without contraction.
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }

inline unsigned int __float_as_uint(float f) {
  unsigned int u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
inline float __uint_as_float(unsigned int u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// fp16 bits -> fp32, exact (the GPU uses cvt.f32.f16).
inline float lk_f16_to_f32(unsigned short b) {
  const unsigned int sign = (unsigned int)(b & 0x8000u) << 16;
  const unsigned int e = (b >> 10) & 0x1Fu, m = b & 0x3FFu;
  if (e == 0x1Fu) return __uint_as_float(sign | 0x7F800000u | (m << 13));  // inf / NaN
  if (e == 0) {  // zero or subnormal: m * 2^-24, exact in fp32
    const float mag = (float)m * 5.9604644775390625e-8f;
    return sign ? -mag : mag;
  }
  return __uint_as_float(sign | ((e + 112u) << 23) | (m << 13));
}

// fp32 -> fp16 bits, round to nearest even (the GPU uses cvt.rn.f16.f32): overflow to inf, subnormals rounded,
// NaN made quiet.
inline unsigned short lk_f32_to_f16(float f) {
  const unsigned int u = __float_as_uint(f);
  const unsigned int sign = (u >> 16) & 0x8000u;
  const unsigned int a = u & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return (unsigned short)(sign | 0x7E00u);
  const int e = (int)(a >> 23) - 127 + 15;  // the fp16 biased exponent
  if (e >= 31) return (unsigned short)(sign | 0x7C00u);
  if (e <= 0) {  // an fp16 subnormal (or zero): value / 2^-24 = mantissa_with_1 >> (14 - e), rounded
    if (e < -10) return (unsigned short)sign;  // below half the smallest subnormal: 0
    const unsigned int m = (a & 0x7FFFFFu) | 0x800000u;
    const int shift = 14 - e;  // 14 .. 24
    unsigned int r = m >> shift;
    const unsigned int rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1u))) ++r;  // may carry into the smallest normal: still right
    return (unsigned short)(sign | r);
  }
  unsigned int r = ((unsigned int)e << 10) | ((a & 0x7FFFFFu) >> 13);
  const unsigned int rem = a & 0x1FFFu;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;  // a carry may reach the exponent, up to inf: right
  return (unsigned short)(sign | r);
}

// Runs kernel(args...) once per thread of a 1-D grid of `grid` blocks of `block` threads, in order.
template <typename Kernel, typename... Args>
inline void lk_launch(unsigned int grid, unsigned int block, Kernel kernel, Args... args) {
  gridDim = {grid, 1, 1};
  blockDim = {block, 1, 1};
  for (unsigned int b = 0; b < grid; ++b) {
    blockIdx = {b, 0, 0};
    for (unsigned int t = 0; t < block; ++t) {
      threadIdx = {t, 0, 0};
      kernel(args...);
    }
  }
}

// lk_launch_grid's simulated threads: each one is a coroutine (ucontext) with its own stack, so a kernel can wait at
// __syncthreads until every thread of its block has arrived, as on the GPU.
struct lk_block_state {
  ucontext_t scheduler;
  std::vector<ucontext_t> threads;
  std::vector<unsigned char> where;  // per thread: 0 runnable, 1 waiting at a barrier, 2 returned
  unsigned int current = 0;
  void (*body)(void*) = nullptr;  // runs the kernel with its arguments
  void* body_arg = nullptr;
};
inline thread_local lk_block_state* lk_block = nullptr;

inline void __syncthreads() {
  lk_block_state* b = lk_block;
  if (b == nullptr) {  // lk_launch runs each thread to its end, so it cannot run a kernel that synchronises
    std::fputs("cpu_shim.h: __syncthreads in a kernel run by lk_launch; launch it with lk_launch_grid\n", stderr);
    std::abort();
  }
  b->where[b->current] = 1;
  swapcontext(&b->threads[b->current], &b->scheduler);
}

inline void lk_thread_entry() {
  lk_block_state* b = lk_block;
  b->body(b->body_arg);
  b->where[b->current] = 2;  // then uc_link resumes the scheduler
}

// Runs kernel(args...) over a grid of grid_x * grid_y blocks of `block` threads. Within a block the threads run one
// at a time, in index order (reverse = false) or in reverse, each until it returns or reaches __syncthreads; once
// every thread waits there, all resume. Running the same launch in both orders shows a missing barrier as a
// different result. Returns 0, or -2 when a block's threads did not all reach the same barrier (some returned or
// took another path while others waited: undefined behaviour on the GPU).
template <typename Kernel, typename... Args>
inline int lk_launch_grid(unsigned int grid_x, unsigned int grid_y, unsigned int block, bool reverse, Kernel kernel,
                          Args... args) {
  constexpr size_t kStack = 64 * 1024;
  auto call = [&]() { kernel(args...); };
  lk_block_state state;
  state.threads.resize(block);
  state.where.resize(block);
  state.body = [](void* f) { (*static_cast<decltype(call)*>(f))(); };
  state.body_arg = &call;
  std::unique_ptr<unsigned char[]> stacks(new unsigned char[static_cast<size_t>(block) * kStack]);  // not zeroed
  gridDim = {grid_x, grid_y, 1};
  blockDim = {block, 1, 1};
  lk_block = &state;
  int rc = 0;
  for (unsigned int by = 0; by < grid_y && rc == 0; ++by) {
    for (unsigned int bx = 0; bx < grid_x && rc == 0; ++bx) {
      blockIdx = {bx, by, 0};
      for (unsigned int t = 0; t < block; ++t) {
        ucontext_t& c = state.threads[t];
        getcontext(&c);
        c.uc_stack.ss_sp = stacks.get() + static_cast<size_t>(t) * kStack;
        c.uc_stack.ss_size = kStack;
        c.uc_link = &state.scheduler;
        makecontext(&c, lk_thread_entry, 0);
        state.where[t] = 0;
      }
      for (;;) {
        for (unsigned int i = 0; i < block; ++i) {
          const unsigned int t = reverse ? block - 1 - i : i;
          if (state.where[t] != 0) continue;
          state.current = t;
          threadIdx = {t, 0, 0};
          swapcontext(&state.scheduler, &state.threads[t]);
        }
        unsigned int waiting = 0;
        for (unsigned char w : state.where) waiting += w == 1;
        if (waiting == 0) break;  // every thread returned
        if (waiting != block) {
          rc = -2;
          break;
        }
        for (unsigned char& w : state.where) w = 0;
      }
    }
  }
  lk_block = nullptr;
  return rc;
}
