"""Training, evaluation, throughput and energy of ``CompressedVideoNet`` on compressed-domain tensors
(``lrkern.data.synth_motion.VideoTensors``): what ``bench/video_model.py`` and ``lrkern video`` run.

Recipe (lrkern's; the paper's is not public): AdamW (lr 1e-3, weight decay 0.05, betas 0.9 / 0.999), linear warm-up
over the first epoch then cosine decay to 0, batch 32, cross-entropy, gradient-norm clipping at 1.0. The epoch with the
best validation accuracy is kept (its weights are restored) and evaluated on the test split.
"""
from __future__ import annotations

import copy
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from lrkern.spiking.energy import EnergyTable, OpCounter


def batches(data, batch_size: int, shuffle: bool, generator: Optional[torch.Generator] = None,
            device: torch.device | str = "cpu") -> Iterator[tuple[torch.Tensor, ...]]:
    """Yield ``(iframes, mv, residual, gop_index, labels)`` mini-batches on ``device`` (the last one may be short)."""
    n = len(data.labels)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for i in range(0, n, batch_size):
        idx = order[i:i + batch_size]
        gi = data.gop_index[idx] if data.gop_index.dim() == 2 else data.gop_index
        yield (data.iframes[idx].to(device), data.mv[idx].to(device).float(), data.residual[idx].to(device),
               gi.to(device), data.labels[idx].to(device))


@torch.no_grad()
def evaluate(model: nn.Module, data, batch_size: int = 64, device: torch.device | str = "cpu") -> float:
    """Top-1 accuracy in percent."""
    model.eval()
    correct = 0
    for *inputs, y in batches(data, batch_size, False, device=device):
        correct += int((model(*inputs).argmax(-1) == y).sum())
    return 100.0 * correct / len(data.labels)


@dataclass
class TrainResult:
    best_val: float
    best_epoch: int
    history: list[dict] = field(default_factory=list)
    median_step_ms: float = float("nan")
    train_seconds: float = 0.0


def train(model: nn.Module, train_data, val_data, epochs: int = 15, lr: float = 1e-3, batch_size: int = 32,
          weight_decay: float = 0.05, seed: int = 0, device: torch.device | str = "cpu",
          log: Optional[Callable[[str], None]] = print) -> TrainResult:
    """Train with the recipe above; ``model`` ends with the weights of the best validation epoch."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    model.to(device)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(train_data.labels) / batch_size)
    total, warmup = epochs * steps_per_epoch, steps_per_epoch
    decay = max(1, total - warmup)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / decay)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    result, best_state, step_times = TrainResult(-1.0, -1), None, []
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        losses = []
        for *inputs, y in batches(train_data, batch_size, True, gen, device):
            t0 = time.perf_counter()
            loss = F.cross_entropy(model(*inputs), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            step_times.append(time.perf_counter() - t0)
        val = evaluate(model, val_data, device=device)
        result.history.append({"epoch": epoch, "loss": statistics.fmean(losses), "val_acc": val})
        if val > result.best_val:
            result.best_val, result.best_epoch = val, epoch
            best_state = copy.deepcopy(model.state_dict())
        if log:
            log(f"  epoch {epoch + 1}/{epochs}: loss {statistics.fmean(losses):.3f}, val {val:.2f}%")
    model.load_state_dict(best_state)
    result.median_step_ms = 1e3 * statistics.median(step_times)
    result.train_seconds = time.perf_counter() - start
    return result


@torch.no_grad()
def videos_per_second(model: nn.Module, data, batch_size: int = 32, device: torch.device | str = "cpu",
                      repeats: int = 3) -> float:
    """Inference throughput on already-decoded compressed-domain tensors (decoding is not included), best of
    ``repeats`` passes over the split after one warm-up batch."""
    model.eval()
    dev = torch.device(device)
    warm = next(batches(data, batch_size, False, device=dev))
    model(*warm[:-1])
    best = 0.0
    for _ in range(repeats):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        n = 0
        for *inputs, _y in batches(data, batch_size, False, device=dev):
            model(*inputs)
            n += inputs[0].shape[0]
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        best = max(best, n / (time.perf_counter() - t0))
    return best


@torch.no_grad()
def energy(model: nn.Module, data, batch_size: int = 64, device: torch.device | str = "cpu",
           table: EnergyTable = EnergyTable()) -> dict:
    """Compute-energy estimate per clip over the whole split (firing rates measured on it), see ``energy``."""
    model.eval()
    with OpCounter(model) as counter:
        for *inputs, _y in batches(data, batch_size, False, device=device):
            model(*inputs)
    return counter.report(table)
