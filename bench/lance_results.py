"""``bench/results/lance.json`` and ``lance.md``: the LANCE experiment rows, merged by key so the fine-tuning and
continual-learning scripts (and reruns of one configuration) update their own rows only."""
from __future__ import annotations

import json

import torch

from bench.common import RESULTS, git_commit, merge_rows

JSON = RESULTS / "lance.json"
MD = RESULTS / "lance.md"

FINETUNE_KEY = ("model", "method", "eps", "modes", "layers", "device")
CONTINUAL_KEY = ("method", "eps", "eps_modes", "device")


def environment() -> dict:
    return dict(torch=torch.__version__, threads=torch.get_num_threads(), commit=git_commit())


def _load() -> dict:
    if JSON.is_file():
        return json.loads(JSON.read_text())
    return {"finetune": [], "continual": []}


def record(finetune: list[dict] = (), continual: list[dict] = ()) -> None:
    data = _load()
    data["finetune"] = merge_rows(data.get("finetune", []), list(finetune), FINETUNE_KEY)
    data["continual"] = merge_rows(data.get("continual", []), list(continual), CONTINUAL_KEY)
    RESULTS.mkdir(parents=True, exist_ok=True)
    JSON.write_text(json.dumps(data, indent=1) + "\n")
    MD.write_text(markdown(data))


def _kb(b) -> str:
    return f"{b / 1024:.1f}"


def markdown(data: dict) -> str:
    out = ["# LANCE results", "", "Written by `bench/lance_finetune.py` and `bench/lance_continual.py`; rows are "
           "merged by configuration. Activation bytes: what autograd saves inside the compressed layers for one "
           "training step (`lrkern.lance.SavedBytesMeter`); reduction is against the BP row of the same model and "
           "layers.", ""]
    ft = data.get("finetune", [])
    if ft:
        out += ["## Fine-tuning (pretrained on Fashion-MNIST, fine-tuned on MNIST 8k, evaluated on the held-out 2k)",
                "", "| model | layers | method | eps | modes | accuracy % | act. KiB | reduction | step ms | vs BP "
                "step | cos(dW~, dW) | device |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        bp = {(r["model"], r["layers"], r["device"]): r for r in ft if r["method"] == "bp"}
        for r in sorted(ft, key=lambda r: (r["model"], r["layers"], ["bp", "hosvd", "lance"].index(r["method"]),
                                           r["eps"] or 0, r["modes"] or "")):
            base = bp.get((r["model"], r["layers"], r["device"]))
            red = f"{base['activation_bytes'] / r['activation_bytes']:.0f}x" if base else ""
            step = f"{r['step_ms'] / base['step_ms']:.2f}x" if base else ""
            cos = ", ".join(f"{c:.2f}" for c in r.get("cos", {}).values()) if r.get("cos") else ""
            out.append(f"| {r['model']} | {r['layers']} | {r['method']} | {r['eps'] or ''} | {r['modes'] or ''} | "
                       f"{r['accuracy']:.2f} | {_kb(r['activation_bytes'])} | {red} | {r['step_ms']:.1f} | {step} | "
                       f"{cos} | {r['device']} |")
        out.append("")
    cl = data.get("continual", [])
    if cl:
        out += ["## Continual learning (Split Fashion-MNIST, 5 tasks of 2 classes, task-incremental)", "",
                "| method | eps (U_F / positions) | avg accuracy % | BWT (points) | stored KiB | basis KiB | "
                "activation KiB | factor KiB | device |", "|---|---|---|---|---|---|---|---|---|"]
        for r in cl:
            eps = f"{r['eps']} / {r['eps_modes']}" if r.get("eps") else ""
            out.append(f"| {r['method']} | {eps} | {r['avg_accuracy']:.2f} | {r['bwt']:+.2f} | "
                       f"{_kb(r['stored_bytes'])} | {_kb(r['basis_bytes'])} | {_kb(r['activation_bytes'])} | "
                       f"{_kb(r.get('factor_bytes', 0))} | {r['device']} |")
        out.append("")
    return "\n".join(out)
