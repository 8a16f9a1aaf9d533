"""``KVLinCCache``: a transformers ``Cache`` whose layers are ``lrkern.QuantizedKV`` (2/4-bit codes, full-precision
residual window, linear correction), for ``model.generate(..., past_key_values=KVLinCCache(...))``.

How a forward step flows (transformers 5.x): the attention module calls ``cache.update(k, v, layer_idx)`` and hands
what it returns to the attention function registered as ``"lrkern_kvlinc"`` (``hf_attention.py``). ``update`` cannot
write into the quantized cache yet, because where the new tokens go depends on the padding mask, which only the
attention function sees, and because chunked prefill must attend to the cache *before* the chunk is appended. So
``update`` only parks the chunk and tags the returned key tensor with its layer; the attention function then attends
and commits the chunk. A chunk that is never committed means the model is not running the lrkern attention, which
the next ``update`` reports instead of silently attending to nothing.

Rows hold only their real tokens (left padding is dropped on the first prefill), while ``get_seq_length`` counts
every position the model has processed, padding included, because that is the length transformers builds its 2-D
attention mask and cache positions from.
"""
from __future__ import annotations

import inspect
from typing import Optional

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from lrkern.quantized_kv import PRESETS, KVConfig, QuantizedKV

ATTN_IMPLEMENTATION = "lrkern_kvlinc"
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
# The attribute that ties a key tensor returned by ``update`` to its cache layer (see the module docstring).
LAYER_TAG = "_lrkern_kvlinc_layer"


def cache_kwarg(model) -> str:
    """The name generate()/forward() take the cache under: ``cache`` in recent transformers 5.x releases, where
    ``past_key_values`` still works but warns; ``past_key_values`` before that."""
    inner = getattr(model, "model", model)
    return "cache" if "cache" in inspect.signature(type(inner).forward).parameters else "past_key_values"


