"""``lrkern.QuantizedKV``: what lands in the codes, the window and the correction state, and when."""
import pytest
import torch

import lrkern
from lrkern.quantized_kv import rotate
from lrkern.reference import quant_pack as ref_quant_pack
from tests.kv_cases import make_cache

G = 32


@pytest.mark.parametrize("T", [0, G - 1, G, G + 1, 3 * G + 5])
@pytest.mark.parametrize("preset", ["kvlinc", "kivi", "quarot"])
def test_window_boundaries(preset, T):
    kv, k, v = make_cache(preset, 2, 2, 64, (T, T), G=G)
    # The window never holds R = G tokens after an append: a full window is flushed as one block.
    assert kv.n_quant_list == [T // G * G] * 2 and kv.n_win_list == [T % G] * 2
    assert kv.lengths == [T, T]
    if T == 0:
        return
    k_hat, v_hat = kv.dequantized()
    nq = T // G * G
    # Window tokens are stored in full precision (rotations are exact up to fp32 rounding).
    torch.testing.assert_close(k_hat[:, :, nq:T], k[:, :, nq:T].float(), rtol=0, atol=1e-5)
    torch.testing.assert_close(v_hat[:, :, nq:T], v[:, :, nq:T].float(), rtol=0, atol=1e-5)
    if nq:
        # Quantized tokens are within half a quantization step of the truth (checked loosely: 2-bit steps are big).
        assert (k_hat[:, :, :nq] - k[:, :, :nq]).abs().max() < (k.amax() - k.amin()) / 3


@pytest.mark.parametrize("preset", ["kvlinc", "kivi", "quarot"])
def test_codes_bit_equal_to_quant_pack(preset):
    T = 3 * G + 7
    kv, k, v = make_cache(preset, 2, 2, 64, (T, T), G=G, dtype=torch.float16)
    c = kv.config
    nq = 3 * G
    k_st = rotate(k) if c.rotate_keys else k
    v_st = rotate(v) if c.value_rotation else v
    if c.key_per_channel:
        kc, ks, kz = ref_quant_pack(k_st[:, :, :nq], c.bits, G, -2)
        assert torch.equal(kv.k_scale[:, :, :nq // G], ks) and torch.equal(kv.k_zero[:, :, :nq // G], kz)
    else:
        kc, ks, kz = ref_quant_pack(k_st[:, :, :nq], c.bits, c.cgroup, -1)
        assert torch.equal(kv.k_scale[:, :, :nq], ks) and torch.equal(kv.k_zero[:, :, :nq], kz)
    assert torch.equal(kv.k_codes[:, :, :nq], kc)
    vc, vs, vz = ref_quant_pack(v_st[:, :, :nq], c.bits, c.cgroup, -1)
    assert torch.equal(kv.v_codes[:, :, :nq], vc)
    assert torch.equal(kv.v_scale[:, :, :nq], vs) and torch.equal(kv.v_zero[:, :, :nq], vz)


def test_token_by_token_equals_one_chunk():
    """Decode-style appends (one token per call, in-place window writes) store exactly what one bulk append does."""
    T = 2 * G + 3
    bulk, k, v = make_cache("kvlinc", 2, 2, 64, (T, T), G=G)
    step = lrkern.QuantizedKV(2, bulk.config, dtype=torch.float32, psi=bulk.psi)
    with torch.no_grad():
        for i in range(T):
            step.append(k[:, :, i:i + 1], v[:, :, i:i + 1])
    assert step.lengths == bulk.lengths and step.n_win_list == bulk.n_win_list
    for name in ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero"):
        a, b = getattr(step, name), getattr(bulk, name)
        n = min(a.shape[2], b.shape[2])
        assert torch.equal(a[:, :, :n], b[:, :, :n]), name
    nw = T % G
    assert torch.equal(step.k_win[:, :, :nw], bulk.k_win[:, :, :nw])
    torch.testing.assert_close(step.corr_s, bulk.corr_s, rtol=1e-5, atol=1e-5)


def test_correction_state_from_full_precision_keys():
    """S = sum psi(k_j) v_j^T and z = sum psi(k_j) over quantized tokens, psi on the original fp keys, v stored
    (rotated) space."""
    T = 2 * G + 5
    kv, k, v = make_cache("kvlinc", 1, 2, 64, (T,), G=G)
    nq = 2 * G
    with torch.no_grad():
        feats = kv.psi(k[:, :, :nq].float())
    v_rot = rotate(v[:, :, :nq]).float()
    torch.testing.assert_close(kv.corr_s, feats.transpose(-1, -2) @ v_rot, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(kv.corr_z, feats.sum(2), rtol=1e-5, atol=1e-4)


def test_rows_of_different_lengths_and_padding_sides():
    lengths = [G + 3, 0, 2 * G + 1]
    kv, k, v = make_cache("kivi", 3, 2, 64, lengths, G=G)
    assert kv.lengths == lengths
    # Left padding: the real tokens are the last ones of each row.
    t = k.shape[2]
    k_left = torch.zeros_like(k)
    v_left = torch.zeros_like(v)
    for b, n in enumerate(lengths):
        k_left[b, :, t - n:] = k[b, :, :n]
        v_left[b, :, t - n:] = v[b, :, :n]
    left = lrkern.QuantizedKV(3, kv.config, dtype=torch.float32)
    left.append(k_left, v_left, lengths=lengths, padding_side="left")
    for a, b in zip(kv.dequantized(), left.dequantized()):
        assert torch.equal(a, b)
    # Rows stay independent through later single-token appends.
    for _ in range(G):
        kv.append(torch.randn(3, 2, 1, 64), torch.randn(3, 2, 1, 64))
    assert kv.lengths == [n + G for n in lengths]
    assert all(nw < G and nq % G == 0 for nq, nw in zip(kv.n_quant_list, kv.n_win_list))


def test_storage_grows_without_requantizing():
    kv, k, v = make_cache("kivi", 1, 1, 64, (2 * G,), G=G)
    before = kv.k_codes[:, :, :2 * G].clone()
    for _ in range(20):
        kv.append(torch.randn(1, 1, G, 64), torch.randn(1, 1, G, 64))
    assert torch.equal(kv.k_codes[:, :, :2 * G], before)
    assert kv.k_codes.shape[2] >= kv.n_quant_list[0] and kv.k_codes.shape[2] % G == 0


@pytest.mark.parametrize("d,want", [(64, 5.5), (128, 6.0)])
def test_nbytes_vs_fp16(d, want):
    """Every held byte counted; at T = 8k, G = 128, 2 bits the cache is >= 6x smaller than fp16 for d = 128 (d = 64:
    the per-token value scale and zero cost 0.5 bit per element, ~5.8x)."""
    T, H = 8192, 2
    kv = lrkern.QuantizedKV.preset("kvlinc", 1, H, d, capacity=T, psi=lrkern.FeatureMap(H, d, 64))
    with torch.no_grad():
        kv.append(torch.randn(1, H, T, d, dtype=torch.float16), torch.randn(1, H, T, d, dtype=torch.float16))
    held = sum(t.numel() * t.element_size() for t in (kv.k_codes, kv.k_scale, kv.k_zero, kv.v_codes, kv.v_scale,
                                                       kv.v_zero, kv.k_win, kv.v_win, kv.corr_s, kv.corr_z))
    assert kv.nbytes == held
    fp16 = 2 * H * T * d * 2
    assert fp16 / kv.nbytes >= want


def test_reorder_rows():
    kv, _, _ = make_cache("kvlinc", 3, 1, 64, (G + 1, 2 * G + 2, 5), G=G)
    k_hat, v_hat = kv.dequantized()
    s = kv.corr_s.clone()
    kv.reorder(torch.tensor([2, 0, 0]))
    assert kv.lengths == [5, G + 1, G + 1]
    k2, v2 = kv.dequantized()
    T = max(kv.lengths)
    assert torch.equal(k2[1], k_hat[0, :, :T]) and torch.equal(v2[0, :, :5], v_hat[2, :, :5])
    assert torch.equal(kv.corr_s[2], s[0])


def test_bad_configuration_and_append():
    with pytest.raises(ValueError, match="bits=3"):
        lrkern.KVConfig(num_kv_heads=1, head_dim=64, bits=3)
    with pytest.raises(ValueError, match="residual=16"):
        lrkern.KVConfig(num_kv_heads=1, head_dim=64, group_size=32, residual=16)
    with pytest.raises(ValueError, match="key_mode"):
        lrkern.KVConfig(num_kv_heads=1, head_dim=64, key_mode="tensor")
    with pytest.raises(ValueError, match="preset 'fp8'"):
        lrkern.QuantizedKV.preset("fp8", 1, 1, 64)
    kv = lrkern.QuantizedKV.preset("kivi", 2, 2, 64, group_size=G)
    with pytest.raises(ValueError, match="Hkv=2"):
        kv.append(torch.randn(2, 3, 1, 64, dtype=torch.float16), torch.randn(2, 3, 1, 64, dtype=torch.float16))
    with pytest.raises(TypeError, match="dtype"):
        kv.append(torch.randn(2, 2, 1, 64), torch.randn(2, 2, 1, 64))
    with pytest.raises(ValueError, match="lengths"):
        x = torch.randn(2, 2, 4, 64, dtype=torch.float16)
        kv.append(x, x, lengths=[5, 1])
    corr = lrkern.QuantizedKV.preset("kvlinc", 1, 1, 64, group_size=G)
    with pytest.raises(ValueError, match="needs psi"):
        corr.append(torch.randn(1, 1, 1, 64, dtype=torch.float16), torch.randn(1, 1, 1, 64, dtype=torch.float16))
    wrong_psi = lrkern.QuantizedKV.preset("kvlinc", 1, 1, 64, group_size=G, psi=lrkern.FeatureMap(1, 64, 8))
    with pytest.raises(ValueError, match="psi returned"):
        x = torch.randn(1, 1, G, 64, dtype=torch.float16)
        with torch.no_grad():
            wrong_psi.append(x, x)
