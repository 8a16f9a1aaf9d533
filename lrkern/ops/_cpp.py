"""Host wrappers for the C++ CPU kernels in ``lrkern._C``: allocate outputs here (so poisoning covers them), then
call the extension's out-variants."""
from __future__ import annotations

import torch

from lrkern import _alloc, _ext
from lrkern.layout import packed_shapes, unpacked_shape


def hadamard(x: torch.Tensor) -> torch.Tensor:
    out = _alloc.empty(x.shape, x.dtype, x.device)
    _ext.cpp().hadamard_out(x, out)
    return out


def quant_pack(x: torch.Tensor, bits: int, group_size: int, axis: int):
    codes_shape, scale_shape = packed_shapes(x.shape, bits, group_size, axis)
    codes = _alloc.empty(codes_shape, torch.uint8, x.device)
    scale = _alloc.empty(scale_shape, x.dtype, x.device)
    zero = _alloc.empty(scale_shape, x.dtype, x.device)
    _ext.cpp().quant_pack_out(x, codes, scale, zero, bits, group_size, axis)
    return codes, scale, zero


def dequant(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int, axis: int):
    out = _alloc.empty(unpacked_shape(codes.shape, bits), scale.dtype, codes.device)
    _ext.cpp().dequant_out(codes, scale, zero, out, bits, group_size, axis)
    return out


def kv_attention(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_win, v_win, n_quant, n_win, corr_s, corr_z,
                 phi_q, bits: int, group_size: int, key_per_channel: bool, channel_group: int, rotate_keys: bool,
                 value_rotation: bool, scale: float):
    out = _alloc.empty(q.shape, q.dtype, q.device)
    lse = _alloc.empty(q.shape[:3], torch.float32, q.device)
    _ext.cpp().kv_attention_out(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_win, v_win, n_quant, n_win,
                                corr_s, corr_z, phi_q, bits, group_size, key_per_channel, channel_group, rotate_keys,
                                value_rotation, scale, out, lse)
    return out, lse


def lif_forward(x: torch.Tensor, v0: torch.Tensor, tau: float, v_threshold: float, v_reset: float, soft_reset: bool,
                decay_input: bool, store_v_seq: bool):
    """-> (s [T, N] x.dtype, h [T, N] x.dtype, v_last [N] fp32, v_seq [T, N] fp32 or empty)."""
    s = _alloc.empty(x.shape, x.dtype, x.device)
    h = _alloc.empty(x.shape, x.dtype, x.device)
    v_last = _alloc.empty(x.shape[1:], torch.float32, x.device)
    v_seq = _alloc.empty(x.shape if store_v_seq else (0,), torch.float32, x.device)
    _ext.cpp().lif_forward_out(x, v0, s, h, v_last, v_seq, tau, v_threshold, v_reset, soft_reset, decay_input,
                               store_v_seq)
    return s, h, v_last, v_seq


def lif_backward(grad_s: torch.Tensor, grad_v_last: torch.Tensor, grad_v_seq: torch.Tensor, h: torch.Tensor,
                 s: torch.Tensor, tau: float, v_threshold: float, v_reset: float, soft_reset: bool, decay_input: bool,
                 detach_reset: bool, surrogate_kind: int, alpha: float):
    """-> (grad_x [T, N] in h's dtype, grad_v0 [N] fp32)."""
    grad_x = _alloc.empty(h.shape, h.dtype, h.device)
    grad_v0 = _alloc.empty(h.shape[1:], torch.float32, h.device)
    _ext.cpp().lif_backward_out(grad_s, grad_v_last, grad_v_seq, h, s, grad_x, grad_v0, tau, v_threshold, v_reset,
                                soft_reset, decay_input, detach_reset, surrogate_kind, alpha)
    return grad_x, grad_v0


def stm_forward(u: torch.Tensor, v0: torch.Tensor, gain, tau: torch.Tensor, theta0: torch.Tensor, beta, rho: float,
                v_reset: float, soft_reset: bool, decay_input: bool):
    """-> (s [T, B, C, S] u.dtype, h [T, B, C, S] u.dtype, v_last [B, C, S] fp32)."""
    s = _alloc.empty(u.shape, u.dtype, u.device)
    h = _alloc.empty(u.shape, u.dtype, u.device)
    v_last = _alloc.empty(u.shape[1:], torch.float32, u.device)
    _ext.cpp().stm_forward_out(u, v0, gain, tau, theta0, beta, s, h, v_last, rho, v_reset, soft_reset, decay_input)
    return s, h, v_last


def stm_backward(grad_s: torch.Tensor, grad_v_last: torch.Tensor, u, v0: torch.Tensor, h: torch.Tensor,
                 s: torch.Tensor, gain, tau: torch.Tensor, theta0: torch.Tensor, beta, rho: float, v_reset: float,
                 soft_reset: bool, decay_input: bool, detach_reset: bool, surrogate_kind: int, alpha: float):
    """-> (grad_u [T, B, C, S] in h's dtype, grad_v0 [B, C, S] fp32, grad_params [4, B, C] fp32)."""
    grad_u = _alloc.empty(h.shape, h.dtype, h.device)
    grad_v0 = _alloc.empty(h.shape[1:], torch.float32, h.device)
    grad_params = _alloc.empty((4, h.shape[1], h.shape[2]), torch.float32, h.device)
    _ext.cpp().stm_backward_out(grad_s, grad_v_last, u, v0, h, s, gain, tau, theta0, beta, grad_u, grad_v0,
                                grad_params, rho, v_reset, soft_reset, decay_input, detach_reset, surrogate_kind,
                                alpha)
    return grad_u, grad_v0, grad_params


