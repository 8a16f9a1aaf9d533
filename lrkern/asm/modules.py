"""ASM layers, model conversion and BatchNorm folding (spec ``asm.md`` section 4 item 5, sections 3.4 and 3.5).

``ASMLinear`` and ``ASMConv2d`` share the original layer's Parameters (state_dict keys of the weight and bias do not
change) and add an activation quantizer (``act``, see ``lrkern.asm.quant_act``) and, with ``scale="lsq"``, a learnable
per-output-channel weight scale ``w_scale``. Three modes (``layer.mode``, or ``set_mode(model, mode)``):

- ``"train"``: fake quantization, w_hat = ``torch.ops.lrkern.asm_fake_quant(W, s_w, 0, alphabet, w_bits)`` and
  x_hat = s_x clamp(round(x / s_x), 0, 2^a - 1) (clipped STE; LSQ gradients to the scales), then the ordinary
  ``F.linear`` / ``F.conv2d``. Differentiable; the recipe of section 3.5 trains in this mode.
- ``"exact"``: integers end to end. w_int = ``asm_project(W, s_w, ...)``, x_int = the quantized activations (uint8),
  im2col for convolutions (``im2col_int``: channels-last zero padding and a strided gather of the integers
  themselves, the patch matrix of ``F.unfold`` up to a column permutation applied to the filters too; per group for
  ``groups > 1``; zero padding is exact because 0 is a valid activation),
  acc = ``torch.ops.lrkern.asm_gemm`` (int32), y = ``lrkern.asm.epilogue.asm_epilogue(acc, s_x, s_w, bias)``. No
  float convolution on this path (cuDNN's Winograd and FFT algorithms would not keep integers exact). Not
  differentiable.
- ``"emulate"``: the same with ``torch.ops.lrkern.asm_gemm_emulate`` (the bit-exact shift-add datapath), so its
  output is bitwise equal to ``"exact"``.

Train and exact modes compute the same products: the exact path's integers are exactly those behind the fake-quantized
tensors, so the two differ only by fp32 summation order (about 1e-6 relative).

Weight scale: ``scale="max"`` sets s_o = max_k |W[o, k]| / r_max from the current weight on every call (an all-zero
channel uses 1; no gradient flows into it); ``scale="lsq"`` learns s_o (initialised to the max scale at conversion).

BatchNorm stays float during training. At export, ``fold_bn(layer, bn)`` returns a copy of the ASM convolution (or
Linear, with an ``nn.BatchNorm1d``) with the BN folded into its epilogue, s'_o = gamma_o s_o / sigma_o and
bias'_o = beta_o + gamma_o (b_o - mu_o) / sigma_o (sigma_o = sqrt(var_o + eps)), keeping the trained w_int unchanged
(stored as a buffer); the folded layer runs in the integer modes only. ``fold_bn_pairs(model, pairs)`` does it for
named (layer, bn) pairs and replaces each BN by ``nn.Identity``; a float ``nn.Conv2d`` or ``nn.Linear`` (an
unconstrained first or last layer) is folded the usual way.

``convert(model, alphabet, w_bits=4, a_bits=4, all_layers=False, scale="max")`` swaps every ``nn.Conv2d`` and
``nn.Linear`` in place, except (unless ``all_layers``) the first of them and the last ``nn.Linear`` (common QAT
practice; the paper's choice is unconfirmed). With ``all_layers=True`` and ``input_norm=(mean, std)``, the first layer
takes the raw 8-bit pixels p = round((x std + mean) 255) recovered from the normalised input and folds the normalisation
into its output: y = s_x s_w acc + bias + o * sum over valid taps of w_hat (o = -mean / std, s_x = 1 / (255 std); the
last term is a fixed per-position map, exact in real arithmetic, evaluated in fp32 from the weights only). Without
``input_norm`` the first layer quantizes its input like any other layer (it must then be non-negative).
"""
from __future__ import annotations

import copy
from typing import Iterable, Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from lrkern.asm.alphabet import check_a_bits, check_w_bits, parse_alphabet, r_max
from lrkern.asm.quant_act import ACT_SCALES, ActQuantizer

