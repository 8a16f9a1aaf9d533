"""lrkern: fused kernels for low-rank, low-bit and spiking efficiency methods, exposed as ``torch.ops.lrkern.*``."""
from lrkern.ops import available_backends, dequant, hadamard, quant_pack, select_backend, use_backend

__version__ = "0.1.0"

__all__ = ["hadamard", "quant_pack", "dequant", "use_backend", "select_backend", "available_backends"]
