// CPU kernels of lrkern._C. Each is an out-variant: the Python layer (lrkern/ops/_cpp.py) validates the arguments
// and allocates contiguous outputs; these functions only check their internal contract.
#pragma once

#include <torch/extension.h>

namespace lrkern::cpu {

// out = x @ H_n along the last dim (orthonormal Walsh-Hadamard, Sylvester order); fp32 math.
void hadamard_out(const at::Tensor& x, at::Tensor& out);

// Asymmetric min-max group quantization with uint8 packing (see lrkern/reference/quant.py); axis is -1 or -2.
void quant_pack_out(const at::Tensor& x, at::Tensor& codes, at::Tensor& scale, at::Tensor& zero, int64_t bits,
                    int64_t group_size, int64_t axis);

// out = code * scale + zero in fp32, rounded once to out's dtype.
void dequant_out(const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& zero, at::Tensor& out,
                 int64_t bits, int64_t group_size, int64_t axis);

// Attention over a quantized KV cache plus its window, with the optional linear correction (see
// lrkern/reference/kv_attention.py). out [B, Hq, t, d] in q's dtype, lse [B, Hq, t] fp32.
void kv_attention_out(const at::Tensor& q, const at::Tensor& k_codes, const at::Tensor& k_scale,
                      const at::Tensor& k_zero, const at::Tensor& v_codes, const at::Tensor& v_scale,
                      const at::Tensor& v_zero, const at::Tensor& k_win, const at::Tensor& v_win,
                      const at::Tensor& n_quant, const at::Tensor& n_win, const std::optional<at::Tensor>& corr_s,
                      const std::optional<at::Tensor>& corr_z, const std::optional<at::Tensor>& phi_q, int64_t bits,
                      int64_t group_size, bool key_per_channel, int64_t channel_group, bool rotate_keys,
                      bool value_rotation, double scale, at::Tensor& out, at::Tensor& lse);

// Multi-step LIF neuron over x [T, N] (see lrkern/reference/lif.py): s, h [T, N] in x's dtype, v_last [N] fp32,
// v_seq [T, N] fp32 (or empty when !store_v_seq); v0 [N] fp32. fp32 results are bit-identical to the reference.
void lif_forward_out(const at::Tensor& x, const at::Tensor& v0, at::Tensor& s, at::Tensor& h, at::Tensor& v_last,
                     at::Tensor& v_seq, double tau, double v_threshold, double v_reset, bool soft_reset,
                     bool decay_input, bool store_v_seq);

// Its backward, one reverse sweep over T: grad_x [T, N] in h's dtype (grad_s and s share it), grad_v0 [N] fp32.
// grad_v_seq is fp32 [T, N] or empty (absent); surrogate_kind 0 = sigmoid, 1 = atan.
void lif_backward_out(const at::Tensor& grad_s, const at::Tensor& grad_v_last, const at::Tensor& grad_v_seq,
                      const at::Tensor& h, const at::Tensor& s, at::Tensor& grad_x, at::Tensor& grad_v0, double tau,
                      double v_threshold, double v_reset, bool soft_reset, bool decay_input, bool detach_reset,
                      int64_t surrogate_kind, double alpha);

// Spiking Temporal Modulator over u [T, B, C, S] (see lrkern/reference/stm.py): s, h [T, B, C, S] in u's dtype,
// v_last [B, C, S] fp32; v0 [B, C, S] fp32; gain fp32 [B, C] or absent (1); tau, theta0, beta (or absent) fp32 [C].
// fp32 results are bit-identical to the reference.
void stm_forward_out(const at::Tensor& u, const at::Tensor& v0, const std::optional<at::Tensor>& gain,
                     const at::Tensor& tau, const at::Tensor& theta0, const std::optional<at::Tensor>& beta,
                     at::Tensor& s, at::Tensor& h, at::Tensor& v_last, double rho, double v_reset, bool soft_reset,
                     bool decay_input);

// Its backward (a trace-rebuild sweep when beta is given, then one reverse sweep over T): grad_u [T, B, C, S] in h's
// dtype, grad_v0 [B, C, S] fp32, grad_params fp32 [4, B, C] (gain, tau, theta0, beta per (b, c); the gain and tau rows
// are zeros when u is absent, the beta row when beta is). v0 is read only when u is given.
void stm_backward_out(const at::Tensor& grad_s, const at::Tensor& grad_v_last, const std::optional<at::Tensor>& u,
                      const at::Tensor& v0, const at::Tensor& h, const at::Tensor& s,
                      const std::optional<at::Tensor>& gain, const at::Tensor& tau, const at::Tensor& theta0,
                      const std::optional<at::Tensor>& beta, at::Tensor& grad_u, at::Tensor& grad_v0,
                      at::Tensor& grad_params, double rho, double v_reset, bool soft_reset, bool decay_input,
                      bool detach_reset, int64_t surrogate_kind, double alpha);

// Compressed-domain video (see lrkern/data/compressed.py, whose NumPy functions these match bit for bit).
// records: int32 [N, 8], columns source, w, h, dst_x, dst_y, motion_x, motion_y, motion_scale (MV_FIELDS order).
// d float32 [H/4, W/4, 2] = dst - src of the block covering each 4x4 cell (0 where none), valid bool [H/4, W/4].
// Raises ValueError (the reference's message) on a past-reference block size that is not a positive multiple of 4.
void mv_displacement_out(const at::Tensor& records, at::Tensor& d, at::Tensor& valid);

// MV tensor out float32 [2 | 3, H/16, W/16]: 16x16-cell means of d / 8 px, plus the covered fraction if 3 channels.
void mv_pool_out(const at::Tensor& d, const at::Tensor& valid, at::Tensor& out);

// Motion compensation: out float32 [H, W, C] = prev (uint8 or float32 [H, W, C]) sampled bilinearly at
// clip(pixel - d, 0, size - 1) (fp64 blend, one rounding to fp32, as the NumPy reference).
void motion_compensate_out(const at::Tensor& prev, const at::Tensor& d, at::Tensor& out);

// ASM GEMMs (see lrkern/reference/asm_gemm.py): x [M, K] uint8/int16/int32 (values in [0, 2^a_bits - 1]),
// w [N, K] int16, out int32 [M, N]. asm_gemm_emulate_out: the shift-add datapath (bank, mux, shift, add, sign) for the
// sorted alphabet; asm_gemm_fast_out: int8 x int8 -> int32 GEMM (x - 128 offset for a_bits 8, quartet planes for
// w_bits 8). Both bit-identical to the int64 reference within the op's bound K * r_max * (2^a_bits - 1) < 2^30.
void asm_gemm_emulate_out(const at::Tensor& x, const at::Tensor& w, const std::vector<int64_t>& alphabet,
                          int64_t w_bits, at::Tensor& out);
void asm_gemm_fast_out(const at::Tensor& x, const at::Tensor& w, int64_t w_bits, int64_t a_bits, at::Tensor& out);

// ASM alphabet-set projection (see lrkern/reference/asm_quant.py); tables from lrkern.asm.alphabet.kernel_tables:
// mid fp32 [256], delta and mag int32 [256]. w [P, C, inner] fp32/fp16/bf16 contiguous, scale fp32 [C].
// out int16 w_int = sign(w) * P(|w| / s), bit-identical to the reference.
void asm_project_out(const at::Tensor& w, const at::Tensor& scale, const at::Tensor& mid, const at::Tensor& delta,
                     const at::Tensor& mag, at::Tensor& out, int64_t inner, int64_t n_mid, int64_t w_bits);
// out in w's dtype: w_hat = dtype(s * w_int).
void asm_fake_quant_out(const at::Tensor& w, const at::Tensor& scale, const at::Tensor& mid, const at::Tensor& delta,
                        const at::Tensor& mag, at::Tensor& out, int64_t inner, int64_t n_mid, int64_t w_bits);
// grad_w = grad where u <= r_max else 0 (w's dtype); grad_scale fp32 [C] = gscale * per-channel sums of
// grad * sign(w) * (P(u) - u or r_max), reduced in a fixed order (deterministic for any thread count).
void asm_fake_quant_backward_out(const at::Tensor& grad, const at::Tensor& w, const at::Tensor& scale,
                                 const at::Tensor& mid, const at::Tensor& delta, const at::Tensor& mag,
                                 at::Tensor& grad_w, at::Tensor& grad_scale, int64_t inner, int64_t n_mid,
                                 int64_t w_bits, double r_max, double gscale);
// codes uint8 [..., Q] of w_int int16 (code: int32 [16] byte per quartet value, -1 where not representable);
// returns the first offending flat index, or numel.
int64_t asm_decompose_out(const at::Tensor& w_int, const at::Tensor& code, at::Tensor& codes, int64_t w_bits);

}  // namespace lrkern::cpu
