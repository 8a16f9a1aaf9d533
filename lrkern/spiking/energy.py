"""Compute-energy estimate of a (partly) spiking network from operation counts (spec ``spiking_video.md`` 6).

    E = sum over dense layers of MACs x E_MAC  +  sum over spiking layers of SOPs x E_AC

A layer is *spiking* when its input is the output of a spiking neuron (an ``lrkern.spiking`` ``LIF`` or ``STM``, any
module type passed as ``neurons``, or a module with a true ``emits_spikes`` attribute) and every value is 0 or 1: each
input spike then triggers one accumulate per synapse, so its synaptic operations are ``SOPs = dense MACs x input firing
rate`` (its dense MACs already include the T time steps, which the models fold into the batch). A layer fed by real
values (pixels, motion vectors, residuals, firing *rates*, ReLU outputs) counts as MACs; so the first layer after a
real-valued input always does.
Convolutions and linear layers are counted by forward hooks; so is every module with an ``attention_macs(x)`` method
(attention's two matmuls ``Q K^T`` and ``A V``, 2 B L^2 D MACs for ``[B, L, D]``), whose inner projections are
ordinary linear layers counted on their own. Element-wise work (BN, neuron
updates, softmax, norms) and every memory access are ignored, so this is a compute-only estimate and not comparable to
a measured joules-per-video figure (which is dominated by DRAM traffic on real hardware).

Default energies (``EnergyTable``): 45 nm CMOS figures from M. Horowitz, "Computing's energy problem (and what we can
do about it)", ISSCC 2014: a 32-bit float multiply costs 3.7 pJ and a 32-bit float add 0.9 pJ, so a MAC costs
3.7 + 0.9 = 4.6 pJ and an accumulate (AC) 0.9 pJ. Pass another table for other technologies or integer datapaths
(the same paper lists 8-bit integer add 0.03 pJ, multiply 0.2 pJ; 32-bit integer add 0.1 pJ, multiply 3.1 pJ).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
from torch import nn


@dataclass(frozen=True)
class EnergyTable:
    """Energy per operation in picojoules."""

    mac_pj: float = 4.6   # fp32 multiply 3.7 pJ + fp32 add 0.9 pJ (Horowitz, ISSCC 2014, 45 nm)
    ac_pj: float = 0.9    # fp32 add 0.9 pJ (same source)
    source: str = "M. Horowitz, Computing's energy problem (and what we can do about it), ISSCC 2014, 45 nm: " \
                  "fp32 mult 3.7 pJ, fp32 add 0.9 pJ"

    def __post_init__(self):
        for name in ("mac_pj", "ac_pj"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v >= 0):
                raise ValueError(f"{name} must be a non-negative number of picojoules, got {v!r}")


@dataclass
class LayerCount:
    """One layer's counts, summed over every call of a counting pass."""

    name: str
    kind: str                      # "mac" (real-valued input) or "sop" (spike input)
    dense_macs: float = 0.0        # MACs if every input were dense
    ops: float = 0.0               # MACs for "mac" layers, SOPs (dense MACs x firing rate) for "sop" layers
    _spikes: float = field(default=0.0, repr=False)
    _inputs: float = field(default=0.0, repr=False)

    @property
    def input_rate(self) -> Optional[float]:
        """Mean firing rate of the input spikes (None for a real-valued input)."""
        return self._spikes / self._inputs if self.kind == "sop" and self._inputs else None


def _is_binary(x: torch.Tensor) -> bool:
    return x.is_floating_point() and bool(((x == 0) | (x == 1)).all())


def _storage(x: torch.Tensor) -> int:
    return x.untyped_storage().data_ptr()


