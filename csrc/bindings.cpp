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
}
