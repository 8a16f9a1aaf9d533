"""Training and evaluation helpers of the LANCE vision experiments (spec ``lance.md`` section 6).

- ``train_epochs``: a plain supervised cross-entropy loop that times every step, so BP and LANCE runs can be compared
  by median step time, and that calls a hook after each step (where probes such as gradient cosines plug in).
- ``accuracy``: top-1 accuracy in percent, optionally restricted to a slice of the logits (task-incremental heads).
- ``pretrained``: a model pretrained with BP on Fashion-MNIST train (Adam 1e-3, batch 128), trained once and cached as
  safetensors in ``$LRKERN_CACHE_DIR`` (default ``~/.cache/lrkern``); later calls load it in well under a second.

Pretraining measured on a 2-core CPU (torch 2.13 CPU, 2 threads, 2 epochs = 938 steps, seed 0), Fashion-MNIST test
accuracy / median step / wall time on a shared machine (other jobs running; an idle one is about median x 938):

| name | model | test acc | median step | wall (shared CPU) |
|---|---|---|---|---|
| cnn | SmallCNN() | 90.48% | 64 ms | 125 s |
| cnn_nobn | SmallCNN(batchnorm=False) | 89.29% | 50 ms | 93 s |
| vit | SmallViT() (49 patches + cls) | 83.13% | 96 ms | 262 s |

(SmallViT(patch=7), 16 patches + cls: 83.88%, median step 50 ms, if the ViT ever needs to be cheaper.)
"""
from __future__ import annotations

import math
import os
import statistics
import time
from pathlib import Path
from typing import Callable, Iterable, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from lrkern.lance.models import SmallCNN, SmallViT
from lrkern.vision_data import batches, fashion_mnist

# Bump when a model definition, the data normalisation or the pretraining recipe changes: it is part of every cache
# file name, so stale checkpoints are never loaded into a changed model.
PRETRAIN_VERSION = "v1"
PRETRAIN_NAMES = ("cnn", "cnn_nobn", "vit")
PRETRAIN_LR = 1e-3
PRETRAIN_BATCH = 128

# Model factories; their arguments are written into the cache file name too.
_FACTORIES: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "cnn": (lambda: SmallCNN(batchnorm=True), "smallcnn-bn"),
    "cnn_nobn": (lambda: SmallCNN(batchnorm=False), "smallcnn-nobn"),
    "vit": (lambda: SmallViT(), "smallvit-d64-L4-h4-m2-p4"),
}


