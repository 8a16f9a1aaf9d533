"""Code paths of the Triton launchers that default shapes don't reach: the two-pass Hadamard for n > max_fused_n
and the chunked loops for groups longer than one register tile. Forced here at small sizes."""
import pytest
import torch

from lrkern.reference import dequant as ref_dequant
from lrkern.reference import hadamard as ref_hadamard
from lrkern.reference import quant_pack as ref_quant_pack
from tests.helpers import DTYPE_IDS, DTYPES, assert_close


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("rows,n,max_fused", [(5, 256, 16), (3, 64, 8), (1, 32, 16)],
                         ids=["n256-f16", "n64-f8", "n32-f16"])
def test_hadamard_two_pass(kdevice, rows, n, max_fused, dtype):
    from lrkern.kernels.hadamard import hadamard

    x = torch.randn(rows, n, device=kdevice).to(dtype)
    assert_close(hadamard(x, max_fused_n=max_fused), ref_hadamard(x))


def test_hadamard_refuses_three_passes(kdevice):
    from lrkern.kernels.hadamard import hadamard

    with pytest.raises(ValueError, match="more than two passes"):
        hadamard(torch.randn(1, 256, device=kdevice), max_fused_n=8)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("shape,group_size,axis", [((3, 96), 96, -1), ((2, 256), 128, -1), ((40, 8), 40, -2),
                                                   ((2, 64, 16), 32, -2)], ids=["g96", "g128", "tok40", "tok32"])
def test_quant_chunked_groups(kdevice, monkeypatch, shape, group_size, axis, bits):
    import lrkern.kernels.quant as kq

    monkeypatch.setattr(kq, "MAX_TILE", 16)  # groups span several chunks
    x = (torch.randn(shape, device=kdevice) * 3 + 1).to(torch.float16)
    codes, scale, zero = kq.quant_pack(x, bits, group_size, axis)
    want = ref_quant_pack(x, bits, group_size, axis)
    assert torch.equal(codes, want[0]) and torch.equal(scale, want[1]) and torch.equal(zero, want[2])
    assert_close(kq.dequant(codes, scale, zero, bits, group_size, axis), ref_dequant(*want, bits, group_size, axis))
