"""Calibration of the KVLinC linear correction (spec ``kvlinc.md`` 3.3): emulate, for every position of N calibration
sequences, the attention a decode step computes over a ``lrkern.QuantizedKV`` fed one token per step, and fit the
feature maps phi (queries) and psi (keys) of one layer so that the corrected output approaches full-precision
attention.

Shapes: N sequences, Hq query heads, Hkv KV heads (g = Hq / Hkv, query head h reads KV head h // g), T tokens, d head
dim, D correction features, G = ``config.group_size``, R = ``config.residual``.

The emulation is exact, not an approximation of the cache: after n tokens a row holds the quantized prefix
``nq(n) = 0 if n < R else G * ((n - R) // G + 1)`` (blocks aligned at token 0, quantized once and never again), so
a token's codes do not depend on when they are read, and the whole prefix ``nq(T)`` can be quantized at once with
the cache's own ops. Query i (which sees n = i + 1 tokens) reads token j < nq(i + 1) dequantized and every later
token j <= i in full precision (the cache dtype). Its correction reads the running sums of the cache,

    S_b = sum_{j < b*G} psi(k_j) v_j^T,   z_b = sum_{j < b*G} psi(k_j),    b = nq(i + 1) / G,

and since b only changes every G queries (queries R-1+(b-1)G ... R-2+bG share S_b), the correction of all queries is
one batched [G, D] @ [D, d] product per block: O(T D d) per head, not a T x T matrix. Only this part depends on phi
and psi; the softmax part (scores, max, sums, the dequantized tokens) is computed once per layer without autograd
(``emulate_layer``) and reused by every training step (``corrected_output``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from lrkern.feature_map import EXP_INIT_BIAS, EXP_INIT_WEIGHT_SCALE
from lrkern.ops.quant import quant_pack
from lrkern.quantized_kv import KVConfig
from lrkern.quantized_kv import rotate as cache_rotate
from lrkern.reference.hadamard import rotate as fp32_rotate
from lrkern.reference.kv_attention import dequant_keys, dequant_values

FeatureFn = Callable[[torch.Tensor], torch.Tensor]

# Queries per block of the uncorrected pass: its scores are one [Hq, block, Tq + T] fp32 matrix per sequence, worked
# in place (T = 1024, Hq = 9: ~35 MB), whatever N is.
_QUERY_BLOCK = 512


def n_quantized(n: int, group_size: int, residual: int) -> int:
    """Tokens of a row holding n tokens that sit in the quantized prefix (the cache's flush rule)."""
    return 0 if n < residual else group_size * ((n - residual) // group_size + 1)


@dataclass
class LayerEmulation:
    """One layer's calibration data as the cache sees it, precomputed once (no autograd), on the inputs' device.

    Queries before ``first = R - 1`` have an empty quantized prefix, so the correction never touches them; the
    tensors used for fitting hold only the Tc = T - first later ones (Tq = nq(T) is the quantized prefix):

    q_in   [N, Hq, Tc, d]    fp32 queries as ``phi`` sees them in a decode step (cache-dtype values, original space)
    k_in   [N, Hkv, Tq, d]   fp32 keys as ``psi`` sees them when their block is flushed (cache-dtype values, original
                             space)
    v_st   [N, Hkv, Tq, d]   fp32 full-precision values of the quantized prefix, stored (rotated) space
    out0   [N, Hq, Tc, d]    fp32 uncorrected decode output, stored value space
    lse0   [N, Hq, Tc]       fp32 log-sum-exp of the uncorrected scores (the log of the softmax mass)
    ref    [N, Hq, Tc, d]    fp32 full-precision causal attention, stored value space like out0
    out0_head, ref_head [N, Hq, first, d]   the same two for the uncorrected queries (for ``emulated_attention``)
    """

    config: KVConfig
    first: int
    q_in: torch.Tensor
    k_in: torch.Tensor
    v_st: torch.Tensor
    out0: torch.Tensor
    lse0: torch.Tensor
    ref: torch.Tensor
    out0_head: torch.Tensor
    ref_head: torch.Tensor

    @property
    def num_sequences(self) -> int:
        return self.q_in.shape[0]

    def to_original(self, x: torch.Tensor) -> torch.Tensor:
        """An output [..., d] from the stored value space back to the original one (the rotation is its own
        inverse); differentiable."""
        return fp32_rotate(x) if self.config.value_rotation else x


# ----------------------------------------------------------------------------------------------------- checks


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: KVConfig) -> None:
    if not isinstance(config, KVConfig):
        raise TypeError(f"config must be a lrkern.KVConfig, got {type(config).__name__}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a 4-D tensor [N, heads, T, d], got {got}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    N, Hq, T, d = q.shape
    want = (N, config.num_kv_heads, T, config.head_dim)
    for name, x in (("k", k), ("v", v)):
        if tuple(x.shape) != want:
            raise ValueError(f"{name} has shape {tuple(x.shape)}; expected {want} (q's N, T and the config's "
                             f"num_kv_heads={config.num_kv_heads}, head_dim={config.head_dim})")
    if d != config.head_dim:
        raise ValueError(f"q has head dim {d} but config.head_dim={config.head_dim}")
    if Hq % config.num_kv_heads:
        raise ValueError(f"q has Hq={Hq} heads, not a multiple of config.num_kv_heads={config.num_kv_heads}")
    if T == 0:
        raise ValueError("q, k, v hold no tokens (T = 0)")
    if q.device != k.device or q.device != v.device:
        raise ValueError(f"q, k, v must share a device, got {q.device}, {k.device}, {v.device}")


def _check_maps(phi, psi, config: KVConfig) -> bool:
    """True when the correction is on. phi and psi come together, and only for a config with feature_dim > 0."""
    if phi is None and psi is None:
        return False
    if phi is None or psi is None:
        raise ValueError("phi and psi go together: give both feature maps (correction) or neither (none)")
    if not config.feature_dim:
        raise ValueError("phi/psi were given but config.feature_dim=0 (no correction); use the 'kvlinc' preset or "
                         "set feature_dim > 0")
    return True


def _check_features(name: str, feats, want: tuple) -> torch.Tensor:
    if not isinstance(feats, torch.Tensor) or tuple(feats.shape) != want:
        got = tuple(feats.shape) if isinstance(feats, torch.Tensor) else type(feats).__name__
        raise ValueError(f"{name} returned {got}; expected features {want} (config.feature_dim={want[-1]})")
    return feats.float()


# ---------------------------------------------------------------------------------------- uncorrected emulation


def _stored_tokens(k: torch.Tensor, v: torch.Tensor, config: KVConfig, cache_dtype: torch.dtype):
    """(k_st, v_st) [N, Hkv, T, d] in the cache dtype as the cache stores them (rotated where the config says), and
    the keys psi sees at flush time. Uses the cache's own rotation so the stored bytes are the cache's."""
    k_c, v_c = k.detach().to(cache_dtype), v.detach().to(cache_dtype)
    k_st = cache_rotate(k_c) if config.rotate_keys else k_c
    v_st = cache_rotate(v_c) if config.value_rotation else v_c
    # The cache hands psi rotate(k_st) (one more rounding to the cache dtype), not the key it was given.
    k_psi = cache_rotate(k_st) if config.rotate_keys else k_c
    return k_st, v_st, k_psi


def _dequantized_prefix(k_st: torch.Tensor, v_st: torch.Tensor, config: KVConfig, tq: int):
    """fp32 (k_hat, v_hat) [N, Hkv, tq, d] of the first tq tokens in the stored spaces. Blocks are independent (keys
    group G tokens aligned at 0, values group channels of one token), so quantizing the whole prefix at once gives
    the codes the cache writes block by block."""
    c = config
    k_blk, v_blk = k_st[:, :, :tq].contiguous(), v_st[:, :, :tq].contiguous()
    if c.key_per_channel:
        kc, ks, kz = quant_pack(k_blk, c.bits, c.group_size, -2)
    else:
        kc, ks, kz = quant_pack(k_blk, c.bits, c.cgroup, -1)
    vc, vs, vz = quant_pack(v_blk, c.bits, c.cgroup, -1)
    k_hat = dequant_keys(kc, ks, kz, c.bits, c.group_size, c.key_per_channel, c.cgroup)
    v_hat = dequant_values(vc, vs, vz, c.bits, c.cgroup)
    return k_hat.float(), v_hat.float()


def _read_bias(T: int, tq: int, config: KVConfig, device) -> torch.Tensor:
    """[T, tq + T] fp32 additive mask of query i over [dequantized prefix | full-precision tokens]: 0 where the
    decode step at i reads that copy of the token, -inf elsewhere. Token j is read dequantized when j < nq(i + 1),
    in full precision when nq(i + 1) <= j <= i (the window), not at all after i."""
    nq = torch.tensor([n_quantized(i + 1, config.group_size, config.residual) for i in range(T)], device=device)
    pos = torch.arange(T, device=device)
    quant = torch.arange(tq, device=device)[None, :] < nq[:, None]
    window = (pos[None, :] >= nq[:, None]) & (pos[None, :] <= pos[:, None])
    bias = torch.full((T, tq + T), float("-inf"), device=device)
    return bias.masked_fill_(torch.cat([quant, window], dim=1), 0.0)


def _decode_pass(qr: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor, scale: float):
    """Uncorrected decode attention of one sequence, in blocks of queries, in place on each score block.

    qr [Hq, T, d] fp32 queries as the kernel sees them; keys, values [Hkv, tq + T, d] fp32 = [dequantized prefix |
    stored tokens]; bias from ``_read_bias``. Returns (out [Hq, T, d] stored value space, lse [Hq, T])."""
    Hq, T, d = qr.shape
    Hkv = keys.shape[0]
    g = Hq // Hkv
    q4 = qr.reshape(Hkv, g, T, d)
    out = torch.empty(Hkv, g, T, d, device=qr.device)
    lse = torch.empty(Hkv, g, T, device=qr.device)
    for i0 in range(0, T, _QUERY_BLOCK):
        i1 = min(T, i0 + _QUERY_BLOCK)
        s = torch.matmul(q4[:, :, i0:i1], keys[:, None].transpose(-1, -2))  # [Hkv, g, m, tq + T]
        s.mul_(scale).add_(bias[i0:i1])
        m = s.amax(dim=-1, keepdim=True)  # finite: query i always reads token i (dequantized or not)
        p = s.sub_(m).exp_()
        mass = p.sum(dim=-1, keepdim=True)
        out[:, :, i0:i1] = torch.matmul(p, values[:, None]) / mass
        lse[:, :, i0:i1] = (m + mass.log())[..., 0]
    return out.reshape(Hq, T, d), lse.reshape(Hq, T)


@torch.no_grad()
def emulate_layer(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: KVConfig, *,
                  scale: Optional[float] = None, cache_dtype: torch.dtype = torch.float16) -> LayerEmulation:
    """Precompute everything of one layer's emulated decode that does not depend on phi / psi.

    q [N, Hq, T, d], k, v [N, Hkv, T, d]: post-RoPE queries, keys and values of N calibration sequences (any float
    dtype; the reference attention uses them as given, in fp32 math). cache_dtype: what the cache stores (k, v and the
    decode query are cast to it first, exactly as a cache of that dtype would hold them). scale: default 1/sqrt(d).
    Peak memory: the inputs a few times over in fp32, plus a few [Hq, 512, Tq + T] fp32 score blocks (one sequence at
    a time): ~0.5 GB at N = 8, Hq = 9, T = 1024.
    """
    _check_inputs(q, k, v, config)
    if cache_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"cache_dtype={cache_dtype} is not supported; accepted: float32, float16, bfloat16")
    N, Hq, T, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    G, R = config.group_size, config.residual
    tq, first = n_quantized(T, G, R), min(R - 1, T)
    k_st, v_st, k_psi = _stored_tokens(k, v, config, cache_dtype)
    k_hat, v_hat = _dequantized_prefix(k_st, v_st, config, tq)
    q_in = q.detach().to(cache_dtype).float()
    qr = fp32_rotate(q_in) if config.rotate_keys else q_in
    bias = _read_bias(T, tq, config, q.device)
    out0 = torch.empty(N, Hq, T, d, device=q.device)
    lse0 = torch.empty(N, Hq, T, device=q.device)
    for n in range(N):
        keys = torch.cat([k_hat[n], k_st[n].float()], dim=1)
        values = torch.cat([v_hat[n], v_st[n].float()], dim=1)
        out0[n], lse0[n] = _decode_pass(qr[n], keys, values, bias, scale)
    ref = F.scaled_dot_product_attention(q.detach().float(), k.detach().float(), v.detach().float(), is_causal=True,
                                         scale=scale, enable_gqa=True)
    ref = fp32_rotate(ref) if config.value_rotation else ref
    return LayerEmulation(config=config, first=first, q_in=q_in[:, :, first:].contiguous(),
                          k_in=k_psi[:, :, :tq].float().contiguous(), v_st=v_st[:, :, :tq].float().contiguous(),
                          out0=out0[:, :, first:].contiguous(), lse0=lse0[:, :, first:].contiguous(),
                          ref=ref[:, :, first:].contiguous(), out0_head=out0[:, :, :first].contiguous(),
                          ref_head=ref[:, :, :first].contiguous())


# ------------------------------------------------------------------------------------------------- correction


def _block_sums(em: LayerEmulation, psi: FeatureFn, seqs: slice) -> tuple[torch.Tensor, torch.Tensor]:
    """The cache's running correction state after each flushed block: S [n, Hkv, nb, D, d] and z [n, Hkv, nb, D]
    (entry b - 1 holds the sums over the first b blocks), accumulated block by block in fp32 like the cache."""
    c = em.config
    k_in, v_st = em.k_in[seqs], em.v_st[seqs]
    n, Hkv, tq, d = k_in.shape
    feats = _check_features("psi", psi(k_in), (n, Hkv, tq, c.feature_dim))
    nb, G = tq // c.group_size, c.group_size
    fb = feats.reshape(n, Hkv, nb, G, c.feature_dim)
    s_blk = torch.matmul(fb.transpose(-1, -2), v_st.reshape(n, Hkv, nb, G, d))
    return torch.cumsum(s_blk, dim=2), torch.cumsum(fb.sum(dim=3), dim=2)


def _merge(out0: torch.Tensor, lse0: torch.Tensor, c_n: torch.Tensor, c_d: torch.Tensor) -> torch.Tensor:
    """The kernel's corrected output (reference ``kv_attention``): the softmax part (out0, lse0) and the correction
    (c_n, c_d = max(phi.z, 0)) on the common scale M = max(lse0, log c_d). The result does not depend on M, so M is
    detached; c_n is dropped where c_d == 0, as in the kernel."""
    pos = c_d > 0
    log_cd = torch.log(torch.where(pos, c_d, torch.ones_like(c_d))).masked_fill(~pos, float("-inf"))
    M = torch.maximum(lse0, log_cd).detach()
    a = torch.exp(lse0 - M)
    f = torch.where(pos, torch.exp(-M), torch.zeros_like(M))
    return (out0 * a[..., None] + c_n * f[..., None]) / (a + c_d * f)[..., None]


def corrected_output(em: LayerEmulation, phi: FeatureFn, psi: FeatureFn, seqs: slice = slice(None)) -> torch.Tensor:
    """Corrected decode output of the queries that have a quantized prefix (positions first .. T-1): [n, Hq, Tc, d]
    fp32 in the stored value space, for the sequences ``seqs`` (a slice; default all). Differentiable w.r.t. the
    parameters of phi ([n, Hq, t, d] -> [n, Hq, t, D]) and psi ([n, Hkv, t, d] -> [n, Hkv, t, D])."""
    c = em.config
    q_in = em.q_in[seqs]
    n, Hq, tc, d = q_in.shape
    G, D, Hkv = c.group_size, c.feature_dim, c.num_kv_heads
    if tc == 0:
        return em.out0[seqs]
    S, z = _block_sums(em, psi, seqs)
    nb = S.shape[2]  # = ceil(Tc / G): the blocks that queries first .. T-1 read, in order
    fq = _check_features("phi", phi(q_in), (n, Hq, tc, D))
    # Queries first + (b-1)G ... first + bG - 1 all read S_b: pad to whole blocks and multiply block by block.
    fq = F.pad(fq, (0, 0, 0, nb * G - tc)).reshape(n, Hkv, Hq // Hkv, nb, G, D)
    c_n = torch.matmul(fq, S[:, :, None]).reshape(n, Hq, nb * G, d)[:, :, :tc]
    c_d = torch.matmul(fq, z[:, :, None, :, :, None]).reshape(n, Hq, nb * G)[:, :, :tc].clamp_min(0.0)
    return _merge(em.out0[seqs], em.lse0[seqs], c_n, c_d)


def emulated_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: KVConfig,
                       phi: Optional[FeatureFn] = None, psi: Optional[FeatureFn] = None,
                       scale: Optional[float] = None,
                       cache_dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, ref) [N, Hq, T, d] fp32: out[:, :, i] is what ``lrkern.decode_attention(q_i, kv, scale, phi)`` returns
    (before its cast to the cache dtype) for a ``QuantizedKV(N, config, dtype=cache_dtype, psi=psi)`` fed tokens 0..i
    one per step; ref is full-precision causal softmax attention (query head h reads KV head h // (Hq / Hkv)).

    q [N, Hq, T, d], k, v [N, Hkv, T, d]: post-RoPE, any float dtype. phi, psi: the query / key feature maps (both or
    neither; without them no correction, as a decode step without phi). Differentiable w.r.t. phi's and psi's
    parameters (not w.r.t. q, k, v).
    """
    corrected = _check_maps(phi, psi, config)
    em = emulate_layer(q, k, v, config, scale=scale, cache_dtype=cache_dtype)
    tail = corrected_output(em, phi, psi) if corrected else em.out0
    out = torch.cat([em.out0_head, tail], dim=2)
    return em.to_original(out), em.to_original(torch.cat([em.ref_head, em.ref], dim=2))


# ---------------------------------------------------------------------------------------------------- fitting


def _project(em: LayerEmulation, x: torch.Tensor, out_proj: Optional[torch.Tensor]) -> torch.Tensor:
    """x [n, Hq, t, d] (stored value space) as the layer's output projection sees it: [n, t, hidden] when
    ``out_proj`` [hidden, Hq*d] is given, else unchanged. The value rotation is folded into the weight (per head,
    W_h H: H is symmetric and its own inverse), so no per-step rotation is needed."""
    if out_proj is None:
        return x
    n, h, t, d = x.shape
    w = out_proj
    if em.config.value_rotation:
        w = em.to_original(out_proj.reshape(-1, h, d)).reshape(out_proj.shape)
    return torch.matmul(x.transpose(1, 2).reshape(n, t, h * d), w.t())


def _ref_power(em: LayerEmulation, out_proj: Optional[torch.Tensor]) -> torch.Tensor:
    """mean |ref|^2 over all sequences (projected when ``out_proj`` is given), computed once per weight."""
    cache = em.__dict__.setdefault("_ref_power", {})
    key = None if out_proj is None else id(out_proj)
    if key not in cache:
        with torch.no_grad():
            cache[key] = _project(em, em.ref, out_proj).pow(2).mean()
    return cache[key]


def correction_loss(em: LayerEmulation, phi: FeatureFn, psi: FeatureFn, seqs: slice = slice(None),
                    out_proj: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Relative squared error of the corrected output over the queries the correction touches, sequences ``seqs``:
    mean |out - ref|^2 / mean |ref|^2 (a scalar; 1.0 is what an output of zeros scores). The normaliser is taken over
    all sequences so that the losses of mini-batches are on one scale. With ``out_proj`` (the layer's o_proj weight
    [hidden, Hq*d]) both are measured after the output projection, i.e. in the residual stream the error enters."""
    out = corrected_output(em, phi, psi, seqs)
    err = _project(em, out - em.ref[seqs], out_proj)
    return err.pow(2).mean() / _ref_power(em, out_proj)


def uncorrected_loss(em: LayerEmulation, seqs: slice = slice(None), out_proj: Optional[torch.Tensor] = None) -> float:
    """``correction_loss`` of the cache without correction (where a near-zero init starts)."""
    err = _project(em, em.out0[seqs] - em.ref[seqs], out_proj)
    return float(err.pow(2).mean() / _ref_power(em, out_proj))


# Initialisation of the feature maps (``init_feature_maps``, the same as FeatureMap(..., activation="exp") starts
# with): every pre-activation starts near INIT_BIAS, so each feature is ~e^-10 and phi(q).psi(k) ~ D e^-20 ~ 1e-7
# per pair: next to the softmax mass e^lse (>= 1 for any query that sees a token with score >= 0) the correction
# weighs ~1e-4 or less over 1k tokens, i.e. the cache starts as the uncorrected one. Unlike an exactly-zero start it
# has a gradient, and Adam's steps do not depend on its size. The small random weights break the symmetry between
# features.
INIT_BIAS = EXP_INIT_BIAS
INIT_WEIGHT_SCALE = EXP_INIT_WEIGHT_SCALE  # times 1/sqrt(d)


@dataclass(frozen=True)
class FitDefaults:
    """Defaults of ``fit_layer``, chosen on SmolLM2-135M (kvlinc preset, 2 bits, G = R = 128; 6 + 2 held-out sequences
    of 1024 WikiText-2 tokens per layer, layers 0, 7, 15, 29): 200 steps reach the held-out loss of 400 and 800 (more
    steps overfit), lr 0.02 beats 0.05, and decoupled weight decay on the projections (not the biases) is what makes
    the fit carry over to unseen text: 0 overfits (layer 15, held-out WikiText-2 test: 0.196 -> 0.204 in relative
    MSE), 1-3 generalise (0.136), 10 and more underfit or diverge. ~10 s per layer on 2 CPU cores at N = 8."""

    steps: int = 200
    lr: float = 0.02
    batch_size: int = 4
    weight_decay: float = 2.0


@torch.no_grad()
def init_feature_maps(phi: torch.nn.Module, psi: torch.nn.Module, *, bias: float = INIT_BIAS,
                      weight_scale: float = INIT_WEIGHT_SCALE, generator: Optional[torch.Generator] = None) -> None:
    """Re-initialise two ``FeatureMap``s in place so that the correction starts negligible (see ``INIT_BIAS``):
    weight ~ N(0, (weight_scale / sqrt(d))^2), bias = ``bias``. Meant for positive activations that behave like
    e^y for y << 0 (``"exp"``, ``"softplus"``)."""
    for name, fm in (("phi", phi), ("psi", psi)):
        w, b = getattr(fm, "weight", None), getattr(fm, "bias", None)
        if not isinstance(w, torch.Tensor) or not isinstance(b, torch.Tensor) or w.dim() != 3:
            raise TypeError(f"{name} must be a lrkern.FeatureMap (weight [H, d, D], bias [H, D]), got "
                            f"{type(fm).__name__}")
        noise = torch.randn(w.shape, generator=generator, dtype=torch.float32)
        w.copy_(noise * (weight_scale / math.sqrt(w.shape[1])))
        b.fill_(bias)


def _batches(n: int, batch_size: Optional[int]) -> list[slice]:
    bs = n if batch_size is None else min(batch_size, n)
    return [slice(s0, min(n, s0 + bs)) for s0 in range(0, n, bs)]


@torch.no_grad()
def _total_loss(em: LayerEmulation, phi, psi, batches: list[slice], out_proj=None) -> float:
    """``correction_loss`` over all sequences, batch by batch (weighted by batch size: the mean over all queries)."""
    n = em.num_sequences
    with torch.no_grad():
        return sum(float(correction_loss(em, phi, psi, b, out_proj)) * (b.stop - b.start) / n for b in batches)


def _check_fit_args(steps, lr, batch_size, weight_decay) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps={steps!r} must be an int >= 0")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"lr={lr!r} must be a number > 0")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size={batch_size!r} must be a positive int or None")
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or weight_decay < 0:
        raise ValueError(f"weight_decay={weight_decay!r} must be a number >= 0")


def fit_emulation(em: LayerEmulation, phi: torch.nn.Module, psi: torch.nn.Module, *,
                  steps: int = FitDefaults.steps, lr: float = FitDefaults.lr,
                  batch_size: Optional[int] = FitDefaults.batch_size,
                  weight_decay: float = FitDefaults.weight_decay, out_proj: Optional[torch.Tensor] = None,
                  log: Optional[Callable[[int, float], None]] = None) -> list[float]:
    """Fit phi and psi (in place) to an emulated layer: AdamW against ``correction_loss`` over mini-batches of
    ``batch_size`` consecutive sequences taken in turn (None: all at once), cosine-decayed learning rate, decoupled
    weight decay on the projection weights only (the biases set the correction's overall size and stay free).

    If the fitted maps end with a higher loss over all sequences than they started with (a diverged fit), the
    starting parameters are restored: with ``init_feature_maps`` that is the uncorrected cache, so a fit never makes
    its own calibration data worse. Returns the loss of every step, on its mini-batch; ``log(step, loss)`` is called
    after each."""
    _check_fit_args(steps, lr, batch_size, weight_decay)
    params = [p for m in (phi, psi) for p in m.parameters() if p.requires_grad]
    if not params:
        raise ValueError("phi and psi have no trainable parameters")
    batches = _batches(em.num_sequences, batch_size)
    start = [p.detach().clone() for p in params]
    start_loss = _total_loss(em, phi, psi, batches, out_proj)
    decay = [p for p in params if p.dim() > 1]
    free = [p for p in params if p.dim() <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": free, "weight_decay": 0.0}],
                            lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / max(steps, 1))))
    history = []
    for step in range(steps):
        loss = correction_loss(em, phi, psi, batches[step % len(batches)], out_proj)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        history.append(loss.item())
        if log is not None:
            log(step, history[-1])
    if steps and not _total_loss(em, phi, psi, batches, out_proj) <= start_loss:  # also catches a NaN loss
        with torch.no_grad():
            for p, p0 in zip(params, start):
                p.copy_(p0)
    return history


