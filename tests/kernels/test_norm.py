"""The fused RMSNorm and RoPE row kernels against the model's PyTorch forms (same rounding)."""

import pytest
import torch

from mlsys24.kernels.norm import rmsnorm, rope
from mlsys24.models import RMSNorm, apply_rope

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}   # two rounding steps of the dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 64), (2, 5, 83), (1, 256), (7, 1)])
def test_rmsnorm_matches_module(dtype, shape):
    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(*shape, generator=g)).to(dtype)
    m = RMSNorm(shape[-1], eps=1e-5)
    with torch.no_grad():
        m.weight.copy_(torch.randn(shape[-1], generator=g))
    m = m.to(dtype)
    with torch.no_grad():
        ref = m(x)                                   # CPU: the PyTorch form
    out = rmsnorm(x, m.weight.detach(), 1e-5)
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])
    with pytest.raises(ValueError, match="weight"):
        rmsnorm(x, m.weight.detach().float() if dtype != torch.float32 else m.weight.detach().half(), 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,T,H,D", [(2, 3, 5, 16), (1, 1, 32, 128), (3, 7, 1, 8)])
def test_rope_matches_apply_rope(dtype, B, T, H, D):
    g = torch.Generator().manual_seed(1)
    ang = torch.rand(B, T, D // 2, generator=g) * 6.0
    cos, sin = ang.cos(), ang.sin()
    qkv = torch.randn(B, T, 3 * H * D, generator=g).to(dtype)
    x = qkv[..., H * D:2 * H * D].view(B, T, H, D)                 # a strided view, as q/k from a split
    assert B * T == 1 or not x.is_contiguous()
    ref = apply_rope(x, cos, sin)                                  # CPU: the PyTorch form
    out = rope(x, cos, sin)
    assert out.dtype == dtype and out.is_contiguous()
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])
    # positions shared by the batch (cos/sin broadcast over B)
    out1 = rope(x, cos[:1], sin[:1])
    torch.testing.assert_close(out1.float(), apply_rope(x, cos[:1].expand(B, T, D // 2), sin[:1].expand(B, T, D // 2)).float(),
                               atol=TOL[dtype], rtol=TOL[dtype])
    with pytest.raises(ValueError, match="power of two"):
        rope(torch.zeros(1, 1, 1, 12, dtype=dtype), cos[:, :, :6], sin[:, :, :6])