def asm_gemm_emulate(x: torch.Tensor, w: torch.Tensor, alphabet: list[int], w_bits: int, a_bits: int):
    """-> int32 [M, N]: the ASM shift-add datapath (x [M, K] uint8/int16/int32, w [N, K] int16)."""
    out = _alloc.empty((x.shape[0], w.shape[0]), torch.int32, x.device)
    _ext.cpp().asm_gemm_emulate_out(x, w, list(alphabet), w_bits, out)
    return out


def asm_gemm(x: torch.Tensor, w: torch.Tensor, w_bits: int, a_bits: int):
    """-> int32 [M, N]: the ASM fast path (int8 x int8 -> int32 GEMM; x - 128 offset, quartet planes)."""
    out = _alloc.empty((x.shape[0], w.shape[0]), torch.int32, x.device)
    _ext.cpp().asm_gemm_fast_out(x, w, w_bits, a_bits, out)
    return out


def _asm_tables(alphabet, w_bits, device):
    from lrkern.asm.alphabet import kernel_tables

    return kernel_tables(alphabet, w_bits, device)


def _asm_project_into(w: torch.Tensor, scale: torch.Tensor, inner: int, alphabet, w_bits: int, fake: bool):
    # One path for both outputs: the projection (int16 w_int) and the fake quantization (w_hat in w's dtype) share
    # their checks and tables and differ only in the kernel's store.
    t = _asm_tables(alphabet, w_bits, w.device)
    out = _alloc.empty(w.shape, w.dtype if fake else torch.int16, w.device)
    if w.numel() == 0:
        return out
    fn = _ext.cpp().asm_fake_quant_out if fake else _ext.cpp().asm_project_out
    fn(w, scale, t.mid, t.delta, t.mag, out, inner, t.n_mid, w_bits)
    return out


def asm_project(w: torch.Tensor, scale: torch.Tensor, inner: int, alphabet, w_bits: int):
    """-> int16 w_int, w's shape (alphabet-set projection)."""
    return _asm_project_into(w, scale, inner, alphabet, w_bits, fake=False)


def asm_fake_quant(w: torch.Tensor, scale: torch.Tensor, inner: int, alphabet, w_bits: int):
    """-> w_hat = dtype(s * w_int), w's dtype and shape."""
    return _asm_project_into(w, scale, inner, alphabet, w_bits, fake=True)


def asm_fake_quant_backward(grad: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, inner: int, alphabet,
                            w_bits: int):
    """-> (grad_w in w's dtype, grad_scale fp32 [C])."""
    from lrkern.reference.asm_quant import gscale

    t = _asm_tables(alphabet, w_bits, w.device)
    grad_w = _alloc.empty(w.shape, w.dtype, w.device)
    grad_scale = _alloc.empty(scale.shape, torch.float32, w.device)
    if w.numel() == 0:
        return grad_w, grad_scale.zero_()
    _ext.cpp().asm_fake_quant_backward_out(grad, w, scale, t.mid, t.delta, t.mag, grad_w, grad_scale, inner, t.n_mid,
                                           w_bits, float(t.r_max), gscale(w.numel(), scale.numel(), t.r_max))
    return grad_w, grad_scale


def asm_decompose(w_int: torch.Tensor, alphabet, w_bits: int):
    """-> (codes uint8 [..., Q], first offending flat index or numel as an int64 0-dim tensor)."""
    t = _asm_tables(alphabet, w_bits, w_int.device)
    codes = _alloc.empty((*w_int.shape, w_bits // 4), torch.uint8, w_int.device)
    first = _ext.cpp().asm_decompose_out(w_int, t.code, codes, w_bits)
    return codes, torch.tensor(first, dtype=torch.int64)


# ------------------------------------------------------------------------------------------ compressed-domain video

def mv_displacement(records: torch.Tensor, H: int, W: int):
    """int32 records [N, 8] (lrkern.data.compressed.MV_FIELDS columns) -> (d float32 [H/4, W/4, 2], valid bool)."""
    d = _alloc.empty((H // 4, W // 4, 2), torch.float32, records.device)
    valid = _alloc.empty((H // 4, W // 4), torch.bool, records.device)
    _ext.cpp().mv_displacement_out(records, d, valid)
    return d, valid


def mv_pool(d: torch.Tensor, valid: torch.Tensor, mask: bool) -> torch.Tensor:
    """-> the MV tensor float32 [2 | 3, H/16, W/16]."""
    out = _alloc.empty((3 if mask else 2, d.shape[0] // 4, d.shape[1] // 4), torch.float32, d.device)
    _ext.cpp().mv_pool_out(d, valid, out)
    return out


def motion_compensate(prev: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """prev uint8 / float32 [H, W, C] -> float32 [H, W, C]."""
    out = _alloc.empty(prev.shape, torch.float32, prev.device)
    _ext.cpp().motion_compensate_out(prev, d, out)
    return out
