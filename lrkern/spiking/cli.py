"""``lrkern video demo | data | train``: the compressed-domain action-recognition model (spec ``spiking_video.md``)."""
from __future__ import annotations

import argparse
from pathlib import Path


def _per_class(text: str) -> tuple[int, int, int]:
    try:
        counts = tuple(int(v) for v in text.split(","))
    except ValueError:
        counts = ()
    if len(counts) != 3 or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"--per-class must be three positive integers train,val,test; got {text!r}")
    return counts


def _summary(name: str, net, data, device) -> str:
    from lrkern.spiking.train import energy, evaluate, videos_per_second

    e = energy(net, data, device=device)
    acc, vps = evaluate(net, data, device=device), videos_per_second(net, data, device=device)
    return (f"{name:12s} test {acc:6.2f}%  {vps:6.0f} videos/s  {e['joules_per_clip'] * 1e3:.3f} mJ/video "
            f"(compute estimate; all-dense equivalent {e['dense_equivalent_joules_per_clip'] * 1e3:.3f} mJ)")


def _train_models(models: list[str], splits: dict, epochs: int, device, seed: int = 0, **overrides) -> dict:
    import torch

    from lrkern.spiking.train import train
    from lrkern.spiking.video import CompressedVideoNet, config_for

    nets = {}
    for name in models:
        torch.manual_seed(seed)
        net = CompressedVideoNet(config_for(name, splits["train"], **overrides))
        print(f"training {name} ({sum(p.numel() for p in net.parameters()) / 1e6:.2f} M parameters, {epochs} epochs)")
        train(net, splits["train"], splits["val"], epochs=epochs, seed=seed, device=device)
        nets[name] = net
    return nets


def _demo(args) -> int:
    from lrkern.data import synth_motion

    root = Path(args.root) if args.root else synth_motion.default_root().with_name("synth_motion_demo")
    print(f"Synthetic motion set, {args.per_class} clips per class (train/val/test), MPEG-4 Part 2 via PyAV -> {root}")
    synth_motion.make_dataset(root, per_class=args.per_class)
    splits = {s: synth_motion.load_split(root, s) for s in synth_motion.SPLITS}
    nets = _train_models(["iframe_only", "full"], splits, args.epochs, args.device)
    for name, net in nets.items():
        print(_summary(name, net, splits["test"], args.device))
    print("I-frames carry no class information here (every motion is at rest on I-frames), so iframe_only should stay "
          "near chance (12.5%) while the full model reads the motion from the P-frames' vectors and residuals.\n"
          "The full experiment (5 models x 3 seeds, 200 clips per class): `make video`, bench/results/video_model.md.")
    return 0


def _data(args) -> int:
    from lrkern.data import synth_motion

    paths = synth_motion.make_dataset(args.root, seed=args.seed, per_class=args.per_class, codec=args.codec)
    for split, path in paths.items():
        print(f"{split}: {path}")
    return 0


def _train(args) -> int:
    import torch

    from lrkern.data import synth_motion
    from lrkern.spiking.video import MODELS

    # The inputs the model needs: --accumulate, else the named model's own (full_coviar), else per-frame; checked
    # before decoding anything.
    model_acc = MODELS[args.model].get("accumulate")
    accumulate = model_acc if args.accumulate is None else (None if args.accumulate == "none" else args.accumulate)
    if model_acc is not None and accumulate != model_acc:
        raise SystemExit(f"--model {args.model} takes accumulate={model_acc!r} inputs, not --accumulate "
                         f"{args.accumulate}; drop --accumulate or pick another model")
    overrides = {"reset_per_gop": True} if args.reset_per_gop else {}

    folder = Path(args.data)
    if not (folder / "train").is_dir() or not (folder / "test").is_dir():
        raise SystemExit(f"--data {folder}: expected {folder}/train/<label>/<videos> and {folder}/test/<label>/<videos>"
                         " (and optionally val/)")
    splits = {s: synth_motion.folder_dataset(folder / s, gops=args.gops, workers=args.workers, accumulate=accumulate)
              for s in ("train", "val", "test") if (folder / s).is_dir()}
    if splits["train"].classes != splits["test"].classes:
        raise SystemExit(f"--data {folder}: train and test have different labels: {splits['train'].classes} vs "
                         f"{splits['test'].classes}")
    if "val" not in splits:
        print("no val/ split: the best epoch is picked on the test split (the reported test accuracy is optimistic)")
        splits["val"] = splits["test"]
    net = _train_models([args.model], splits, args.epochs, args.device, **overrides)[args.model]
    print(_summary(args.model, net, splits["test"], args.device))
    if args.out:
        torch.save({"config": net.cfg, "state_dict": net.state_dict(), "classes": splits["train"].classes}, args.out)
        print(f"saved {args.out}")
    return 0


def add_commands(parser: argparse.ArgumentParser) -> None:
    from lrkern.spiking.video import MODELS

    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser("demo", help="build a small synthetic motion set, train the I-frame-only and the full model "
                                       "on CPU, report accuracy, videos/s and the energy estimate (a few minutes)")
    demo.add_argument("--per-class", type=_per_class, default=(40, 10, 10))
    demo.add_argument("--epochs", type=int, default=8)
    demo.add_argument("--root", default=None, help="dataset cache folder")
    demo.add_argument("--device", default="cpu")
    demo.set_defaults(run=_demo)
    data = sub.add_parser("data", help="generate (or reuse) the synthetic motion set and print its cache files")
    data.add_argument("--per-class", type=_per_class, default=(200, 40, 40))
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--codec", default="mpeg4", choices=["mpeg4", "libx264"])
    data.add_argument("--root", default=None)
    data.set_defaults(run=_data)
    tr = sub.add_parser("train", help="train a model on a folder of labelled videos DIR/{train,val,test}/<label>/*")
    tr.add_argument("--data", required=True)
    tr.add_argument("--model", default="full", choices=list(MODELS))
    tr.add_argument("--epochs", type=int, default=12)
    tr.add_argument("--gops", type=int, default=3, help="GOPs kept per clip (clips with fewer are refused)")
    tr.add_argument("--accumulate", default=None, choices=["none", "coviar"],
                    help="P-frame inputs: per frame (none) or MVs and residuals accumulated back to the I-frame as in "
                         "CoViAR (coviar); default: the model's own (coviar for full_coviar, else none)")
    tr.add_argument("--reset-per-gop", action="store_true",
                    help="restart the P path's neurons (STM and LIFs) at every GOP instead of carrying their state "
                         "across GOPs (implied by --model full_reset_gop)")
    tr.add_argument("--workers", type=int, default=1)
    tr.add_argument("--device", default="cpu")
    tr.add_argument("--out", default=None, help="save the trained model (torch.save) here")
    tr.set_defaults(run=_train)
