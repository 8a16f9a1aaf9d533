"""KVLinCCache inside transformers generate(), on tiny randomly initialised Llama / Qwen2 / Qwen3 models (no download).

The full-precision reference is transformers' own DynamicCache with SDPA, run through the same model object.
"""
import pytest
import torch

transformers = pytest.importorskip("transformers")

import lrkern.kvlinc as kvlinc  # noqa: E402
from lrkern.kvlinc.cache import cache_kwarg  # noqa: E402
from transformers import DynamicCache  # noqa: E402

ARCHS = ["llama", "qwen2", "qwen3"]
VOCAB = 96


def tiny_model(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0,
                  eos_token_id=None, bos_token_id=None, attn_implementation=kvlinc.ATTN_IMPLEMENTATION)
    if arch == "llama":
        config = transformers.LlamaConfig(head_dim=32, **common)
    elif arch == "qwen2":
        config = transformers.Qwen2Config(**common)  # head_dim = 64 / 4 = 16
    else:
        config = transformers.Qwen3Config(head_dim=32, **common)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=kvlinc.ATTN_IMPLEMENTATION)
    # Sharper attention than the default init, so quantization error is visible in the logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(8.0)
    return model.eval()


def generate(model, ids, cache, n=12, **kw):
    kw = {"max_new_tokens": n, "min_new_tokens": n, "do_sample": False, "output_scores": True,
          "return_dict_in_generate": True, **kw}
    out = model.generate(ids, **{cache_kwarg(model): cache}, **kw)
    return out.sequences, torch.stack(out.scores, dim=1)


def prompt(b: int, t: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (b, t), generator=g)


