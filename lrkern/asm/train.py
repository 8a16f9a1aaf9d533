"""Full-precision training, alphabet-aware QAT fine-tuning and evaluation (spec ``asm.md`` sections 3.5 and 7).

Recipe (lrkern formulation; the paper's recipe is not public):

1. Full precision (``fp_checkpoint``): ``ResNetCNN(blocks_per_stage)``, SGD (momentum 0.9, Nesterov, weight decay
   5e-4), lr ``Recipe.lr`` with a per-step cosine decay to 0, batch 128 shuffled with the seed, cross-entropy. Trained
   once per (data set, training size, recipe, seed) and cached as safetensors in ``$LRKERN_CACHE_DIR`` (default
   ``~/.cache/lrkern``), with its test accuracy in the metadata.
2. QAT (``qat``): a copy of the FP model converted by ``lrkern.asm.convert`` (first and last layers float unless
   ``all_layers``), activation scales calibrated on ``calib_batches`` batches in eval mode (BN statistics untouched),
   then ``qat_epochs`` epochs in "train" mode (fake quantization, clipped STE) with the same optimizer at 1/10 of the
   FP learning rate, cosine schedule; BatchNorm stays float and keeps training; the activation EMA scales are frozen
   after ``Recipe.act_freeze_epochs`` QAT epochs (default 1, the spec's "after the first QAT epoch"; 0 freezes them
   right after the calibration). Epoch counts may be fractional (``StepLoader``), for CPU budgets. Learned scales
   (``scale="lsq"``) are excluded from weight decay.
   Then the BatchNorm running statistics are re-estimated (``reestimate_bn``, ``Recipe.bn_batches`` training batches)
   with the final quantized weights and frozen activation scales. Why: while the EMA scales move, every training batch
   is quantized on a different activation grid, so BN's running averages describe a mix of networks, not the final
   one (the same mechanism as the weight oscillations of Nagel et al., "Overcoming Oscillations in Quantization-Aware
   Training", ICML 2022, arXiv 2203.11086, who re-estimate BN for that reason). Measured here (Fashion-MNIST, seed 0,
   {1,3,5,7} W4A4, FP 2 + QAT 1 epochs): with the scales moving until the last step, running means off by up to 0.5
   standard deviations on training images and 81.85% test accuracy with the training-time statistics, 87.44% after
   re-estimation; with the scales frozen after calibration, 87.81% and 88.02%. Latent weights barely move at the end
   of the cosine schedule (0 to 5 of 76,288 integer weights change per step over the last 40 steps), so the weights
   are not the cause here.
   Even with re-estimated statistics, an EMA-scaled W4A4 network stays sensitive to them: re-estimating from three
   different 100-batch samples gave 86.79%, 87.99% and 88.00% (uniform, seed 2), and between two such estimates 2% to
   26% of the layers' 4-bit activations (deeper layers more) move by one level. With learned activation scales
   (``act_scale="lsq"``) the same model and samples gave 88.38% to 88.68%, and {1,3,5,7} seed 0 88.29% to 88.44%:
   ``bench/asm_experiment.py`` reports both kinds of scale.
3. Evaluation (``evaluate``): top-1 test accuracy in a given mode ("train" = fake quantization, "exact" = integer
   GEMM, "emulate" = shift-add datapath).
"""
from __future__ import annotations

import copy
import itertools
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import nn

from lrkern.asm.alphabet import parse_alphabet
from lrkern.asm.models import ResNetCNN
from lrkern.asm.modules import asm_layers, convert, set_alphabet, set_mode
from lrkern.asm.quant_act import ActQuantizer, calibrating, freeze_act_scales
from lrkern.lance.training import accuracy, default_cache_dir, train_epochs
from lrkern.vision_data import (FASHION_MNIST_MEAN_STD, MNIST_MEAN_STD, batches, fashion_mnist, mnist_test,
                                split)

FP_VERSION = "v1"
DATASETS = ("fashion", "mnist")


