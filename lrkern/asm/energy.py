"""Operation-counting energy model of ASM versus conventional MAC datapaths (spec ``asm.md`` section 5).

    report = lrkern.asm.energy(model, (1, 1, 28, 28))     # a converted model: each ASM layer's own alphabet
    report["asm_pj"], report["conventional_pj"], report["ratio"], report["brackets"]

Counts come from the layer shapes and the trained integer weights w_int, with no kernel run (one forward pass on a
zero input reads the shapes; ASM layers return zeros of the right shape in that pass). For a GEMM M x K x N (Linear:
M = the rows of the input; Conv2d: M = batch * H_out * W_out, K = C_in / groups * kh * kw, N = C_out, one GEMM of
N / groups outputs per group):

- Conventional: one b x a multiply and one accumulate add (width a + b + ceil(log2 K)) per MAC, b = w_bits (magnitude
  bits; the sign makes the add a subtract) and a = a_bits.
- ASM: the pre-computer bank, M * K * ceil(N_g / bank_share) * (|A| - 1) adds of width a + 4 per group (default
  bank_share = N_g: one bank per input, shared by every output of its group; the computation-sharing multiplier CSHM
  shared one bank by 4); per MAC with n_q nonzero quartets in its weight (Q = w_bits / 4 if ``zero_skip=False``):
  n_q selects from |A| entries (none if |A| = 1), n_q shifts by 0..3, max(n_q - 1, 0) quartet adds (width a + b),
  and 1 accumulate add (width a + b + ceil(log2 K)).
- ``zero_skip=True``: a zero weight costs nothing in either model (no multiply, no add); activations are dense.
  Both designs run the same trained w_int (so they skip the same zeros); only the datapath differs.

Energies (``EnergyTable``, picojoules; every value configurable, also from JSON). Cited: M. Horowitz, "Computing's
energy problem (and what we can do about it)", ISSCC 2014, 45 nm: int add 0.03 pJ (8-bit), 0.1 pJ (32-bit); int
multiply 0.2 pJ (8-bit), 3.1 pJ (32-bit); fp32 add 0.9 pJ, multiply 3.7 pJ (``fp32_energy``: the unquantized
network as fp32 MACs); a 64-bit SRAM read about 10 pJ (8 KB) to
100 pJ (1 MB); DRAM 1.3 to 2.6 nJ. Width scaling (lrkern formulation, fitted to those points):
E_add(n) = 0.03 n / 8 pJ (0.12 at 32 bits), E_mul(n1, n2) = 0.2 n1 n2 / 64 pJ (3.2 at 32 x 32).
Select and shift have **no cited source**; placeholders: a select from k entries costs 0.25 E_add(n) ceil(log2 k) and a
0..3 shift 0.5 E_add(n), with n = a + 4 (the bank entry width). Every report also gives the totals at the two brackets
select = shift = 0 and select = shift = E_add(n) (``report["brackets"]``), so no conclusion rests on the placeholders.

Memory (``memory=True``): weight bits read once per inference, (b + 1) per weight in the conventional design and,
in the ASM design, the code size of section 3.2 (Q quartets of ceil(log2 |representable quartets|) bits plus the sign;
``weight_storage="plain"`` charges b + 1 there too), plus the layer's input activations read once each (a bits; ideal
reuse, the same in both designs), at ``sram_pj_per_64bit / 64`` pJ per bit (default 10 pJ per 64-bit read, an 8 KB
SRAM).

Layers left unconstrained (the float first and last layers of ``convert``) are counted as conventional integer layers
with ``unconstrained_bits`` = (w_bits, a_bits) = (8, 8) in **both** designs (``None`` leaves them out).

The compute-only ratio is **not comparable** to the ~50% of arXiv 2302.01990, which compares whole near-memory and
in-memory designs against a von Neumann one; at system level memory dominates (Sarwar et al.'s ASM neurons saved only
1 to 9% at system level, spec section 3.6).
"""
from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from typing import Optional, Sequence, Union

