"""The Triton kernels (kv_attention at every benchmark class, the foundation, low-rank and LIF kernels at their largest
tiles, the STM forward and backward) compile for sm_90 (H100) without a GPU, and do not spill registers.

The interpreter that runs the other tests never compiles a kernel; ``scripts/sm90_check.py`` does (with the ptxas
and cuobjdump that Triton ships), in a subprocess because this suite runs with TRITON_INTERPRET=1.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parent.parent
_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def test_triton_kernels_compile_for_sm90_without_spills():
    if not (_BIN / "ptxas").exists() or not (_BIN / "cuobjdump").exists():
        pytest.skip(f"Triton's NVIDIA toolchain (ptxas, cuobjdump) is not in {_BIN}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "sm90_check.py")], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    # 8 kv_attention classes x 2 kernels + 6 foundation kernels + 2 x (lance projection, mode Gram) + LIF fwd, bwd
    # + STM fwd, bwd in fp16 and fp32 + ASM GEMM fast (W4A4, W8A8) and emulate (1 and 2 quartets) + ASM project,
    # fake-quant and its backward at 8 and 4 bits + decompose
    assert len(rows) == 43, run.stdout
    asm = [r["class"] for r in rows if r["class"].startswith("asm-")]
    assert len(asm) == 11 and "asm-fake-quant-w8-fp16" in asm, asm
    stm = sorted(r["class"] for r in rows if r["kernel"] in ("_stm_fwd_kernel", "_stm_bwd_kernel"))
    assert stm == ["stm-bwd-fp16", "stm-bwd-fp32", "stm-fwd-fp16", "stm-fwd-fp32"], stm
    failed = [r for r in rows if "error" in r or r["spill_stack_bytes"]]
    assert not failed, "\n".join(json.dumps(r) for r in failed)
