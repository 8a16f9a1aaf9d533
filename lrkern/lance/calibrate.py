"""Phase I of LANCE: one-shot calibration of the per-mode subspaces (forward passes only).

For every chosen layer and mode n, C_n = mean over batches of X_(n) X_(n)^T (``lrkern.mode_gram_accumulate``, fp32),
then C_n = V diag(lambda) V^T and U_n = V[:, :r_n] with r_n the smallest rank reaching ``eps`` of the energy.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from lrkern.lance.modules import _LanceLayer, select_layers
from lrkern.lance.subspaces import (LayerSubspace, Subspaces, UNFOLDS, check_eps, check_modes, eig_desc, energy_rank,
                                    layer_kind)
from lrkern.ops import mode_gram_accumulate


def model_inputs(batch):
    """What a loader yields -> (args, kwargs) for the model: a tensor, an (inputs, labels...) tuple, or a dict."""
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    if isinstance(batch, dict):
        return (), {k: v for k, v in batch.items() if k != "labels"}
    if isinstance(batch, (list, tuple)) and batch:
        return (batch[0],), {}
    raise TypeError(f"cannot feed a loader batch of type {type(batch).__name__} to the model; yield a tensor, an "
                    "(inputs, labels) tuple or a dict of keyword arguments")


def layer_input(module: nn.Module, x: torch.Tensor, unfold: str) -> torch.Tensor:
    """The tensor whose modes are factored: x itself, or the conv patch matrix [N, L, C*kh*kw] for im2col."""
    if unfold == "im2col" and isinstance(module, nn.Conv2d):
        return F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding,
                        stride=module.stride).transpose(1, 2)
    return x


def _base(module: nn.Module) -> nn.Module:
    return module.original[0] if isinstance(module, _LanceLayer) else module


class GramCollector:
    """Accumulates the mode Grams of chosen layers' inputs through forward pre-hooks.

    ``modes_of(name, ndim)`` gives the modes to accumulate for a layer input with ``ndim`` dims; ``transform(name, x)``
    maps a layer input to the tensor whose modes are factored (identity or im2col patches).
    """

    def __init__(self, model: nn.Module, names: Sequence[str], modes_of: Callable[[str, int], Sequence[int]],
                 unfold: str = "tensor"):
        self.model, self.names, self.modes_of, self.unfold = model, list(names), modes_of, unfold
        self.grams: dict[str, dict[int, torch.Tensor]] = {n: {} for n in names}
        self.shapes: dict[str, list[int]] = {}
        self.batches = 0

    def _hook(self, name: str):
        module = _base(self.model.get_submodule(name))

        def hook(_mod, args):
            x = layer_input(module, args[0].detach(), self.unfold)
            if isinstance(module, nn.Linear) and x.dim() not in (2, 3):
                raise ValueError(f"layer {name!r}: Linear inputs must be [N, F] or [N, L, F] to be compressed, got "
                                 f"{tuple(x.shape)}")
            shape = list(x.shape)
            seen = self.shapes.setdefault(name, shape)
            if seen[1:] != shape[1:]:
                raise ValueError(f"layer {name!r}: input shape changed during calibration ({seen} then {shape}); "
                                 "subspaces need a fixed input size per mode")
            grams = self.grams[name]
            for k in self.modes_of(name, x.dim()):
                if k == 0 and seen[0] != shape[0]:
                    raise ValueError(f"layer {name!r}: calibration batches of {seen[0]} and {shape[0]} samples; "
                                     "modes='all' needs a constant batch size (use drop_last=True)")
                g = grams.get(k)
                if g is None:
                    g = grams[k] = torch.zeros(shape[k], shape[k], dtype=torch.float32, device=x.device)
                mode_gram_accumulate(x, g, k, 1.0)

        return hook

    @contextlib.contextmanager
    def active(self) -> Iterator["GramCollector"]:
        handles = [self.model.get_submodule(n).register_forward_pre_hook(self._hook(n)) for n in self.names]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def run(self, loader: Iterable, batches: int, device=None, desc: str = "calibrate") -> int:
        """Feed ``batches`` loader batches through the model (no grad), passing over a re-iterable loader again when
        it is shorter (the reference takes 100 batches however long an epoch is); returns how many were used."""
        from tqdm.auto import tqdm  # a runtime dependency, as in lrkern.kvlinc

        used = 0
        bar = tqdm(total=batches, desc=desc, leave=False, disable=None)
        with self.active(), torch.no_grad():
            while used < batches:
                before = used
                for batch in loader:
                    if used >= batches:
                        break
                    args, kwargs = model_inputs(batch)
                    if device is not None:
                        args = tuple(a.to(device) for a in args)
                        kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
                    self.model(*args, **kwargs)
                    used += 1
                    bar.update(1)
                if used == before:  # empty, or a one-shot iterator that is exhausted
                    break
        bar.close()
        if used == 0:
            raise ValueError("the calibration loader yielded no batches")
        self.batches += used
        return used


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Train-mode forwards update BatchNorm running statistics; calibration must not change the model, so buffers
    and the train/eval flags are restored afterwards."""
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    modes = {n: m.training for n, m in model.named_modules()}
    try:
        yield
    finally:
        with torch.no_grad():
            for n, b in model.named_buffers():
                if n in buffers:
                    b.copy_(buffers[n])
        for n, m in model.named_modules():
            if n in modes:
                m.training = modes[n]


