"""``ASMFakeQuantize``: the alphabet-set weight projection as a torch.ao QConfig weight fake-quantizer (spec ``asm.md``
section 6).

For users whose QAT flow is torch.ao's (``prepare_qat`` swaps ``nn.Conv2d`` / ``nn.Linear`` for the ``torch.ao.nn.qat``
modules, which call ``weight_fake_quant(weight)``)::

    from torch.ao.quantization import QConfig, default_fake_quant, prepare_qat
    from lrkern.asm.ao import ASMFakeQuantize

    model.qconfig = QConfig(activation=default_fake_quant,
                            weight=ASMFakeQuantize.with_args(alphabet="1357", w_bits=4))
    prepare_qat(model, inplace=True)      # weights now train on the {1,3,5,7} grid

The forward is ``torch.ops.lrkern.asm_fake_quant(w, s, ch_axis, alphabet, w_bits)`` with the per-channel max scale
``s_c = max |w[c]| / r_max`` (the ``scale="max"`` of ``lrkern.asm.ASMConv2d``), recomputed from the weight on every
call while the observer is enabled and kept (a buffer) when it is disabled; gradients are the op's clipped STE. It is
the torch.ao counterpart of ``torch.ao.quantization.FakeQuantize`` with a per-channel symmetric observer, on the
alphabet's grid instead of the uniform one: with the full odd set at w_bits=4 it equals
``torch.fake_quantize_per_channel_affine(w, s, 0, ch_axis, -15, 15)`` bit for bit (tested), except at exact ties.

Only fake quantization: torch.ao's ``convert`` targets int8 kernels, which cannot hold the ASM datapath's semantics.
For the integer paths (exact GEMM, shift-add emulation, BN folding, energy) use ``lrkern.asm.convert``.
"""
from __future__ import annotations

import torch
from torch.ao.quantization import FakeQuantizeBase

from lrkern.asm.alphabet import check_w_bits, parse_alphabet, r_max


class ASMFakeQuantize(FakeQuantizeBase):
    """Per-channel alphabet-set weight fake quantization for torch.ao QConfigs.

    Args:
        alphabet: an alphabet set (``"13"``, ``"1357"``, ``(1, 3)``, ...; see ``lrkern.asm.alphabet``).
        w_bits: 4 or 8 (magnitude bits, sign excluded).
        ch_axis: the output-channel axis of the weight (0 for Conv2d and Linear).
        factory_kwargs: passed by torch.ao's ``prepare_qat`` (the device of the buffers).
    """

    def __init__(self, alphabet="1357", w_bits: int = 4, ch_axis: int = 0, factory_kwargs=None):
        super().__init__()
        device = (factory_kwargs or {}).get("device")
        self.alphabet = list(parse_alphabet(alphabet))
        self.w_bits = check_w_bits(w_bits)
        if not isinstance(ch_axis, int):
            raise TypeError(f"ch_axis must be an int, got {type(ch_axis).__name__}")
        self.ch_axis = ch_axis
        self.r_max = r_max(self.alphabet, self.w_bits)
        # Empty until the first observed weight (torch.ao's per-channel observers start the same way).
        self.register_buffer("scale", torch.empty(0, dtype=torch.float32, device=device))
        self.register_buffer("zero_point", torch.empty(0, dtype=torch.int32, device=device))
        # The fields torch.ao's QAT modules and utilities read from a weight fake-quantizer.
        self.dtype = torch.qint8
        self.qscheme = torch.per_channel_symmetric
        self.quant_min, self.quant_max = -self.r_max, self.r_max

    def _observe(self, w: torch.Tensor) -> None:
        axis = self.ch_axis % w.dim()
        dims = [d for d in range(w.dim()) if d != axis]
        with torch.no_grad():
            m = w.detach().abs().amax(dim=dims).to(torch.float32) if dims else w.detach().abs().to(torch.float32)
            s = torch.where(m > 0, m / self.r_max, torch.ones_like(m))
        if self.scale.shape != s.shape:
            self.scale.resize_(s.shape)
            self.zero_point.resize_(s.shape)
        self.scale.copy_(s)
        self.zero_point.zero_()

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not w.is_floating_point():
            raise TypeError(f"w: ASMFakeQuantize takes a float weight, got {w.dtype}")
        if w.dim() == 0:
            raise ValueError("w: ASMFakeQuantize needs a weight with a channel axis, got a 0-dim tensor")
        if self.observer_enabled[0] == 1:
            self._observe(w)
        if self.fake_quant_enabled[0] != 1:
            return w
        if self.scale.numel() != w.shape[self.ch_axis]:
            raise RuntimeError(f"ASMFakeQuantize holds {self.scale.numel()} scales but the weight has "
                               f"{w.shape[self.ch_axis]} channels along ch_axis={self.ch_axis}; enable the observer "
                               "for a new weight")
        import lrkern.ops  # noqa: F401  (registers torch.ops.lrkern.*)
        return torch.ops.lrkern.asm_fake_quant(w.contiguous(), self.scale, self.ch_axis % w.dim(), self.alphabet,
                                               self.w_bits)

    def calculate_qparams(self):
        return self.scale, self.zero_point

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # The buffers start empty: take the saved channel count before the copy (as torch.ao's FakeQuantize does).
        for name in ("scale", "zero_point"):
            key = prefix + name
            if key in state_dict:
                getattr(self, name).resize_(state_dict[key].shape)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        a = ",".join(str(v) for v in self.alphabet) if len(self.alphabet) < 8 else "odd"
        return f"alphabet={{{a}}}, w_bits={self.w_bits}, ch_axis={self.ch_axis}, r_max={self.r_max}"


__all__ = ["ASMFakeQuantize"]
