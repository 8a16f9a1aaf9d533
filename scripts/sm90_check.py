"""Compile lrkern's Triton kernels for sm_90 (H100) on any machine and report their resources.

    python scripts/sm90_check.py            # one JSON line per (problem class, kernel): registers, spill stack, smem

The interpreter that CI runs never compiles a kernel, so errors only a real compile sees (a global that is not a
constexpr, an op a layout does not support, a tile that spills to local memory) would otherwise first show up on a
GPU machine. Triton ships ptxas and cuobjdump, so no GPU or CUDA toolkit is needed. Must run without
TRITON_INTERPRET=1 (under it @triton.jit functions are not compilable); tests/test_sm90_compile.py runs it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lrkern.kernels import asm_gemm as AGK  # noqa: E402
from lrkern.kernels import asm_quant as AQK  # noqa: E402
from lrkern.kernels import hadamard as HK  # noqa: E402
from lrkern.kernels import lif as LIFK  # noqa: E402
from lrkern.kernels import lowrank as LK  # noqa: E402
from lrkern.kernels import kv_attention as K  # noqa: E402
from lrkern.kernels import quant as QK  # noqa: E402
from lrkern.kernels import stm as STMK  # noqa: E402

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
TL = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}

# (Hq, Hkv, t, d, bits, G, key_per_channel, channel_group, rotate_keys, value_rotation, D, dtype): the benchmark
# shapes (Llama-3-8B, SmolLM2-135M) in every preset, a prefill chunk, and the awkward head dims.
CLASSES = [
    (32, 8, 1, 128, 2, 128, True, 128, False, True, 64, torch.float16),  # KVLinC-2, Llama-3-8B
    (32, 8, 1, 128, 2, 128, True, 128, False, False, None, torch.float16),  # KIVI-2
    (32, 8, 1, 128, 2, 128, False, 128, True, True, None, torch.bfloat16),  # QuaRot-style-2
    (9, 3, 1, 64, 2, 128, True, 64, False, True, 64, torch.float16),  # KVLinC-2, SmolLM2-135M
    (9, 3, 1, 64, 4, 128, True, 64, False, False, None, torch.float32),  # KIVI-4 on an fp32 cache
    (32, 8, 16, 128, 2, 128, True, 128, False, True, 64, torch.float16),  # prefill chunk: 64 query rows
    (8, 1, 1, 96, 2, 128, True, 32, False, True, None, torch.float16),  # d = 96, channel groups of 32
    (8, 2, 1, 256, 2, 128, True, 256, False, True, 64, torch.float16),  # d = 256
]


def class_id(c) -> str:
    return f"Hq{c[0]}-Hkv{c[1]}-t{c[2]}-d{c[3]}-b{c[4]}-{'ch' if c[6] else 'tok'}-D{c[10]}-{TL[c[11]]}"


def compile_sm90(fn, types: dict, meta: dict):
    meta = dict(meta)
    num_warps = meta.pop("num_warps")
    options = {"num_warps": num_warps}
    for option in ("num_stages", "enable_fp_fusion"):
        if option in meta:
            options[option] = meta.pop(option)
    signature = {name: types.get(name, "constexpr") for name in fn.arg_names}
    constexprs = {(fn.arg_names.index(k),): v for k, v in meta.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32), options=options)


def resources(compiled) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        text = subprocess.run([os.path.join(BIN, "cuobjdump"), "--dump-resource-usage", str(cubin)],
                              capture_output=True, text=True, check=True).stdout
    line = next(ln for ln in text.splitlines() if "REG:" in ln)
    used = {k: int(v) for k, v in (f.split(":") for f in line.split() if f.split(":")[0] in ("REG", "STACK"))}
    return {"registers": used["REG"], "spill_stack_bytes": used["STACK"], "shared_bytes": compiled.metadata.shared}


def check(cls) -> list[dict]:
    Hq, Hkv, t, d, bits, G, per_channel, cg, rot_k, rot_v, D, dtype = cls
    split_meta, combine_meta = K.launch_config(Hq, Hkv, t, d, bits, G, per_channel, cg, rot_v, D)
    f = "*" + TL[dtype]
    # With rotated keys the launcher hands the split kernel an fp32, rotated q.
    split_types = dict(q_ptr="*fp32" if rot_k else f, kc_ptr="*u8", ks_ptr=f, kz_ptr=f, vc_ptr="*u8", vs_ptr=f,
                       vz_ptr=f, kw_ptr=f, vw_ptr=f, nq_ptr="*i32", nw_ptr="*i32", m_ws="*fp32", l_ws="*fp32",
                       acc_ws="*fp32", Hkv="i32", Tq="i32", W="i32", MROWS="i32", TILES_PER_SPLIT="i32", NSPLIT="i32",
                       qk_scale="fp32")
    combine_types = dict(m_ws="*fp32", l_ws="*fp32", acc_ws="*fp32", phi_ptr="*fp32", cs_ptr="*fp32",
                         cz_ptr="*fp32", out_ptr=f, lse_ptr="*fp32", MROWS="i32", NSP="i32")
    rows = []
    for fn, types, meta in ((K._kv_split_kernel, split_types, split_meta),
                            (K._kv_combine_kernel, combine_types, combine_meta)):
        row = {"class": class_id(cls), "kernel": fn.__name__, "num_warps": meta["num_warps"]}
        try:
            row.update(resources(compile_sm90(fn, types, meta)))
        except Exception as exc:  # reported per kernel, so one failure does not hide the others
            row["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        rows.append(row)
    return rows


# The foundation kernels at the configurations their launchers pick for the benchmark shapes (fp16): Hadamard
# n = 128 (one pass), n = 8192 (one row per program) and the strided second pass of n = 32768; per-token and
# per-channel 2-bit quant_pack with groups of 128; dequant.
_F16 = "*fp16"
FOUNDATION = [
    ("hadamard-n128", HK._fwht_kernel, dict(x_ptr=_F16, y_ptr=_F16, R="i32", scale="fp32"),
     dict(L=128, LOG_L=7, S=1, BLOCK_P=64, num_warps=8)),
    ("hadamard-n8192", HK._fwht_kernel, dict(x_ptr=_F16, y_ptr=_F16, R="i32", scale="fp32"),
     dict(L=8192, LOG_L=13, S=1, BLOCK_P=1, num_warps=8)),
    ("hadamard-n32768-pass2", HK._fwht_kernel, dict(x_ptr="*fp32", y_ptr=_F16, R="i32", scale="fp32"),
     dict(L=4, LOG_L=2, S=8192, BLOCK_P=2048, num_warps=8)),
    ("quant-rows-b2-g128", QK._quant_rows_kernel, dict(x_ptr=_F16, codes_ptr="*u8", scale_ptr=_F16, zero_ptr=_F16,
                                                       G="i32"),
     dict(GS=128, BITS=2, BLOCK_G=64, CHUNK=128, NUM_CHUNKS=1, num_warps=8)),
    ("quant-cols-b2-g128", QK._quant_cols_kernel, dict(x_ptr=_F16, codes_ptr="*u8", scale_ptr=_F16, zero_ptr=_F16,
                                                       T="i32", N="i32"),
     dict(GS=128, BITS=2, BLOCK_N=64, CHUNK=128, NUM_CHUNKS=1, num_warps=8)),
    ("dequant-b2-tok", QK._dequant_kernel, dict(codes_ptr="*u8", scale_ptr=_F16, zero_ptr=_F16, out_ptr=_F16,
                                                R="i32", N="i32", T="i32"),
     dict(GS=128, PER_TOKEN=True, BITS=2, BLOCK_R=64, BLOCK_B=32, num_warps=8)),
] + [  # the low-rank kernels at their largest tiles (64-rank blocks), fp32 (IEEE dots) and bf16 (tensor cores)
    (f"lance-project-{TL[dt]}", LK._two_sided_project_kernel,
     dict(x_ptr="*" + TL[dt], a_ptr="*fp32", b_ptr="*fp32", ws_ptr="*fp32", M1="i32", M2="i32", R1="i32", R2="i32",
          sxs="i32", sx1="i32", sx2="i32", SPLIT="i32", TILES_PER_SPLIT="i32", NB2="i32", NRB="i32"),
     dict(BLOCK_M1=LK.BLOCK_M1, BLOCK_M2=LK.BLOCK_M2, BLOCK_R1=LK.MAX_BLOCK_R, BLOCK_R2=LK.MAX_BLOCK_R,
          LOW=dt != torch.float32, EMULATE=False, num_warps=LK.PROJECT_NUM_WARPS, num_stages=LK.PROJECT_NUM_STAGES))
    for dt in (torch.float32, torch.bfloat16)
] + [  # multi-step LIF at the default block, fp16, every store and the heavier sigmoid surrogate
    ("lif-fwd-fp16", LIFK._lif_fwd_kernel,
     dict(x_ptr=_F16, v0_ptr="*fp32", s_ptr=_F16, h_ptr=_F16, v_last_ptr="*fp32", v_seq_ptr="*fp32", T="i32",
          N="i32", tau="fp32", v_threshold="fp32", v_reset="fp32"),
     dict(SOFT_RESET=False, DECAY_INPUT=True, STORE_V_SEQ=True, BLOCK=LIFK.BLOCK, num_warps=LIFK._num_warps(LIFK.BLOCK),
          enable_fp_fusion=False)),
    ("lif-bwd-fp16", LIFK._lif_bwd_kernel,
     dict(grad_s_ptr=_F16, grad_v_last_ptr="*fp32", grad_v_seq_ptr="*fp32", h_ptr=_F16, s_ptr=_F16,
          grad_x_ptr=_F16, grad_v0_ptr="*fp32", T="i32", N="i32", tau="fp32", v_threshold="fp32", v_reset="fp32",
          decay="fp32", alpha="fp32", atan_scale="fp32", half_alpha="fp32"),
     dict(SOFT_RESET=False, DECAY_INPUT=True, DETACH_RESET=False, SURROGATE=0, HAS_V_SEQ=True, BLOCK=LIFK.BLOCK,
          num_warps=LIFK._num_warps(LIFK.BLOCK), enable_fp_fusion=False)),
] + [  # STM at its largest block, fp16 and fp32, the heaviest variant: dynamic threshold (beta), gain, and in the
    # backward the parameter gradients (u passed) with the sigmoid surrogate; the module's default hard reset
    (f"stm-{kind}-{TL[dt]}", fn, types, dict(meta, BLOCK=STMK.MAX_BLOCK, num_warps=STMK._num_warps(STMK.MAX_BLOCK),
                                             enable_fp_fusion=False))
    for dt in (torch.float16, torch.float32)
    for kind, fn, types, meta in (
        ("fwd", STMK._stm_fwd_kernel,
         dict(u_ptr="*" + TL[dt], v0_ptr="*fp32", gain_ptr="*fp32", tau_ptr="*fp32", theta0_ptr="*fp32",
              beta_ptr="*fp32", s_ptr="*" + TL[dt], h_ptr="*" + TL[dt], v_last_ptr="*fp32", T="i32", N="i32",
              S="i32", C="i32", rho="fp32", v_reset="fp32"),
         dict(SOFT_RESET=False, DECAY_INPUT=True, HAS_GAIN=True, HAS_BETA=True)),
        ("bwd", STMK._stm_bwd_kernel,
         dict(grad_s_ptr="*" + TL[dt], grad_v_last_ptr="*fp32", u_ptr="*" + TL[dt], v0_ptr="*fp32",
              h_ptr="*" + TL[dt], s_ptr="*" + TL[dt], gain_ptr="*fp32", tau_ptr="*fp32", theta0_ptr="*fp32",
              beta_ptr="*fp32", trace_ptr="*fp32", grad_u_ptr="*" + TL[dt], grad_v0_ptr="*fp32",
              partial_ptr="*fp32", T="i32", N="i32", S="i32", C="i32", n_blocks="i32", rho="fp32", v_reset="fp32",
              alpha="fp32", atan_scale="fp32", half_alpha="fp32"),
         dict(SOFT_RESET=False, DECAY_INPUT=True, DETACH_RESET=False, SURROGATE=STMK.SIGMOID, HAS_GAIN=True,
              HAS_BETA=True, PARAMS=True)),
    )
] + [
    (f"mode-gram-{TL[dt]}", LK._mode_gram_kernel,
     dict(x_ptr="*" + TL[dt], out_ptr="*fp32", N="i32", Q="i32", T="i32", sxp="i32", sxn="i32", sxq="i32",
          alpha="fp32", NUM_PAIRS="i32", TILES_PER_SPLIT="i32"),
     dict(BLOCK_N=LK.GRAM_BLOCK_N, BLOCK_T=LK.GRAM_BLOCK_T if dt != torch.float32 else LK.GRAM_BLOCK_T_FP32,
          LOW=dt != torch.float32, EMULATE=False,
          num_warps=LK.GRAM_NUM_WARPS, num_stages=LK.GRAM_NUM_STAGES))
    for dt in (torch.float32, torch.bfloat16)
] + [  # ASM GEMMs at the launcher's full tiles: the fast path W4A4 and W8A8 (two quartet planes, 8-bit activations)
    # and the shift-add emulation of {1,3,5,7} (the mux over 4 bank entries) with one and two quartets
    (f"asm-gemm-fast-w{8 if w8 else 4}a{8 if w8 else 4}", AGK._asm_fast_kernel, dict(
        x_ptr="*u8", w_ptr="*i16", out_ptr="*i32", M="i32", N="i32", K="i32", stride_xm="i32", stride_wn="i32",
        stride_om="i32"),
     dict(W8=w8, A8=w8, BLOCK_M=AGK.FAST_BLOCK_M, BLOCK_N=AGK.FAST_BLOCK_N, BLOCK_K=AGK.FAST_BLOCK_K,
          num_warps=AGK.FAST_NUM_WARPS, num_stages=AGK.FAST_NUM_STAGES))
    for w8 in (False, True)
] + [
    (f"asm-gemm-emulate-1357-q{q}", AGK._asm_emulate_kernel, dict(
        x_ptr="*u8", w_ptr="*i16", out_ptr="*i32", M="i32", N="i32", K="i32", stride_xm="i32", stride_wn="i32",
        stride_om="i32"),
     dict(ALPHA=AGK.alphabet_mask([1, 3, 5, 7]), Q=q, BLOCK_M=AGK.EMU_BLOCK_M, BLOCK_N=AGK.EMU_BLOCK_N,
          BLOCK_K=AGK.EMU_BLOCK_K, num_warps=AGK.EMU_NUM_WARPS))
    for q in (1, 2)
] + [  # the alphabet projection of a Linear weight [O, K] along axis 0 (the launcher's MODE 0, BLOCK_R 2048), fp16,
    # with the 8-bit {1,3,5,7} table (143 midpoints, a binary search) and the 4-bit one; the backward with its
    # per-channel partial sums; decompose
    (f"asm-{name}-w{w_bits}-fp16", fn, types, dict(meta, N_MID=n_mid, W_BITS=w_bits, BLOCK_R=AQK.BLOCK, BLOCK_C=1,
                                                   MODE=0, num_warps=AQK._num_warps(AQK.BLOCK),
                                                   enable_fp_fusion=False))
    for w_bits, n_mid in ((8, 143), (4, 11))  # 4-bit {1,3,5,7}: 11 midpoints, compared one by one
    for name, fn, types, meta in (
        ("project", AQK._project_kernel, dict(w_ptr=_F16, scale_ptr="*fp32", out_ptr="*i16", mid_ptr="*fp32",
                                              delta_ptr="*i32", mag_ptr="*i32", M="i32", C="i32", inner="i32"),
         dict(FAKE=False)),
        ("fake-quant", AQK._project_kernel, dict(w_ptr=_F16, scale_ptr="*fp32", out_ptr=_F16, mid_ptr="*fp32",
                                                 delta_ptr="*i32", mag_ptr="*i32", M="i32", C="i32", inner="i32"),
         dict(FAKE=True)),
        ("fake-quant-bwd", AQK._fq_bwd_kernel, dict(g_ptr=_F16, w_ptr=_F16, scale_ptr="*fp32", gw_ptr=_F16,
                                                    part_ptr="*fp32", mid_ptr="*fp32", delta_ptr="*i32",
                                                    mag_ptr="*i32", M="i32", C="i32", inner="i32", r_max="fp32"),
         {}),
    )
] + [
    ("asm-decompose-w8", AQK._decompose_kernel, dict(w_ptr="*i16", codes_ptr="*u8", first_ptr="*i64",
                                                     code_ptr="*i32", n="i32"),
     dict(Q=2, QMAX=255, BLOCK_N=AQK.BLOCK, num_warps=AQK._num_warps(AQK.BLOCK))),
]


def check_foundation() -> list[dict]:
    rows = []
    for name, fn, types, meta in FOUNDATION:
        row = {"class": name, "kernel": fn.__name__, "num_warps": meta["num_warps"]}
        try:
            row.update(resources(compile_sm90(fn, types, meta)))
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        rows.append(row)
    return rows


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: interpreted kernels cannot be compiled", file=sys.stderr)
        return 2
    for cls in CLASSES:
        for row in check(cls):
            print(json.dumps(row), flush=True)
    for row in check_foundation():
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
