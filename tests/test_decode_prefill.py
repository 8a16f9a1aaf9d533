"""``lrkern.decode_attention`` / ``lrkern.prefill_attention``: attention over what the cache holds (its dequantized
view), the correction formula, the causal chunk merge, torch.compile, and errors for mismatched caches."""
import pytest
import torch

import lrkern
from lrkern.reference.hadamard import rotate
from tests.helpers import assert_close
from tests.kv_cases import make_cache

G = 32


def _softmax_attention(q, k_hat, v_hat, lengths, causal_new=None):
    """fp32 attention of q [B, Hq, t, d] over each row's first lengths[b] tokens of k_hat/v_hat [B, Hkv, T, d]."""
    B, Hq, t, d = q.shape
    g = Hq // k_hat.shape[1]
    k = k_hat.repeat_interleave(g, 1)
    v = v_hat.repeat_interleave(g, 1)
    s = q.float() @ k.transpose(-1, -2) / d ** 0.5
    mask = torch.arange(k.shape[2])[None, :] >= torch.tensor(lengths)[:, None]
    s = s.masked_fill(mask[:, None, None, :], float("-inf"))
    return torch.softmax(s, -1) @ v


@pytest.mark.parametrize("preset", ["kvlinc", "kivi", "quarot"])
def test_decode_is_softmax_over_the_dequantized_cache(backend, device, preset):
    lengths = (3 * G + 5, G + 2)
    kv, _, _ = make_cache(preset, 2, 2, 64, lengths, G=G, device=device)
    q = torch.randn(2, 6, 1, 64, device=device)
    out = lrkern.decode_attention(q, kv)  # no phi: no correction
    k_hat, v_hat = kv.dequantized()
    assert_close(out, _softmax_attention(q.cpu(), k_hat.cpu(), v_hat.cpu(), lengths).to(device))


def test_decode_correction_formula(backend, device):
    """o = (sum e^{s_j} v_j + phi^T S) / (sum e^{s_j} + phi^T z), in the original value space."""
    lengths = (3 * G + 5,)
    kv, _, _ = make_cache("kvlinc", 1, 2, 64, lengths, G=G, device=device)
    q = torch.randn(1, 4, 1, 64, device=device)
    phi = lrkern.FeatureMap(4, 64, kv.config.feature_dim).to(device)
    with torch.no_grad():
        out = lrkern.decode_attention(q, kv, phi=phi)
        f = phi(q).float().cpu()  # [1, 4, 1, D]
    k_hat, v_hat = (x.cpu() for x in kv.dequantized())
    k = k_hat.repeat_interleave(2, 1)
    v = v_hat.repeat_interleave(2, 1)
    e = torch.exp(q.cpu().float() @ k.transpose(-1, -2) / 8.0)
    S = rotate(kv.corr_s.cpu()).repeat_interleave(2, 1)  # back to the original space
    z = kv.corr_z.cpu().repeat_interleave(2, 1)
    num = e @ v + f @ S
    den = e.sum(-1, keepdim=True) + f @ z[..., None]
    assert_close(out, (num / den).to(device))


@pytest.mark.parametrize("preset,t", [("kvlinc", 5), ("kivi", 1), ("quarot", 7)])
def test_prefill_is_causal_attention_over_cache_and_chunk(backend, device, preset, t):
    lengths = (2 * G + 3, G)
    kv, _, _ = make_cache(preset, 2, 2, 64, lengths, G=G, device=device)
    q = torch.randn(2, 4, t, 64, device=device)
    k_new = torch.randn(2, 2, t, 64, device=device)
    v_new = torch.randn(2, 2, t, 64, device=device)
    out = lrkern.prefill_attention(q, k_new, v_new, kv)
    k_hat, v_hat = (x.cpu() for x in kv.dequantized())
    want = torch.empty(2, 4, t, 64)
    for b, n in enumerate(lengths):
        for i in range(t):
            k_all = torch.cat([k_hat[b:b + 1, :, :n], k_new[b:b + 1, :, :i + 1].cpu()], 2)
            v_all = torch.cat([v_hat[b:b + 1, :, :n], v_new[b:b + 1, :, :i + 1].cpu()], 2)
            want[b:b + 1, :, i:i + 1] = _softmax_attention(q[b:b + 1, :, i:i + 1].cpu(), k_all, v_all, [n + i + 1])
    assert_close(out, want.to(device))