def model_geometry(config) -> tuple[int, int, int, int]:
    """(num_layers, num_heads, num_kv_heads, head_dim) of a supported transformers config, or a clear error."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"KVLinC supports the {', '.join(SUPPORTED_MODEL_TYPES)} architectures; this model is "
                         f"{model_type!r}")
    layer_types = getattr(config, "layer_types", None) or []
    other = sorted({t for t in layer_types if t != "full_attention"})
    if other or getattr(config, "use_sliding_window", False):
        raise ValueError(f"KVLinC caches full-attention layers only; this {model_type} config has layer types "
                         f"{other or ['sliding_attention']} (use_sliding_window={getattr(config, 'use_sliding_window', False)})")
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return config.num_hidden_layers, heads, kv_heads, head_dim


class KVLinCLayer(CacheLayerMixin):
    """One decoder layer's cache: a ``QuantizedKV`` created on the first ``update`` (batch, dtype and device come
    from the first keys), plus that layer's correction feature maps."""

    is_compileable = False
    is_sliding = False
    # Exact within the residual window only (QuantizedKV.crop); deeper crops raise.
    is_croppable = True

    def __init__(self, config: KVConfig, phi=None, psi=None, dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.config, self.phi, self.psi, self.cache_dtype = config, phi, psi, dtype
        self.kv: Optional[QuantizedKV] = None
        self.cumulative_length = 0
        self.pending: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        dtype = self.cache_dtype or (key_states.dtype if key_states.dtype != torch.float32 else torch.float16)
        self.kv = QuantizedKV(key_states.shape[0], self.config, dtype=dtype, device=key_states.device, psi=self.psi)
        self.device = self.kv.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.pending is not None:
            raise RuntimeError("KVLinCCache: the previous step's keys were never attended to. The model must run "
                               f"attn_implementation={ATTN_IMPLEMENTATION!r} (model.set_attn_implementation("
                               f"{ATTN_IMPLEMENTATION!r}), after `import lrkern.kvlinc`)")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.pending = (key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        setattr(key_states, LAYER_TAG, self)
        return key_states, value_states

    def take_pending(self) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.pending
        self.pending = None
        return k, v

    @property
    def batch_size(self) -> int:
        if self.kv is None:
            raise AttributeError("batch_size")  # hasattr() is how transformers asks
        return self.kv.batch_size

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cumulative_length + query_length, 0

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.kv, self.pending, self.cumulative_length = None, None, 0
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        # transformers >= 5.x passes a negative count; older callers passed the length to keep.
        n = -tokens_to_remove if tokens_to_remove < 0 else self.cumulative_length - tokens_to_remove
        if n <= 0 or self.kv is None:
            return
        self.kv.crop(n)
        self.cumulative_length -= n

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.kv is not None:
            self.kv.reorder(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.kv is not None:
            self.kv.reorder(torch.as_tensor(indices).reshape(-1))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.kv is not None:
            self.kv.reorder(torch.arange(self.kv.batch_size).repeat_interleave(repeats))

    def offload(self):
        raise NotImplementedError("KVLinCCache does not offload: its quantized layers are already ~7x smaller")

    prefetch = offload


class KVLinCCache(Cache):
    """A 2/4-bit KV cache for transformers ``generate()``: every layer a ``lrkern.QuantizedKV``.

    Args:
        config: the model's config (``model.config``); Llama, Qwen2 and Qwen3 are supported.
        preset: ``"kvlinc"`` (per-channel keys, Hadamard-rotated per-token values, linear correction when adapters
            are given), ``"kivi"`` or ``"quarot"`` (spec section 3.5). Ignored when ``kv_config`` is given.
        adapters: ``KVLinCAdapters`` calibrated for this model and these settings (``lrkern kvlinc calibrate``); they
            switch on the correction. Without them the ``kvlinc`` preset runs uncorrected.
        bits, group_size, residual: quantization settings (defaults 2, 128, residual = group_size).
        kv_config: explicit per-layer settings instead of a preset.
        dtype: storage dtype of the window, scales and zeros (default: the model's dtype, fp16 for an fp32 model).

    The model must run the lrkern attention: ``model.set_attn_implementation("lrkern_kvlinc")``.

    Example:
        >>> model.set_attn_implementation("lrkern_kvlinc")
        >>> cache = KVLinCCache(model.config, "kvlinc", adapters=KVLinCAdapters.load("adapters.safetensors"))
        >>> out = model.generate(input_ids, past_key_values=cache, max_new_tokens=64)
    """

    def __init__(self, config, preset: str = "kvlinc", *, adapters=None, bits: int = 2, group_size: int = 128,
                 residual: Optional[int] = None, kv_config: Optional[KVConfig] = None,
                 dtype: Optional[torch.dtype] = None):
        num_layers, heads, kv_heads, head_dim = model_geometry(config)
        impl = getattr(config, "_attn_implementation", None)
        if impl != ATTN_IMPLEMENTATION:
            raise ValueError(f"KVLinCCache needs the model to run attn_implementation={ATTN_IMPLEMENTATION!r}, but "
                             f"it runs {impl!r}: call model.set_attn_implementation({ATTN_IMPLEMENTATION!r}) after "
                             "`import lrkern.kvlinc` (or pass it to from_pretrained)")
        if kv_config is None:
            if preset not in PRESETS:
                raise ValueError(f"preset={preset!r} is unknown; accepted: {', '.join(PRESETS)}")
            settings = dict(bits=bits, group_size=group_size, residual=residual or group_size)
            if preset == "kvlinc":
                settings["feature_dim"] = adapters.config.feature_dim if adapters is not None else 0
            kv_config = KVConfig.preset(preset, kv_heads, head_dim, **settings)
        if (kv_config.num_kv_heads, kv_config.head_dim) != (kv_heads, head_dim):
            raise ValueError(f"kv_config is for {kv_config.num_kv_heads} KV heads of dim {kv_config.head_dim}; the "
                             f"model has {kv_heads} of dim {head_dim}")
        if adapters is not None:
            adapters.check_compatible(config, kv_config)
        elif kv_config.feature_dim:
            raise ValueError(f"kv_config has feature_dim={kv_config.feature_dim} (linear correction) but no adapters "
                             "were given; pass adapters= or use feature_dim=0")
        self.kv_config = kv_config
        self.adapters = adapters
        layers = [KVLinCLayer(kv_config, phi=adapters.phi[i] if adapters is not None else None,
                              psi=adapters.psi[i] if adapters is not None else None, dtype=dtype)
                  for i in range(num_layers)]
        super().__init__(layers=layers)

    @property
    def nbytes(self) -> int:
        """Bytes allocated by every layer's quantized cache (codes, scales, zeros, windows, correction state)."""
        return sum(layer.kv.nbytes for layer in self.layers if layer.kv is not None)

    def __repr__(self) -> str:
        return f"KVLinCCache(layers={len(self.layers)}, {self.kv_config}, corrected={self.adapters is not None})"
