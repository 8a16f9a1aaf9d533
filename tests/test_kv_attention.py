"""``lrkern::kv_attention`` on every backend against the reference fed the same codes (kernel error measured apart
from quantization error), at awkward shapes: window boundaries, rows of different lengths, GQA 1-8, d 64-256."""
import pytest
import torch

from lrkern.reference.kv_attention import kv_attention as ref_kv_attention
from tests.helpers import DTYPE_IDS, DTYPES, assert_close
from tests.kv_cases import make_cache, op_args, phi_features

G = 32  # token group (and window) of the test caches; boundaries below are relative to it

# (preset, B, Hkv, g, d, per-row lengths, t queries)
CASES = [
    ("kvlinc", 2, 2, 3, 64, (3 * G + 5, 3 * G + 5), 1),
    ("kivi", 1, 3, 3, 64, (G - 1,), 1),  # window only
    ("kivi", 1, 2, 4, 64, (G,), 1),  # exactly one block, empty window
    ("kivi", 1, 2, 4, 64, (G + 1,), 1),
    ("quarot", 2, 1, 8, 128, (2 * G + 7, G + 2), 1),  # rows of different lengths
    ("kvlinc", 3, 2, 1, 128, (0, G + 3, 4 * G), 1),  # an empty row
    ("kivi", 1, 1, 4, 96, (2 * G + 3,), 1),  # d = 96: block-diagonal rotation, padded tiles
    ("kvlinc", 1, 1, 3, 256, (2 * G + 1,), 1),
    ("kvlinc", 2, 2, 3, 64, (2 * G + 9, 3 * G), 5),  # a chunk of 5 queries (the prefill half)
    ("quarot", 1, 2, 4, 64, (3 * G + 2,), 3),
]
CASE_IDS = [f"{p}-B{b}-Hkv{h}-g{g}-d{d}-T{'_'.join(map(str, n))}-t{t}" for p, b, h, g, d, n, t in CASES]


def _run_and_compare(kv, q, phi_q, scale=None):
    args = op_args(kv, q, phi_q, scale)
    out, lse = torch.ops.lrkern.kv_attention(*args)
    ref_out, ref_lse = ref_kv_attention(*args)
    assert_close(out, ref_out)
    assert lse.dtype == torch.float32 and lse.shape == ref_lse.shape
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse).cpu(), finite.cpu()), "lse is finite where the reference's is not"
    # fp32 ulps of the log-sum-exp itself: relative to its magnitude (scores of ~1e3 give lse ~1e3).
    diff = (lse[finite] - ref_lse[finite]).abs() / ref_lse[finite].abs().clamp_min(1.0)
    assert not finite.any() or diff.max().item() <= 1e-5, f"lse differs by {diff.max().item():.3g} (relative)"
    return out, lse


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("preset,B,Hkv,g,d,lengths,t", CASES, ids=CASE_IDS)
def test_matches_reference_on_same_codes(backend, device, preset, B, Hkv, g, d, lengths, t, dtype):
    kv, _, _ = make_cache(preset, B, Hkv, d, lengths, dtype=dtype, device=device, G=G)
    q = torch.randn(B, Hkv * g, t, d, device=device).to(dtype)
    out, lse = _run_and_compare(kv, q, phi_features(kv, q))
    empty = torch.tensor([n == 0 for n in lengths], device=device)
    if empty.any():
        assert (out[empty] == 0).all() and torch.isneginf(lse[empty]).all(), "an empty row must give 0 and -inf"


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("key_mode,channel_group", [("channel", 32), ("token", 32), ("token", 64)])
def test_bits_and_channel_groups(backend, device, bits, key_mode, channel_group):
    kv, _, _ = make_cache("kivi", 2, 2, 64, (2 * G + 5, 3 * G + 1), device=device, bits=bits, key_mode=key_mode,
                          channel_group=channel_group)
    q = torch.randn(2, 6, 1, 64, device=device)
    _run_and_compare(kv, q, None)


@pytest.mark.parametrize("scale", [1e3, 1e-3])
def test_extreme_scores_stay_finite(backend, device, scale):
    """Scores of magnitude ~1e3 (and near 0) with the correction: the exp-domain terms must not overflow."""
    kv, _, _ = make_cache("kvlinc", 2, 2, 64, (3 * G + 4, G + 1), device=device)
    q = torch.randn(2, 4, 1, 64, device=device)
    out, lse = _run_and_compare(kv, q, phi_features(kv, q), scale=scale)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()


