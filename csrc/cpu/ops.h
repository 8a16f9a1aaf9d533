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

}  // namespace lrkern::cpu