MODES = ("train", "exact", "emulate")
WEIGHT_SCALES = ("max", "lsq")
# Elements of one im2col chunk (rows x K) in the integer conv path (bytes for uint8 activations).
_CHUNK_ELEMENTS = 1 << 24


class _LazyOps:
    """``torch.ops.lrkern`` (imported lazily: ``lrkern.ops`` registers the ops), with a clear error for a missing op."""

    def __getattr__(self, name):
        import lrkern.ops  # noqa: F401  (registers torch.ops.lrkern.*)
        if not hasattr(torch.ops.lrkern, name):
            raise RuntimeError(f"torch.ops.lrkern.{name} is not registered (lrkern.ops did not load it)")
        return getattr(torch.ops.lrkern, name)


_LAZY_OPS = _LazyOps()


def _ops() -> _LazyOps:
    return _LAZY_OPS


def _epilogue():
    from lrkern.asm.epilogue import asm_epilogue
    return asm_epilogue


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not supported; accepted: {', '.join(repr(m) for m in MODES)}")
    return mode


def max_scale(weight: torch.Tensor, alphabet, w_bits: int) -> torch.Tensor:
    """s_o = max_k |W[o, k]| / r_max per output channel (dim 0), fp32 [N]; an all-zero channel gets 1."""
    r = r_max(alphabet, w_bits)
    with torch.no_grad():
        m = weight.detach().reshape(weight.shape[0], -1).abs().amax(dim=1).to(torch.float32)
        s = m / r
        return torch.where(m > 0, s, torch.ones_like(s))


def _check_int_operand(x_int: torch.Tensor, a_bits: int) -> None:
    if not isinstance(x_int, torch.Tensor):
        raise TypeError(f"x_int must be an integer tensor, got {type(x_int).__name__}")
    if x_int.is_floating_point() or x_int.is_complex() or x_int.dtype == torch.bool:
        raise TypeError(f"x_int must hold quantized integer activations (uint8, int16 or int32), got {x_int.dtype}; "
                        "quantize float activations first (ActQuantizer.quantize)")


def _gemm(x_int: torch.Tensor, w_int: torch.Tensor, alphabet: Sequence[int], w_bits: int, a_bits: int,
          emulate: bool) -> torch.Tensor:
    ops = _ops()
    if emulate:
        return ops.asm_gemm_emulate(x_int, w_int, list(alphabet), w_bits, a_bits)
    return ops.asm_gemm(x_int, w_int, w_bits, a_bits)


