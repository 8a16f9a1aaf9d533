"""KVLinC end to end: a 2-bit KV cache with linear correction as a drop-in transformers cache (spec ``kvlinc.md``).

Importing this package registers ``attn_implementation="lrkern_kvlinc"`` with transformers.

    >>> import lrkern.kvlinc as kvlinc
    >>> model, tok = kvlinc.load_model("smollm2-135m")
    >>> cache = kvlinc.KVLinCCache(model.config, "kvlinc", adapters=kvlinc.KVLinCAdapters.load(path, model))
    >>> model.generate(ids, past_key_values=cache, max_new_tokens=64)
"""
from lrkern.kvlinc.cache import ATTN_IMPLEMENTATION, SUPPORTED_MODEL_TYPES, KVLinCCache, KVLinCLayer
from lrkern.kvlinc.hf_attention import register
from lrkern.kvlinc.adapters import KVLinCAdapters, model_fingerprint
from lrkern.kvlinc.models import load as load_model

register()

__all__ = ["ATTN_IMPLEMENTATION", "SUPPORTED_MODEL_TYPES", "KVLinCCache", "KVLinCLayer", "KVLinCAdapters",
           "model_fingerprint", "load_model", "register"]
