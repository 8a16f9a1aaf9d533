"""Ablation of the KVLinC correction's feature map on real activations (spec ``kvlinc.md`` 3.3: "the choice ... must
be justified by the ablation in the calibration report").

Post-RoPE q, k, v of a few layers are captured from a causal LM (transformers, fp32) on N windows of T tokens of
calibration text and N windows of held-out text. Per layer, the correction is fitted on the calibration windows
(``lrkern.kvlinc.fit``) and every variant is scored on the held-out windows by the relative error of the decode
attention output, rms(out - ref) / rms(ref), over the queries that have a quantized prefix (positions >= R - 1; the
earlier ones hold all their tokens in the full-precision window). ref is full-precision causal attention.

    KIVI           kivi preset: per-channel keys, per-token values, no rotation, no correction
    no corr        kvlinc preset without correction (Hadamard-rotated values)
    softplus       kvlinc + correction, FeatureMap activation "softplus", init_feature_maps (near-zero start)
    exp            kvlinc + correction, activation "exp", the same init
    softplus/def   kvlinc + correction, "softplus" with FeatureMap's constructor init (bias 0): is the init needed?

    python bench/ablate_kvlinc_features.py --model /path/to/smollm2-135m-safetensors [--layers 0,7,15,29]
        [--data calib.txt] [--eval-data heldout.txt] [--record]

``--record`` writes bench/results/kvlinc_feature_ablation.json (otherwise nothing is written).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

import lrkern
from bench.common import RESULTS, metadata
from lrkern.kvlinc.calibrate import calibration_sequences, capture_qkv
from lrkern.kvlinc.fit import (FitDefaults, LayerEmulation, correction_loss, emulate_layer, fit_emulation,
                               init_feature_maps, uncorrected_loss)

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
RESULTS_FILE = RESULTS / "kvlinc_feature_ablation.json"
COLUMNS = ("kivi", "no_corr", "softplus", "exp", "softplus_default_init")
HEADERS = {"kivi": "KIVI", "no_corr": "no corr", "softplus": "softplus", "exp": "exp",
           "softplus_default_init": "softplus/def"}
# Correction variants: (FeatureMap activation, whether init_feature_maps runs first).
VARIANTS = {"softplus": ("softplus", True), "exp": ("exp", True), "softplus_default_init": ("softplus", False)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", required=True, help="a transformers causal-LM folder (e.g. SmolLM2-135M as safetensors)")
    p.add_argument("--layers", default="0,7,15,29", help="comma-separated layer indices (default 0,7,15,29)")
    p.add_argument("--data", default=str(DATA / "wikitext2-valid-tokens.txt"), help="calibration text file")
    p.add_argument("--eval-data", default=str(DATA / "wikitext2-raw-test.txt"), help="held-out text file")
    p.add_argument("--num-seqs", type=int, default=8, help="windows of each text (default 8)")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per window (default 1024)")
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--residual", type=int, default=None, help="window R (default: the group size)")
    p.add_argument("--feature-dim", type=int, default=64)
    p.add_argument("--steps", type=int, default=FitDefaults.steps)
    p.add_argument("--lr", type=float, default=FitDefaults.lr)
    p.add_argument("--batch-size", type=int, default=FitDefaults.batch_size)
    p.add_argument("--weight-decay", type=float, default=FitDefaults.weight_decay)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--record", action="store_true", help=f"write {RESULTS_FILE.relative_to(ROOT)}")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------------ capture


def capture_layers(model, tokenizer, path: str, n: int, T: int, layers: list[int]) -> dict:
    """{layer: (q, k, v)} post-RoPE for the first n windows of T tokens of the file (lrkern's own calibration
    capture), keeping only ``layers``."""
    bad = [l for l in layers if not 0 <= l < model.config.num_hidden_layers]
    if bad:
        raise ValueError(f"--layers {bad} out of range (the model has {model.config.num_hidden_layers} layers)")
    captured = capture_qkv(model, calibration_sequences(tokenizer, path, n, T))
    return {l: captured[l] for l in layers}


# ------------------------------------------------------------------------------------------------------ scoring


def rel_err(em: LayerEmulation, phi=None, psi=None) -> float:
    """rms(out - ref) / rms(ref) over the corrected queries of all sequences (uncorrected without phi / psi)."""
    if phi is None:
        return math.sqrt(uncorrected_loss(em))
    with torch.no_grad():
        return math.sqrt(float(correction_loss(em, phi, psi)))


def ablate_layer(layer: int, calib, heldout, args, hq: int) -> dict:
    """Every variant of one layer: held-out errors, the fit's final training error and its time."""
    d, hkv = calib[1].shape[-1], calib[1].shape[1]
    common = dict(bits=args.bits, group_size=args.group_size, residual=args.residual or args.group_size)
    kvlinc = lrkern.KVConfig.preset("kvlinc", hkv, d, feature_dim=args.feature_dim, **common)
    kivi = lrkern.KVConfig.preset("kivi", hkv, d, **common)
    t0 = time.perf_counter()
    em_fit, em_eval = emulate_layer(*calib, kvlinc), emulate_layer(*heldout, kvlinc)
    row = {"layer": layer, "emulate_s": round(time.perf_counter() - t0, 2),
           "heldout": {"kivi": rel_err(emulate_layer(*heldout, kivi)), "no_corr": rel_err(em_eval)},
           "train": {"no_corr": rel_err(em_fit)}, "fit_s": {}}
    for name, (activation, near_zero) in VARIANTS.items():
        torch.manual_seed(args.seed)
        phi = lrkern.FeatureMap(hq, d, args.feature_dim, activation=activation)
        psi = lrkern.FeatureMap(hkv, d, args.feature_dim, activation=activation)
        if near_zero:
            init_feature_maps(phi, psi, generator=torch.Generator().manual_seed(args.seed))
        t0 = time.perf_counter()
        fit_emulation(em_fit, phi, psi, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                      weight_decay=args.weight_decay)
        row["fit_s"][name] = round(time.perf_counter() - t0, 2)
        row["heldout"][name] = rel_err(em_eval, phi, psi)
        row["train"][name] = rel_err(em_fit, phi, psi)
    return row


