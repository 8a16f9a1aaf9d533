"""Alphabet Set Multipliers (ASM): alphabet-constrained weights, bit-exact shift-add emulation and an exact fast
path (spec asm.md). ``lrkern.asm.alphabet`` holds the alphabet tables; the ops are ``torch.ops.lrkern.asm_*``.
On top of them: alphabet-aware layers and training, and an operation-counting energy model.

    import lrkern.asm as asm
    model = asm.convert(model, "1357", w_bits=4, a_bits=4)     # Conv2d/Linear -> ASMConv2d/ASMLinear (first/last float)
    ...                                                         # QAT in "train" mode (fake quantization, STE)
    asm.set_mode(model, "exact")                                # integer GEMM (torch.ops.lrkern.asm_gemm), same logits
    asm.set_mode(model, "emulate")                              # bit-exact shift-add datapath, bitwise equal to exact
    report = asm.energy(model, (1, 1, 28, 28), memory=True)     # pJ per inference, ASM vs conventional

- Alphabets (``lrkern.asm.alphabet``): ``ALPHABETS``, ``parse_alphabet``, ``representable_quartets``,
  ``representable_magnitudes``, ``r_max``, ``midpoints``, ``asm_compose``.
- Ops: ``torch.ops.lrkern.asm_project``, ``asm_fake_quant``, ``asm_decompose``, ``asm_gemm_emulate``, ``asm_gemm``;
  ``asm_epilogue`` (``lrkern.asm.epilogue``) is the one fp32 epilogue of every path.
- Layers (``lrkern.asm.modules``): ``ASMLinear``, ``ASMConv2d`` (modes "train", "exact", "emulate"), ``convert``,
  ``set_mode``, ``set_alphabet``, ``asm_layers``, ``fold_bn``, ``fold_bn_pairs``, and the functional
  ``linear_int`` / ``conv2d_int``.
- Activations (``lrkern.asm.quant_act``): ``ActQuantizer`` (EMA or LSQ scale), ``fake_quant_act``,
  ``freeze_act_scales``, ``calibrating``.
- Energy (``lrkern.asm.energy``): ``energy`` (ASM vs conventional), ``fp32_energy``, ``EnergyTable``.
- torch.ao (``lrkern.asm.ao``, imported explicitly: torch.ao.quantization is deprecated upstream):
  ``ASMFakeQuantize``, the alphabet projection as a QConfig weight fake-quantizer for ``prepare_qat`` flows.
- Experiment (``lrkern.asm.models``, ``lrkern.asm.train``): ``ResNetCNN``; ``Recipe``, ``load_data``,
  ``fp_checkpoint``, ``qat``, ``reestimate_bn``, ``evaluate`` (imported on first use).
"""
from lrkern.asm.alphabet import (ALPHABETS, asm_compose, check_a_bits, check_w_bits, midpoints, parse_alphabet,
                                 r_max, representable_magnitudes, representable_quartets)
from lrkern.asm.energy import EnergyTable, energy, fp32_energy
from lrkern.asm.models import ResNetCNN
from lrkern.asm.modules import (ASMConv2d, ASMLinear, asm_layers, conv2d_int, convert, fold_bn, fold_bn_pairs,
                                linear_int, max_scale, set_alphabet, set_mode)
from lrkern.asm.quant_act import ActQuantizer, calibrating, fake_quant_act, freeze_act_scales

_TRAIN_NAMES = ("Recipe", "load_data", "fp_checkpoint", "qat", "evaluate", "calibrate", "reestimate_bn")


def __getattr__(name):
    # The training helpers import lrkern.lance (which imports lrkern.ops): loaded on first use, so that lrkern.ops
    # can import lrkern.asm.alphabet without a cycle.
    if name in _TRAIN_NAMES:
        from lrkern.asm import train
        return getattr(train, name)
    raise AttributeError(f"module 'lrkern.asm' has no attribute {name!r}")


__all__ = ["ALPHABETS", "parse_alphabet", "check_w_bits", "check_a_bits", "representable_quartets",
           "representable_magnitudes", "r_max", "midpoints", "asm_compose", "ASMLinear", "ASMConv2d", "convert",
           "set_mode", "set_alphabet", "asm_layers", "fold_bn", "fold_bn_pairs", "linear_int", "conv2d_int",
           "max_scale",
           "ActQuantizer", "fake_quant_act", "freeze_act_scales", "calibrating", "energy", "fp32_energy", "EnergyTable",
           "ResNetCNN", *_TRAIN_NAMES]