def linear_int(x_int: torch.Tensor, w_int: torch.Tensor, s_x: torch.Tensor, s_w: torch.Tensor,
               bias: Optional[torch.Tensor] = None, *, alphabet=None, w_bits: int = 4, a_bits: int = 4,
               emulate: bool = False) -> torch.Tensor:
    """Integer linear layer: ``x_int [..., K]`` (integer dtype, values in [0, 2^a_bits - 1]), ``w_int [N, K]`` int16
    -> fp32 ``[..., N]`` = asm_epilogue(asm_gemm(x_int, w_int), s_x, s_w, bias). ``emulate=True`` runs the shift-add
    emulation (needs ``alphabet``)."""
    _check_int_operand(x_int, a_bits)
    if emulate and alphabet is None:
        raise ValueError("alphabet is required when emulate=True")
    k = w_int.shape[1]
    if x_int.shape[-1] != k:
        raise ValueError(f"x_int has {x_int.shape[-1]} features but w_int expects K = {k}")
    lead = x_int.shape[:-1]
    alpha = parse_alphabet(alphabet) if alphabet is not None else ()
    acc = _gemm(x_int.reshape(-1, k).contiguous(), w_int.contiguous(), alpha, w_bits, a_bits, emulate)
    y = _epilogue()(acc, s_x, s_w.to(torch.float32).contiguous(), None if bias is None else bias.float())
    return y.reshape(*lead, w_int.shape[0])


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def conv_out_hw(hw: Sequence[int], kernel: Sequence[int], stride, padding, dilation) -> tuple[int, int]:
    """Output height and width of a convolution (the nn.Conv2d formula)."""
    s, p, d = _pair(stride), _pair(padding), _pair(dilation)
    return tuple((hw[i] + 2 * p[i] - d[i] * (kernel[i] - 1) - 1) // s[i] + 1 for i in range(2))


def im2col_int(x: torch.Tensor, kernel: Sequence[int], stride=1, padding=0, dilation=1) -> torch.Tensor:
    """The patches of a convolution in x's (integer) dtype, as a strided view ``[B, Ho, Wo, kh, kw, C]``.

    x goes to channels-last once, is zero-padded, and each patch is a view: reshaping a group's channels
    ``[..., g*Cg:(g+1)*Cg]`` to ``[B*Ho*Wo, kh*kw*Cg]`` is the patch matrix with its columns in (i, j, c) order, to be
    multiplied with ``w.permute(0, 2, 3, 1).reshape(N, -1)`` (a permutation of the K terms: the integer sums are
    unchanged). The integers are only copied, never converted to floats (``F.unfold`` has no integer kernel); the
    contiguous channel runs make the gather much faster than an unfold-order copy on the CPU."""
    kh, kw = kernel
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    x = x.permute(0, 2, 3, 1)
    if ph or pw:
        x = F.pad(x, (0, 0, pw, pw, ph, ph))
    x = x.contiguous()
    b, h, w, c = x.shape
    ho, wo = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    sb, sy, sx, sc = x.stride()
    return x.as_strided((b, ho, wo, kh, kw, c), (sb, sy * sh, sx * sw, sy * dh, sx * dw, sc))


def conv2d_int(x_int: torch.Tensor, w_int: torch.Tensor, s_x: torch.Tensor, s_w: torch.Tensor,
               bias: Optional[torch.Tensor] = None, stride=1, padding=0, dilation=1, groups: int = 1, *,
               alphabet=None, w_bits: int = 4, a_bits: int = 4, emulate: bool = False) -> torch.Tensor:
    """Integer convolution by im2col: ``x_int [B, C, H, W]`` (integer dtype), ``w_int [N, C/groups, kh, kw]`` int16
    -> fp32 ``[B, N, Ho, Wo]``. Each group is one ``asm_gemm`` (or ``asm_gemm_emulate``) of its patch matrix
    ``[B*Ho*Wo, C/groups*kh*kw]`` with its ``N/groups`` filters; the int32 results are concatenated and go through
    the shared epilogue."""
    _check_int_operand(x_int, a_bits)
    if emulate and alphabet is None:
        raise ValueError("alphabet is required when emulate=True")
    if x_int.dim() != 4:
        raise ValueError(f"x_int must be [B, C, H, W], got shape {tuple(x_int.shape)}")
    b, c, h, w = x_int.shape
    n, cg, kh, kw = w_int.shape
    if c != cg * groups or n % groups:
        raise ValueError(f"x_int has {c} channels, w_int is {tuple(w_int.shape)} with groups={groups}: "
                         "C must equal C/groups * groups and N must be divisible by groups")
    ho, wo = conv_out_hw((h, w), (kh, kw), stride, padding, dilation)
    if ho < 1 or wo < 1:
        raise ValueError(f"input {h}x{w} is too small for kernel {kh}x{kw} with padding {padding}")
    alpha = parse_alphabet(alphabet) if alphabet is not None else ()
    kg, ng, L = cg * kh * kw, n // groups, ho * wo
    # Columns in (i, j, c) order (see im2col_int): permute the filters the same way.
    w_groups = [w_int[g * ng:(g + 1) * ng].permute(0, 2, 3, 1).reshape(ng, kg).contiguous() for g in range(groups)]
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // max(L * kg * groups, 1))
    accs = []
    for lo in range(0, b, rows_per_chunk):
        patches = im2col_int(x_int[lo:lo + rows_per_chunk], (kh, kw), stride, padding, dilation)
        bb = patches.shape[0]
        parts = []
        for g in range(groups):
            xg = patches[..., g * cg:(g + 1) * cg].reshape(bb * L, kg)  # [bb*L, kh*kw*Cg], a copy
            parts.append(_gemm(xg.contiguous(), w_groups[g], alpha, w_bits, a_bits, emulate))
        accs.append(parts[0] if groups == 1 else torch.cat(parts, dim=1))
    acc = accs[0] if len(accs) == 1 else torch.cat(accs, dim=0)  # int32 [B*L, N]
    y = _epilogue()(acc, s_x, s_w.to(torch.float32).contiguous(), None if bias is None else bias.float())
    return y.view(b, L, n).transpose(1, 2).reshape(b, n, ho, wo)


class _ASMLayer(nn.Module):
    """Shared state of ASMLinear / ASMConv2d."""

    def _init_common(self, orig: nn.Module, alphabet, w_bits: int, a_bits: int, scale: str, act_scale: str,
                     mode: str, pixel: Optional[tuple[float, float]]) -> None:
        self.alphabet = list(parse_alphabet(alphabet))
        self.w_bits = check_w_bits(w_bits)
        self.a_bits = check_a_bits(a_bits) if pixel is None else 8
        if scale not in WEIGHT_SCALES:
            raise ValueError(f"scale={scale!r} is not supported; accepted: {', '.join(WEIGHT_SCALES)}")
        if act_scale not in ACT_SCALES:
            raise ValueError(f"act_scale={act_scale!r} is not supported; accepted: {', '.join(ACT_SCALES)}")
        self.r_max = r_max(self.alphabet, self.w_bits)
        self.scale_mode = scale
        self.weight, self.bias = orig.weight, orig.bias
        if scale == "lsq":
            self.w_scale = nn.Parameter(max_scale(orig.weight, self.alphabet, self.w_bits))
        self.act = ActQuantizer(self.a_bits, act_scale, pixel)
        self._mode = _check_mode(mode)
        self.folded = False

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        self._mode = _check_mode(value)

    def weight_scale(self) -> torch.Tensor:
        """s_w, fp32 [N]: the learned scale (``scale="lsq"``, kept positive) or the max scale of the current weight."""
        if self.folded:
            return self.folded_scale
        if self.scale_mode == "lsq":
            return self.w_scale.clamp_min(1e-8)
        return max_scale(self.weight, self.alphabet, self.w_bits)

    def weight_int(self) -> torch.Tensor:
        """w_int (int16, the weight's shape): the projection the integer paths use (stored once folded)."""
        if self.folded:
            return self.folded_w_int
        with torch.no_grad():
            return _ops().asm_project(self.weight.detach().contiguous(), self.weight_scale().detach().contiguous(), 0,
                                      self.alphabet, self.w_bits)

    def weight_hat(self) -> torch.Tensor:
        """w_hat = s_w * w_int in the weight's dtype, differentiable (clipped STE to W, LSQ to ``w_scale``)."""
        if self.folded:
            raise RuntimeError("a BN-folded ASM layer has no trainable weight; run it in 'exact' or 'emulate' mode")
        return _ops().asm_fake_quant(self.weight.contiguous(), self.weight_scale().contiguous(), 0, self.alphabet,
                                     self.w_bits)

    def _bias(self) -> Optional[torch.Tensor]:
        if self.folded:
            return self.folded_bias
        return None if self.bias is None else self.bias.detach().to(torch.float32)

    def _describe(self) -> str:
        a = ",".join(str(v) for v in self.alphabet) if len(self.alphabet) < 8 else "odd"
        return (f"alphabet={{{a}}}, w_bits={self.w_bits}, a_bits={self.a_bits}, scale={self.scale_mode}, "
                f"mode={self.mode}" + (", bn_folded" if self.folded else ""))


class ASMLinear(_ASMLayer):
    """``nn.Linear`` with alphabet-constrained weights and quantized activations (input ``[..., K]``)."""

    def __init__(self, orig: nn.Linear, alphabet, w_bits: int = 4, a_bits: int = 4, scale: str = "max",
                 act_scale: str = "ema", mode: str = "train", pixel: Optional[tuple[float, float]] = None):
        super().__init__()
        if not isinstance(orig, nn.Linear):
            raise TypeError(f"orig must be an nn.Linear, got {type(orig).__name__}")
        self.in_features, self.out_features = orig.in_features, orig.out_features
        self._init_common(orig, alphabet, w_bits, a_bits, scale, act_scale, mode, pixel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "train":
            return F.linear(self.act(x), self.weight_hat(), self.bias)
        with torch.no_grad():
            x_int, s_x = self.act.quantize(x)
            y = linear_int(x_int, self.weight_int(), s_x, self.weight_scale(), self._bias(), alphabet=self.alphabet,
                           w_bits=self.w_bits, a_bits=self.a_bits, emulate=self.mode == "emulate")
            if self.act.offset != 0.0:
                y = y + self._offset_term()
            return y.to(x.dtype)

    def _offset_term(self) -> torch.Tensor:
        w_hat = self.weight_scale().view(-1, 1) * self.weight_int().to(torch.float32)
        return self.act.offset * w_hat.sum(1)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self._describe()}"


class ASMConv2d(_ASMLayer):
    """``nn.Conv2d`` (stride, padding, dilation, groups; zero padding) with alphabet-constrained weights and quantized
    activations."""

    def __init__(self, orig: nn.Conv2d, alphabet, w_bits: int = 4, a_bits: int = 4, scale: str = "max",
                 act_scale: str = "ema", mode: str = "train", pixel: Optional[tuple[float, float]] = None):
        super().__init__()
        if not isinstance(orig, nn.Conv2d):
            raise TypeError(f"orig must be an nn.Conv2d, got {type(orig).__name__}")
        if orig.padding_mode != "zeros":
            raise ValueError(f"padding_mode={orig.padding_mode!r} is not supported; ASMConv2d needs zero padding")
        if isinstance(orig.padding, str):
            if orig.padding != "valid":
                raise ValueError(f"padding={orig.padding!r} is not supported; give explicit integer padding")
            padding = (0, 0)
        else:
            padding = tuple(orig.padding)
        self.in_channels, self.out_channels = orig.in_channels, orig.out_channels
        self.kernel_size = tuple(orig.kernel_size)
        self.stride, self.padding, self.dilation = tuple(orig.stride), padding, tuple(orig.dilation)
        self.groups = orig.groups
        self._init_common(orig, alphabet, w_bits, a_bits, scale, act_scale, mode, pixel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "train":
            return F.conv2d(self.act(x), self.weight_hat(), self.bias, self.stride, self.padding, self.dilation,
                            self.groups)
        with torch.no_grad():
            x_int, s_x = self.act.quantize(x)
            y = conv2d_int(x_int, self.weight_int(), s_x, self.weight_scale(), self._bias(), self.stride,
                           self.padding, self.dilation, self.groups, alphabet=self.alphabet, w_bits=self.w_bits,
                           a_bits=self.a_bits, emulate=self.mode == "emulate")
            if self.act.offset != 0.0:
                y = y + self._offset_term(x.shape)
            return y.to(x.dtype)

    def _offset_term(self, x_shape) -> torch.Tensor:
        """o * (sum over the valid (non-padding) taps of w_hat) per output channel and position: [1, N, Ho, Wo]."""
        _, c, h, w = x_shape
        n, cg, kh, kw = self.weight.shape
        ho, wo = conv_out_hw((h, w), (kh, kw), self.stride, self.padding, self.dilation)
        scale = self.folded_w_scale if self.folded else self.weight_scale()
        w_hat = scale.view(-1, 1) * self.weight_int().to(torch.float32).reshape(n, -1)
        mask = F.unfold(torch.ones(1, c, h, w, device=w_hat.device), (kh, kw), dilation=self.dilation,
                        padding=self.padding, stride=self.stride)[0]  # [C*kh*kw, L]
        kg, ng = cg * kh * kw, n // self.groups
        rows = [w_hat[g * ng:(g + 1) * ng] @ mask[g * kg:(g + 1) * kg] for g in range(self.groups)]
        term = self.act.offset * torch.cat(rows, 0)
        if self.folded:
            term = term * self.folded_gain.view(-1, 1)
        return term.view(1, n, ho, wo)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, {self._describe()}")


ASM_LAYERS = (ASMLinear, ASMConv2d)


def asm_layers(model: nn.Module) -> Iterator[tuple[str, _ASMLayer]]:
    """``(name, layer)`` for every ASM layer of ``model``."""
    for name, m in model.named_modules():
        if isinstance(m, ASM_LAYERS):
            yield name, m


def set_mode(model: nn.Module, mode: str) -> nn.Module:
    """Set every ASM layer of ``model`` to ``mode`` ("train", "exact" or "emulate"); returns the model."""
    _check_mode(mode)
    for _, m in asm_layers(model):
        m.mode = mode
    return model


def set_alphabet(model: nn.Module, alphabet) -> nn.Module:
    """Move every ASM layer of ``model`` to another alphabet set (progressive QAT: full odd set, then {1,3,5,7}, then
    {1,3}); returns the model. The latent weights are kept; a max scale follows the new r_max by itself, a learned
    scale (``scale="lsq"``) is multiplied by r_max(old) / r_max(new) so the largest representable weight stays put.
    BN-folded layers (frozen integers) refuse."""
    alpha = list(parse_alphabet(alphabet))
    layers = list(asm_layers(model))
    folded = [n for n, m in layers if m.folded]
    if folded:
        raise ValueError(f"set_alphabet: {', '.join(folded)} have a BatchNorm folded in (frozen integers)")
    for _, m in layers:
        new_r = r_max(alpha, m.w_bits)
        if m.scale_mode == "lsq":
            with torch.no_grad():
                m.w_scale.mul_(m.r_max / new_r)
        m.alphabet, m.r_max = list(alpha), new_r
    return model


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def convert(model: nn.Module, alphabet, w_bits: int = 4, a_bits: int = 4, all_layers: bool = False,
            scale: str = "max", act_scale: str = "ema", input_norm: Optional[tuple[float, float]] = None,
            mode: str = "train", skip: Iterable[str] = (), layer_alphabets: Optional[dict] = None) -> nn.Module:
    """Replace, in place, the ``nn.Conv2d`` / ``nn.Linear`` layers of ``model`` by ``ASMConv2d`` / ``ASMLinear``
    sharing their parameters; returns ``model``.

    Args:
        model: a float model (no ASM layers yet).
        alphabet: a name of ``ALPHABETS`` ("1", "13", "1357", "odd") or an iterable of odd ints in 1..15 with 1.
        w_bits, a_bits: 4 or 8 (weight magnitude bits, sign excluded; unsigned activation bits).
        all_layers: also convert the first layer (the first Conv2d/Linear in module order) and the last
            ``nn.Linear``; by default both stay float.
        scale: weight scale, ``"max"`` or ``"lsq"``. act_scale: activation scale, ``"ema"`` or ``"lsq"``.
        input_norm: ``(mean, std)`` of the input normalisation; with ``all_layers`` the first layer then takes raw
            8-bit pixels (see the module docstring).
        mode: the initial mode of the new layers.
        skip: names of further layers to leave float.
        layer_alphabets: ``{layer name: alphabet}`` overriding ``alphabet`` per layer ("mixed ASM": larger sets in
            the most sensitive layers).
    """
    alpha = parse_alphabet(alphabet)
    check_w_bits(w_bits)
    check_a_bits(a_bits)
    if scale not in WEIGHT_SCALES:
        raise ValueError(f"scale={scale!r} is not supported; accepted: {', '.join(WEIGHT_SCALES)}")
    _check_mode(mode)
    if any(True for _ in asm_layers(model)):
        raise ValueError("model already contains ASM layers; convert a float model")
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if not names:
        raise ValueError("model has no nn.Conv2d or nn.Linear layer to convert")
    skip = set(skip)
    per_layer = {k: parse_alphabet(v) for k, v in (layer_alphabets or {}).items()}
    unknown_layers = set(per_layer) - set(names)
    if unknown_layers:
        raise ValueError(f"layer_alphabets names layers that are not Conv2d/Linear layers of the model: "
                         f"{sorted(unknown_layers)}")
    unknown = skip - set(names)
    if unknown:
        raise ValueError(f"skip names layers that are not Conv2d/Linear layers of the model: {sorted(unknown)}")
    first = names[0]
    linears = [n for n in names if isinstance(model.get_submodule(n), nn.Linear)]
    last = linears[-1] if linears else None
    if not all_layers:
        skip |= {first} | ({last} if last is not None else set())
    for name in names:
        if name in skip:
            continue
        orig = model.get_submodule(name)
        pixel = input_norm if (all_layers and name == first and input_norm is not None) else None
        cls = ASMConv2d if isinstance(orig, nn.Conv2d) else ASMLinear
        new = cls(orig, per_layer.get(name, alpha), w_bits, a_bits, scale=scale, act_scale=act_scale, mode=mode,
                  pixel=pixel)
        new.to(orig.weight.device)
        parent, attr = _parent(model, name)
        setattr(parent, attr, new)
    return model


_FOLDABLE = ((ASMConv2d, nn.Conv2d, nn.BatchNorm2d), (ASMLinear, nn.Linear, nn.BatchNorm1d))


def fold_bn(layer: Union[ASMConv2d, nn.Conv2d, ASMLinear, nn.Linear],
            bn: Union[nn.BatchNorm2d, nn.BatchNorm1d]) -> Union[ASMConv2d, nn.Conv2d, ASMLinear, nn.Linear]:
    """A copy of ``layer`` with the (eval-mode) BatchNorm ``bn`` that follows it folded in: a convolution with an
    ``nn.BatchNorm2d``, or a Linear with an ``nn.BatchNorm1d`` over its output features (a ``[B, N]`` output).

    ASM layer: the trained w_int is frozen into a buffer and the epilogue uses s'_o = gamma_o s_o / sigma_o and
    bias'_o = beta_o + gamma_o (b_o - mu_o) / sigma_o; the result runs in "exact" (default) or "emulate" mode only.
    Float layer: W' = W gamma / sigma, b' = bias' (the usual folding).
    """
    kinds = next((k for k in _FOLDABLE if isinstance(layer, k[:2])), None)
    if kinds is None:
        raise TypeError(f"layer must be an ASMConv2d, nn.Conv2d, ASMLinear or nn.Linear, got {type(layer).__name__}")
    if type(bn) is not kinds[2]:
        raise TypeError(f"bn must be an nn.{kinds[2].__name__} to fold into a {type(layer).__name__}, "
                        f"got {type(bn).__name__}")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("bn has no running statistics (track_running_stats=False); it cannot be folded")
    n = layer.weight.shape[0]
    if bn.num_features != n:
        raise ValueError(f"bn has {bn.num_features} features but the layer has {n} outputs")
    with torch.no_grad():
        sigma = torch.sqrt(bn.running_var.float() + bn.eps)
        gamma = bn.weight.detach().float() if bn.weight is not None else torch.ones_like(sigma)
        beta = bn.bias.detach().float() if bn.bias is not None else torch.zeros_like(sigma)
        gain = gamma / sigma
        b = layer.bias.detach().float() if layer.bias is not None else torch.zeros_like(sigma)
        new_bias = beta + gain * (b - bn.running_mean.float())
        if isinstance(layer, _ASMLayer):
            if layer.folded:
                raise ValueError("layer already has a BatchNorm folded in")
            out = copy.deepcopy(layer)
            w_int = layer.weight_int()
            s_w = layer.weight_scale().detach().float()
            out.register_buffer("folded_w_int", w_int.clone())
            out.register_buffer("folded_w_scale", s_w.clone())  # s_o before folding (for the pixel-offset term)
            out.register_buffer("folded_gain", gain.clone())
            out.register_buffer("folded_scale", (gain * s_w).contiguous())
            out.register_buffer("folded_bias", new_bias.contiguous())
            out.folded = True
            if out.mode == "train":
                out.mode = "exact"
            return out
        out = copy.deepcopy(layer)
        out.weight.copy_(layer.weight * gain.view(-1, *[1] * (layer.weight.dim() - 1)).to(layer.weight.dtype))
        if out.bias is None:
            out.bias = nn.Parameter(new_bias.to(layer.weight.dtype))
        else:
            out.bias.copy_(new_bias)
        return out


def fold_bn_pairs(model: nn.Module, pairs: Iterable[tuple[str, str]]) -> nn.Module:
    """Fold each BN ``pairs[i][1]`` into the convolution or Linear ``pairs[i][0]`` (by module name) in place: the layer
    is replaced by ``fold_bn(layer, bn)`` and the BN by ``nn.Identity``. Returns ``model`` (call ``model.eval()``
    first: the running statistics are what gets folded)."""
    for conv_name, bn_name in list(pairs):
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        folded = fold_bn(conv, bn)
        parent, attr = _parent(model, conv_name)
        setattr(parent, attr, folded)
        parent, attr = _parent(model, bn_name)
        setattr(parent, attr, nn.Identity())
    return model
