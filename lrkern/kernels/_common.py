"""Small ``@triton.jit`` helpers shared by the kernel modules."""
import triton
import triton.language as tl


@triton.jit
def to_f32(v):
    """Exact widening to fp32; bf16 is widened with integer ops (its 16 bits become the top half of the fp32 word).

    This is what the GPU's own conversion does, spelled out because Triton's interpreter mis-converts bf16
    subnormals, and the codes must not differ between the interpreter and the GPU.
    """
    if v.dtype == tl.bfloat16:
        return (v.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return v.to(tl.float32)


@triton.jit
def cast_rne(v, dtype: tl.constexpr):
    """fp32 -> dtype with round-to-nearest-even; bf16 is rounded with integer ops.

    Triton's interpreter truncates fp32 -> bf16 while the GPU rounds to nearest even. Codes must be bit-identical
    across backends, and they are computed from the bf16-rounded scale, so the rounding is spelled out: add
    0x7FFF plus the lowest kept bit, keep the top 16 bits (finite inputs; behaviour on NaN is unspecified).
    """
    if dtype == tl.bfloat16:
        u = v.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        return u.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(dtype)
