"""KVLinC's method layer end to end on a tiny random Llama saved as a local model folder with its own tokenizer (no
download): adapters round-trip and refusal, calibration lowering the held-out attention error, the eval protocol,
and the ``lrkern kvlinc calibrate`` / ``eval`` commands."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import lrkern.kvlinc as kvlinc  # noqa: E402
from lrkern.cli import main as cli  # noqa: E402
from lrkern.kvlinc.adapters import KVLinCAdapters  # noqa: E402
from lrkern.kvlinc.calibrate import CalibrationSettings, calibrate, capture_qkv  # noqa: E402
from lrkern.kvlinc.evaluate import EvalSettings, kv_bytes_per_token, perplexity, cache_factory  # noqa: E402
from lrkern.quantized_kv import KVConfig  # noqa: E402

TEXT = ("The quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat near the old door . "
        "A small bird sings in the tall tree and the river runs past the mill toward the sea . ") * 60


def _tokenizer():
    words = sorted(set(TEXT.split()))
    vocab = {"<unk>": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<unk>")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A 2-layer Llama (GQA 4/2, head dim 32) saved with a word-level tokenizer, plus a text file."""
    d = tmp_path_factory.mktemp("tiny_llama")
    tok = _tokenizer()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      head_dim=32, max_position_embeddings=1024)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(6.0)  # sharper attention: quantization error worth correcting
    model.save_pretrained(d)
    tok.save_pretrained(d)
    (d / "text.txt").write_text(TEXT.replace(" . ", " .\n"))
    return d


@pytest.fixture(scope="module")
def loaded(model_dir):
    return kvlinc.load_model(str(model_dir))


SMALL = CalibrationSettings(bits=2, group_size=16, residual=16, feature_dim=8, sequences=3, heldout=1, seq_len=96,
                            steps=60, lr=0.02, batch_size=3)


def test_capture_gives_post_rope_qkv_of_every_layer(loaded):
    model, tok = loaded
    ids = torch.randint(1, len(tok), (2, 40))
    cap = capture_qkv(model, ids)
    assert sorted(cap) == [0, 1]
    q, k, v = cap[1]
    assert q.shape == (2, 4, 40, 32) and k.shape == v.shape == (2, 2, 40, 32)
    assert model.config._attn_implementation == kvlinc.ATTN_IMPLEMENTATION  # restored afterwards


def test_calibration_lowers_heldout_attention_error_and_round_trips(loaded, model_dir, tmp_path):
    model, tok = loaded
    adapters = calibrate(model, tok, model_dir / "text.txt", SMALL, log=lambda s: None)
    report = adapters.extra["layers"]
    assert len(report) == 2
    for r in report:
        assert r["train_last"] < r["train_first"], r
        assert r["heldout_corrected"] < r["heldout_uncorrected"], r
    path = tmp_path / "a.safetensors"
    adapters.save(path, adapters.extra)
    back = KVLinCAdapters.load(path, model)
    assert back.config == adapters.config and back.activation == adapters.activation
    for a, b in zip(adapters.state_dict().values(), back.state_dict().values()):
        assert torch.equal(a, b)
    assert back.extra["layers"] == report

    # Other settings, or another checkpoint, are refused with a message naming what differs.
    other = KVConfig(**{**adapters.config.__dict__, "bits": 4})
    with pytest.raises(ValueError, match="bits=2"):
        KVLinCAdapters.load(path, model, kv_config=other)
    with pytest.raises(ValueError, match="bits"):
        kvlinc.KVLinCCache(model.config, "kvlinc", bits=4, group_size=16, residual=16, adapters=back)
    retrained = transformers.LlamaForCausalLM(model.config)
    with pytest.raises(ValueError, match="another checkpoint"):
        KVLinCAdapters.load(path, retrained)
    bigger = transformers.LlamaConfig(**{**model.config.to_dict(), "num_hidden_layers": 3})
    with pytest.raises(ValueError, match="another model"):
        back.check_compatible(bigger, back.config)
    with pytest.raises(ValueError, match="not a lrkern KVLinC adapter file"):
        from safetensors.torch import save_file
        save_file({"x": torch.zeros(1)}, str(tmp_path / "x.safetensors"))
        KVLinCAdapters.load(tmp_path / "x.safetensors")


def test_eval_protocol_fp16_equals_plain_forward_and_quantized_is_worse(loaded, model_dir):
    """The fp16 path of the chunked protocol equals one full forward's loss on the scored tokens."""
    model, tok = loaded
    s = EvalSettings(ctx=96, prefix=48, chunk=8, batch=2, max_windows=2, group_size=16, residual=16)
    ids = torch.randint(1, len(tok), (2, 96), generator=torch.Generator().manual_seed(0))
    ppl, n = perplexity(model, ids, cache_factory(model, "fp16", 16, s), s)
    with torch.no_grad():
        logits = model(ids).logits[:, 47:-1]
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 48:].reshape(-1)).exp()
    assert n == 2 * 48
    assert ppl == pytest.approx(ref.item(), rel=1e-4)
    q_ppl, _ = perplexity(model, ids, cache_factory(model, "kivi", 2, s), s)
    assert q_ppl != pytest.approx(ppl, rel=1e-3)


def test_kv_bytes_per_token_counts_every_buffer(loaded):
    model, _ = loaded
    s = EvalSettings(group_size=128, residual=128)
    L, Hkv, d = 2, 2, 32
    assert kv_bytes_per_token(model.config, "fp16", 16, s) == 2 * L * Hkv * d * 2
    # 8192 tokens with G = R = 128: all 64 blocks quantized (a full window flushes), the empty window still allocated.
    codes = 2 * 8192 * d * 2 / 8
    scales = 2 * 2 * (8192 / 128 * d + 8192)  # keys per channel per block, values per token (fp16)
    window = 2 * 128 * d * 2
    expect = L * Hkv * (codes + scales + window) / 8192
    assert kv_bytes_per_token(model.config, "kivi", 2, s) == pytest.approx(expect)
    corr = 8 * d * 4 + 8 * 4
    assert kv_bytes_per_token(model.config, "kvlinc", 2, s, feature_dim=8) == pytest.approx(
        expect + L * Hkv * corr / 8192)


def test_cli_calibrate_then_eval_writes_results(model_dir, tmp_path):
    out = tmp_path / "adapters.safetensors"
    common = ["--model", str(model_dir), "--data", str(model_dir / "text.txt"), "--group-size", "16"]
    assert cli(["kvlinc", "calibrate", *common, "--out", str(out), "--feature-dim", "8", "--sequences", "2",
                "--heldout", "1", "--seq-len", "64", "--steps", "5"]) == 0
    assert out.is_file()
    assert KVLinCAdapters.load(out).extra["command"].startswith("lrkern kvlinc calibrate --model ")
    js, md = tmp_path / "ppl.json", tmp_path / "ppl.md"
    assert cli(["kvlinc", "eval", *common, "--adapters", str(out), "--bits", "2", "--ctx", "64", "--windows", "2",
                "--batch", "2", "--chunk", "8", "--out-json", str(js), "--out-md", str(md)]) == 0
    rows = json.loads(js.read_text())
    assert [(r["method"], r["bits"]) for r in rows] == [("fp16", 16), ("kivi", 2), ("quarot", 2), ("kvlinc", 2)]
    assert all(r["tokens"] == 2 * 32 and r["ppl"] > 1 for r in rows)
    assert rows[-1]["corrected"] is True
    assert "| kvlinc | 2 |" in md.read_text()
    with pytest.raises(SystemExit):
        cli(["kvlinc", "eval", *common, "--methods", "fp16,int3"])