class OpCounter:
    """Counts MACs / SOPs of ``model`` while it runs inside ``with OpCounter(model) as c:``; ``c.clips`` is the number
    of samples seen (the batch size of each call of the model's forward, summed)."""

    def __init__(self, model: nn.Module, neurons: Optional[tuple[type, ...]] = None):
        if neurons is None:
            from lrkern.spiking import LIF
            from lrkern.spiking.stm import STM
            neurons = (LIF, STM)
        self.model, self.neurons = model, neurons
        self.layers: dict[str, LayerCount] = {}
        self.clips = 0
        self._handles: list = []
        # Storages of the current forward's neuron outputs. A layer input is spikes when it views one of them (flatten
        # and view keep the storage) and is binary; the value check also rules out a real tensor that reuses a freed
        # spike tensor's address. An all-zero spike tensor still counts as spikes (rate 0), which a value check alone
        # could not tell from a zero real-valued input.
        self._spike_storages: set[int] = set()

    def _hook(self, name: str):
        def hook(module, args, out):
            x = args[0]
            if isinstance(module, nn.Conv2d):
                kh, kw = module.kernel_size
                macs = out.numel() * (module.in_channels // module.groups) * kh * kw
            elif isinstance(module, nn.Linear):
                macs = out.numel() * module.in_features
            else:
                self._add(name, "mac", int(module.attention_macs(x)), None)
                return
            spikes = _storage(x) in self._spike_storages and _is_binary(x)
            self._add(name, "sop" if spikes else "mac", macs, x)
        return hook

    def _neuron_hook(self, module, args, out) -> None:
        self._spike_storages.add(_storage(out))

    def _add(self, name: str, kind: str, macs: int, x: Optional[torch.Tensor]) -> None:
        layer = self.layers.get(name)
        if layer is None:
            layer = self.layers[name] = LayerCount(name, kind)
        elif layer.kind != kind:
            raise RuntimeError(f"layer {name} got spike input in one call and real-valued input in another; "
                               "count separate passes")
        layer.dense_macs += macs
        if kind == "sop":
            spikes = float(x.detach().float().sum())
            layer.ops += macs * spikes / x.numel()
            layer._spikes += spikes
            layer._inputs += x.numel()
        else:
            layer.ops += macs

    def __enter__(self) -> "OpCounter":
        for name, m in self.model.named_modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)) or callable(getattr(m, "attention_macs", None)):
                self._handles.append(m.register_forward_hook(self._hook(name)))
            elif isinstance(m, self.neurons) or getattr(m, "emits_spikes", False):
                # emits_spikes: a wrapper whose output is a neuron's spikes rearranged into a new tensor (the per-GOP
                # layout of lrkern.spiking.video.PerGop), which the storage test would otherwise miss.
                self._handles.append(m.register_forward_hook(self._neuron_hook))
        self._handles.append(self.model.register_forward_pre_hook(self._count_clips))
        return self

    def _count_clips(self, module, args) -> None:
        self.clips += int(args[0].shape[0])
        self._spike_storages.clear()

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def report(self, table: EnergyTable = EnergyTable()) -> dict:
        """Per-clip energy of the network as counted, and of its all-dense equivalent (every layer as MACs)."""
        if not self.clips:
            raise RuntimeError("nothing was counted: run the model inside the `with OpCounter(model)` block")
        n = self.clips
        rows = []
        mac = sop = dense = 0.0
        for layer in self.layers.values():
            rows.append({"layer": layer.name, "kind": layer.kind, "dense_macs_per_clip": layer.dense_macs / n,
                         "ops_per_clip": layer.ops / n, "input_rate": layer.input_rate})
            dense += layer.dense_macs
            if layer.kind == "sop":
                sop += layer.ops
            else:
                mac += layer.ops
        pj = 1e-12
        return {
            "macs_per_clip": mac / n, "sops_per_clip": sop / n, "dense_macs_per_clip": dense / n,
            "joules_per_clip": (mac * table.mac_pj + sop * table.ac_pj) * pj / n,
            "dense_equivalent_joules_per_clip": dense * table.mac_pj * pj / n,
            "energy_table": asdict(table), "layers": rows,
        }
