"""Whole-test-set check of the ASM datapath emulation (spec ``asm.md`` section 7, acceptance 1): for each arm, the
trained network's logits in "emulate" mode (``asm_gemm_emulate``, the shift-add datapath) are bitwise equal to its
logits in "exact" mode (``asm_gemm``, the integer fast path) on every test image.

The models are retrained with ``bench/asm_experiment.py``'s recipe and options (the same seed, data and arguments
give the same model: QAT on the CPU is deterministic at a fixed thread count), so the check covers the very networks
whose accuracy that experiment reports. The experiment itself compares only ``--emulate-n`` images per arm and seed,
because the emulation is a compute-bound oracle (tens of times slower than the fast path).

Rows ``dataset, method, alphabet, bits, seed, n_images, bitwise_equal, mismatched_images, exact_accuracy`` (+ times)
are merged into ``bench/results/asm.json`` under the key "emulate_check" and rendered into its section of
``bench/results/asm.md``.

    .venv/bin/python bench/asm_emulate_check.py                      # seed 0, W4A4, uniform / {1,3,5,7} / {1,3} / {1}
    .venv/bin/python bench/asm_emulate_check.py --epochs 0.05 --n-train 2000 --n-test 200 --no-record   # smoke
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench import asm_experiment as X  # noqa: E402
from bench.common import device_name, git_commit, merge_rows, write_md_section  # noqa: E402
from lrkern.asm.train import fp_checkpoint, load_data, logits  # noqa: E402

KEY = ("dataset", "method", "alphabet", "bits", "act_scale", "seed")
MD_BEGIN, MD_END = "<!-- asm_emulate_check:begin -->", "<!-- asm_emulate_check:end -->"


def check(model, images: torch.Tensor, labels: torch.Tensor, batch: int) -> dict:
    """Compare emulate and exact logits batch by batch over all of ``images``."""
    mismatched, correct, t_exact, t_emul = 0, 0, 0.0, 0.0
    for lo in range(0, images.shape[0], batch):
        x = images[lo:lo + batch]
        t0 = time.perf_counter()
        le = logits(model, x, "exact")
        t1 = time.perf_counter()
        lm = logits(model, x, "emulate")
        t2 = time.perf_counter()
        t_exact, t_emul = t_exact + t1 - t0, t_emul + t2 - t1
        mismatched += int((le != lm).any(dim=1).sum())
        correct += int((le.argmax(1) == labels[lo:lo + batch]).sum())
    n = int(images.shape[0])
    return {"n_images": n, "bitwise_equal": mismatched == 0, "mismatched_images": mismatched,
            "exact_accuracy": 100.0 * correct / n, "exact_seconds": t_exact, "emulate_seconds": t_emul}


def markdown(rows: list[dict]) -> str:
    out = [MD_BEGIN, "## Emulate == exact on the whole test set (`bench/asm_emulate_check.py`)", "",
           "The networks of the accuracy table (same recipe and seed, retrained), run once through the shift-add "
           "emulation and once through the integer fast path: images whose 10 logits are not all bitwise equal.", "",
           "| dataset | method | alphabet | bits | act. scale | seed | images | bitwise equal | mismatched images | "
           "exact-mode acc. % | emulate s | exact s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['dataset']} | {r['method']} | {r['alphabet']} | {r['bits']} | {r.get('act_scale', '')} | "
                   f"{r['seed']} | "
                   f"{r['n_images']} | {'yes' if r['bitwise_equal'] else '**no**'} | {r['mismatched_images']} | "
                   f"{r['exact_accuracy']:.2f} | {r['emulate_seconds']:.0f} | {r['exact_seconds']:.0f} |")
    devices = sorted({r.get("device", "") for r in rows})
    out += ["", f"Device: {', '.join(devices)}; commit {', '.join(sorted({r.get('commit', '') for r in rows}))}.",
            MD_END]
    return "\n".join(out)


def record(rows: list[dict]) -> None:
    data = X.load_results()
    data["emulate_check"] = merge_rows(data.get("emulate_check", []), rows, KEY)
    X.JSON.write_text(json.dumps(data, indent=1) + "\n")
    write_md_section(X.MD, MD_BEGIN, MD_END, markdown(data["emulate_check"]), "# ASM results")


def main(argv=None) -> list[dict]:
    ap = X.parser(__doc__)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check-batch", type=int, default=500, help="test images per emulate / exact call")
    ap.set_defaults(arms=["uniform", "1357", "13", "1"])
    args = ap.parse_args(argv)
    recipe = X.recipe_from(args)
    if "fp32" in args.arms:
        ap.error("--arms: fp32 has no integer path to check")
    train, test, _ = load_data(args.dataset, args.n_train, args.n_test)
    env = {"device": device_name(torch.device("cpu")), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "commit": git_commit()}
    fp_model, _ = fp_checkpoint(train, test, args.seed, recipe, args.dataset, args.cache_dir)
    rows = []
    for arm in args.arms:
        method, alphabet = X.ARMS[arm]
        model, _ = X.train_arm(arm, fp_model, args.seed, train, args, recipe)
        res = check(model, *test, args.check_batch)
        row = {"dataset": args.dataset, "method": method, "alphabet": X.ALPHABET_LABEL[alphabet],
               "bits": f"W{args.w_bits}A{args.a_bits}", "act_scale": args.act_scale, "seed": args.seed, **res,
               "fp_epochs": recipe.fp_epochs, "qat_epochs": recipe.qat_epochs, **env}
        rows.append(row)
        print(f"  {arm:>14}: {res['n_images']} images, bitwise equal: {res['bitwise_equal']} "
              f"({res['mismatched_images']} mismatched), exact accuracy {res['exact_accuracy']:.2f}%, emulate "
              f"{res['emulate_seconds']:.0f} s, exact {res['exact_seconds']:.0f} s", flush=True)
    if not args.no_record:
        record(rows)
        print(f"recorded in {X.JSON} and {X.MD}", flush=True)
    return rows


if __name__ == "__main__":
    main()