import torch
from torch import nn

from lrkern.asm.alphabet import check_a_bits, check_w_bits, parse_alphabet, representable_quartets

HOROWITZ = ("M. Horowitz, 'Computing's energy problem (and what we can do about it)', ISSCC 2014, 45 nm: int add "
             "0.03 pJ (8 bit) / 0.1 pJ (32 bit), int mult 0.2 pJ (8 bit) / 3.1 pJ (32 bit), 64-bit SRAM read 10 pJ "
             "(8 KB) to 100 pJ (1 MB); width scaling and select/shift placeholders: lrkern formulation (spec asm.md 5)")
BRACKETS = ("placeholder", "zero", "add")


@dataclass(frozen=True)
class EnergyTable:
    """Energy per operation (picojoules) and its width scaling.

    E_add(n) = add_pj_8bit * n / 8; E_mul(n1, n2) = mul_pj_8x8 * n1 * n2 / 64;
    select from k entries = select_factor * E_add(n) * ceil(log2 k); shift by 0..3 = shift_factor * E_add(n);
    memory = sram_pj_per_64bit / 64 per bit.
    """

    add_pj_8bit: float = 0.03
    mul_pj_8x8: float = 0.2
    select_factor: float = 0.25
    shift_factor: float = 0.5
    sram_pj_per_64bit: float = 10.0
    fp32_add_pj: float = 0.9
    fp32_mul_pj: float = 3.7
    source: str = HOROWITZ

    def __post_init__(self):
        for f in fields(self):
            if f.name == "source":
                continue
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 or math.isinf(v):
                raise ValueError(f"{f.name} must be a non-negative finite number, got {v!r}")

    def e_add(self, n: float) -> float:
        return self.add_pj_8bit * n / 8.0

    def e_mul(self, n1: float, n2: float) -> float:
        return self.mul_pj_8x8 * n1 * n2 / 64.0

    def e_select(self, n: float, k: int, bracket: str = "placeholder") -> float:
        if k <= 1 or bracket == "zero":
            return 0.0
        if bracket == "add":
            return self.e_add(n)
        return self.select_factor * self.e_add(n) * math.ceil(math.log2(k))

    def e_shift(self, n: float, bracket: str = "placeholder") -> float:
        if bracket == "zero":
            return 0.0
        if bracket == "add":
            return self.e_add(n)
        return self.shift_factor * self.e_add(n)

    @property
    def pj_per_bit(self) -> float:
        return self.sram_pj_per_64bit / 64.0

    @classmethod
    def from_json(cls, src: Union[str, os.PathLike, dict]) -> "EnergyTable":
        """From a dict or a JSON file holding any subset of the fields (the rest keep their defaults)."""
        data = dict(src) if isinstance(src, dict) else json.loads(open(src).read())
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown EnergyTable fields {sorted(unknown)}; accepted: {sorted(known)}")
        return cls(**data)

    def to_json(self, path: Union[str, os.PathLike, None] = None) -> str:
        text = json.dumps(asdict(self), indent=1)
        if path is not None:
            with open(path, "w") as f:
                f.write(text + "\n")
        return text


def _acc_width(a: int, b: int, k: int) -> int:
    return a + b + math.ceil(math.log2(max(k, 1)))


