"""Plain-PyTorch reference implementations: the executable specification every kernel is tested against.

Each reference computes in fp32 and has the same signature as its registered op. They are also the fallback
backend on devices without a kernel.
"""
from lrkern.reference.hadamard import hadamard, hadamard_matrix
from lrkern.reference.lowrank import (lance_conv2d_wgrad, lance_linear_wgrad, lance_project, mode_gram_accumulate,
                                      reconstruct)
from lrkern.reference.quant import dequant, quant_pack

__all__ = ["hadamard", "hadamard_matrix", "quant_pack", "dequant", "mode_gram_accumulate", "lance_project", "reconstruct",
           "lance_linear_wgrad", "lance_conv2d_wgrad"]
