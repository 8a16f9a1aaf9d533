"""Compressed layers and the swap that installs them.

``LanceLinear`` / ``LanceConv2d`` share the original layer's Parameters (the state_dict keys do not change) and
keep the factors as non-persistent buffers. In training mode with gradients enabled they run
``torch.ops.lrkern.lance_linear`` / ``lance_conv2d``, whose autograd saves only the HOSVD core; otherwise they are
the plain layer (inference needs no core).

Factors are either fixed (LANCE: calibrated once, ``compress(model, subspaces)``) or recomputed from every batch
(``refresh_eps``: per-step HOSVD_eps, the prior method the paper compares with; ``compress_per_step``).
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from lrkern.lance.subspaces import LayerSubspace, Subspaces, check_eps, check_modes, eig_desc, energy_rank, layer_kind
from lrkern.ops import lance_conv2d, lance_linear, mode_gram_accumulate


def hosvd_factors(x: torch.Tensor, eps: float, modes: Sequence[int], max_rank: Optional[int] = None):
    """Per-step HOSVD_eps factors of one activation: for each mode in ``modes``, the top eigenvectors of its Gram
    reaching ``eps`` of the energy (None for the other modes and for full-rank modes)."""
    factors: list[Optional[torch.Tensor]] = [None] * x.dim()
    for k in modes:
        n = x.shape[k]
        gram = torch.zeros(n, n, dtype=torch.float32, device=x.device)
        mode_gram_accumulate(x.detach(), gram, k, 1.0)
        lam, vec = eig_desc(gram)
        r = energy_rank(lam, eps, max_rank)
        if r < n:
            factors[k] = vec[:, :r].to(torch.float32).contiguous()
    return factors


class _LanceLayer(nn.Module):
    lance_kind = ""

    def _init_common(self, orig: nn.Module, sub: Optional[LayerSubspace], refresh_eps: Optional[float],
                     modes: str, max_rank: Optional[int]):
        self.weight, self.bias = orig.weight, orig.bias
        self.original = [orig]  # a list, so the original module is not registered twice in the module tree
        self.subspace = sub
        self.refresh_eps, self.modes, self.max_rank = refresh_eps, modes, max_rank
        self._n_factors = len(sub.factors) if sub is not None else 0
        if sub is not None:
            for k, u in enumerate(sub.factors):
                self.register_buffer(f"U{k}", None if u is None else u.to(orig.weight.device), persistent=False)

    def factors(self, x: torch.Tensor) -> list[Optional[torch.Tensor]]:
        if self.refresh_eps is not None:
            first = 0 if self.modes == "all" else 1
            return hosvd_factors(self._project_source(x), self.refresh_eps, range(first, self._source_dims(x)),
                                 self.max_rank)
        factors = [getattr(self, f"U{k}") for k in range(self._n_factors)]
        u_b = factors[0]
        if u_b is not None and u_b.shape[0] != x.shape[0]:
            raise ValueError(f"{self.name}: a batch of {x.shape[0]} but the subspaces were calibrated with batch "
                             f"{u_b.shape[0]} under modes='all' (the batch factor is tied to the batch size); use a "
                             "loader with drop_last=True, or calibrate with modes='no_batch'")
        return factors

    def _project_source(self, x):
        return x

    def _source_dims(self, x):
        return x.dim()

    def _compressing(self) -> bool:
        return self.training and torch.is_grad_enabled() and self.weight.requires_grad


class LanceLinear(_LanceLayer):
    """nn.Linear whose backward keeps the HOSVD core of its input ([N, F] or [N, L, F]) instead of the input."""

    lance_kind = "linear"

    def __init__(self, orig: nn.Linear, sub: Optional[LayerSubspace] = None, *, name: str = "",
                 refresh_eps: Optional[float] = None, modes: str = "no_batch", max_rank: Optional[int] = None):
        super().__init__()
        self.name, self.in_features, self.out_features = name, orig.in_features, orig.out_features
        self._init_common(orig, sub, refresh_eps, modes, max_rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._compressing():
            return F.linear(x, self.weight, self.bias)
        if x.dim() not in (2, 3):
            raise ValueError(f"{self.name}: LANCE Linear inputs must be [N, F] or [N, L, F], got {tuple(x.shape)}")
        factors = self.factors(x)
        if self.refresh_eps is None:
            _check_shape(self.name, x.shape, factors)
        return lance_linear(x, self.weight, self.bias, factors)[0]

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {_describe(self)}"


class LanceConv2d(_LanceLayer):
    """nn.Conv2d (groups=1, zero padding) whose backward keeps the core of its input (unfold="tensor": the 4 modes
    of [N, C, H, W]; "im2col": the 3 modes of the patch matrix [N, L, C*kh*kw])."""

    lance_kind = "conv2d"

    def __init__(self, orig: nn.Conv2d, sub: Optional[LayerSubspace] = None, *, name: str = "",
                 refresh_eps: Optional[float] = None, modes: str = "no_batch", max_rank: Optional[int] = None,
                 unfold: str = "tensor"):
        super().__init__()
        check_compressible(name, orig)
        self.name = name
        self.stride, self.padding, self.dilation = list(orig.stride), list(orig.padding), list(orig.dilation)
        self.unfold = sub.unfold if sub is not None else unfold
        self._init_common(orig, sub, refresh_eps, modes, max_rank)

    def _project_source(self, x):
        if self.unfold == "im2col":
            return F.unfold(x, tuple(self.weight.shape[2:]), dilation=self.dilation, padding=self.padding,
                            stride=self.stride).transpose(1, 2)
        return x

    def _source_dims(self, x):
        return 3 if self.unfold == "im2col" else 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._compressing():
            return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)
        factors = self.factors(x)
        if self.refresh_eps is None and self.unfold == "tensor":
            _check_shape(self.name, x.shape, factors)
        return lance_conv2d(x, self.weight, self.bias, factors, self.stride, self.padding, self.dilation,
                            self.unfold == "im2col")[0]

    def extra_repr(self) -> str:
        return f"{self.weight.shape[1]}, {self.weight.shape[0]}, unfold={self.unfold}, {_describe(self)}"


def _describe(m: _LanceLayer) -> str:
    if m.refresh_eps is not None:
        return f"per-step HOSVD eps={m.refresh_eps}, modes={m.modes}"
    return f"ranks={m.subspace.ranks}"


def _check_shape(name, shape, factors) -> None:
    for k, u in enumerate(factors):
        if u is not None and u.shape[0] != shape[k]:
            raise ValueError(f"{name}: input mode {k} has size {shape[k]} but its factor was calibrated for "
                             f"{u.shape[0]} (input shape {tuple(shape)}); recalibrate for this input size")


def check_compressible(name: str, module: nn.Module) -> None:
    """Raise TypeError unless ``module`` is an nn.Linear or a groups=1, zero-padded nn.Conv2d."""
    if isinstance(module, nn.Linear):
        return
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise TypeError(f"layer {name!r} is a Conv2d with groups={module.groups}: grouped and depthwise "
                            "convolutions cannot be compressed (LANCE wraps groups=1 convolutions only)")
        if module.padding_mode != "zeros":
            raise TypeError(f"layer {name!r} uses padding_mode={module.padding_mode!r}; only 'zeros' is supported")
        if isinstance(module.padding, str):
            raise TypeError(f"layer {name!r} has padding={module.padding!r}; give explicit integer padding")
        return
    raise TypeError(f"layer {name!r} is a {type(module).__name__}; LANCE compresses nn.Linear and nn.Conv2d only")


def select_layers(model: nn.Module, layers: Union[int, str, Iterable[str]]) -> list[str]:
    """Layer names from a list of names, one name, or an int n = the last n Linear/Conv2d(groups=1) layers in
    module order. Every name is checked (exists, compressible)."""
    modules = dict(model.named_modules())
    if isinstance(layers, bool):
        raise TypeError("layers must be a list of layer names or an int")
    if isinstance(layers, int):
        candidates = [n for n, m in modules.items() if isinstance(m, nn.Linear)
                      or (isinstance(m, nn.Conv2d) and m.groups == 1)]
        if not 1 <= layers <= len(candidates):
            raise ValueError(f"layers={layers}: the model has {len(candidates)} compressible layers")
        return candidates[-layers:]
    names = [layers] if isinstance(layers, str) else list(layers)
    if not names:
        raise ValueError("layers is empty")
    for n in names:
        if n not in modules:
            raise ValueError(f"layers: no layer named {n!r} in the model")
        check_compressible(n, modules[n])
    return names


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def compress(model: nn.Module, subspaces: Subspaces) -> nn.Module:
    """Swap every layer of ``subspaces`` for its LANCE version, in place; returns ``model``.

    The forward output and input gradients stay exact; weight gradients become those of the low-rank input.
    Refuses subspaces calibrated on another model (layer names, types, weight shapes).

    Example:
        >>> subs = lrkern.lance.calibrate(model, loader, layers=["conv2", "conv3"], eps=0.7)
        >>> lrkern.lance.compress(model, subs)
    """
    subspaces.check_model(model)
    modules = dict(model.named_modules())
    for name, sub in subspaces.layers.items():
        m = modules[name]
        if isinstance(m, _LanceLayer):
            m = m.original[0]
        cls = LanceLinear if isinstance(m, nn.Linear) else LanceConv2d
        _set(model, name, cls(m, sub, name=name))
    return model


def compress_per_step(model: nn.Module, layers, eps: float, modes: str = "no_batch",
                      max_rank: Optional[int] = None, unfold: str = "tensor") -> nn.Module:
    """Per-step HOSVD_eps baseline: the same compressed layers, with factors recomputed from every batch."""
    check_eps(eps)
    check_modes(modes)
    for name in select_layers(model, layers):
        m = model.get_submodule(name)
        if isinstance(m, nn.Linear):
            new = LanceLinear(m, name=name, refresh_eps=eps, modes=modes, max_rank=max_rank)
        else:
            new = LanceConv2d(m, name=name, refresh_eps=eps, modes=modes, max_rank=max_rank, unfold=unfold)
        _set(model, name, new)
    return model


def decompress(model: nn.Module) -> nn.Module:
    """Put the original layers back (they share the Parameters, so training progress is kept)."""
    for name, m in list(model.named_modules()):
        if isinstance(m, _LanceLayer):
            _set(model, name, m.original[0])
    return model


def compressed_layers(model: nn.Module) -> dict[str, _LanceLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, _LanceLayer)}


__all__ = ["LanceLinear", "LanceConv2d", "compress", "compress_per_step", "decompress", "select_layers",
           "hosvd_factors", "compressed_layers", "check_compressible", "layer_kind"]