@dataclass(frozen=True)
class Recipe:
    """Training settings shared by every arm (FP pretraining and QAT)."""

    fp_epochs: float = 2        # may be fractional: round(epochs * batches per epoch) steps
    qat_epochs: float = 1
    batch: int = 128
    lr: float = 0.05            # FP learning rate; QAT uses lr * qat_lr_factor
    qat_lr_factor: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    calib_batches: int = 20
    act_freeze_epochs: float = 1  # QAT epochs before the activation EMA scales freeze (0: right after calibration)
    bn_batches: int = 100       # batches for the BN re-estimation after QAT (0: keep the training-time statistics)
    blocks_per_stage: int = 1

    def __post_init__(self):
        if not (self.fp_epochs > 0 and self.qat_epochs > 0):
            raise ValueError(f"fp_epochs={self.fp_epochs} and qat_epochs={self.qat_epochs} must be positive")
        if self.act_freeze_epochs < 0:
            raise ValueError(f"act_freeze_epochs={self.act_freeze_epochs} must be >= 0")
        if self.act_freeze_epochs == 0 and self.calib_batches == 0:
            raise ValueError("act_freeze_epochs=0 freezes the activation scales right after the calibration: "
                             "calib_batches must be >= 1")
        if self.batch < 1 or not self.lr > 0 or self.calib_batches < 0 or self.bn_batches < 0:
            raise ValueError(f"batch={self.batch} must be >= 1, lr={self.lr} > 0, calib_batches={self.calib_batches} "
                             f"and bn_batches={self.bn_batches} >= 0")


def load_data(dataset: str = "fashion", n_train: Optional[int] = None, n_test: Optional[int] = None,
              root: Optional[Union[str, os.PathLike]] = None):
    """``((x_train, y_train), (x_test, y_test), (mean, std))``.

    ``"fashion"``: Fashion-MNIST 60k/10k (Debian package ``dataset-fashion-mnist``); ``"mnist"``: the MNIST test set
    split 8k train / 2k test (seed 0). ``n_train`` / ``n_test`` keep the first examples only (a quick run)."""
    if dataset == "fashion":
        train, test, norm = fashion_mnist("train", root), fashion_mnist("test", root), FASHION_MNIST_MEAN_STD
    elif dataset == "mnist":
        images, labels = mnist_test(root)
        train, test = split(images, labels, 8000, seed=0)
        norm = MNIST_MEAN_STD
    else:
        raise ValueError(f"dataset={dataset!r} is not supported; accepted: {', '.join(DATASETS)}")
    if n_train is not None:
        train = (train[0][:n_train], train[1][:n_train])
    if n_test is not None:
        test = (test[0][:n_test], test[1][:n_test])
    return train, test, norm


class StepLoader:
    """``round(epochs * len(loader))`` batches of ``loader`` (at least 1), re-iterating it (a new shuffle each pass)
    as often as needed: fractional epochs for ``train_epochs(model, StepLoader(loader, e), 1, ...)``, whose cosine
    schedule then spans exactly these steps."""

    def __init__(self, loader, epochs: float):
        self.loader = loader
        self.total = max(1, round(epochs * len(loader)))

    def __len__(self) -> int:
        return self.total

    def __iter__(self):
        n = 0
        while n < self.total:
            for batch in self.loader:
                yield batch
                n += 1
                if n >= self.total:
                    return


