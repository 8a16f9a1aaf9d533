"""GPM-style gradient projection (Saha et al., ICLR 2021): the continual-learning baseline LANCE-CL is compared to.

The protected basis P of every layer is built exactly as in LANCE-CL (``extend_basis`` on the same input Grams), but
training keeps full activations (plain backprop) and every weight gradient is projected after backward:
g <- g - (g P) P^T on the [O, n_F] view of the gradient. Biases of protected layers are frozen after task 0, as in
LANCE-CL, so the two methods differ only in how the update is confined.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import nn

from lrkern.lance.continual import extend_basis, feature_grams
from lrkern.lance.modules import select_layers
from lrkern.lance.subspaces import check_eps


class GPM:
    """``before_task(loader)`` / ``after_task(loader)`` around each task's training, like ``ContinualLance``."""

    def __init__(self, model: nn.Module, layers, eps_cl: float = 0.97, eps_cl_step: float = 0.0003,
                 protect_batches: int = 11, device=None):
        self.model, self.names = model, select_layers(model, layers)
        self.eps_cl, self.eps_cl_step = check_eps(eps_cl, "eps_cl"), eps_cl_step
        self.protect_batches, self.device = protect_batches, device
        self.bases: dict[str, Optional[torch.Tensor]] = {n: None for n in self.names}
        self.task = 0
        self._hooks: list = []

    def before_task(self, loader: Iterable) -> None:
        if self.task == 0:
            return
        for name in self.names:
            module = self.model.get_submodule(name)
            p = self.bases[name]
            self._hooks.append(module.weight.register_hook(
                lambda g, p=p: (g.reshape(g.shape[0], -1) - (g.reshape(g.shape[0], -1) @ p) @ p.T).reshape(g.shape)))
            if module.bias is not None:
                module.bias.requires_grad_(False)

    def after_task(self, loader: Iterable) -> dict[str, int]:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        grams = feature_grams(self.model, loader, self.names, self.protect_batches, self.device)
        eps_cl = min(1.0, self.eps_cl + self.eps_cl_step * self.task)
        for name in self.names:
            (gram,) = grams.grams[name].values()
            self.bases[name] = extend_basis(self.bases[name], gram, eps_cl)
        self.task += 1
        return {n: b.shape[1] for n, b in self.bases.items()}

    def basis_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.bases.values() if b is not None)

    def run(self, task_loaders: Sequence[Iterable], train_task: Callable[[nn.Module, int, Iterable], None],
            after: Optional[Callable[[nn.Module, int], None]] = None) -> "GPM":
        for t, loader in enumerate(task_loaders):
            self.before_task(loader)
            train_task(self.model, t, loader)
            self.after_task(loader)
            if after is not None:
                after(self.model, t)
        return self
