"""GPM-style gradient projection (Saha et al., ICLR 2021): the continual-learning baseline LANCE-CL is compared to.

The protected basis P of every layer is built exactly as in LANCE-CL (``extend_basis`` on the same input Grams), but
training keeps full activations (plain backprop) and every weight gradient is projected after backward:
g <- g - (g P) P^T on the [O, n_F] view of the gradient. Biases of protected layers are frozen after task 0, as in
LANCE-CL, so the two methods differ only in how the update is confined.
"""
from __future__ import annotations

from typing import Iterable

from torch import nn

from lrkern.lance.continual import ProtectedTasks


class GPM(ProtectedTasks):
    """``before_task(loader)`` / ``after_task(loader)`` around each task's training, like ``ContinualLance``."""

    def __init__(self, model: nn.Module, layers, eps_cl: float = 0.97, eps_cl_step: float = 0.0003,
                 protect_batches: int = 11, device=None):
        super().__init__(model, layers, eps_cl, eps_cl_step, protect_batches, device)
        self._hooks: list = []

    def before_task(self, loader: Iterable) -> None:
        if self.task == 0:
            return
        self._freeze_biases()
        for name in self.names:
            p = self.bases[name]
            self._hooks.append(self.model.get_submodule(name).weight.register_hook(
                lambda g, p=p: (g.reshape(g.shape[0], -1) - (g.reshape(g.shape[0], -1) @ p) @ p.T).reshape(g.shape)))

    def _end_task(self) -> dict:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        return {}