def _optimizer(params, lr: float, recipe: Recipe) -> torch.optim.Optimizer:
    params = list(params)
    # Scales (LSQ weight scales and activation scales) take no weight decay.
    scale_ids = set()
    for p in params:
        if getattr(p, "_asm_scale", False):
            scale_ids.add(id(p))
    decay = [p for p in params if id(p) not in scale_ids]
    no_decay = [p for p in params if id(p) in scale_ids]
    groups = [{"params": decay, "weight_decay": recipe.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return torch.optim.SGD(groups, lr=lr, momentum=recipe.momentum, nesterov=True)


def fp_cache_path(dataset: str, n_train: int, seed: int, recipe: Recipe,
                  cache_dir: Optional[Union[str, os.PathLike]] = None) -> Path:
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return folder / (f"asm-resnet-b{recipe.blocks_per_stage}-{dataset}-n{n_train}-sgd{recipe.lr:g}-"
                     f"m{recipe.momentum:g}-wd{recipe.weight_decay:g}-b{recipe.batch}-e{recipe.fp_epochs:g}-s{seed}-"
                     f"{FP_VERSION}.safetensors")


def fp_checkpoint(train, test, seed: int = 0, recipe: Recipe = Recipe(), dataset: str = "fashion",
                  cache_dir: Optional[Union[str, os.PathLike]] = None, verbose: bool = True
                  ) -> tuple[nn.Module, dict]:
    """The FP ``ResNetCNN`` trained by the recipe (cached), in eval mode on the CPU, and its info
    (``test_accuracy``, ``train_seconds``, ``cached``)."""
    from safetensors.torch import load_file, save_file

    path = fp_cache_path(dataset, int(train[0].shape[0]), seed, recipe, cache_dir)
    if path.is_file():
        model = ResNetCNN(blocks_per_stage=recipe.blocks_per_stage)
        model.load_state_dict(load_file(path))
        from safetensors import safe_open
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        model.eval()
        acc = float(meta["test_accuracy"]) if "test_accuracy" in meta else accuracy(model, *test)
        return model, {"test_accuracy": acc, "train_seconds": float(meta.get("train_seconds", "nan")),
                       "cached": True, "path": str(path)}
    torch.manual_seed(seed)
    model = ResNetCNN(blocks_per_stage=recipe.blocks_per_stage)
    loader = batches(*train, recipe.batch, shuffle=True, seed=seed)
    t0 = time.perf_counter()
    log = train_epochs(model, StepLoader(loader, recipe.fp_epochs), 1, lambda p: _optimizer(p, recipe.lr, recipe),
                       "cosine")
    train_s = time.perf_counter() - t0
    model.eval()
    acc = accuracy(model, *test)
    if verbose:
        print(f"lrkern.asm: FP seed {seed}: test accuracy {acc:.2f}% after {recipe.fp_epochs:g} epochs, "
              f"{train_s:.0f} s ({log.median_step_ms:.0f} ms/step); cached in {path}", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, tmp, metadata={"dataset": dataset, "seed": str(seed), "recipe": str(asdict(recipe)),
                                    "test_accuracy": f"{acc:.4f}", "train_seconds": f"{train_s:.1f}",
                                    "version": FP_VERSION, "torch": torch.__version__})
    tmp.replace(path)
    return model, {"test_accuracy": acc, "train_seconds": train_s, "cached": False, "path": str(path),
                   "median_step_ms": log.median_step_ms, "steps": len(log.losses)}


def calibrate(model: nn.Module, loader, num_batches: int) -> None:
    """Initialise the activation scales from ``num_batches`` batches in eval mode (BN statistics untouched)."""
    was_training = model.training
    model.eval()
    p = next(model.parameters())
    with torch.no_grad(), calibrating(model):
        for x, _ in itertools.islice(loader, num_batches):
            model(x.to(p.device))
    model.train(was_training)


@torch.no_grad()
def reestimate_bn(model: nn.Module, loader, num_batches: int) -> int:
    """Recompute every BatchNorm's running mean and variance as the plain average over ``num_batches`` batches of
    ``loader`` (only the BN layers in training mode, ``momentum=None``), with the rest of the model as it will be
    evaluated: ASM layers in their current mode, activation quantizers in eval mode (their scales do not move).
    Parameters and activation scales do not change; the BN layers' momentum and the model's training flag are
    restored. Returns the number of batches used."""
    if num_batches < 1:
        raise ValueError(f"num_batches must be >= 1, got {num_batches}")
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    was_training = model.training
    momenta = [m.momentum for m in bns]
    p = next(model.parameters())
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch weighs the same
        m.train()
    used = 0
    try:
        for x, _ in itertools.islice(loader, num_batches):
            model(x.to(p.device))
            used += 1
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        model.train(was_training)
    if used == 0:
        raise ValueError("reestimate_bn: the loader gave no batches")
    return used


def qat(fp_model: nn.Module, alphabet, train, seed: int = 0, recipe: Recipe = Recipe(), w_bits: int = 4,
        a_bits: int = 4, scale: str = "max", act_scale: str = "ema", all_layers: bool = False,
        input_norm=None, prepare=None, progressive: Sequence[tuple] = (), verbose: bool = True
        ) -> tuple[nn.Module, dict]:
    """Alphabet-aware QAT of a copy of ``fp_model`` (see the module docstring); returns the model (in "train" mode,
    eval) and its info (``train_seconds``, ``median_step_ms``, ``final_loss``, ``bn_batches``, and
    ``bn_stats_before_reestimate``: the BN buffers as training left them, a partial state dict, empty without the
    re-estimation). ``prepare(model)``, if given, runs right after the conversion (e.g. to swap the weight quantizer
    of a baseline).

    ``progressive``: earlier stages ``[(alphabet, epochs), ...]`` trained in order before the final
    ``recipe.qat_epochs`` epochs on ``alphabet`` (spec 3.5's progressive alphabets, e.g. ``[("odd", 1), ("1357", 1)]``
    before ``"13"``). Each stage has its own cosine schedule from the QAT learning rate and a fresh optimizer; the
    layers move between sets with ``lrkern.asm.set_alphabet``; the activation scales freeze after
    ``recipe.act_freeze_epochs`` epochs counted over all stages."""
    stages = [(a, float(e)) for a, e in progressive] + [(alphabet, float(recipe.qat_epochs))]
    for a, e in stages:
        parse_alphabet(a)
        if not e > 0:
            raise ValueError(f"progressive: every stage needs positive epochs, got {e!r} for alphabet {a!r}")
    model = copy.deepcopy(fp_model)
    convert(model, stages[0][0], w_bits, a_bits, all_layers=all_layers, scale=scale, act_scale=act_scale,
            input_norm=input_norm)
    if prepare is not None:
        prepare(model)
    for _, layer in asm_layers(model):
        for q in [layer.act]:
            if isinstance(q.scale, nn.Parameter):
                q.scale._asm_scale = True
        if isinstance(getattr(layer, "w_scale", None), nn.Parameter):
            layer.w_scale._asm_scale = True
    torch.manual_seed(seed)
    loader = batches(*train, recipe.batch, shuffle=True, seed=seed + 1000)
    calibrate(model, loader, recipe.calib_batches)
    stage_steps = [StepLoader(loader, e) for _, e in stages]
    total = sum(len(st) for st in stage_steps)
    # Freeze after the step that ends act_freeze_epochs epochs (or after the last step, if QAT is shorter).
    freeze_at = min(round(recipe.act_freeze_epochs * len(loader)), total) - 1
    if freeze_at < 0:
        freeze_act_scales(model)
    t0 = time.perf_counter()
    losses, step_ms, done = [], [], 0
    for (a, _), steps in zip(stages, stage_steps):
        set_alphabet(model, a)

        def after_step(step: int, m: nn.Module, offset=done) -> None:
            if offset + step == freeze_at:
                freeze_act_scales(m)

        log = train_epochs(model, steps, 1, lambda p: _optimizer(p, recipe.lr * recipe.qat_lr_factor, recipe),
                           "cosine", step_callback=after_step)
        losses += log.losses
        step_ms.append(log.median_step_ms)
        done += len(steps)
    train_s = time.perf_counter() - t0
    before = {}
    if recipe.bn_batches:
        # Kept so that a caller can measure what the re-estimation changed (bench/asm_experiment.py does).
        before = {k: v.clone() for k, v in model.state_dict().items()
                  if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
        reestimate_bn(model, loader, recipe.bn_batches)
    model.eval()
    unfrozen = [q for q in model.modules() if isinstance(q, ActQuantizer) and not bool(q.frozen)]
    if unfrozen:
        raise RuntimeError(f"{len(unfrozen)} activation quantizers were never calibrated (unused layers?)")
    info = {"train_seconds": train_s, "median_step_ms": statistics.median(step_ms), "steps": total,
            "final_loss": statistics.fmean(losses[-min(50, len(losses)):]),
            "bn_batches": recipe.bn_batches, "bn_stats_before_reestimate": before}
    if verbose:
        what = " -> ".join(f"{a} ({e:g} ep)" for a, e in stages) if progressive else f"{alphabet}"
        print(f"lrkern.asm: QAT {what} seed {seed}: {sum(e for _, e in stages):g} epochs, {train_s:.0f} s "
              f"({info['median_step_ms']:.0f} ms/step), final loss {info['final_loss']:.4f}", flush=True)
    return model, info


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, mode: str = "train",
             batch_size: int = 500) -> float:
    """Top-1 accuracy (%) with every ASM layer in ``mode``; the layers' previous modes are restored."""
    layers = list(asm_layers(model))
    saved = [m.mode for _, m in layers]
    set_mode(model, mode)
    try:
        return accuracy(model, images, labels, batch_size=batch_size)
    finally:
        for (_, m), s in zip(layers, saved):
            m.mode = s


@torch.no_grad()
def logits(model: nn.Module, images: torch.Tensor, mode: str) -> torch.Tensor:
    """The model's logits on ``images`` in eval mode with every ASM layer in ``mode`` (modes restored)."""
    layers = list(asm_layers(model))
    saved = [m.mode for _, m in layers]
    was_training = model.training
    set_mode(model, mode)
    model.eval()
    try:
        return model(images)
    finally:
        model.train(was_training)
        for (_, m), s in zip(layers, saved):
            m.mode = s