def table(rows: list[dict]) -> str:
    head = f"{'layer':>5} | " + " | ".join(f"{HEADERS[c]:>12}" for c in COLUMNS) + " | fit s (exp)"
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = " | ".join(f"{r['heldout'][c]:12.4f}" for c in COLUMNS)
        lines.append(f"{r['layer']:>5} | {cells} | {r['fit_s']['exp']:8.1f}")
    means = " | ".join(f"{sum(r['heldout'][c] for r in rows) / len(rows):12.4f}" for c in COLUMNS)
    lines.append(f"{'mean':>5} | {means} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    layers = [int(x) for x in args.layers.split(",") if x.strip()]
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    t0 = time.perf_counter()
    calib = capture_layers(model, tokenizer, args.data, args.num_seqs, args.seq_len, layers)
    heldout = capture_layers(model, tokenizer, args.eval_data, args.num_seqs, args.seq_len, layers)
    print(f"captured {len(layers)} layers x 2 x {args.num_seqs} x {args.seq_len} tokens in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    hq = model.config.num_attention_heads
    rows = []
    for layer in layers:
        rows.append(ablate_layer(layer, calib[layer], heldout[layer], args, hq))
        r = rows[-1]
        print(f"layer {layer}: " + ", ".join(f"{c} {r['heldout'][c]:.4f}" for c in COLUMNS), flush=True)
    print(f"\nheld-out relative error rms(out - ref) / rms(ref) of decode attention, queries >= R - 1 "
          f"({args.bits} bits, G={args.group_size}, R={args.residual or args.group_size}, D={args.feature_dim}; "
          f"fit: {args.steps} steps, lr {args.lr}, batch {args.batch_size}, weight decay {args.weight_decay})")
    print(table(rows))
    if args.record:
        settings = {k: v for k, v in vars(args).items() if k != "record"}
        settings["residual"] = args.residual or args.group_size
        out = {"bench": "kvlinc_feature_ablation", "metric": "held-out rms(out - ref) / rms(ref), queries >= R - 1",
               "settings": settings, "meta": metadata(torch.device("cpu")), "layers": rows}
        RESULTS_FILE.parent.mkdir(parents=True, exist_ok=True)
        RESULTS_FILE.write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {RESULTS_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