def fit_layer(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: KVConfig, phi: torch.nn.Module,
              psi: torch.nn.Module, *, scale: Optional[float] = None, steps: int = FitDefaults.steps,
              lr: float = FitDefaults.lr, batch_size: Optional[int] = FitDefaults.batch_size,
              weight_decay: float = FitDefaults.weight_decay, cache_dtype: torch.dtype = torch.float16,
              log: Optional[Callable[[int, float], None]] = None) -> list[float]:
    """Fit one layer's correction on calibration data: phi (``FeatureMap(Hq, d, D)``) and psi (``FeatureMap(Hkv, d,
    D)``, D = config.feature_dim) are trained in place, from their current parameters, so that the emulated
    corrected decode output approaches full-precision attention. Start from a negligible correction:
    ``FeatureMap(..., activation="exp")`` does by construction; call ``init_feature_maps`` on "softplus" maps.

    q [N, Hq, T, d], k, v [N, Hkv, T, d]: post-RoPE, as captured from the model (see ``emulate_layer``). Returns the
    loss history (``correction_loss`` per step, on its mini-batch). See ``fit_emulation`` for the optimiser and
    ``FitDefaults`` for how the defaults were chosen.

    Example:
        >>> cfg = lrkern.KVConfig.preset("kvlinc", 3, 64, bits=2)
        >>> phi, psi = lrkern.FeatureMap(9, 64, 64, "exp"), lrkern.FeatureMap(3, 64, 64, "exp")
        >>> losses = fit_layer(q, k, v, cfg, phi, psi)  # q [8, 9, 1024, 64], k, v [8, 3, 1024, 64]
    """
    _check_maps(phi, psi, config)
    _check_fit_args(steps, lr, batch_size, weight_decay)
    em = emulate_layer(q, k, v, config, scale=scale, cache_dtype=cache_dtype)
    return fit_emulation(em, phi, psi, steps=steps, lr=lr, batch_size=batch_size, weight_decay=weight_decay, log=log)
