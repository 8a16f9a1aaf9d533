"""LANCE for continual learning: each new task trains in the orthogonal complement of earlier tasks' inputs.

After task t, the dominant directions of every protected layer's input feature space (F for a Linear, C*kh*kw of
the im2col patches for a Conv2d) are added to an orthonormal basis P (energy threshold eps_cl, raised by
eps_cl_step per task). For task t+1 the layer's feature factor U_F comes from the residual Gram
(I - P P^T) C_F (I - P P^T) at energy ``eps``, and the layer is compressed with it. A LANCE weight gradient is
dW = Z U_F^T, so every update has rows in span(U_F), orthogonal to P: for an old-task input x close to span(P),
dW x ~ 0 and the old task's outputs do not move (the GPM argument, with no per-layer projection step during
training and only the small core kept for backward).

Task 0 trains without compression (reference code). Use plain SGD (momentum is fine, reset per task) without weight
decay: Adam's per-element scaling and weight decay both leave span(U_F) and break the guarantee. Biases of protected
layers are frozen after task 0 for the same reason (a bias shift moves old tasks' outputs).
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import nn

from lrkern.lance.calibrate import GramCollector, preserved_state
from lrkern.lance.modules import compress, decompress, select_layers
from lrkern.lance.subspaces import LayerSubspace, Subspaces, check_eps, eig_desc, energy_rank, layer_kind


def feature_grams(model: nn.Module, loader: Iterable, names: Sequence[str], batches: int, device=None,
                  extra_modes: bool = False) -> GramCollector:
    """Grams of the feature mode (last mode of the im2col/Linear input) of each layer; with ``extra_modes`` also
    the non-batch modes before it."""
    first = 1 if extra_modes else None
    collector = GramCollector(model, names, lambda _n, nd: range(first if first else nd - 1, nd), unfold="im2col")
    with preserved_state(model):
        model.eval()  # protection statistics describe the trained model as it will be evaluated
        collector.run(loader, batches, device, desc="protect")
    return collector


def extend_basis(basis: Optional[torch.Tensor], gram: torch.Tensor, eps_cl: float) -> torch.Tensor:
    """GPM's basis update: add the fewest residual directions so that the basis holds eps_cl of the Gram's energy.

    basis: [n, k] orthonormal or None; gram: [n, n] (fp32 or fp64). Returns [n, k'] orthonormal (fp32), k' >= k.
    """
    c = gram.to(torch.float64)
    total = torch.trace(c).clamp_min(1e-30)
    if basis is None:
        lam, vec = eig_desc(c)
        return vec[:, :energy_rank(lam, eps_cl)].to(torch.float32).contiguous()
    p = basis.to(torch.float64)
    kept = torch.trace(p.T @ c @ p)
    if kept / total >= eps_cl or p.shape[1] == p.shape[0]:
        return basis
    q = torch.eye(c.shape[0], dtype=torch.float64, device=c.device) - p @ p.T
    lam, vec = eig_desc(q @ c @ q)
    need = (eps_cl * total - kept).item()
    k = int((torch.cumsum(lam.clamp_min(0), 0) < need).sum().item()) + 1
    k = min(k, c.shape[0] - p.shape[1])
    new = q @ vec[:, :k]  # strip any component inside span(P) left by rounding, then re-orthonormalise
    full, _ = torch.linalg.qr(torch.cat([p, new], 1))
    return full.to(torch.float32).contiguous()


def residual_factor(gram: torch.Tensor, basis: Optional[torch.Tensor], eps: float,
                    max_rank: Optional[int] = None) -> torch.Tensor:
    """U_F: the top eigenvectors (energy ``eps``) of (I - P P^T) C (I - P P^T), exactly orthogonal to span(P)."""
    c = gram.to(torch.float64)
    if basis is None:
        lam, vec = eig_desc(c)
        return vec[:, :energy_rank(lam, eps, max_rank)].to(torch.float32).contiguous()
    p = basis.to(torch.float64)
    q = torch.eye(c.shape[0], dtype=torch.float64, device=c.device) - p @ p.T
    lam, vec = eig_desc(q @ c @ q)
    r = min(energy_rank(lam, eps, max_rank), c.shape[0] - p.shape[1])
    if r < 1:
        raise ValueError("the protected basis already spans the whole input space; no direction is left to train")
    u, _ = torch.linalg.qr(q @ vec[:, :r])
    return u.to(torch.float32).contiguous()


class ProtectedTasks:
    """What LANCE-CL and the GPM baseline share: the protected layers, their bases P, the task counter, the basis
    update after each task (``protect``) and the task loop (``run``). Subclasses confine the updates of later tasks
    in ``before_task`` and undo that in ``_end_task``."""

    def __init__(self, model: nn.Module, layers, eps_cl: float, eps_cl_step: float, protect_batches: int, device):
        self.model, self.names = model, select_layers(model, layers)
        self.eps_cl, self.eps_cl_step = check_eps(eps_cl, "eps_cl"), eps_cl_step
        self.protect_batches, self.device = protect_batches, device
        self.bases: dict[str, Optional[torch.Tensor]] = {n: None for n in self.names}
        self.task = 0
        self.history: list[dict] = []

    def before_task(self, loader: Iterable):
        raise NotImplementedError

    def _end_task(self) -> dict:
        """Undo ``before_task``; returns what to log for the task."""
        return {}

    def after_task(self, loader: Iterable) -> dict[str, int]:
        """Undo the task's confinement and add its dominant input directions to the protected bases."""
        logged = self._end_task()
        grams = feature_grams(self.model, loader, self.names, self.protect_batches, self.device)
        eps_cl = min(1.0, self.eps_cl + self.eps_cl_step * self.task)
        for name in self.names:
            (gram,) = grams.grams[name].values()
            self.bases[name] = extend_basis(self.bases[name], gram, eps_cl)
        ranks = {n: b.shape[1] for n, b in self.bases.items()}
        self.history.append(dict(task=self.task, eps_cl=eps_cl, basis_ranks=ranks, **logged))
        self.task += 1
        return ranks

    def _freeze_biases(self) -> None:
        # A bias shift moves every old task's outputs; no subspace argument protects it.
        for name in self.names:
            bias = self.model.get_submodule(name).bias
            if bias is not None:
                bias.requires_grad_(False)

    def basis_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.bases.values() if b is not None)

    def run(self, task_loaders: Sequence[Iterable], train_task: Callable[[nn.Module, int, Iterable], None],
            after: Optional[Callable[[nn.Module, int], None]] = None):
        """Train on every task in order: ``train_task(model, t, loader)`` is the user's loop (SGD, no weight decay);
        ``after(model, t)`` runs after each task is protected (e.g. evaluate all tasks so far)."""
        for t, loader in enumerate(task_loaders):
            self.before_task(loader)
            train_task(self.model, t, loader)
            self.after_task(loader)
            if after is not None:
                after(self.model, t)
        return self


