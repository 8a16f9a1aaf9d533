#include <torch/extension.h>

#include "cpu/ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lrkern C++ CPU kernels (out-variants; validation and allocation happen in lrkern.ops)";
  m.def("hadamard_out", &lrkern::cpu::hadamard_out, "out = x @ H_n along the last dim (orthonormal)",
        py::arg("x"), py::arg("out"));
  m.def("quant_pack_out", &lrkern::cpu::quant_pack_out, "min-max group quantization with uint8 packing",
        py::arg("x"), py::arg("codes"), py::arg("scale"), py::arg("zero"), py::arg("bits"), py::arg("group_size"),
        py::arg("axis"));
  m.def("dequant_out", &lrkern::cpu::dequant_out, "out = code * scale + zero (fp32 inside)", py::arg("codes"),
        py::arg("scale"), py::arg("zero"), py::arg("out"), py::arg("bits"), py::arg("group_size"), py::arg("axis"));
  m.def("kv_attention_out", &lrkern::cpu::kv_attention_out, "attention over a quantized KV cache plus its window",
        py::arg("q"), py::arg("k_codes"), py::arg("k_scale"), py::arg("k_zero"), py::arg("v_codes"),
        py::arg("v_scale"), py::arg("v_zero"), py::arg("k_win"), py::arg("v_win"), py::arg("n_quant"),
        py::arg("n_win"), py::arg("corr_s"), py::arg("corr_z"), py::arg("phi_q"), py::arg("bits"),
        py::arg("group_size"), py::arg("key_per_channel"), py::arg("channel_group"), py::arg("rotate_keys"),
        py::arg("value_rotation"), py::arg("scale"), py::arg("out"), py::arg("lse"));
  m.def("lif_forward_out", &lrkern::cpu::lif_forward_out, "multi-step LIF forward fused over time", py::arg("x"),
        py::arg("v0"), py::arg("s"), py::arg("h"), py::arg("v_last"), py::arg("v_seq"), py::arg("tau"),
        py::arg("v_threshold"), py::arg("v_reset"), py::arg("soft_reset"), py::arg("decay_input"),
        py::arg("store_v_seq"));
  m.def("lif_backward_out", &lrkern::cpu::lif_backward_out, "multi-step LIF backward (one reverse sweep over time)",
        py::arg("grad_s"), py::arg("grad_v_last"), py::arg("grad_v_seq"), py::arg("h"), py::arg("s"),
        py::arg("grad_x"), py::arg("grad_v0"), py::arg("tau"), py::arg("v_threshold"), py::arg("v_reset"),
        py::arg("soft_reset"), py::arg("decay_input"), py::arg("detach_reset"), py::arg("surrogate_kind"),
        py::arg("alpha"));
  m.def("stm_forward_out", &lrkern::cpu::stm_forward_out, "Spiking Temporal Modulator forward fused over time",
        py::arg("u"), py::arg("v0"), py::arg("gain"), py::arg("tau"), py::arg("theta0"), py::arg("beta"), py::arg("s"),
        py::arg("h"), py::arg("v_last"), py::arg("rho"), py::arg("v_reset"), py::arg("soft_reset"),
        py::arg("decay_input"));
  m.def("stm_backward_out", &lrkern::cpu::stm_backward_out,
        "Spiking Temporal Modulator backward (trace rebuild, then one reverse sweep over time)", py::arg("grad_s"),
        py::arg("grad_v_last"), py::arg("u"), py::arg("v0"), py::arg("h"), py::arg("s"), py::arg("gain"),
        py::arg("tau"), py::arg("theta0"), py::arg("beta"), py::arg("grad_u"), py::arg("grad_v0"),
        py::arg("grad_params"), py::arg("rho"), py::arg("v_reset"), py::arg("soft_reset"), py::arg("decay_input"),
        py::arg("detach_reset"), py::arg("surrogate_kind"), py::arg("alpha"));
  m.def("mv_displacement_out", &lrkern::cpu::mv_displacement_out,
        "paint FFmpeg motion-vector records (int32 [N, 8]) onto the 4x4-pixel displacement grid", py::arg("records"),
        py::arg("d"), py::arg("valid"));
  m.def("mv_pool_out", &lrkern::cpu::mv_pool_out, "displacement grid -> MV tensor [2 | 3, H/16, W/16]", py::arg("d"),
        py::arg("valid"), py::arg("out"));
  m.def("motion_compensate_out", &lrkern::cpu::motion_compensate_out,
        "bilinear motion compensation of prev [H, W, C] by the displacement grid", py::arg("prev"), py::arg("d"),
        py::arg("out"));
  m.def("asm_gemm_emulate_out", &lrkern::cpu::asm_gemm_emulate_out,
        "ASM shift-add datapath emulation (bank, mux, shift, add, sign, int32 accumulate)", py::arg("x"), py::arg("w"),
        py::arg("alphabet"), py::arg("w_bits"), py::arg("out"));
  m.def("asm_gemm_fast_out", &lrkern::cpu::asm_gemm_fast_out,
        "ASM fast path: int8 x int8 -> int32 GEMM of the projected integers", py::arg("x"), py::arg("w"),
        py::arg("w_bits"), py::arg("a_bits"), py::arg("out"));
  m.def("asm_project_out", &lrkern::cpu::asm_project_out, "ASM alphabet-set projection -> int16 w_int",
        py::arg("w"), py::arg("scale"), py::arg("mid"), py::arg("delta"), py::arg("mag"), py::arg("out"),
        py::arg("inner"), py::arg("n_mid"), py::arg("w_bits"));
  m.def("asm_fake_quant_out", &lrkern::cpu::asm_fake_quant_out, "ASM fake quantization w_hat = s * w_int",
        py::arg("w"), py::arg("scale"), py::arg("mid"), py::arg("delta"), py::arg("mag"), py::arg("out"),
        py::arg("inner"), py::arg("n_mid"), py::arg("w_bits"));
  m.def("asm_fake_quant_backward_out", &lrkern::cpu::asm_fake_quant_backward_out,
        "ASM fake quantization backward: clipped STE to w, LSQ gradient to the scale", py::arg("grad"), py::arg("w"),
        py::arg("scale"), py::arg("mid"), py::arg("delta"), py::arg("mag"), py::arg("grad_w"), py::arg("grad_scale"),
        py::arg("inner"), py::arg("n_mid"), py::arg("w_bits"), py::arg("r_max"), py::arg("gscale"));
  m.def("asm_decompose_out", &lrkern::cpu::asm_decompose_out,
        "ASM code bytes per quartet; returns the first offending flat index (numel if none)", py::arg("w_int"),
        py::arg("code"), py::arg("codes"), py::arg("w_bits"));
}
