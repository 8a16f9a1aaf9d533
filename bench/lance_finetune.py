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
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import device_name  # noqa: E402
from bench.lance_results import environment, record  # noqa: E402
from lrkern.lance.finetune import FinetuneSettings, describe, finetune  # noqa: E402
from lrkern.lance.training import pretrained  # noqa: E402
from lrkern.vision_data import mnist_test, split  # noqa: E402

METHODS = [("bp", None, None), ("hosvd", 0.7, "all"), ("lance", 0.5, "no_batch"), ("lance", 0.7, "no_batch"),
           ("lance", 0.9, "no_batch"), ("lance", 0.7, "all")]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["cnn", "vit"], choices=["cnn", "vit"])
    ap.add_argument("--layers", nargs="+", type=int, default=[2, 4])
    ap.add_argument("--methods", nargs="+", default=None, choices=["bp", "hosvd", "lance"],
                    help="a subset of the methods (default: all, at the spec's eps values)")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--calib-batches", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    settings = FinetuneSettings(args.epochs, args.batch, args.lr, args.calib_batches, args.seed)
    images, labels = mnist_test()
    train, held_out = split(images, labels, 8000, seed=args.seed)
    for name in args.models:
        base = pretrained(name)
        for n in args.layers:
            for method, eps, modes in METHODS:
                if args.methods and method not in args.methods:
                    continue
                row = finetune(name, base, n, method, eps, modes, train, held_out, settings, device)
                row.update(device=device_name(device), **environment())
                print(describe(row), flush=True)
                if not args.no_record:
                    record(finetune=[row])


if __name__ == "__main__":
    main()
