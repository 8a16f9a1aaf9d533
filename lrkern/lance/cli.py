"""``lrkern lance demo | calibrate``."""
from __future__ import annotations

import argparse


def _device(text: str):
    import torch

    return torch.device(text)


def _demo(args) -> int:
    import torch

    from lrkern.lance.finetune import FinetuneSettings, describe, finetune
    from lrkern.lance.training import pretrained
    from lrkern.vision_data import mnist_test, split

    images, labels = mnist_test()
    train, held_out = split(images, labels, 8000, seed=0)
    base = pretrained("cnn")  # trains once (~1-2 min on 2 cores) and caches; later runs load it
    settings = FinetuneSettings(epochs=args.epochs)
    print(f"LANCE demo: SmallCNN pretrained on Fashion-MNIST, conv2 and conv3 fine-tuned on MNIST (8k train, 2k "
          f"held out), {args.epochs} epoch(s), batch 128, torch {torch.__version__} on {args.device}")
    rows = [finetune("cnn", base, 2, "bp", None, None, train, held_out, settings, args.device),
            finetune("cnn", base, 2, "lance", args.eps, args.modes, train, held_out, settings, args.device)]
    for r in rows:
        print(describe(r))
    bp, lc = rows
    print(f"LANCE keeps {bp['activation_bytes'] / lc['activation_bytes']:.0f}x fewer activation bytes in conv2/conv3 "
          f"({lc['activation_bytes']} vs {bp['activation_bytes']} B, ranks {lc['ranks']}), accuracy "
          f"{lc['accuracy'] - bp['accuracy']:+.2f} points vs BP, step time {lc['step_ms'] / bp['step_ms']:.2f}x BP.")
    print("The 5-epoch experiment (CNN and ViT, eps 0.5-0.9, per-step HOSVD): `make lance`, bench/results/lance.md.")
    return 0


def _calibrate(args) -> int:
    from lrkern.lance.calibrate import calibrate
    from lrkern.lance.models import new_head
    from lrkern.lance.training import pretrained
    from lrkern.vision_data import batches, mnist_test, split

    images, labels = mnist_test()
    (x, y), _ = split(images, labels, 8000, seed=0)
    model = pretrained(args.model)
    new_head(model, 10)
    loader = batches(x, y, args.batch, shuffle=True, seed=0, drop_last=True)
    subs = calibrate(model, loader, layers=args.layers.split(","), eps=args.eps, batches=args.batches,
                     modes=args.modes, device=args.device)
    subs.extra = {"command": "lrkern " + " ".join(args.cli_argv), "data": "MNIST test 8k split (seed 0)"}
    path = subs.save(args.out)
    for name, s in subs.layers.items():
        print(f"{name}: ranks {s.ranks} of {s.shape} (compression {s.compression():.0f}x at batch {s.shape[0]})")
    print(f"saved {path}")
    return 0


def add_commands(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser("demo", help="fine-tune a small CNN on MNIST with BP and with LANCE; compare bytes, "
                                       "accuracy and step time (~1 min after a one-time pretraining)")
    demo.add_argument("--epochs", type=int, default=1)
    demo.add_argument("--eps", type=float, default=0.7)
    demo.add_argument("--modes", default="no_batch", choices=["no_batch", "all"])
    demo.add_argument("--device", type=_device, default="cpu")
    demo.set_defaults(run=_demo)
    cal = sub.add_parser("calibrate", help="calibrate LANCE subspaces of a pretrained experiment model on MNIST and "
                                           "save them as safetensors")
    cal.add_argument("--model", default="cnn", choices=["cnn", "vit"])
    cal.add_argument("--layers", default="conv2,conv3", help="comma-separated layer names")
    cal.add_argument("--eps", type=float, default=0.7)
    cal.add_argument("--batches", type=int, default=100)
    cal.add_argument("--batch", type=int, default=128)
    cal.add_argument("--modes", default="no_batch", choices=["no_batch", "all"])
    cal.add_argument("--device", type=_device, default="cpu")
    cal.add_argument("--out", required=True, help="output .safetensors path")
    cal.set_defaults(run=_calibrate)
