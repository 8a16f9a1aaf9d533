"""Registered ops (``torch.ops.lrkern.*``). Importing this package registers them.

Adding an op: write ``lrkern/reference/<op>.py``, the Triton launcher in ``lrkern/kernels/<family>.py``, the C++ kernel in
``csrc/cpu/`` (bound in ``csrc/bindings.cpp``, wrapped in ``lrkern/ops/_cpp.py``), then ``lrkern/ops/<op>.py`` with a
``Dispatcher`` naming the three, the ``custom_op`` with its validation, ``register_fake`` and, where gradients flow,
``register_autograd``; import it below.
"""
from lrkern.ops._dispatch import available_backends, select_backend, use_backend
from lrkern.ops.hadamard import hadamard
from lrkern.ops.kv_attention import kv_attention
from lrkern.ops.lance_layers import lance_conv2d, lance_linear
from lrkern.ops.lif import lif_multistep, lif_multistep_backward
from lrkern.ops.lowrank import lance_conv2d_wgrad, lance_linear_wgrad, lance_project, mode_gram_accumulate
from lrkern.ops.quant import dequant, quant_pack
from lrkern.ops.stm import stm_multistep, stm_multistep_backward

__all__ = ["hadamard", "kv_attention", "quant_pack", "dequant", "mode_gram_accumulate", "lance_project",
           "lance_linear_wgrad", "lance_conv2d_wgrad", "lance_linear", "lance_conv2d", "lif_multistep",
           "lif_multistep_backward", "stm_multistep", "stm_multistep_backward", "use_backend", "select_backend",
           "available_backends"]
from lrkern.ops.asm_quant import asm_decompose, asm_fake_quant, asm_fake_quant_backward, asm_project  # noqa: E402

__all__ += ["asm_project", "asm_fake_quant", "asm_fake_quant_backward", "asm_decompose"]

from lrkern.ops.asm_gemm import asm_gemm, asm_gemm_emulate  # noqa: E402

__all__ += ["asm_gemm_emulate", "asm_gemm"]
