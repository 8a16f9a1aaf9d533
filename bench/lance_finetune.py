"""LANCE fine-tuning experiment (issue 5, spec ``lance.md`` section 6): a SmallCNN and a SmallViT pretrained with BP on
Fashion-MNIST, then their last 2 or 4 layers fine-tuned on MNIST (the shared 10k test set split 8k train / 2k
held-out with a fixed seed) with BP, per-step HOSVD_eps (the prior method) and LANCE at several eps.

Per run: held-out accuracy, the bytes autograd saves inside the compressed layers for one step (SavedBytesMeter),
the median step time, and cos(dW~, dW) of each compressed layer on the first batch (the spec's probe).
Settings follow the spec: SGD momentum 0.9, lr 0.05 cosine, batch 128 (drop_last), 5 epochs, gradient clipping 2.0,
100 calibration batches. "layers" is the number of compressed layers, counted as the reference code does (see
``layer_plan``): CNN 2 = conv2, conv3 (fc1 and the new head train uncompressed: the spec's quality check), CNN 4 =
conv1..conv3 and fc1; ViT n = every Linear of the last n blocks.

    .venv/bin/python bench/lance_finetune.py                 # everything (~15 min on 2 CPU cores)
    .venv/bin/python bench/lance_finetune.py --models cnn --layers 4 --epochs 1   # a quick look
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lrkern.lance as lance  # noqa: E402
from bench.common import device_name  # noqa: E402
from bench.lance_results import environment, record  # noqa: E402
from lrkern.lance.calibrate import preserved_state  # noqa: E402
from lrkern.lance.models import new_head  # noqa: E402
from lrkern.lance.training import accuracy, pretrained, train_epochs  # noqa: E402
from lrkern.vision_data import batches, mnist_test, split  # noqa: E402

METHODS = [("bp", None, None), ("hosvd", 0.7, "all"), ("lance", 0.5, "no_batch"), ("lance", 0.7, "no_batch"),
           ("lance", 0.9, "no_batch"), ("lance", 0.7, "all")]


def layer_plan(name: str, model, n: int) -> tuple[list[str], list[str]]:
    """(compressed layer names, trained module names) for ``n`` compressed layers.

    CNN (as the reference code counts: the last n compressible layers): 2 -> conv2, conv3 (the spec's quality check;
    fc1 and the head train with plain BP); 4 -> conv1, conv2, conv3, fc1 (the whole body). ViT: the last n blocks,
    every Linear in them compressed. The new head (and the ViT's final norm, the CNN's BN layers of trained convs)
    always train with plain BP.
    """
    if name == "cnn":
        if n not in (2, 4):
            raise ValueError(f"the CNN experiment has layer settings 2 and 4, not {n}")
        wrapped = ["conv2", "conv3"] if n == 2 else ["conv1", "conv2", "conv3", "fc1"]
        bns = [f"bn{c[-1]}" for c in wrapped if c.startswith("conv")]
        return wrapped, wrapped + bns + (["fc1"] if n == 2 else []) + ["head"]
    depth = len(model.blocks)
    if n > depth:
        raise ValueError(f"the ViT has {depth} blocks; cannot train the last {n}")
    blocks = [f"blocks.{i}" for i in range(depth - n, depth)]
    wrapped = [f"{b}.{lin}" for b in blocks for lin in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    return wrapped, blocks + ["norm", "head"]


def weight_layers(model, modules: list[str]) -> list[str]:
    """The Linear/Conv2d layers inside ``modules`` (what plain BP keeps activations for)."""
    out = []
    for m in modules:
        for sub, mod in model.get_submodule(m).named_modules():
            if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
                out.append(f"{m}.{sub}" if sub else m)
    return out


def set_trainable(model, modules: list[str]) -> list[torch.nn.Parameter]:
    for p in model.parameters():
        p.requires_grad_(False)
    params = []
    for m in modules:
        for p in model.get_submodule(m).parameters():
            p.requires_grad_(True)
            params.append(p)
    return params


def layer_grads(model, batch, names) -> dict[str, torch.Tensor]:
    with preserved_state(model):
        model.train()
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(batch[0]), batch[1]).backward()
        grads = {n: model.get_submodule(n).weight.grad.detach().clone() for n in names}
        model.zero_grad(set_to_none=True)
    return grads


def run_one(args, name, base, n_layers, method, eps, modes, data, device) -> dict:
    (x_tr, y_tr), (x_ev, y_ev) = data
    torch.manual_seed(args.seed)
    model = copy.deepcopy(base).to(device)
    new_head(model, 10)
    model.to(device)
    wrapped, trained = layer_plan(name, model, n_layers)
    params = set_trainable(model, trained)
    loader = batches(x_tr, y_tr, args.batch, shuffle=True, seed=args.seed, drop_last=True)
    probe = (x_tr[:args.batch].to(device), y_tr[:args.batch].to(device))
    exact = layer_grads(model, probe, wrapped)
    bp_meter = lance.saved_bytes(model, probe, wrapped)
    bp_trained = lance.saved_bytes(model, probe, weight_layers(model, trained))
    calib_s, ranks = 0.0, None
    if method == "lance":
        t0 = time.perf_counter()
        subs = lance.calibrate(model, loader, layers=wrapped, eps=eps, batches=args.calib_batches, modes=modes,
                               device=device)
        calib_s = time.perf_counter() - t0
        lance.compress(model, subs)
        ranks = subs.ranks()
    elif method == "hosvd":
        lance.compress_per_step(model, wrapped, eps=eps, modes=modes)
    approx = layer_grads(model, probe, wrapped)
    cos = {n: F.cosine_similarity(approx[n].flatten(), exact[n].flatten(), dim=0).item() for n in wrapped}
    meter = lance.saved_bytes(model, probe, wrapped)
    trained_meter = lance.saved_bytes(model, probe, weight_layers(model, trained))
    log = train_epochs(model, loader, args.epochs,
                       lambda p: torch.optim.SGD(p, lr=args.lr, momentum=0.9), lr_schedule="cosine",
                       grad_clip=2.0, params=params)
    acc = accuracy(model, x_ev, y_ev)
    row = dict(model=name, method=method, eps=eps, modes=modes, layers=n_layers, accuracy=acc,
               activation_bytes=meter.layer_bytes(), bp_activation_bytes=bp_meter.layer_bytes(),
               trained_layer_bytes=trained_meter.layer_bytes(), bp_trained_layer_bytes=bp_trained.layer_bytes(),
               total_saved_bytes=meter.total, bp_total_saved_bytes=bp_meter.total, step_ms=log.median_step_ms,
               calib_s=round(calib_s, 2), ranks=ranks, cos=cos, compressed=wrapped, epochs=args.epochs,
               final_loss=sum(log.losses[-20:]) / len(log.losses[-20:]), device=device_name(device),
               **environment())
    print(f"{name} L{n_layers} {method:5s} eps={eps} {modes or '':8s} acc {acc:6.2f}%  act "
          f"{row['activation_bytes'] / 1024:9.1f} KiB ({bp_meter.layer_bytes() / max(1, row['activation_bytes']):6.0f}x"
          f")  step {row['step_ms']:6.1f} ms  calib {calib_s:4.1f} s  cos {[round(c, 2) for c in cos.values()]}",
          flush=True)
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["cnn", "vit"], choices=["cnn", "vit"])
    ap.add_argument("--layers", nargs="+", type=int, default=[2, 4])
    ap.add_argument("--methods", nargs="+", default=None,
                    help="subset of bp, hosvd, lance (default: all, at the spec's eps values)")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--calib-batches", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    images, labels = mnist_test()
    data = split(images, labels, 8000, seed=args.seed)
    rows = []
    for name in args.models:
        base = pretrained(name)
        for n in args.layers:
            for method, eps, modes in METHODS:
                if args.methods and method not in args.methods:
                    continue
                rows.append(run_one(args, name, base, n, method, eps, modes, data, device))
                if not args.no_record:
                    record(finetune=[rows[-1]])


if __name__ == "__main__":
    main()