class TrainLog(NamedTuple):
    """What ``train_epochs`` returns: per-step ``losses`` (floats) and ``step_times`` (seconds, each covering forward,
    backward and optimizer step). Unpacks as ``losses, step_times = train_epochs(...)``."""

    losses: list[float]
    step_times: list[float]

    @property
    def median_step_ms(self) -> float:
        """Median wall time of a step in milliseconds (robust to the slow first steps)."""
        return 1e3 * statistics.median(self.step_times) if self.step_times else float("nan")


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def train_epochs(model: nn.Module, loader: Iterable, epochs: int,
                 optimizer_fn: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
                 lr_schedule: Optional[str] = "cosine", grad_clip: Optional[float] = None,
                 params: Optional[Iterable[nn.Parameter]] = None,
                 step_callback: Optional[Callable[[int, nn.Module], None]] = None) -> TrainLog:
    """Train ``model`` with cross-entropy for ``epochs`` passes over ``loader``.

    Args:
        model: maps images ``[B, ...]`` to logits ``[B, C]``; put in train mode here (BN statistics update).
        loader: re-iterable, yields ``(images [B, ...], labels int64 [B])`` (e.g. ``lrkern.vision_data.batches``);
            batches are moved to the model's device. ``len(loader)`` is needed for the cosine schedule.
        epochs: number of passes (>= 1).
        optimizer_fn: builds the optimizer from a parameter list, e.g. ``lambda p: torch.optim.SGD(p, lr=0.05,
            momentum=0.9)``.
        lr_schedule: ``"cosine"`` (per-step cosine decay from the optimizer's lr to 0 over all steps) or None
            (constant lr).
        grad_clip: max global gradient norm of the trained parameters, or None.
        params: the parameters to train; default every parameter with ``requires_grad``. The model's other
            parameters are frozen (``requires_grad=False``) during the call, so no time is spent on their gradients,
            and restored afterwards.
        step_callback: ``step_callback(step, model)`` after every optimizer step (``step`` counts from 0 over all
            epochs); not included in the step time.

    Returns:
        ``TrainLog(losses, step_times)``: one loss and one wall time (``time.perf_counter`` around forward, backward,
        clipping and optimizer step; CUDA is synchronised first) per step.
    """
    if epochs < 1:
        raise ValueError(f"epochs={epochs} must be >= 1")
    if lr_schedule not in ("cosine", None):
        raise ValueError(f"lr_schedule={lr_schedule!r} is not supported; accepted: 'cosine', None")
    if grad_clip is not None and grad_clip <= 0:
        raise ValueError(f"grad_clip={grad_clip} must be positive or None")
    all_params = list(model.parameters())
    trained = [p for p in all_params if p.requires_grad] if params is None else list(params)
    if not trained:
        raise ValueError("no parameters to train: params is empty or every parameter has requires_grad=False")
    trained_ids = {id(p) for p in trained}
    if not trained_ids <= {id(p) for p in all_params}:
        raise ValueError("params contains tensors that are not parameters of model")
    saved_flags = [p.requires_grad for p in all_params]
    for p in all_params:
        p.requires_grad_(id(p) in trained_ids)

    device = _device_of(model)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    optimizer = optimizer_fn(trained)
    scheduler = None
    if lr_schedule == "cosine":
        total = epochs * len(loader)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, total) / total)))
    losses: list[float] = []
    times: list[float] = []
    model.train()
    try:
        step = 0
        for _ in range(epochs):
            for x, y in loader:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                sync()
                t0 = time.perf_counter()
                optimizer.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                if grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(trained, grad_clip)
                optimizer.step()
                sync()
                times.append(time.perf_counter() - t0)
                losses.append(loss.item())
                if scheduler is not None:
                    scheduler.step()
                if step_callback is not None:
                    step_callback(step, model)
                step += 1
    finally:
        for p, flag in zip(all_params, saved_flags):
            p.requires_grad_(flag)
    return TrainLog(losses, times)


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000,
             head_slice: Optional[slice] = None) -> float:
    """Top-1 accuracy of ``model`` on ``(images [N, ...], labels [N])`` in percent (0-100).

    Runs in eval mode under ``torch.no_grad`` and restores the model's previous train/eval mode.

    Args:
        head_slice: only these logits compete, e.g. ``slice(2, 4)`` for the task of classes (2, 3) with a shared
            10-way output; labels stay absolute class ids (the argmax inside the slice is offset by
            ``head_slice.start``). None: all logits.
    """
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"images ({images.shape[0]}) and labels ({labels.shape[0]}) differ in length")
    if images.shape[0] == 0:
        raise ValueError("accuracy of an empty set is undefined")
    if head_slice is not None and (not isinstance(head_slice, slice) or head_slice.step not in (None, 1)):
        raise ValueError(f"head_slice={head_slice!r} must be a contiguous slice such as slice(2, 4)")
    was_training = model.training
    model.eval()
    device = _device_of(model)
    correct = 0
    try:
        for lo in range(0, images.shape[0], batch_size):
            logits = model(images[lo:lo + batch_size].to(device))
            offset = 0
            if head_slice is not None:
                offset = head_slice.indices(logits.shape[1])[0]
                logits = logits[:, head_slice]
            pred = logits.argmax(1) + offset
            correct += (pred.cpu() == labels[lo:lo + batch_size]).sum().item()
    finally:
        model.train(was_training)
    return 100.0 * correct / images.shape[0]


def default_cache_dir() -> Path:
    """``$LRKERN_CACHE_DIR``, else ``~/.cache/lrkern`` (the same folder ``lrkern.kvlinc`` caches its model in)."""
    return Path(os.environ.get("LRKERN_CACHE_DIR", Path.home() / ".cache" / "lrkern"))


