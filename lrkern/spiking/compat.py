"""``from_spikingjelly``: run a SpikingJelly model's LIF neurons on lrkern's fused kernels.

Every ``spikingjelly.activation_based.neuron.LIFNode`` (multi-step, ``step_mode='m'``) becomes an
``lrkern.spiking.LIF`` with the same tau, v_threshold, v_reset (None: soft reset), decay_input, detach_reset,
surrogate (``Sigmoid`` or ``ATan`` with its alpha) and store_v_seq; the rest of the model is untouched. Nodes lrkern
cannot reproduce are refused, all of them listed by module path, before anything is changed: single-step nodes,
other surrogates, surrogates in non-spiking mode, ``ParametricLIFNode`` (its tau is learned), and subclasses of
``LIFNode`` (their dynamics may differ).

SpikingJelly's neurons keep their membrane between calls until ``functional.reset_net``; lrkern's LIF starts every
call from v_reset (``stateful=False``, the default), which equals SpikingJelly's behaviour when ``reset_net`` runs
between batches, as its training loops do. ``stateful=True`` keeps SpikingJelly's memory (``reset_net`` still resets
it: it calls each module's ``reset()``). SpikingJelly's own ``backend`` choice ('torch', 'cupy', ...) is not carried
over; pass ``backend=`` for lrkern's.

Works with SpikingJelly 0.0.0.0.14 and 2.0, which name these attributes alike.
"""
from __future__ import annotations

from torch import nn


def _spikingjelly():
    try:
        from spikingjelly.activation_based import neuron, surrogate
    except ImportError as exc:
        raise ImportError("from_spikingjelly needs SpikingJelly (`pip install --no-deps spikingjelly`; it needs no "
                          f"package beyond torch and numpy to import its neurons): {exc}") from exc
    return neuron, surrogate


def _surrogate(node, surrogate) -> tuple[str, float]:
    fn = node.surrogate_function
    kinds = {surrogate.Sigmoid: "sigmoid", surrogate.ATan: "atan"}
    kind = kinds.get(type(fn))
    if kind is None:
        raise ValueError(f"its surrogate {type(fn).__module__}.{type(fn).__qualname__} is not supported "
                         "(lrkern implements surrogate.Sigmoid and surrogate.ATan)")
    if not getattr(fn, "spiking", True):
        raise ValueError(f"its surrogate {type(fn).__name__} has spiking=False (a smooth forward), which lrkern "
                         "does not implement")
    return kind, float(fn.alpha)


def _convert(node, surrogate, backend: str, stateful: bool):
    from lrkern.spiking import LIF

    if getattr(node, "step_mode", "s") != "m":
        raise ValueError(f"it is single-step (step_mode={node.step_mode!r}); lrkern's LIF is multi-step over "
                         "[T, ...] inputs: set step_mode='m' (functional.set_step_mode(model, 'm')) first")
    if getattr(node, "_neuron_precision", None) is not None:
        raise ValueError(f"it has a custom neuron precision {node._neuron_precision!r}; lrkern computes in fp32")
    kind, alpha = _surrogate(node, surrogate)
    lif = LIF(tau=float(node.tau), v_threshold=float(node.v_threshold),
              v_reset=None if node.v_reset is None else float(node.v_reset), surrogate=kind, alpha=alpha,
              detach_reset=bool(node.detach_reset), decay_input=bool(node.decay_input),
              store_v_seq=bool(getattr(node, "store_v_seq", False)), stateful=stateful, backend=backend)
    lif.train(node.training)
    return lif


def from_spikingjelly(model: nn.Module, *, backend: str = "auto", stateful: bool = False) -> nn.Module:
    """Swaps every SpikingJelly ``LIFNode`` in ``model`` (in place) for an ``lrkern.spiking.LIF`` with identical
    parameters and returns the model (the new LIF when ``model`` itself is a ``LIFNode``).

    Raises ValueError, naming each offending module's path, when a node cannot be reproduced (single-step mode, a
    surrogate other than Sigmoid / ATan, ``ParametricLIFNode``, a ``LIFNode`` subclass); the model is then left
    unchanged. A node shared by several parents becomes one shared LIF.

    Example:
        >>> net = nn.Sequential(nn.Linear(16, 32), neuron.LIFNode(step_mode="m"))
        >>> net = lrkern.spiking.from_spikingjelly(net)    # net[1] is now lrkern.spiking.LIF
    """
    from lrkern.spiking import MODULE_BACKENDS

    if backend not in MODULE_BACKENDS:
        raise ValueError(f"backend={backend!r} is not supported; accepted: {', '.join(MODULE_BACKENDS)}")
    neuron, surrogate = _spikingjelly()
    plif = getattr(neuron, "ParametricLIFNode", None)
    plan: list[tuple[str, nn.Module]] = []
    converted: dict[int, nn.Module] = {}
    problems: list[str] = []
    for path, module in model.named_modules(remove_duplicate=False):
        where = repr(path) if path else "the model itself"
        if plif is not None and isinstance(module, plif):
            problems.append(f"{where} ({type(module).__name__}): its tau is learned, and lrkern's LIF has a fixed "
                            "tau")
        elif isinstance(module, neuron.LIFNode):
            if type(module) is not neuron.LIFNode:
                problems.append(f"{where} ({type(module).__qualname__}): a subclass of LIFNode, whose dynamics "
                                "lrkern cannot know")
                continue
            if id(module) not in converted:
                try:
                    converted[id(module)] = _convert(module, surrogate, backend, stateful)
                except ValueError as exc:
                    problems.append(f"{where} (LIFNode): {exc}")
                    continue
            plan.append((path, converted[id(module)]))
    if problems:
        raise ValueError("from_spikingjelly cannot convert these SpikingJelly neurons (nothing was changed):\n  "
                         + "\n  ".join(problems))
    for path, lif in plan:
        if not path:
            return lif
        parent_path, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, name, lif)
    return model