@pytest.mark.parametrize("arch", ARCHS)
def test_window_covering_everything_matches_fp_cache(arch):
    """Nothing is quantized (window R > sequence): the same tokens and logits as the full-precision cache."""
    model = tiny_model(arch)
    ids = prompt(2, 20)
    ref_seq, ref_scores = generate(model, ids, DynamicCache(config=model.config))
    cache = kvlinc.KVLinCCache(model.config, "kvlinc", bits=2, group_size=16, residual=64, dtype=torch.float32)
    seq, scores = generate(model, ids, cache)
    assert cache.layers[0].kv.n_quant_list == [0, 0]
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(scores, ref_scores, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_four_bit_logits_stay_close(arch):
    """Most of the context quantized at 4 bits: logits within 10% (rms) of full precision (the q/k weights are scaled up 8x, so attention is sharp); at 2 bits the error is
    clearly larger (so the test can tell quantization happened)."""
    model = tiny_model(arch)
    ids = prompt(1, 70)
    # Teacher-forced continuation: both caches see the same tokens, so the logits are comparable position by position.
    cont = prompt(1, 16, seed=2)

    def logits(cache):
        with torch.no_grad():
            model(ids, **{cache_kwarg(model): cache})
            outs = [model(cont[:, i:i + 1], **{cache_kwarg(model): cache}).logits for i in range(cont.shape[1])]
        return torch.cat(outs, dim=1)

    ref = logits(DynamicCache(config=model.config))
    err = {}
    for bits in (4, 2):
        cache = kvlinc.KVLinCCache(model.config, "kvlinc", bits=bits, group_size=16, residual=16)
        out = logits(cache)
        assert cache.layers[0].kv.n_quant_list == [80]
        err[bits] = ((out - ref).pow(2).mean() / ref.pow(2).mean()).sqrt().item()
    assert err[4] < 0.10, err
    assert err[2] > 3 * err[4], err


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("preset", ["kvlinc", "kivi", "quarot"])
def test_left_padded_batch_equals_rows_alone(arch, preset):
    model = tiny_model(arch)
    a, b = prompt(1, 37, seed=3), prompt(1, 21, seed=4)
    ids = torch.full((2, 37), model.config.pad_token_id)
    ids[0] = a[0]
    ids[1, 37 - 21:] = b[0]
    mask = torch.zeros_like(ids)
    mask[0] = 1
    mask[1, 37 - 21:] = 1

    def cache():
        return kvlinc.KVLinCCache(model.config, preset, bits=2, group_size=16, residual=16)

    seq, scores = generate(model, ids, cache(), n=20, attention_mask=mask)
    for row, single in ((0, a), (1, b)):
        s1, sc1 = generate(model, single, cache(), n=20)
        assert torch.equal(seq[row, 37:], s1[0, single.shape[1]:]), f"row {row}"
        torch.testing.assert_close(scores[row], sc1[0], rtol=1e-3, atol=1e-3)


def test_beam_search_runs_and_matches_fp_cache_when_nothing_is_quantized():
    model = tiny_model("llama")
    ids = prompt(2, 12)
    ref = model.generate(ids, **{cache_kwarg(model): DynamicCache(config=model.config)}, max_new_tokens=10,
                         min_new_tokens=10, do_sample=False, num_beams=3, num_return_sequences=2)
    cache = kvlinc.KVLinCCache(model.config, "kvlinc", group_size=16, residual=64, dtype=torch.float32)
    out = model.generate(ids, **{cache_kwarg(model): cache}, max_new_tokens=10, min_new_tokens=10,
                         do_sample=False, num_beams=3, num_return_sequences=2)
    assert out.shape == (4, 22) and torch.equal(out, ref)


def test_beam_search_with_quantized_blocks_reorders_like_a_gather():
    """reorder_cache must move every row's codes, scales, window, lengths and correction state together."""
    model = tiny_model("llama")
    cache = kvlinc.KVLinCCache(model.config, "kivi", bits=2, group_size=16, residual=16)
    ids = torch.cat([prompt(1, 40, seed=5), prompt(1, 23, seed=6)[:, :23].repeat(1, 2)[:, :40]], dim=0)
    with torch.no_grad():
        model(ids, **{cache_kwarg(model): cache})
    layer = cache.layers[1].kv
    k0, v0 = layer.dequantized()
    beam_idx = torch.tensor([1, 1, 0])
    cache.reorder_cache(beam_idx)
    k1, v1 = cache.layers[1].kv.dequantized()
    assert torch.equal(k1, k0[beam_idx]) and torch.equal(v1, v0[beam_idx])
    # And generation keeps going on the reordered rows: beam search end to end with quantized blocks.
    out = model.generate(prompt(2, 40, seed=7), **{cache_kwarg(model): kvlinc.KVLinCCache(
        model.config, "kvlinc", group_size=16, residual=16)}, max_new_tokens=24, num_beams=3, do_sample=False)
    assert out.shape == (2, 64)


def test_sampled_decoding_runs_with_quantized_cache():
    model = tiny_model("qwen2")
    torch.manual_seed(0)
    cache = kvlinc.KVLinCCache(model.config, "kvlinc", group_size=16, residual=16)
    out = model.generate(prompt(2, 30), **{cache_kwarg(model): cache}, max_new_tokens=25, min_new_tokens=25,
                         do_sample=True, top_k=20, temperature=0.9)
    assert out.shape == (2, 55)
    assert cache.layers[0].kv.lengths == [54, 54]


def test_crop_rolls_back_window_tokens_exactly():
    """35 tokens (G=16, R=24: one block quantized, 19 in the window), then 4 drafted ones rolled back: the cache is
    bit for bit the one that never saw them. (Had the drafts flushed a block, that block would stay quantized.)"""
    model = tiny_model("llama")
    base, extra = prompt(1, 35, seed=8), prompt(1, 4, seed=9)
    a = kvlinc.KVLinCCache(model.config, "kvlinc", group_size=16, residual=24)
    b = kvlinc.KVLinCCache(model.config, "kvlinc", group_size=16, residual=24)
    with torch.no_grad():
        model(base, **{cache_kwarg(model): a})
        model(base, **{cache_kwarg(model): b})
        model(extra, **{cache_kwarg(model): b})
    b.crop(-4)
    assert b.get_seq_length() == a.get_seq_length() == 35
    for la, lb in zip(a.layers, b.layers):
        assert la.kv.lengths == lb.kv.lengths
        ka, va = la.kv.dequantized()
        kb, vb = lb.kv.dequantized()
        assert torch.equal(ka, kb) and torch.equal(va, vb)
    with pytest.raises(ValueError, match="residual window"):
        b.crop(-30)


def test_misconfigured_model_and_unsupported_architecture_are_refused():
    model = tiny_model("llama")
    model.set_attn_implementation("sdpa")
    with pytest.raises(ValueError, match="lrkern_kvlinc"):
        kvlinc.KVLinCCache(model.config, "kvlinc")
    # A cache built while the model ran lrkern's attention, then used under SDPA: refused at the next step.
    model.set_attn_implementation(kvlinc.ATTN_IMPLEMENTATION)
    cache = kvlinc.KVLinCCache(model.config, "kivi", group_size=16)
    model.set_attn_implementation("sdpa")
    with torch.no_grad(), pytest.raises(RuntimeError, match="never attended"):
        model(prompt(1, 4), **{cache_kwarg(model): cache})
        model(prompt(1, 1), **{cache_kwarg(model): cache})
    gpt2 = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32)
    with pytest.raises(ValueError, match="llama, qwen2, qwen3"):
        kvlinc.KVLinCCache(gpt2, "kvlinc")
    model.set_attn_implementation(kvlinc.ATTN_IMPLEMENTATION)
    with pytest.raises(ValueError, match="preset"):
        kvlinc.KVLinCCache(model.config, "int8")


def test_right_padding_is_refused():
    model = tiny_model("llama")
    ids = prompt(2, 10)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    cache = kvlinc.KVLinCCache(model.config, "kivi", group_size=16)
    with torch.no_grad(), pytest.raises(ValueError, match="left padding"):
        model(ids, attention_mask=mask, **{cache_kwarg(model): cache})


def test_kv_bytes_per_token_marginal_rate_is_over_six_times_below_fp16():
    """Each further token costs codes + scales only: 2 bits + 32/G bits per element for keys and 2 + 32/d for
    values, > 6x below fp16 (the window and the correction state are a fixed cost, reported by the eval)."""
    from lrkern import QuantizedKV
    for d in (64, 128):
        kv = QuantizedKV.preset("kvlinc", 1, 4, d, feature_dim=64)
        kv.reserve(8192)
        before = kv.nbytes
        kv.reserve(16384)
        per_token = (kv.nbytes - before) / 8192
        assert per_token == 4 * (2 * d * 2 / 8 + 2 * 2 * d / 128 + 2 * 2), per_token
        assert 2 * 4 * d * 2 / per_token > 6.5