def test_prefill_on_an_empty_cache_is_plain_causal_attention(backend, device):
    kv = lrkern.QuantizedKV.preset("kivi", 1, 2, 64, group_size=G, dtype=torch.float32, device=device)
    q, k, v = (torch.randn(1, n, 9, 64, device=device) for n in (4, 2, 2))
    out = lrkern.prefill_attention(q, k, v, kv)
    want = torch.stack([_softmax_attention(q[:, :, i:i + 1].cpu(), k.cpu(), v.cpu(), [i + 1]) for i in range(9)], 2)
    assert_close(out, want[:, :, :, 0].to(device))


def test_prefill_chunk_blocks(device):
    """The chunk's own causal part in query blocks equals one block."""
    from lrkern.attention import _causal_chunk_attention

    q, k, v = torch.randn(2, 6, 37, 64, device=device), torch.randn(2, 3, 37, 64, device=device), torch.randn(
        2, 3, 37, 64, device=device)
    one = _causal_chunk_attention(q, k, v, 2, 0.125, block=64)
    for a, b in zip(_causal_chunk_attention(q, k, v, 2, 0.125, block=8), one):
        assert_close(a, b)


def test_decode_step_compiles(device):
    kv, _, _ = make_cache("kvlinc", 2, 2, 64, (2 * G + 3, G + 1), G=G, device=device)
    phi = lrkern.FeatureMap(4, 64, kv.config.feature_dim).to(device)

    def step(q):
        return lrkern.decode_attention(q, kv, phi=phi)

    q = torch.randn(2, 4, 1, 64, device=device)
    with torch.no_grad():
        compiled = torch.compile(step, fullgraph=True)
        assert torch.equal(compiled(q), step(q))


def test_mismatched_query_or_features_raise(device):
    kv, _, _ = make_cache("kvlinc", 2, 2, 64, (G + 3, G + 3), G=G, device=device)
    q = torch.randn(2, 4, 1, 64, device=device)
    with pytest.raises(ValueError, match="head dim 128"):
        lrkern.decode_attention(torch.randn(2, 4, 1, 128, device=device), kv)
    with pytest.raises(ValueError, match="Hq=3"):
        lrkern.decode_attention(torch.randn(2, 3, 1, 64, device=device), kv)
    with pytest.raises(ValueError, match="batch 1"):
        lrkern.decode_attention(torch.randn(1, 4, 1, 64, device=device), kv)
    with pytest.raises(TypeError, match="dtype"):
        lrkern.decode_attention(q.half(), kv)
    with pytest.raises(ValueError, match="exactly 1"):
        lrkern.decode_attention(torch.randn(2, 4, 2, 64, device=device), kv)
    # Adapters of another configuration: features of another width.
    with pytest.raises(ValueError, match="feature_dim=16"):
        lrkern.decode_attention(q, kv, phi=lrkern.FeatureMap(4, 64, 8).to(device))
    kivi, _, _ = make_cache("kivi", 2, 2, 64, (G + 3, G + 3), G=G, device=device)
    with pytest.raises(ValueError, match="no linear correction"):
        lrkern.decode_attention(q, kivi, phi=lrkern.FeatureMap(4, 64, 16).to(device))
    with pytest.raises(TypeError, match="QuantizedKV"):
        lrkern.decode_attention(q, object())
    with pytest.raises(ValueError, match="k_new"):
        lrkern.prefill_attention(torch.randn(2, 4, 3, 64, device=device), torch.randn(2, 2, 2, 64, device=device),
                                 torch.randn(2, 2, 3, 64, device=device), kv)


def test_eager_fast_path_equals_the_registered_op(backend, device):
    """decode_attention skips the op's validation in eager mode; it must compute exactly what the op computes, and a
    query that wants a gradient goes through the op, which refuses the backward instead of returning a detached
    result."""
    from tests.kv_cases import op_args, phi_features

    kv, _, _ = make_cache("kvlinc", 2, 2, 64, (2 * G + 3, G + 1), G=G, device=device)
    q = torch.randn(2, 4, 1, 64, device=device)
    phi_q = phi_features(kv, q)
    fast = lrkern.decode_attention(q, kv, phi=phi_q)
    assert torch.equal(fast, torch.ops.lrkern.kv_attention(*op_args(kv, q, phi_q))[0])
    out = lrkern.decode_attention(q.clone().requires_grad_(True), kv, phi=phi_q)
    with pytest.raises(RuntimeError):
        out.sum().backward()