def calibrate(model: nn.Module, loader: Iterable, layers: Union[int, str, Iterable[str]] = 2, eps: float = 0.7,
              batches: int = 100, modes: str = "no_batch", max_rank: Optional[int] = None, unfold: str = "tensor",
              device=None) -> Subspaces:
    """Calibrate LANCE subspaces for ``layers`` on up to ``batches`` batches of ``loader`` (forward only).

    Args:
        model: any nn.Module; its state (weights, BN statistics, train/eval flags) is left unchanged.
        loader: yields tensors, (inputs, labels) tuples or dicts of model kwargs.
        layers: layer names, or an int n = the last n Linear/Conv2d layers.
        eps: energy threshold in (0, 1]; eps=1 keeps every mode at full rank (exact gradients).
        modes: "no_batch" (default; any batch size) or "all" (the batch mode is projected too; fixed batch size).
        max_rank: optional cap on every r_n.
        unfold: "tensor" (conv inputs factored over N, C, H, W) or "im2col" (over the patch matrix N, L, C*kh*kw).
    Returns:
        ``Subspaces`` (``.save(path)``; ``lrkern.lance.compress(model, subspaces)``).

    Example:
        >>> subs = lrkern.lance.calibrate(model, train_loader, layers=["conv2", "conv3"], eps=0.7, batches=100)
    """
    eps, modes = check_eps(eps), check_modes(modes)
    if unfold not in UNFOLDS:
        raise ValueError(f"unfold={unfold!r} is not supported; accepted: {', '.join(UNFOLDS)}")
    if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
        raise ValueError(f"batches={batches!r} must be a positive int")
    names = select_layers(model, layers)
    first = 0 if modes == "all" else 1
    collector = GramCollector(model, names, lambda _n, nd: range(first, nd), unfold)
    with preserved_state(model):
        model.train()  # the reference calibrates in train mode (dropout and BN as during fine-tuning)
        used = collector.run(loader, batches, device)
    out = {}
    for name in names:
        module = _base(model.get_submodule(name))
        shape = collector.shapes[name]
        factors: list[Optional[torch.Tensor]] = [None] * len(shape)
        eigvals: list[Optional[torch.Tensor]] = [None] * len(shape)
        for k, gram in collector.grams[name].items():
            lam, vec = eig_desc(gram / used)
            r = energy_rank(lam, eps, max_rank)
            eigvals[k] = lam
            if r < shape[k]:  # a full-rank factor would be a rotation: no memory saved, exact either way
                factors[k] = vec[:, :r].to(torch.float32).contiguous()
        kind = layer_kind(module)
        out[name] = LayerSubspace(kind, unfold if kind == "conv2d" else "tensor", shape, list(module.weight.shape),
                                  factors, eigvals)
    return Subspaces(out, eps, modes, used, max_rank)
