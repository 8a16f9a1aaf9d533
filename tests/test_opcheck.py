"""torch.library.opcheck on every registered op, for every backend: schema, fake tensor, autograd registration and
AOT dispatch."""
import pytest
import torch

import lrkern


def _cases(device):
    x = torch.randn(6, 64, device=device)
    xs = torch.randn(2, 8, 32, device=device, dtype=torch.float16)
    codes, scale, zero = lrkern.reference.quant_pack(x, 4, 16, -1)
    codes2, scale2, zero2 = lrkern.reference.quant_pack(xs, 2, 4, -2)
    return [
        ("hadamard", (x,)),
        ("hadamard", (torch.randn(3, 128, device=device, requires_grad=True),)),
        ("quant_pack", (x, 4, 16, -1)),
        ("quant_pack", (xs, 2, 4, -2)),
        ("dequant", (codes, scale, zero, 4, 16, -1)),
        ("dequant", (codes2, scale2.requires_grad_(True), zero2.requires_grad_(True), 2, 4, -2)),
    ]


@pytest.mark.parametrize("case", range(6))
def test_opcheck(backend, device, case):
    name, args = _cases(device)[case]
    torch.library.opcheck(getattr(torch.ops.lrkern, name).default, args)