class ContinualLance(ProtectedTasks):
    """Drives LANCE through a sequence of tasks.

    Args:
        model: the network (its protected layers: Linear, or Conv2d with groups=1).
        layers: names (or an int: the last n compressible layers) of the protected, compressed layers.
        eps: energy of the residual feature subspace U_F (reference: 0.98).
        eps_modes: energy of the other non-batch modes (the output positions L of a conv's patch matrix); they set
            the memory of the cores but not the orthogonality, which U_F alone guarantees. None: no projection.
        eps_cl: energy kept in the protected basis after each task (reference: 0.97), raised by eps_cl_step per task.
        calib_batches / protect_batches: batches for the per-task subspaces / for the basis (reference: ~11).
    Use ``before_task(loader)``, your training loop, then ``after_task(loader)`` for each task, or ``run``.
    """

    def __init__(self, model: nn.Module, layers, eps: float = 0.98, eps_cl: float = 0.97,
                 eps_cl_step: float = 0.0003, eps_modes: Optional[float] = 0.9, calib_batches: int = 20,
                 protect_batches: int = 11, max_rank: Optional[int] = None, device=None):
        super().__init__(model, layers, eps_cl, eps_cl_step, protect_batches, device)
        self.eps = check_eps(eps)
        self.eps_modes = None if eps_modes is None else check_eps(eps_modes, "eps_modes")
        self.calib_batches, self.max_rank = calib_batches, max_rank
        self.subspaces: Optional[Subspaces] = None
        self._frozen: list[nn.Parameter] = []

    def before_task(self, loader: Iterable) -> Optional[Subspaces]:
        """Task 0: nothing (plain training). Later tasks: residual subspaces, then compress the layers."""
        if self.task == 0:
            return None
        self._freeze_biases()
        grams = feature_grams(self.model, loader, self.names, self.calib_batches, self.device,
                              extra_modes=self.eps_modes is not None)
        layers = {}
        for name in self.names:
            module = self.model.get_submodule(name)
            basis = self.bases[name]
            if basis is not None and basis.shape[1] == basis.shape[0]:
                # Earlier tasks span the whole input space: no update can avoid them, so the layer sits this task out.
                module.weight.requires_grad_(False)
                self._frozen.append(module.weight)
                continue
            shape = grams.shapes[name]
            nd = len(shape)
            factors: list[Optional[torch.Tensor]] = [None] * nd
            eig: list[Optional[torch.Tensor]] = [None] * nd
            for k, gram in grams.grams[name].items():
                if k == nd - 1:
                    factors[k] = residual_factor(gram, basis, self.eps, self.max_rank)
                else:
                    lam, vec = eig_desc(gram)
                    r = energy_rank(lam, self.eps_modes, self.max_rank)
                    factors[k] = vec[:, :r].to(torch.float32).contiguous() if r < shape[k] else None
            unfold = "im2col" if isinstance(module, nn.Conv2d) else "tensor"
            layers[name] = LayerSubspace(layer_kind(module), unfold, shape, list(module.weight.shape), factors, eig)
        self.subspaces = Subspaces(layers, self.eps, "no_batch", grams.batches, self.max_rank)
        compress(self.model, self.subspaces)
        return self.subspaces

    def _end_task(self) -> dict:
        decompress(self.model)
        for w in self._frozen:
            w.requires_grad_(True)
        self._frozen.clear()
        logged = dict(factor_ranks=self.subspaces.ranks() if self.subspaces else None)
        self.subspaces = None
        return logged


def continual_learning(model: nn.Module, task_loaders: Sequence[Iterable],
                       train_task: Callable[[nn.Module, int, Iterable], None], layers, **kwargs) -> ContinualLance:
    """LANCE-CL over ``task_loaders`` (one loader per task, in order). See ``ContinualLance`` for the arguments."""
    return ContinualLance(model, layers, **kwargs).run(task_loaders, train_task)
