"""Calibrated LANCE subspaces: per layer, one orthonormal factor per projected mode, saved as safetensors with the
settings they were made under.

A subspace file only fits the architecture it was calibrated on (layer names, layer types, weight shapes and, for
``modes="all"``, the batch size). ``Subspaces.load(path, model=...)`` and ``lrkern.lance.compress`` check this and
refuse a mismatch with a message naming the layer and the difference.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

FORMAT = "lrkern-lance-subspaces/1"
MODES = ("no_batch", "all")
UNFOLDS = ("tensor", "im2col")


def check_eps(eps: float, name: str = "eps") -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0.0 < eps <= 1.0:
        raise ValueError(f"{name}={eps!r} must be a number in (0, 1]: the fraction of each mode's energy (sum of "
                         "Gram eigenvalues) that the kept subspace must reach")
    return float(eps)


def check_modes(modes: str) -> str:
    if modes not in MODES:
        raise ValueError(f"modes={modes!r} is not supported; accepted: 'no_batch' (any batch size; the batch mode is "
                         "not projected) or 'all' (the paper's setting, fixed batch size)")
    return modes


def energy_rank(eigvals: torch.Tensor, eps: float, max_rank: Optional[int] = None) -> int:
    """Smallest r whose top-r eigenvalues hold at least eps of the total: 1 + #{i : cumsum(lambda)_i / sum < eps}.

    eigvals: descending, >= 0. A zero spectrum (an all-zero activation) keeps rank 1.
    """
    lam = eigvals.clamp_min(0).to(torch.float64)
    total = lam.sum()
    if total <= 0:
        return 1
    r = 1 + int((torch.cumsum(lam, 0) / total < eps).sum().item())
    r = min(r, lam.numel())
    return min(r, max_rank) if max_rank else r


def eig_desc(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(eigenvalues descending, eigenvectors as columns) of a symmetric PSD Gram, computed in fp64."""
    lam, vec = torch.linalg.eigh(gram.to(torch.float64))
    return lam.flip(0), vec.flip(1)


def layer_kind(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    return type(module).__name__


@dataclass
class LayerSubspace:
    """One layer's factors.

    kind: "linear" | "conv2d"; unfold: "tensor" (the activation's own modes) or "im2col" (the conv patch matrix
    [N, L, C*kh*kw]); shape: mode sizes seen at calibration (mode 0 = batch); weight_shape: the layer's weight;
    factors[k]: fp32 [n_k, r_k] or None (mode not projected: not asked for, or full rank); eigvals[k]: that mode's
    Gram spectrum (descending) or None.
    """

    kind: str
    unfold: str
    shape: list[int]
    weight_shape: list[int]
    factors: list[Optional[torch.Tensor]]
    eigvals: list[Optional[torch.Tensor]]

    @property
    def ranks(self) -> list[int]:
        return [n if u is None else u.shape[1] for n, u in zip(self.shape, self.factors)]

    def compression(self, batch: Optional[int] = None) -> float:
        """prod n_k / prod r_k for an activation with this shape (batch mode = ``batch`` when not projected)."""
        shape = list(self.shape)
        ranks = self.ranks
        if batch is not None and self.factors[0] is None:
            shape[0] = ranks[0] = batch
        return math.prod(shape) / math.prod(ranks)


@dataclass
class Subspaces:
    """All calibrated layers plus the settings: eps, modes, batches (calibration batches actually used),
    max_rank, and free-form ``extra`` (e.g. the command that made them)."""

    layers: dict[str, LayerSubspace]
    eps: float
    modes: str
    batches: int
    max_rank: Optional[int] = None
    extra: dict = field(default_factory=dict)

    def ranks(self) -> dict[str, list[int]]:
        return {name: s.ranks for name, s in self.layers.items()}

    def to(self, device) -> "Subspaces":
        for s in self.layers.values():
            s.factors = [None if u is None else u.to(device) for u in s.factors]
        return self

    # ------------------------------------------------------------------------------------------------- checks
    def check_model(self, model: nn.Module) -> None:
        """Raise ValueError unless every calibrated layer exists in ``model`` with the same type and weight shape."""
        modules = dict(model.named_modules())
        problems = []
        for name, s in self.layers.items():
            m = modules.get(name)
            if m is None:
                problems.append(f"{name}: no such layer in the model")
                continue
            base = getattr(m, "lance_kind", None) or layer_kind(m)
            if base != s.kind:
                problems.append(f"{name}: calibrated as {s.kind}, the model has {layer_kind(m)}")
            elif list(m.weight.shape) != list(s.weight_shape):
                problems.append(f"{name}: weight {list(m.weight.shape)} but the subspaces were calibrated for "
                                f"{list(s.weight_shape)}")
        if problems:
            raise ValueError("these subspaces were calibrated on another model: " + "; ".join(problems))

    # ------------------------------------------------------------------------------------------------ storage
    def save(self, path) -> Path:
        from safetensors.torch import save_file

        tensors, layers = {}, {}
        for name, s in self.layers.items():
            for k, (u, lam) in enumerate(zip(s.factors, s.eigvals)):
                if u is not None:
                    tensors[f"{name}/U{k}"] = u.detach().to("cpu", torch.float32).contiguous()
                if lam is not None:
                    tensors[f"{name}/eig{k}"] = lam.detach().to("cpu", torch.float64).contiguous()
            layers[name] = dict(kind=s.kind, unfold=s.unfold, shape=list(s.shape), weight_shape=list(s.weight_shape),
                                projected=[u is not None for u in s.factors],
                                has_eig=[lam is not None for lam in s.eigvals])
        meta = dict(format=FORMAT, eps=self.eps, modes=self.modes, batches=self.batches, max_rank=self.max_rank,
                    layers=layers, extra=self.extra)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata={"lance": json.dumps(meta)})
        return path

    @classmethod
    def load(cls, path, model: Optional[nn.Module] = None, device=None) -> "Subspaces":
        """Read a file written by ``save``; with ``model``, also check it fits (see ``check_model``)."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            raw = (f.metadata() or {}).get("lance")
            meta = json.loads(raw) if raw else {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path} is not a LANCE subspace file (format {meta.get('format')!r}, expected "
                                 f"{FORMAT!r})")
            layers = {}
            for name, info in meta["layers"].items():
                factors = [f.get_tensor(f"{name}/U{k}") if p else None for k, p in enumerate(info["projected"])]
                eig = [f.get_tensor(f"{name}/eig{k}") if p else None for k, p in enumerate(info["has_eig"])]
                layers[name] = LayerSubspace(info["kind"], info["unfold"], info["shape"], info["weight_shape"],
                                             factors, eig)
        out = cls(layers, meta["eps"], meta["modes"], meta["batches"], meta.get("max_rank"), meta.get("extra", {}))
        if model is not None:
            out.check_model(model)
        return out.to(device) if device is not None else out