def pretrained_path(name: str, epochs: int = 2, seed: int = 0, cache_dir: Optional[Union[str, os.PathLike]] = None
                    ) -> Path:
    """Where ``pretrained(name, epochs, seed)`` caches its weights: every setting and ``PRETRAIN_VERSION`` are in the
    name."""
    if name not in _FACTORIES:
        raise ValueError(f"name={name!r} is not supported; accepted: {', '.join(PRETRAIN_NAMES)}")
    arch = _FACTORIES[name][1]
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return folder / (f"lance-{arch}-fmnist-adam{PRETRAIN_LR:g}-b{PRETRAIN_BATCH}-e{epochs}-s{seed}-"
                     f"{PRETRAIN_VERSION}.safetensors")


def pretrained(name: str, epochs: int = 2, seed: int = 0, cache_dir: Optional[Union[str, os.PathLike]] = None,
               root: Optional[Union[str, os.PathLike]] = None) -> nn.Module:
    """A model pretrained with BP on Fashion-MNIST train (60k), in eval mode on the CPU.

    Recipe: ``torch.manual_seed(seed)`` then the model's init, Adam (lr 1e-3), batch 128 shuffled with ``seed``,
    ``epochs`` epochs, constant lr, cross-entropy. The weights (BN running statistics included) are cached as
    safetensors at ``pretrained_path(name, epochs, seed, cache_dir)``, with the Fashion-MNIST test accuracy and the
    training time in its metadata; a later call loads that file (well under a second) instead of training.

    Args:
        name: ``"cnn"`` (``SmallCNN()``), ``"cnn_nobn"`` (``SmallCNN(batchnorm=False)``) or ``"vit"``
            (``SmallViT()``).
        epochs: number of pretraining epochs.
        seed: seeds the initialisation and the batch order.
        cache_dir: default ``$LRKERN_CACHE_DIR``, else ``~/.cache/lrkern``.
        root: the Fashion-MNIST folder, see ``lrkern.vision_data.fashion_mnist``; only read when training.
    """
    from safetensors.torch import load_file, save_file
    from tqdm.auto import tqdm  # a runtime dependency, as in lrkern.kvlinc

    path = pretrained_path(name, epochs, seed, cache_dir)
    factory = _FACTORIES[name][0]
    if path.is_file():
        model = factory()
        model.load_state_dict(load_file(path))
        return model.eval()

    x_train, y_train = fashion_mnist("train", root)
    x_test, y_test = fashion_mnist("test", root)
    torch.manual_seed(seed)
    model = factory()
    # Built once and handed to every per-epoch train_epochs call, so Adam's moments carry over between epochs.
    optimizer = torch.optim.Adam(model.parameters(), lr=PRETRAIN_LR)
    loader = batches(x_train, y_train, PRETRAIN_BATCH, shuffle=True, seed=seed, drop_last=False)
    t_start = time.perf_counter()
    for epoch in range(epochs):
        # One train_epochs call per epoch (constant lr, so nothing changes) gives a progress line per epoch.
        bar = tqdm(total=len(loader), desc=f"pretrain {name} epoch {epoch + 1}/{epochs}", unit="step", leave=False)
        t0 = time.perf_counter()
        log = train_epochs(model, loader, 1, lambda _: optimizer, lr_schedule=None,
                           step_callback=lambda s, m: bar.update())
        bar.close()
        print(f"lrkern: pretrain {name} epoch {epoch + 1}/{epochs}: loss {statistics.fmean(log.losses):.4f}, "
              f"{time.perf_counter() - t0:.1f} s ({log.median_step_ms:.1f} ms/step)", flush=True)
    train_s = time.perf_counter() - t_start
    acc = accuracy(model, x_test, y_test)
    print(f"lrkern: pretrain {name}: Fashion-MNIST test accuracy {acc:.2f}% after {epochs} epochs, {train_s:.0f} s; "
          f"cached in {path}", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, tmp, metadata={"name": name, "epochs": str(epochs), "seed": str(seed),
                                    "version": PRETRAIN_VERSION, "fmnist_test_acc": f"{acc:.2f}",
                                    "train_seconds": f"{train_s:.1f}", "torch": torch.__version__,
                                    "threads": str(torch.get_num_threads())})
    tmp.replace(path)  # atomic: an interrupted run never leaves a truncated cache file behind
    return model.eval()
