"""ASM accuracy and energy experiment (issue 7, spec ``asm.md`` section 7).

A small ResNet-style CNN (``lrkern.asm.ResNetCNN``, one basic block per stage) is trained in full precision on
Fashion-MNIST (60k/10k, Debian package ``dataset-fashion-mnist``; ``--dataset mnist``: the MNIST test set split 8k/2k),
then fine-tuned with alphabet-aware QAT (``lrkern.asm.train``: 1/10 of the FP learning rate, cosine, BN float,
activation EMA scales frozen after the first QAT epoch, or at the end of a shorter QAT, then the BN running statistics
re-estimated on 100 training batches: ``lrkern.asm.train`` explains why), W4A4 (``--w-bits 8 --a-bits
8`` for the W8A8 rows), first and last layers unconstrained. Arms: fp32 (the FP
checkpoint), uniform 4-bit (the full odd set, which is exactly uniform symmetric quantization in the same code path),
{1,3,5,7}, {1,3}, {1}, ``ao-uniform`` (weights fake-quantized by torch.ao's
``torch.fake_quantize_per_channel_affine`` with quant_min = -15, quant_max = 15, zero point 0, the same max scale: the
spec's cross-check of the uniform arm); optional ``13-progressive`` ({1,3} reached progressively: the QAT epochs
split in three equal stages on the full odd set, {1,3,5,7} and {1,3}, spec 3.5). Every arm of a seed starts from that
seed's FP checkpoint (cached in ``$LRKERN_CACHE_DIR``).

Per arm and seed: test accuracy in "train" mode (fake quantization) and in "exact" mode (integer GEMM), the largest
logit difference between the two, whether "emulate" (the shift-add datapath) gives logits bitwise equal to "exact" on
a test batch, and the energy per inference from ``lrkern.asm.energy`` (compute only and with the memory term; the ASM
rows with the select/shift brackets 0 and E_add(n)). The uniform row's energy is the conventional W4A4 MAC design; the
fp32 row's is fp32 MACs (Horowitz 45 nm). Rows ``dataset, method, alphabet, bits, accuracy,
energy_pj_per_inference`` (+ details) are merged into ``bench/results/asm.json`` under the key "accuracy" (other keys,
such as "speed", are kept) and rendered into its section of ``bench/results/asm.md``.

    .venv/bin/python bench/asm_experiment.py    # default: 3 seeds, FP 2 + QAT 1 epochs, 6 arms
    .venv/bin/python bench/asm_experiment.py --w-bits 8 --a-bits 8 --arms ao-uniform uniform 1357 13 1  # W8A8 rows
    .venv/bin/python bench/asm_experiment.py --dataset mnist   # MNIST test set split 8k / 2k
    .venv/bin/python bench/asm_experiment.py --epochs 1 --seeds 1 --n-train 2000 --n-test 500 --no-record  # smoke
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS, device_name, git_commit, merge_rows, write_md_section  # noqa: E402
from lrkern.asm import asm_layers, energy  # noqa: E402
from lrkern.asm.energy import fp32_energy  # noqa: E402
from lrkern.asm.train import Recipe, evaluate, fp_checkpoint, load_data, logits, qat  # noqa: E402

JSON = RESULTS / "asm.json"
MD = RESULTS / "asm.md"
KEY = ("dataset", "method", "alphabet", "bits", "act_scale")
MD_BEGIN, MD_END = "<!-- asm_experiment:begin -->", "<!-- asm_experiment:end -->"

# arm -> (method, alphabet name)
ARMS = {"fp32": ("fp32", None), "uniform": ("uniform", "odd"), "1357": ("asm", "1357"), "13": ("asm", "13"),
        "1": ("asm", "1"), "ao-uniform": ("ao-uniform", "odd"), "13-progressive": ("asm-progressive", "13")}
# The progressive arm (spec 3.5): the QAT budget split in three equal stages, full odd set -> {1,3,5,7} -> {1,3}.
PROGRESSIVE = ("odd", "1357")
DEFAULT_ARMS = ["fp32", "ao-uniform", "uniform", "1357", "13", "1"]
ALPHABET_LABEL = {None: "-", "odd": "{1,3,...,15}", "1357": "{1,3,5,7}", "13": "{1,3}", "1": "{1}"}
# Default epochs FP 2 + QAT 1 (the recorded runs). Measured on 2 otherwise idle EPYC threads (torch 2.13 CPU, batch 128,
# 469 steps per epoch): FP 78 ms/step (2 epochs ~120 s, once per seed, then cached), QAT 96-115 ms/step (~50-80 s per
# arm), evaluation 10-17 s per arm (10k + 2k train-mode, 2k exact), BN re-estimation and emulation check ~1 s. So a
# seed costs about 2 + 5 x 1.5 min, and the default run (3 seeds, 5 QAT arms) about 30 min; each run prints its own
# projection at the end. Concurrent jobs on the same cores slow it 2-5x.
DEFAULT_FP_EPOCHS = 2
DEFAULT_QAT_EPOCHS = 1
DEFAULT_EXACT_N = 2000


def ao_weight_quant(model: torch.nn.Module) -> None:
    """Swap every ASM layer's weight fake quantization for torch.ao's per-channel affine one (symmetric, zero point 0,
    [-15, 15], the layer's max scale): the uniform baseline as torch.ao would train it. The integer modes still use
    asm_project (identical except at exact ties, which float weights do not hit)."""
    for _, layer in asm_layers(model):
        if layer.alphabet != list(range(1, 16, 2)) or layer.w_bits != 4:
            raise ValueError("ao-uniform needs the full odd alphabet at w_bits=4")

        def weight_hat(layer=layer):
            s = layer.weight_scale().detach()
            zp = torch.zeros(s.shape, dtype=torch.int32, device=s.device)
            return torch.fake_quantize_per_channel_affine(layer.weight, s, zp, 0, -15, 15)
        layer.weight_hat = weight_hat


def arm_energy(method: str, model: torch.nn.Module, shape) -> dict:
    """Energy per inference (pJ) of one trained model, for the results row."""
    if method == "fp32":
        e = fp32_energy(model, shape, memory=True)
        return {"energy_pj_per_inference": e["compute_pj"], "energy_with_memory_pj": e["with_memory_pj"]}
    r = energy(model, shape, memory=True)
    conv = {"conventional_pj": r["conventional_pj"], "conventional_with_memory_pj": r["conventional_with_memory_pj"]}
    if method in ("uniform", "ao-uniform"):  # a conventional W4A4 MAC design; the odd-set ASM cost for reference
        return {"energy_pj_per_inference": r["conventional_pj"],
                "energy_with_memory_pj": r["conventional_with_memory_pj"], "asm_odd_pj": r["asm_pj"],
                "asm_odd_ratio": r["ratio"], **conv}
    b = r["brackets"]
    return {"energy_pj_per_inference": r["asm_pj"], "energy_with_memory_pj": r["asm_with_memory_pj"],
            "energy_pj_select_shift_0": b["zero"]["asm_pj"], "energy_pj_select_shift_add": b["add"]["asm_pj"],
            "ratio": r["ratio"], "ratio_select_shift_0": b["zero"]["ratio"],
            "ratio_select_shift_add": b["add"]["ratio"],
            "ratio_with_memory": r["ratio_with_memory"],
            "ratio_with_memory_select_shift_0": b["zero"]["ratio_with_memory"],
            "ratio_with_memory_select_shift_add": b["add"]["ratio_with_memory"], **conv}


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def _std(xs):
    xs = [x for x in xs if x is not None]
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def aggregate(dataset: str, arm: str, runs: list[dict], args, recipe: Recipe, env: dict) -> dict:
    method, alphabet = ARMS[arm]
    row = {"dataset": dataset, "method": method, "alphabet": ALPHABET_LABEL[alphabet],
           "bits": "fp32" if method == "fp32" else f"W{args.w_bits}A{args.a_bits}",
           "accuracy": _mean([r["accuracy"] for r in runs]),
           "energy_pj_per_inference": _mean([r["energy_pj_per_inference"] for r in runs]),
           "accuracy_std": _std([r["accuracy"] for r in runs]), "seeds": [r["seed"] for r in runs],
           "accuracy_per_seed": [r["accuracy"] for r in runs]}
    for k in runs[0]:
        if k in row or k in ("seed", "accuracy"):
            continue
        vals = [r[k] for r in runs]
        if all(isinstance(v, bool) for v in vals):
            row[k] = all(vals)
        elif all(isinstance(v, (int, float)) for v in vals):
            row[k] = max(vals) if k.startswith("max_") else _mean(vals)
    row.update(n_train=args.n_train_actual, n_test=args.n_test_actual, fp_epochs=recipe.fp_epochs,
               qat_epochs=0 if method == "fp32" else recipe.qat_epochs, scale=args.scale,
               act_scale="-" if method == "fp32" else args.act_scale,
               blocks_per_stage=recipe.blocks_per_stage, act_freeze_epochs=recipe.act_freeze_epochs,
               bn_batches_recipe=recipe.bn_batches, **env)
    return row


def load_results() -> dict:
    if JSON.is_file():
        return json.loads(JSON.read_text())
    return {}


def record(rows: list[dict]) -> None:
    data = load_results()
    data["accuracy"] = merge_rows(data.get("accuracy", []), rows, KEY)
    RESULTS.mkdir(parents=True, exist_ok=True)
    JSON.write_text(json.dumps(data, indent=1) + "\n")
    write_md_section(MD, MD_BEGIN, MD_END, markdown(data["accuracy"]), "# ASM results")


def _f(v, fmt="{:.2f}"):
    return "" if v is None else fmt.format(v)


def markdown(rows: list[dict]) -> str:
    order = {"fp32": 0, "ao-uniform": 1, "uniform": 2, "asm": 3}
    out = [MD_BEGIN, "## Accuracy and energy per inference (`bench/asm_experiment.py`)", "",
           "Small ResNet-style CNN (16/32/64, one block per stage), FP training then alphabet-aware QAT (W4A4 unless "
           "stated; first and last layer unconstrained, counted as 8x8-bit conventional layers in both designs). "
           "Accuracy: mean over seeds of the test accuracy in train mode (fake quantization), after the BN "
           "re-estimation of `lrkern.asm.train.reestimate_bn` (next column: the same models with the BN "
           "statistics training left, the ablation); exact: the same model "
           "on the integer GEMM path (the first test images); emulate == exact: the shift-add emulation's logits are "
           "bitwise equal to the exact path's on a test batch, every seed. Energy (pJ per inference, "
           "`lrkern.asm.energy`, Horowitz 45 nm, width-scaled; "
           "**compute-only ratios are not comparable to the paper's ~50% system-level figure**): fp32 = fp32 MACs; "
           "uniform = conventional W4A4 MACs; ASM = the shift-add datapath with placeholder select/shift costs, "
           "brackets [select = shift = 0, = E_add(n)]. Memory: weights (ASM codes) and input activations read once "
           "from an 8 KB SRAM (10 pJ / 64 bit).", "",
           "| dataset | method | alphabet | bits | act. scale | accuracy % (± std, seeds) | "
           "without BN re-estimation % | exact-mode acc. % (train mode on the same images) | emulate == exact | "
           "compute pJ [brackets] | vs conventional [brackets] | with memory pJ | vs conventional | epochs FP+QAT | "
           "train / test |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["dataset"], r["method"] != "fp32", r["bits"], r.get("act_scale", ""),
                                         order.get(r["method"], 9), -len(r["alphabet"]))):
        acc = f"{r['accuracy']:.2f} ± {r.get('accuracy_std', 0):.2f} ({len(r.get('seeds', []))})"
        e = _f(r["energy_pj_per_inference"], "{:,.0f}")
        if "energy_pj_select_shift_0" in r:
            e += f" [{r['energy_pj_select_shift_0']:,.0f}, {r['energy_pj_select_shift_add']:,.0f}]"
        ratio = ""
        if "ratio" in r:
            ratio = f"{r['ratio']:.3f} [{r['ratio_select_shift_0']:.3f}, {r['ratio_select_shift_add']:.3f}]"
        ratio_mem = _f(r.get("ratio_with_memory"), "{:.3f}")
        emul = {True: "yes", False: "**no**"}.get(r.get("emulate_bitwise_equal"), "")
        exact = ""
        if r.get("accuracy_exact") is not None:
            exact = (f"{r['accuracy_exact']:.2f} ({r['accuracy_train_on_exact_subset']:.2f}, "
                     f"{int(r['n_exact']) if r.get('n_exact') else ''} img)")
        out.append(f"| {r['dataset']} | {r['method']} | {r['alphabet']} | {r['bits']} | {r.get('act_scale', '')} | "
                   f"{acc} | "
                   f"{_f(r.get('accuracy_training_bn_stats'))} | "
                   f"{exact} | {emul} | {e} | {ratio} | "
                   f"{_f(r.get('energy_with_memory_pj'), '{:,.0f}')} | {ratio_mem} | "
                   f"{r.get('fp_epochs', '')}+{r.get('qat_epochs', '')} | {r.get('n_train', '')} / "
                   f"{r.get('n_test', '')} |")
    devices = sorted({r.get("device", "") for r in rows})
    out += ["", f"Device: {', '.join(devices)}; commit {', '.join(sorted({r.get('commit', '') for r in rows}))}.",
            MD_END]
    return "\n".join(out)


def train_arm(arm: str, fp_model, seed: int, train, args, recipe: Recipe):
    """QAT of one (non-fp32) arm from the seed's FP model: ``(model, info)`` of ``lrkern.asm.train.qat``."""
    method, alphabet = ARMS[arm]
    progressive = ()
    if method == "asm-progressive":
        third = recipe.qat_epochs / (len(PROGRESSIVE) + 1)
        progressive, recipe = [(a, third) for a in PROGRESSIVE], dataclasses.replace(recipe, qat_epochs=third)
    return qat(fp_model, alphabet, train, seed, recipe, args.w_bits, args.a_bits, scale=args.scale,
               act_scale=args.act_scale, prepare=ao_weight_quant if method == "ao-uniform" else None,
               progressive=progressive)


def run_arm(arm: str, fp_model, fp_info: dict, seed: int, train, test, args, recipe: Recipe) -> dict:
    method, alphabet = ARMS[arm]
    shape = (1,) + tuple(test[0].shape[1:])
    t0 = time.perf_counter()
    if method == "fp32":
        out = {"seed": seed, "accuracy": fp_info["test_accuracy"], "train_seconds": fp_info.get("train_seconds")}
        out.update(arm_energy(method, fp_model, shape))
        return out
    model, info = train_arm(arm, fp_model, seed, train, args, recipe)
    t_train = time.perf_counter()
    acc = evaluate(model, *test, mode="train")
    acc_training_bn = None
    if info["bn_stats_before_reestimate"]:
        # The ablation of the BN re-estimation: the same model with the running statistics training left.
        after = {k: v.clone() for k, v in model.state_dict().items() if k in info["bn_stats_before_reestimate"]}
        model.load_state_dict(info["bn_stats_before_reestimate"], strict=False)
        acc_training_bn = evaluate(model, *test, mode="train")
        model.load_state_dict(after, strict=False)
    n_exact = test[0].shape[0] if not args.exact_n else min(args.exact_n, test[0].shape[0])
    acc_train_sub = acc if n_exact == test[0].shape[0] else evaluate(model, test[0][:n_exact], test[1][:n_exact],
                                                                     mode="train")
    acc_exact = evaluate(model, test[0][:n_exact], test[1][:n_exact], mode="exact")
    t_eval = time.perf_counter()
    xb = test[0][:args.logit_n]
    lt, le = logits(model, xb, "train"), logits(model, xb, "exact")
    xe = test[0][:args.emulate_n]
    lem = logits(model, xe, "emulate")
    t_emul = time.perf_counter()
    out = {"seed": seed, "accuracy": acc, "accuracy_exact": acc_exact, "accuracy_train_on_exact_subset": acc_train_sub,
           "accuracy_training_bn_stats": acc_training_bn, "bn_batches": info["bn_batches"],
           "n_exact": n_exact, "n_emulate": int(xe.shape[0]),
           "max_exact_minus_train_accuracy": abs(acc_exact - acc_train_sub),
           "max_logit_diff_train_exact": float((lt - le).abs().max()),
           "emulate_bitwise_equal": bool(torch.equal(lem, le[:xe.shape[0]])),
           "train_seconds": info["train_seconds"], "qat_median_step_ms": info["median_step_ms"],
           "eval_seconds": t_eval - t_train, "emulate_seconds": t_emul - t_eval}
    out.update(arm_energy(method, model, shape))
    bn_note = "" if acc_training_bn is None else f" [training BN statistics: {acc_training_bn:.2f}%]"
    print(f"  {arm:>10} seed {seed}: acc {acc:.2f}%{bn_note} (exact {acc_exact:.2f}% on {n_exact}), "
          "max |logit train - exact| "
          f"{out['max_logit_diff_train_exact']:.2e}, emulate == exact: {out['emulate_bitwise_equal']}, "
          f"{out['energy_pj_per_inference']:,.0f} pJ/inference; train {info['train_seconds']:.0f} s, eval "
          f"{t_eval - t_train:.0f} s, emulate {t_emul - t_eval:.0f} s, total {time.perf_counter() - t0:.0f} s",
          flush=True)
    return out


def projection(args, runs: dict, fp_step_ms: list[float]) -> str | None:
    """Wall time of the default run (3 seeds, full data set, default epochs and arms), projected from this run's
    median step times and evaluation throughput (a rough estimate: step times on a shared CPU vary a lot)."""
    qat_runs = [r for arm in runs for r in runs[arm] if "qat_median_step_ms" in r]
    if not qat_runs or not fp_step_ms:
        return None
    n_train, n_test = (60000, 10000) if args.dataset == "fashion" else (8000, 2000)
    steps = -(-n_train // args.batch)
    fp_ms, qat_ms = statistics.median(fp_step_ms), statistics.median(r["qat_median_step_ms"] for r in qat_runs)
    n_exact_here = args.n_test_actual if not args.exact_n else min(args.exact_n, args.n_test_actual)
    img_s = statistics.median(r["eval_seconds"] / (args.n_test_actual + 2 * n_exact_here) for r in qat_runs)
    emu_s = statistics.median(r["emulate_seconds"] for r in qat_runs)
    n_quant = len([a for a in DEFAULT_ARMS if a != "fp32"])
    per_arm = (DEFAULT_QAT_EPOCHS * steps * qat_ms / 1e3 + img_s * (n_test + 2 * min(DEFAULT_EXACT_N, n_test))
               + emu_s)
    total = 3 * (DEFAULT_FP_EPOCHS * steps * fp_ms / 1e3 + n_quant * per_arm)
    return (f"projected default run ({args.dataset}, 3 seeds, FP {DEFAULT_FP_EPOCHS:g} + QAT {DEFAULT_QAT_EPOCHS:g} "
            f"epochs, {n_quant} QAT arms) at this run's speed (FP {fp_ms:.0f} ms/step, QAT {qat_ms:.0f} ms/step, "
            f"batch {args.batch}): about {total / 60:.0f} min")


def parser(description: str = __doc__) -> argparse.ArgumentParser:
    """The experiment's options (shared with bench/asm_emulate_check.py)."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="fashion", choices=["fashion", "mnist"])
    ap.add_argument("--arms", nargs="+", default=DEFAULT_ARMS, choices=list(ARMS))
    ap.add_argument("--seeds", type=int, default=3, help="number of seeds (0 .. seeds-1)")
    ap.add_argument("--seed-list", type=int, nargs="+", default=None, help="explicit seeds (overrides --seeds)")
    ap.add_argument("--epochs", type=float, default=None, help="sets both --fp-epochs and --qat-epochs")
    ap.add_argument("--fp-epochs", type=float, default=DEFAULT_FP_EPOCHS, help="may be fractional")
    ap.add_argument("--qat-epochs", type=float, default=DEFAULT_QAT_EPOCHS, help="may be fractional")
    ap.add_argument("--lr", type=float, default=Recipe.lr)
    ap.add_argument("--batch", type=int, default=Recipe.batch)
    ap.add_argument("--blocks-per-stage", type=int, default=1)
    ap.add_argument("--w-bits", type=int, default=4, choices=[4, 8])
    ap.add_argument("--a-bits", type=int, default=4, choices=[4, 8])
    ap.add_argument("--scale", default="max", choices=["max", "lsq"])
    ap.add_argument("--act-scale", default="ema", choices=["ema", "lsq"])
    ap.add_argument("--act-freeze-epochs", type=float, default=Recipe.act_freeze_epochs,
                    help="QAT epochs before the activation EMA scales freeze (0: right after the calibration)")
    ap.add_argument("--bn-batches", type=int, default=Recipe.bn_batches,
                    help="training batches for the BN re-estimation after QAT (0: keep the training-time statistics)")
    ap.add_argument("--n-train", type=int, default=None, help="use only the first N training images")
    ap.add_argument("--n-test", type=int, default=None, help="use only the first N test images")
    ap.add_argument("--exact-n", type=int, default=DEFAULT_EXACT_N,
                    help="test images for the exact-mode accuracy (the train-mode accuracy is also taken on them); "
                         "0: the whole test set")
    ap.add_argument("--logit-n", type=int, default=256, help="test images for the train-vs-exact logit difference")
    ap.add_argument("--emulate-n", type=int, default=32, help="test images for the emulate == exact bitwise check")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--no-record", action="store_true")
    return ap


def recipe_from(args) -> Recipe:
    if args.epochs is not None:
        args.fp_epochs = args.qat_epochs = args.epochs
    return Recipe(fp_epochs=args.fp_epochs, qat_epochs=args.qat_epochs, batch=args.batch, lr=args.lr,
                  blocks_per_stage=args.blocks_per_stage, bn_batches=args.bn_batches,
                  act_freeze_epochs=args.act_freeze_epochs)


def main(argv=None) -> list[dict]:
    ap = parser()
    args = ap.parse_args(argv)
    recipe = recipe_from(args)
    seeds = args.seed_list if args.seed_list is not None else list(range(args.seeds))
    t_start = time.perf_counter()
    train, test, _ = load_data(args.dataset, args.n_train, args.n_test)
    args.n_train_actual, args.n_test_actual = int(train[0].shape[0]), int(test[0].shape[0])
    env = {"device": device_name(torch.device("cpu")), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "commit": git_commit()}
    print(f"ASM experiment: {args.dataset} {args.n_train_actual}/{args.n_test_actual}, arms {args.arms}, seeds "
          f"{seeds}, FP {recipe.fp_epochs:g} + QAT {recipe.qat_epochs:g} epochs, W{args.w_bits}A{args.a_bits}, "
          f"{env['device']}", flush=True)
    runs: dict[str, list[dict]] = {arm: [] for arm in args.arms}
    fp_seconds = 0.0
    fp_step_ms: list[float] = []
    for seed in seeds:
        t0 = time.perf_counter()
        fp_model, fp_info = fp_checkpoint(train, test, seed, recipe, args.dataset, args.cache_dir)
        fp_seconds += time.perf_counter() - t0
        if not fp_info["cached"]:
            fp_step_ms.append(fp_info["median_step_ms"])
        how = "cached" if fp_info["cached"] else "trained in {:.0f} s".format(fp_info["train_seconds"])
        print(f" seed {seed}: FP accuracy {fp_info['test_accuracy']:.2f}% ({how})", flush=True)
        for arm in args.arms:
            runs[arm].append(run_arm(arm, fp_model, fp_info, seed, train, test, args, recipe))
    rows = [aggregate(args.dataset, arm, runs[arm], args, recipe, env) for arm in args.arms]
    total = time.perf_counter() - t_start
    for r in rows:
        print(f"{r['method']:>10} {r['alphabet']:>14} {r['bits']}: accuracy {r['accuracy']:.2f} ± "
              f"{r['accuracy_std']:.2f}%, exact {_f(r.get('accuracy_exact'))}%, "
              f"{r['energy_pj_per_inference']:,.0f} pJ/inference (with memory "
              f"{r['energy_with_memory_pj']:,.0f})", flush=True)
    print(f"total wall time {total:.0f} s (FP checkpoints {fp_seconds:.0f} s)", flush=True)
    est = projection(args, runs, fp_step_ms)
    if est is not None:
        print(est, flush=True)
    if not args.no_record:
        for r in rows:
            r["wall_seconds_total_run"] = total
        record(rows)
        print(f"recorded in {JSON} and {MD}", flush=True)
    return rows


if __name__ == "__main__":
    main()