def quartet_counts(w_int: torch.Tensor, w_bits: int) -> tuple[int, int, int]:
    """``(nonzero weights, nonzero quartets, quartet adds = sum max(n_q - 1, 0))`` of an integer weight tensor."""
    m = w_int.detach().to(torch.int64).abs().flatten()
    q = torch.stack([(m >> (4 * i)) & 15 for i in range(w_bits // 4)], 0)
    n_q = (q != 0).sum(0)
    return int((m != 0).sum()), int(n_q.sum()), int((n_q - 1).clamp_min(0).sum())


def code_bits(alphabet, w_bits: int) -> int:
    """Stored bits per ASM weight (section 3.2): Q quartet codes of ceil(log2 #representable quartets) bits + sign."""
    n = len(representable_quartets(alphabet))
    return (w_bits // 4) * math.ceil(math.log2(n)) + 1


def layer_counts(m_rows: int, k: int, n: int, groups: int, w_int: Optional[torch.Tensor], alphabet, w_bits: int,
                 a_bits: int, bank_share: Optional[int] = None, zero_skip: bool = True) -> dict:
    """Operation counts of one layer (GEMM M x K x N in ``groups`` groups, K per group). ``w_int`` [N, ...] with
    N * K elements; ``alphabet=None`` counts the conventional design only."""
    macs = m_rows * k * n
    if w_int is not None and w_int.numel() != n * k:
        raise ValueError(f"w_int has {w_int.numel()} elements, expected N * K = {n} * {k}")
    if w_int is None:
        nnz = n * k
        nq_sum, qadd_sum = nnz * (w_bits // 4), nnz * (w_bits // 4 - 1)
    else:
        nnz, nq_sum, qadd_sum = quartet_counts(w_int, w_bits)
    q = w_bits // 4
    used = m_rows * (nnz if zero_skip else n * k)
    out = {"M": m_rows, "K": k, "N": n, "groups": groups, "macs": macs, "nonzero_weights": nnz,
           "conv_mults": used, "acc_adds": used}
    if alphabet is None:
        return out
    alpha = parse_alphabet(alphabet)
    ng = n // groups
    share = ng if bank_share is None else int(bank_share)
    if share < 1:
        raise ValueError(f"bank_share={bank_share!r} must be a positive integer or None")
    if zero_skip:
        n_sel = m_rows * nq_sum
        n_qadd = m_rows * qadd_sum
    else:
        n_sel = m_rows * n * k * q
        n_qadd = m_rows * n * k * (q - 1)
    out.update(bank_adds=groups * m_rows * k * math.ceil(ng / share) * (len(alpha) - 1),
               selects=n_sel if len(alpha) > 1 else 0, shifts=n_sel, quartet_adds=n_qadd,
               nonzero_quartets=nq_sum)
    return out


def layer_energy(c: dict, alphabet, w_bits: int, a_bits: int, table: EnergyTable, bracket: str = "placeholder"
                 ) -> tuple[float, Optional[float]]:
    """(conventional pJ, ASM pJ or None) of one layer's counts."""
    acc_w = _acc_width(a_bits, w_bits, c["K"])
    conv = c["conv_mults"] * table.e_mul(w_bits, a_bits) + c["acc_adds"] * table.e_add(acc_w)
    if alphabet is None:
        return conv, None
    n = a_bits + 4
    k_sel = len(parse_alphabet(alphabet))
    asm = (c["bank_adds"] * table.e_add(n) + c["selects"] * table.e_select(n, k_sel, bracket)
           + c["shifts"] * table.e_shift(n, bracket) + c["quartet_adds"] * table.e_add(a_bits + w_bits)
           + c["acc_adds"] * table.e_add(acc_w))
    return conv, asm


@contextmanager
def _shape_pass(model: nn.Module):
    """ASM layers return zeros of their output shape (no kernel, no calibration needed); the model is in eval mode."""
    from lrkern.asm.modules import ASMConv2d, ASMLinear, conv_out_hw
    patched = []

    def conv_fwd(self):
        def f(x):
            ho, wo = conv_out_hw(x.shape[-2:], self.kernel_size, self.stride, self.padding, self.dilation)
            return x.new_zeros(x.shape[0], self.out_channels, ho, wo)
        return f

    def lin_fwd(self):
        return lambda x: x.new_zeros(*x.shape[:-1], self.out_features)

    for m in model.modules():
        if isinstance(m, ASMConv2d):
            m.forward = conv_fwd(m)
            patched.append(m)
        elif isinstance(m, ASMLinear):
            m.forward = lin_fwd(m)
            patched.append(m)
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        for m in patched:
            del m.forward
        model.train(was_training)


def _layer_geometry(model: nn.Module, input_shape: Sequence[int]) -> dict:
    from lrkern.asm.modules import ASM_LAYERS
    shapes: dict[str, tuple] = {}
    handles = []

    def hook(name):
        def record(mod, args, out) -> None:  # returns None: a forward hook's return value would replace the output
            shapes.setdefault(name, (tuple(args[0].shape), tuple(out.shape)))
        return record

    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear) + ASM_LAYERS):
            handles.append(m.register_forward_hook(hook(name)))
    p = next(model.parameters(), None)
    dev = p.device if p is not None else torch.device("cpu")
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    try:
        with torch.no_grad(), _shape_pass(model):
            model(torch.zeros(tuple(input_shape), device=dev, dtype=dtype))
    finally:
        for h in handles:
            h.remove()
    return shapes


def energy(model: nn.Module, input_shape: Sequence[int], alphabet=None, w_bits: int = 4, a_bits: int = 4,
           table: Optional[Union[EnergyTable, dict, str, os.PathLike]] = None, bank_share: Optional[int] = None,
           zero_skip: bool = True, memory: bool = False, all_layers: bool = False,
           unconstrained_bits: Optional[tuple[int, int]] = (8, 8), weight_storage: str = "code") -> dict:
    """Energy per inference (pJ) of ``model`` on inputs of ``input_shape``, ASM versus conventional, per layer and in
    total (see the module docstring for the model and its sources).

    Args:
        model: a model converted by ``lrkern.asm.convert`` (each ASM layer uses its own alphabet, bits and trained
            w_int; ``alphabet`` must then be None), or a float model with ``alphabet`` given: its Conv2d/Linear layers,
            except the first and the last Linear unless ``all_layers``, are counted as ASM layers with the max-scale
            projection of their weights, at ``w_bits`` x ``a_bits``.
        input_shape: e.g. ``(1, 1, 28, 28)``; the results are divided by ``input_shape[0]`` (per inference).
        table: ``EnergyTable``, a dict or a JSON path of its fields; default ``EnergyTable()``.
        bank_share: outputs served by one pre-computer bank (default: every output of the input's group).
        zero_skip: zero weights (and zero quartets) cost nothing.
        memory: add the weight and activation read energy (``memory_*`` keys and ``*_with_memory`` totals).
        unconstrained_bits: (w_bits, a_bits) at which layers that are not ASM are counted, the same in both designs;
            None leaves them out.
        weight_storage: ``"code"`` (ASM weights stored as their section-3.2 codes) or ``"plain"`` (b + 1 bits).

    Returns:
        dict with ``layers`` (per layer: name, kind "asm"/"unconstrained", counts, ``conventional_pj``, ``asm_pj``
        and the memory terms), totals ``conventional_pj``, ``asm_pj``, ``ratio`` (ASM / conventional) and
        ``saving`` (1 - ratio), ``brackets`` (the same totals with select = shift = 0 and = E_add(n)), with
        ``memory=True`` also ``conventional_with_memory_pj``, ``asm_with_memory_pj``, ``ratio_with_memory``, and the
        settings (``table``, ``input_shape``, ...).
    """
    from lrkern.asm.modules import ASM_LAYERS, max_scale, _ops
    if table is None:
        table = EnergyTable()
    elif not isinstance(table, EnergyTable):
        table = EnergyTable.from_json(table)
    if weight_storage not in ("code", "plain"):
        raise ValueError(f"weight_storage={weight_storage!r} is not supported; accepted: 'code', 'plain'")
    if len(input_shape) < 2 or any(int(s) < 1 for s in input_shape):
        raise ValueError(f"input_shape={tuple(input_shape)!r} must be a full input shape with a batch dimension")
    if unconstrained_bits is not None:
        unconstrained_bits = (check_w_bits(unconstrained_bits[0]), check_a_bits(unconstrained_bits[1]))
    converted = any(isinstance(m, ASM_LAYERS) for m in model.modules())
    if converted and alphabet is not None:
        raise ValueError("alphabet: the model already has ASM layers, which use their own alphabet; pass "
                         "alphabet=None")
    if alphabet is not None:
        alphabet = parse_alphabet(alphabet)
        w_bits, a_bits = check_w_bits(w_bits), check_a_bits(a_bits)
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear) + ASM_LAYERS)]
    as_asm: set[str] = set()
    if not converted and alphabet is not None and names:
        linears = [n for n in names if isinstance(model.get_submodule(n), nn.Linear)]
        excluded = set() if all_layers else {names[0]} | ({linears[-1]} if linears else set())
        as_asm = set(names) - excluded
    elif not converted:
        raise ValueError("alphabet is required for a model without ASM layers (lrkern.asm.convert it, or pass the "
                         "alphabet to count it as converted)")
    shapes = _layer_geometry(model, input_shape)
    batch = int(input_shape[0])
    rows = []
    tot = {"conventional_pj": 0.0, "asm_pj": 0.0, "memory_conventional_pj": 0.0, "memory_asm_pj": 0.0}
    brackets = {b: {"conventional_pj": 0.0, "asm_pj": 0.0} for b in BRACKETS}
    for name in names:
        if name not in shapes:
            continue  # never called in the forward pass
        m = model.get_submodule(name)
        in_shape, out_shape = shapes[name]
        is_conv = isinstance(m, nn.Conv2d) or type(m).__name__ == "ASMConv2d"
        if is_conv:
            kh, kw = m.kernel_size
            groups = m.groups
            k = (m.in_channels // groups) * kh * kw
            n = m.out_channels
            m_rows = out_shape[0] * out_shape[2] * out_shape[3]
        else:
            groups, k, n = 1, m.in_features, m.out_features
            m_rows = math.prod(out_shape[:-1])
        if isinstance(m, ASM_LAYERS):
            alpha, wb, ab, kind = tuple(m.alphabet), m.w_bits, m.a_bits, "asm"
            w_int = m.weight_int()
        elif name in as_asm:
            alpha, wb, ab, kind = alphabet, w_bits, a_bits, "asm"
            w = m.weight.detach().contiguous()
            w_int = _ops().asm_project(w, max_scale(w, alpha, wb), 0, list(alpha), wb)
        else:
            if unconstrained_bits is None:
                continue
            alpha, (wb, ab), kind = None, unconstrained_bits, "unconstrained"
            w_int = (m.weight.detach() != 0).to(torch.int16)  # only the zero pattern matters (zero skipping)
        c = layer_counts(m_rows, k, n, groups, w_int if kind == "asm" else None, alpha, wb, ab, bank_share,
                         zero_skip)
        if kind == "unconstrained" and zero_skip:
            nnz = int(w_int.sum())
            c.update(nonzero_weights=nnz, conv_mults=m_rows * nnz, acc_adds=m_rows * nnz)
        conv_pj, asm_pj = layer_energy(c, alpha, wb, ab, table)
        if asm_pj is None:
            asm_pj = conv_pj  # an unconstrained layer is the same conventional layer in both designs
        row = {"layer": name, "kind": kind, "alphabet": list(alpha) if alpha else None, "w_bits": wb, "a_bits": ab,
               **{key: v / batch if key not in ("K", "N", "groups", "nonzero_weights", "nonzero_quartets") else v
                  for key, v in c.items()},
               "conventional_pj": conv_pj / batch, "asm_pj": asm_pj / batch}
        for b in BRACKETS:
            cb, ab_pj = layer_energy(c, alpha, wb, ab, table, b)
            brackets[b]["conventional_pj"] += cb / batch
            brackets[b]["asm_pj"] += (cb if ab_pj is None else ab_pj) / batch
        tot["conventional_pj"] += conv_pj / batch
        tot["asm_pj"] += asm_pj / batch
        if memory:
            n_w = n * k
            conv_bits = n_w * (wb + 1)
            asm_bits = n_w * (code_bits(alpha, wb) if (alpha is not None and weight_storage == "code") else wb + 1)
            act_bits = math.prod(in_shape) * ab
            row["memory_conventional_pj"] = (conv_bits * table.pj_per_bit) / batch + act_bits * table.pj_per_bit / batch
            row["memory_asm_pj"] = (asm_bits * table.pj_per_bit) / batch + act_bits * table.pj_per_bit / batch
            tot["memory_conventional_pj"] += row["memory_conventional_pj"]
            tot["memory_asm_pj"] += row["memory_asm_pj"]
        rows.append(row)
    out = {"layers": rows, "conventional_pj": tot["conventional_pj"], "asm_pj": tot["asm_pj"],
           "ratio": _ratio(tot["asm_pj"], tot["conventional_pj"])}
    out["saving"] = 1.0 - out["ratio"]
    for b in BRACKETS:
        brackets[b]["ratio"] = _ratio(brackets[b]["asm_pj"], brackets[b]["conventional_pj"])
    if memory:
        out["memory_conventional_pj"] = tot["memory_conventional_pj"]
        out["memory_asm_pj"] = tot["memory_asm_pj"]
        out["conventional_with_memory_pj"] = tot["conventional_pj"] + tot["memory_conventional_pj"]
        out["asm_with_memory_pj"] = tot["asm_pj"] + tot["memory_asm_pj"]
        out["ratio_with_memory"] = _ratio(out["asm_with_memory_pj"], out["conventional_with_memory_pj"])
        for b in BRACKETS:
            brackets[b]["conventional_with_memory_pj"] = brackets[b]["conventional_pj"] + tot["memory_conventional_pj"]
            brackets[b]["asm_with_memory_pj"] = brackets[b]["asm_pj"] + tot["memory_asm_pj"]
            brackets[b]["ratio_with_memory"] = _ratio(brackets[b]["asm_with_memory_pj"],
                                                      brackets[b]["conventional_with_memory_pj"])
    out["brackets"] = brackets
    out.update(input_shape=list(input_shape), zero_skip=zero_skip, bank_share=bank_share, memory=memory,
               unconstrained_bits=list(unconstrained_bits) if unconstrained_bits else None,
               weight_storage=weight_storage, table=asdict(table))
    return out


def fp32_energy(model: nn.Module, input_shape: Sequence[int], table: Optional[EnergyTable] = None,
                memory: bool = False) -> dict:
    """Energy per inference of ``model`` run entirely in fp32 (every Conv2d/Linear, ASM layers included, as dense
    fp32 MACs at ``fp32_mul_pj + fp32_add_pj``; memory: 32-bit weights and input activations read once), the
    reference point of an unquantized network: ``{"macs", "compute_pj", "memory_pj", "with_memory_pj"}``."""
    from lrkern.asm.modules import ASM_LAYERS
    table = EnergyTable() if table is None else table
    shapes = _layer_geometry(model, input_shape)
    batch = int(input_shape[0])
    macs = mem_bits = 0
    for name, m in model.named_modules():
        if not isinstance(m, (nn.Conv2d, nn.Linear) + ASM_LAYERS) or name not in shapes:
            continue
        in_shape, out_shape = shapes[name]
        per_out = m.weight[0].numel()  # C_in / groups * kh * kw, or in_features
        macs += math.prod(out_shape) * per_out
        mem_bits += 32 * (m.weight.numel() + math.prod(in_shape))
    compute = macs * (table.fp32_mul_pj + table.fp32_add_pj) / batch
    mem = mem_bits * table.pj_per_bit / batch if memory else 0.0
    return {"macs": macs / batch, "compute_pj": compute, "memory_pj": mem, "with_memory_pj": compute + mem}


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def with_table(table: EnergyTable, **changes) -> EnergyTable:
    """A copy of ``table`` with some fields changed (``dataclasses.replace``)."""
    return replace(table, **changes)