def test_zero_correction_equals_no_correction(backend, device):
    kv, _, _ = make_cache("kvlinc", 2, 2, 64, (3 * G + 4, 2 * G), device=device)
    kv.corr_s.zero_()
    kv.corr_z.zero_()
    q = torch.randn(2, 6, 1, 64, device=device)
    with_corr = torch.ops.lrkern.kv_attention(*op_args(kv, q, phi_features(kv, q)))
    without = torch.ops.lrkern.kv_attention(*op_args(kv, q, None))
    assert torch.equal(with_corr[0], without[0]) and torch.equal(with_corr[1], without[1])


def test_correction_changes_output(backend, device):
    """The correction is not silently dropped: a non-zero S, z moves the output, and by the reference's amount."""
    kv, _, _ = make_cache("kvlinc", 1, 2, 64, (3 * G + 4,), device=device)
    q = torch.randn(1, 4, 1, 64, device=device)
    with_corr, _ = _run_and_compare(kv, q, phi_features(kv, q))
    without, _ = torch.ops.lrkern.kv_attention(*op_args(kv, q, None))
    assert (with_corr - without).abs().max().item() > 1e-3


def test_forced_splits_triton(device):
    """The flash-decoding reduction over many splits (each a few tiles) equals one split."""
    from lrkern.ops._dispatch import why_unavailable

    if why_unavailable("triton", device) is not None:
        pytest.skip(why_unavailable("triton", device))
    from lrkern.kernels.kv_attention import kv_attention as triton_kv_attention

    kv, _, _ = make_cache("kvlinc", 2, 1, 64, (8 * G + 3, 5 * G + 1), device=device)
    q = torch.randn(2, 3, 1, 64, device=device)
    args = op_args(kv, q, phi_features(kv, q))
    ref_out, _ = ref_kv_attention(*args)
    for splits in (1, 3, 16):
        out, _ = triton_kv_attention(*args, num_splits=splits)
        assert_close(out, ref_out)


def test_opcheck(backend, device):
    kv, _, _ = make_cache("kvlinc", 2, 1, 64, (2 * G + 3, G), device=device)
    q = torch.randn(2, 2, 1, 64, device=device)
    torch.library.opcheck(torch.ops.lrkern.kv_attention.default, op_args(kv, q, phi_features(kv, q)))
    kv, _, _ = make_cache("quarot", 1, 2, 64, (G + 3,), device=device, dtype=torch.float16)
    q = torch.randn(1, 4, 2, 64, device=device, dtype=torch.float16)
    torch.library.opcheck(torch.ops.lrkern.kv_attention.default, op_args(kv, q, None))


def test_bad_input_names_the_argument(device):
    kv, _, _ = make_cache("kvlinc", 1, 2, 64, (G + 3,), device=device)
    q = torch.randn(1, 4, 1, 64, device=device)
    good = list(op_args(kv, q, phi_features(kv, q)))

    def call(i, value, exc, match):
        args = list(good)
        args[i] = value
        with pytest.raises(exc, match=match):
            torch.ops.lrkern.kv_attention(*args)

    call(0, torch.randn(1, 3, 1, 64, device=device), ValueError, "not a multiple")
    call(0, torch.randn(1, 4, 1, 32, device=device), ValueError, "k_win has shape")
    call(0, q.half(), TypeError, "k_win has dtype")
    call(1, good[1].float(), TypeError, "k_codes has dtype")
    call(9, good[9].long(), TypeError, "n_quant has dtype")
    call(9, torch.tensor([G + 1], dtype=torch.int32, device=device), ValueError, "n_quant")
    call(10, torch.tensor([G + 1], dtype=torch.int32, device=device), ValueError, "n_win")
    call(13, None, ValueError, "together")
    call(13, good[13][..., :8].contiguous(), ValueError, "phi_q has shape")
    call(14, 3, ValueError, "bits=3")
    call(15, 24, ValueError, "multiple of 16")
    call(17, 48, ValueError, "channel_group=48")
