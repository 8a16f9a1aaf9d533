"""Shared comparison helpers and the one tolerance table of the suite."""
import torch

# Scale-free error ratio rms(ref - out) / rms(ref), one bound per output dtype. The bounds sit a few ulps above what
# fp32 accumulation in a different order costs in each dtype (fp16 ulp 2^-11, bf16 ulp 2^-8, both before rounding).
TOLERANCE = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]


def err_ratio(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref64 = ref.detach().to(torch.float64).cpu()
    diff = out.detach().to(torch.float64).cpu() - ref64
    denom = ref64.pow(2).mean().sqrt().item()
    num = diff.pow(2).mean().sqrt().item()
    if denom == 0.0:
        return num
    return num / denom


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    dtype = dtype or out.dtype
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert out.dtype == ref.dtype, f"dtype {out.dtype} != {ref.dtype}"
    assert not torch.isnan(out).any(), "NaN in output (unwritten memory is poisoned with NaN)"
    r = err_ratio(out, ref)
    assert r <= TOLERANCE[dtype], f"error ratio {r:.3g} > {TOLERANCE[dtype]:.3g} for {dtype}"


class SurrogateSpike(torch.autograd.Function):
    """Heaviside with a surrogate derivative: an independent statement of the spiking neurons (SpikingJelly's
    LIFNode order) for autograd, against which the hand-derived LIF and STM backward references are checked."""

    @staticmethod
    def forward(ctx, z, kind, alpha):
        ctx.save_for_backward(z)
        ctx.kind, ctx.alpha = kind, alpha
        return (z >= 0).to(z.dtype)

    @staticmethod
    def backward(ctx, g):
        from lrkern.reference.lif import surrogate

        (z,) = ctx.saved_tensors
        return g * surrogate(z, ctx.kind, ctx.alpha), None, None
