"""lrkern: fused kernels for low-rank, low-bit and spiking efficiency methods, exposed as ``torch.ops.lrkern.*``."""
from lrkern.ops import (available_backends, dequant, hadamard, kv_attention, lance_project, mode_gram_accumulate,
                        quant_pack, select_backend, use_backend)
from lrkern.quantized_kv import KVConfig, QuantizedKV  # noqa: E402  (after the ops it uses)
from lrkern.attention import decode_attention, prefill_attention  # noqa: E402
from lrkern.feature_map import FeatureMap  # noqa: E402

__version__ = "0.1.0"

__all__ = ["hadamard", "quant_pack", "dequant", "kv_attention", "QuantizedKV", "KVConfig", "decode_attention",
           "prefill_attention", "FeatureMap", "mode_gram_accumulate", "lance_project", "use_backend", "select_backend",
           "available_backends"]
