"""An honest meter of what autograd keeps for backward.

``SavedBytesMeter`` installs ``torch.autograd.graph.saved_tensors_hooks`` and attributes every saved tensor to the
layer whose forward is running (forward pre/post hooks), or to ``"other"`` outside the watched layers. Parameters
and buffers (weights, factors) are not activations and are skipped. A storage counts once per layer, at its whole
size (what is really kept alive). A storage saved both by a layer and by another op (a ReLU keeps its output, which
is the next layer's input) counts for each of them but once in ``total``: compressing the layer alone does not free
it, which ``total`` shows.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Iterable, Optional

import torch
from torch import nn


class SavedBytesMeter:
    """Context manager: ``with SavedBytesMeter(model, ["conv2", "conv3"]) as m: loss.backward()`` ... ``m.bytes``.

    ``exclude``: further tensors that are not activations (e.g. factors held outside the model).
    Attributes after the block:
        bytes: {layer name: bytes saved inside that layer's forward, "other": everything else}.
        total: bytes of all distinct saved storages (the whole model's activation memory for backward).
        distinct_layer_bytes: distinct storages saved inside the watched layers (an input shared by two layers,
            such as an MLP's gate and up projections, counts once; ``layer_bytes()`` counts it per layer).
    """

    def __init__(self, model: nn.Module, layers: Optional[Iterable[str]] = None,
                 exclude: Iterable[Optional[torch.Tensor]] = ()):
        self.model = model
        self.exclude = [t for t in exclude if t is not None]
        self.layers = list(layers) if layers is not None else []
        self.bytes: dict[str, int] = defaultdict(int)
        self.total = 0
        self._current: list[str] = []
        self._seen: set[tuple[str, int]] = set()
        self._seen_total: set[int] = set()
        self._seen_layers: set[int] = set()
        self.distinct_layer_bytes = 0
        self._stack = contextlib.ExitStack()

    def _skip(self) -> set[int]:
        consts = list(self.model.parameters()) + list(self.model.buffers()) + self.exclude
        return {t.untyped_storage().data_ptr() for t in consts}

    def _pack(self, t: torch.Tensor):
        if t.device.type == "meta":
            return t
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in self._params:
            return t
        owner = self._current[-1] if self._current else "other"
        if (owner, ptr) not in self._seen:
            self._seen.add((owner, ptr))
            self.bytes[owner] += storage.nbytes()
            if owner != "other" and ptr not in self._seen_layers:
                self._seen_layers.add(ptr)
                self.distinct_layer_bytes += storage.nbytes()
        if ptr not in self._seen_total:
            self._seen_total.add(ptr)
            self.total += storage.nbytes()
        return t

    def _leave(self, _module, _args, _output) -> None:
        self._current.pop()  # a forward hook that returned a value would replace the layer's output

    def __enter__(self) -> "SavedBytesMeter":
        self._params = self._skip()
        for name in self.layers:
            module = self.model.get_submodule(name)
            self._stack.callback(module.register_forward_pre_hook(
                lambda _m, _a, n=name: self._current.append(n)).remove)
            self._stack.callback(module.register_forward_hook(self._leave).remove)
        self._stack.enter_context(torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def layer_bytes(self) -> int:
        """Bytes saved inside the watched layers."""
        return sum(v for k, v in self.bytes.items() if k != "other")


def saved_bytes(model: nn.Module, batch, layers: Optional[Iterable[str]] = None, loss_fn=None) -> SavedBytesMeter:
    """Run one training-mode forward of ``model`` on ``batch`` (inputs or (inputs, labels)) under the meter and
    return it. No backward and no optimizer step; BN statistics are restored; the graph is freed."""
    from lrkern.lance.calibrate import preserved_state

    x, y = (batch[0], batch[1]) if isinstance(batch, (tuple, list)) else (batch, None)
    with preserved_state(model), SavedBytesMeter(model, layers) as meter:
        model.train()
        out = model(x)
        if loss_fn is not None and y is not None:
            out = loss_fn(out, y)
        del out
    return meter
