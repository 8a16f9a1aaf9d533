"""``lrkern kvlinc calibrate | eval | demo``."""
from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m"
CALIBRATION_TEXT = "wikitext2-valid-tokens.txt"
EVAL_TEXT = "wikitext2-raw-test.txt"


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _methods(text: str) -> list[str]:
    from lrkern.kvlinc.evaluate import METHODS
    out = [m for m in text.split(",") if m]
    bad = [m for m in out if m not in METHODS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown method(s) {bad}; accepted: {', '.join(METHODS)}")
    return out


def _data(path, default_name: str) -> Path:
    from lrkern.data import data_file
    if path is None:
        return data_file(default_name)
    if not Path(path).is_file():
        raise SystemExit(f"--data {path}: no such file")
    return Path(path)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"'{DEFAULT_MODEL}' (the packaged SmolLM2-135M-Instruct) or a local transformers folder")
    p.add_argument("--device", default="cpu")


def _load(args):
    from lrkern.kvlinc.models import load
    return load(args.model, device=args.device)


def cmd_calibrate(args) -> int:
    from lrkern.kvlinc.calibrate import CalibrationSettings, calibrate
    data = _data(args.data, CALIBRATION_TEXT)
    settings = CalibrationSettings(bits=args.bits, group_size=args.group_size, residual=args.residual or args.group_size,
                                   feature_dim=args.feature_dim, activation=args.activation,
                                   sequences=args.sequences, heldout=args.heldout, seq_len=args.seq_len,
                                   steps=args.steps, lr=args.lr, seed=args.seed, loss_space=args.loss_space)
    model, tok = _load(args)
    adapters = calibrate(model, tok, data, settings)
    adapters.extra["command"] = "lrkern " + " ".join(args.cli_argv)
    adapters.extra["model"] = args.model
    adapters.save(args.out, adapters.extra)
    print(f"calibrate: wrote {args.out}")
    return 0


def cmd_eval(args) -> int:
    from lrkern.kvlinc.adapters import KVLinCAdapters
    from lrkern.kvlinc.evaluate import EvalSettings, evaluate, markdown_table, write_results
    data = _data(args.data, EVAL_TEXT)
    settings = EvalSettings(ctx=args.ctx, prefix=args.prefix or args.ctx // 2, chunk=args.chunk, batch=args.batch,
                            max_windows=args.windows, group_size=args.group_size,
                            residual=args.residual or args.group_size)
    model, tok = _load(args)
    by_bits = {}
    for path in args.adapters or []:
        a = KVLinCAdapters.load(path, model)
        by_bits[a.config.bits] = a
    for bits in args.bits:
        if bits in by_bits:
            a = by_bits[bits]
            if (a.config.group_size, a.config.residual) != (settings.group_size, settings.residual):
                raise SystemExit(f"adapters {a.config} were calibrated for G={a.config.group_size}, "
                                 f"R={a.config.residual}; this evaluation uses G={settings.group_size}, "
                                 f"R={settings.residual}")
        elif "kvlinc" in args.methods:
            print(f"eval: no adapters for {bits} bits given (--adapters): kvlinc-{bits} runs without correction")
    name = args.name or (Path(args.model).name if Path(args.model).exists() else args.model)
    rows = evaluate(model, tok, data, args.methods, args.bits, settings, adapters_for=by_bits.get, model_name=name)
    table = markdown_table(rows)
    print(table)
    if not args.no_record:
        write_results(rows, args.out_json, args.out_md)
        print(f"eval: results in {args.out_json} and {args.out_md}")
    return 0


def cmd_demo(args) -> int:
    from lrkern.kvlinc.demo import run_demo
    return run_demo(args)


def add_commands(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("calibrate", help="fit the correction adapters (phi, psi per layer) on calibration text")
    _model_args(p)
    p.add_argument("--data", help=f"calibration text (default: {CALIBRATION_TEXT} from the shared data folder)")
    p.add_argument("--out", required=True, help="adapter file to write (.safetensors)")
    p.add_argument("--bits", type=int, default=2, choices=(2, 4))
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--residual", type=int, default=0, help="residual window R (default: the group size)")
    p.add_argument("--feature-dim", type=int, default=64)
    p.add_argument("--activation", default="exp", choices=("exp", "softplus"))
    p.add_argument("--sequences", type=int, default=16, help="calibration sequences")
    p.add_argument("--heldout", type=int, default=2, help="extra sequences to check the fit on")
    p.add_argument("--seq-len", type=int, default=1024)
    from lrkern.kvlinc.fit import FitDefaults
    p.add_argument("--steps", type=int, default=FitDefaults.steps, help="Adam steps per layer")
    p.add_argument("--lr", type=float, default=FitDefaults.lr)
    p.add_argument("--loss-space", default="o_proj", choices=("o_proj", "attention"),
                   help="measure the fit error after the layer's output projection (default) or on the attention output")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=cmd_calibrate)

    p = sub.add_parser("eval", help="WikiText-2 perplexity through the real cache, and KV bytes per token")
    _model_args(p)
    p.add_argument("--data", help=f"evaluation text (default: {EVAL_TEXT} from the shared data folder)")
    p.add_argument("--methods", type=_methods, default=["fp16", "kivi", "quarot", "kvlinc"])
    p.add_argument("--bits", type=_ints, default=[2, 4])
    p.add_argument("--adapters", nargs="*", help="KVLinC adapter files (one per bit width)")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--residual", type=int, default=0, help="residual window R (default: the group size)")
    p.add_argument("--ctx", type=int, default=1024, help="tokens per window")
    p.add_argument("--prefix", type=int, default=0, help="prefilled, unscored tokens per window (default ctx/2)")
    p.add_argument("--chunk", type=int, default=16, help="scored tokens per forward (1: token-by-token decode)")
    p.add_argument("--windows", type=int, default=32, help="windows to evaluate (0: the whole text)")
    p.add_argument("--batch", type=int, default=4, help="windows per forward")
    p.add_argument("--name", help="model name recorded in the results (default: --model)")
    p.add_argument("--out-json", default="bench/results/kvlinc_ppl.json")
    p.add_argument("--out-md", default="bench/results/kvlinc_ppl.md")
    p.add_argument("--no-record", action="store_true", help="print only")
    p.set_defaults(run=cmd_eval)

    p = sub.add_parser("demo", help="fp16 cache vs KVLinC-2 on the packaged model: replies, KV bytes, tokens/s, ppl")
    _model_args(p)
    p.add_argument("--adapters", help="adapter file (default: the one shipped for SmolLM2-135M, 2 bits)")
    p.add_argument("--max-new-tokens", type=int, default=80)
    p.add_argument("--ppl-windows", type=int, default=2, help="WikiText-2 windows for the perplexity comparison")
    p.set_defaults(run=cmd_demo)
