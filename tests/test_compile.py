import torch

import lrkern


def _pipeline(x):
    # The value path of a 2-bit KV cache: rotate, quantize per token, dequantize, rotate back.
    codes, scale, zero = torch.ops.lrkern.quant_pack(torch.ops.lrkern.hadamard(x), 4, 64, -1)
    return torch.ops.lrkern.hadamard(torch.ops.lrkern.dequant(codes, scale, zero, 4, 64, -1)) * 2.0


def test_ops_compile_fullgraph_on_cpu():
    x = torch.randn(3, 5, 128)
    compiled = torch.compile(_pipeline, fullgraph=True, dynamic=False)
    out = compiled(x)
    assert torch.equal(out, _pipeline(x))
    # The ops trace through their fake implementations: a second shape recompiles rather than failing.
    x2 = torch.randn(2, 64)
    assert torch.equal(compiled(x2), _pipeline(x2))


def test_fake_tensor_shapes_without_running_kernels():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(4, 7, 256)
        codes, scale, zero = lrkern.quant_pack(x, 2, 32, -2 + 1)  # axis -1
        assert codes.shape == (4, 7, 64) and scale.shape == (4, 7, 8) and codes.dtype == torch.uint8
        k = torch.empty(2, 256, 64, dtype=torch.float16)
        codes, scale, zero = lrkern.quant_pack(k, 2, 128, -2)
        assert codes.shape == (2, 256, 16) and scale.shape == (2, 2, 64) and scale.dtype == torch.float16
        assert lrkern.hadamard(x).shape == x.shape


def test_lance_layers_compile_fullgraph_with_backward():
    """The LANCE layer ops trace forward and backward (fake shapes, registered autograd calling the wgrad ops)."""
    lin = torch.nn.Linear(12, 6)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    fl = [None, torch.linalg.qr(torch.randn(5, 2))[0], torch.linalg.qr(torch.randn(12, 3))[0]]
    fc = [None, torch.linalg.qr(torch.randn(3, 2))[0], None, torch.linalg.qr(torch.randn(6, 3))[0]]

    def step(x, xc):
        y = torch.ops.lrkern.lance_linear(x, lin.weight, lin.bias, fl)[0].sum()
        yc = torch.ops.lrkern.lance_conv2d(xc, conv.weight, conv.bias, fc, [1, 1], [1, 1], [1, 1], False)[0].sum()
        return y + yc

    x, xc = torch.randn(4, 5, 12), torch.randn(2, 3, 6, 6)
    step(x, xc).backward()
    ref = (lin.weight.grad.clone(), conv.weight.grad.clone())
    lin.weight.grad = conv.weight.grad = None
    torch.compile(step, fullgraph=True, dynamic=False)(x, xc).backward()
    assert torch.allclose(lin.weight.grad, ref[0], atol=1e-5) and torch.allclose(conv.weight.grad, ref[1], atol=1e-5)
