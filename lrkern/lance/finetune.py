"""One LANCE fine-tuning run as the experiments define it (spec ``lance.md`` section 6), shared by
``bench/lance_finetune.py`` and ``lrkern lance demo``.

A model pretrained on Fashion-MNIST gets a new head and is fine-tuned on MNIST with plain BP, per-step HOSVD_eps or
LANCE on a chosen set of layers. Measured per run: held-out accuracy, the bytes autograd saves inside the compressed
layers (and inside every trained layer) for one step, the median step time, and cos(dW~, dW) of each compressed
layer on the first batch (the spec's probe of the gradient direction).
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lrkern.lance.calibrate import calibrate, preserved_state
from lrkern.lance.memory import saved_bytes
from lrkern.lance.models import new_head
from lrkern.lance.modules import compress, compress_per_step
from lrkern.lance.training import accuracy, train_epochs
from lrkern.vision_data import batches

METHODS = ("bp", "hosvd", "lance")


@dataclass
class FinetuneSettings:
    """The spec's recipe: SGD momentum 0.9, lr 0.05 with cosine decay, batch 128 (drop_last), 5 epochs, gradient
    clipping 2.0, 100 calibration batches."""

    epochs: int = 5
    batch: int = 128
    lr: float = 0.05
    calib_batches: int = 100
    seed: int = 0


def layer_plan(name: str, model: nn.Module, n: int) -> tuple[list[str], list[str]]:
    """(compressed layer names, trained module names) for ``n`` compressed layers.

    CNN (counted as the reference code does: the last n compressible layers): 2 -> conv2, conv3 (the spec's quality
    check; fc1 and the head train with plain BP); 4 -> conv1, conv2, conv3, fc1 (the whole body). ViT: the last n
    blocks, every Linear in them compressed. The new head (and the ViT's final norm, the BN layers of trained convs)
    always train with plain BP.
    """
    if name == "cnn":
        if n not in (2, 4):
            raise ValueError(f"the CNN experiment has layer settings 2 and 4, not {n}")
        wrapped = ["conv2", "conv3"] if n == 2 else ["conv1", "conv2", "conv3", "fc1"]
        bns = [f"bn{c[-1]}" for c in wrapped if c.startswith("conv")]
        return wrapped, wrapped + bns + (["fc1"] if n == 2 else []) + ["head"]
    depth = len(model.blocks)
    if not 1 <= n <= depth:
        raise ValueError(f"the ViT has {depth} blocks; cannot train the last {n}")
    blocks = [f"blocks.{i}" for i in range(depth - n, depth)]
    wrapped = [f"{b}.{lin}" for b in blocks for lin in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    return wrapped, blocks + ["norm", "head"]


def weight_layers(model: nn.Module, modules: list[str]) -> list[str]:
    """The Linear/Conv2d layers inside ``modules`` (what plain BP keeps activations for)."""
    out = []
    for m in modules:
        for sub, mod in model.get_submodule(m).named_modules():
            if isinstance(mod, (nn.Linear, nn.Conv2d)):
                out.append(f"{m}.{sub}" if sub else m)
    return out


def set_trainable(model: nn.Module, modules: list[str]) -> list[nn.Parameter]:
    """Freeze everything except ``modules``; returns their parameters."""
    for p in model.parameters():
        p.requires_grad_(False)
    params = []
    for m in modules:
        for p in model.get_submodule(m).parameters():
            p.requires_grad_(True)
            params.append(p)
    return params


def layer_grads(model: nn.Module, batch, names: list[str]) -> dict[str, torch.Tensor]:
    """Weight gradients of ``names`` for one batch (BN statistics restored afterwards)."""
    with preserved_state(model):
        model.train()
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(batch[0]), batch[1]).backward()
        grads = {n: model.get_submodule(n).weight.grad.detach().clone() for n in names}
        model.zero_grad(set_to_none=True)
    return grads


def finetune(name: str, base: nn.Module, n_layers: int, method: str, eps: Optional[float], modes: Optional[str],
             train, held_out, settings: FinetuneSettings = FinetuneSettings(), device="cpu") -> dict:
    """Fine-tune a copy of ``base`` (``name`` "cnn" or "vit") on ``train`` = (images, labels) and evaluate on
    ``held_out``. ``method`` is "bp", "hosvd" (per-step, at eps/modes) or "lance" (calibrated once, eps/modes).
    Returns a result row (accuracy %, bytes, step ms, ranks, cosines, ...)."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not supported; accepted: {', '.join(METHODS)}")
    device = torch.device(device)
    (x_tr, y_tr), (x_ev, y_ev) = train, held_out
    torch.manual_seed(settings.seed)
    model = copy.deepcopy(base)
    new_head(model, 10, seed=settings.seed)
    model.to(device)
    wrapped, trained = layer_plan(name, model, n_layers)
    params = set_trainable(model, trained)
    loader = batches(x_tr, y_tr, settings.batch, shuffle=True, seed=settings.seed, drop_last=True)
    # A copy, not a view: the meter counts whole storages, and a view would carry the entire training set.
    probe = (x_tr[:settings.batch].clone().to(device), y_tr[:settings.batch].clone().to(device))
    exact = layer_grads(model, probe, wrapped)
    bp_meter = saved_bytes(model, probe, wrapped)
    bp_trained = saved_bytes(model, probe, weight_layers(model, trained))
    calib_s, ranks = 0.0, None
    if method == "lance":
        t0 = time.perf_counter()
        subs = calibrate(model, loader, layers=wrapped, eps=eps, batches=settings.calib_batches, modes=modes,
                         device=device)
        calib_s = time.perf_counter() - t0
        compress(model, subs)
        ranks = subs.ranks()
    elif method == "hosvd":
        compress_per_step(model, wrapped, eps=eps, modes=modes)
    approx = layer_grads(model, probe, wrapped)
    cos = {n: F.cosine_similarity(approx[n].flatten(), exact[n].flatten(), dim=0).item() for n in wrapped}
    meter = saved_bytes(model, probe, wrapped)
    trained_meter = saved_bytes(model, probe, weight_layers(model, trained))
    log = train_epochs(model, loader, settings.epochs,
                       lambda p: torch.optim.SGD(p, lr=settings.lr, momentum=0.9), lr_schedule="cosine",
                       grad_clip=2.0, params=params)
    acc = accuracy(model, x_ev, y_ev)
    return dict(model=name, method=method, eps=eps, modes=modes, layers=n_layers, accuracy=acc,
                activation_bytes=meter.layer_bytes(), bp_activation_bytes=bp_meter.layer_bytes(),
                trained_layer_bytes=trained_meter.layer_bytes(), bp_trained_layer_bytes=bp_trained.layer_bytes(),
                total_saved_bytes=meter.total, bp_total_saved_bytes=bp_meter.total, step_ms=log.median_step_ms,
                calib_s=round(calib_s, 2), ranks=ranks, cos=cos, compressed=wrapped, epochs=settings.epochs,
                final_loss=sum(log.losses[-20:]) / len(log.losses[-20:]))


def describe(row: dict) -> str:
    """One line for a result row."""
    red = row["bp_activation_bytes"] / max(1, row["activation_bytes"])
    return (f"{row['model']} L{row['layers']} {row['method']:5s} eps={row['eps']} {row['modes'] or '':8s} "
            f"acc {row['accuracy']:6.2f}%  act {row['activation_bytes'] / 1024:9.1f} KiB ({red:6.0f}x)  "
            f"step {row['step_ms']:6.1f} ms  calib {row['calib_s']:4.1f} s  "
            f"cos {[round(c, 2) for c in row['cos'].values()]}")
