"""The served decode step of the Atom benchmark (mlsys24.quant.atom_bench), wired with the reference ops
on CPU: Atom's layer (packed W4A4 weights with folded channel permutations, 4-bit KV cache) must track
the FP layer on the same weights, and the check must catch a wrong permutation. Memory accounting of
the equal-memory batches is checked by hand."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)

import mlsys24.quant.w4a4 as W  # noqa: E402
from mlsys24.quant import atom_bench as AB  # noqa: E402


@pytest.fixture
def ref_ops(monkeypatch):
    """Kernels replaced by their references (the kernels have their own tests)."""
    monkeypatch.setattr(W, "quantize_act_w4a4", W.quantize_act_w4a4_ref)
    monkeypatch.setattr(W, "w4a4_gemm", lambda qa, sa, qa8, sa8, qw, sw, qw8, sw8, G, out_dtype=torch.float32,
                        config=None: W.w4a4_gemm_ref(qa, sa, qa8, sa8, qw, sw, qw8, sw8, G, out_dtype))
    monkeypatch.setattr(W, "decode_attention_kv4", lambda q, k4, kd, kz, v4, vd, vz, lens, out_dtype=torch.float32,
                        **kw: W.decode_attention_kv4_ref(q.float(), k4, kd, kz, v4, vd, vz, lens).to(out_dtype))


def _layer_update_rel_err(atom_layers, fp_layers, dm, g):
    B = 2
    x0 = torch.randn(B, dm.d, generator=g)
    c16 = AB._fp16_cache(dm, B, "cpu", g, torch.float32)
    c4 = []
    for kc, vc in c16:      # the FP cache holds the 4-bit-rounded values: both layers see the same K/V
        packs = [W.pack_kv4(kc.transpose(1, 2)), W.pack_kv4(vc.transpose(1, 2))]
        for (p4, pd, pz), dst in zip(packs, (kc, vc)):
            pi = p4.to(torch.int32)
            qv = torch.stack([pi & 0xF, pi >> 4], -1).reshape(*p4.shape[:-1], -1).float()
            dst.copy_(((qv - pz[..., None]) * pd[..., None]).transpose(1, 2))
        c4.append([*packs[0], *packs[1]])
    cs = torch.arange(dm.cap).float()[:, None] / (10000.0 ** (torch.arange(0, dm.D, 2).float() / dm.D))[None, :]
    lens = torch.full((B,), dm.cap // 2, dtype=torch.int32)
    y16 = AB._fp16_step_fn(fp_layers, c16, dm, B, x0, lens.clone(), cs.cos(), cs.sin(), "sdpa")()
    cfg = dict.fromkeys(("qkv", "o", "gu", "d"))
    y4 = AB._atom_step_fn(atom_layers, c4, dm, B, x0, lens.clone(), cs.cos(), cs.sin(), cfg,
                          ("split", 16, 4, False, False))()
    return float(((y4 - x0) - (y16 - x0)).norm() / (y16 - x0).norm())


def test_atom_layer_tracks_fp_layer_and_check_catches_a_wrong_permutation(ref_ops):
    dm = AB._Dims(False)
    g = torch.Generator().manual_seed(0)
    fp = AB._fp16_layers(dm, "cpu", g, torch.float32)
    atom = [AB._atom_layer(w, dm, g) for w in fp]
    ok = _layer_update_rel_err(atom, fp, dm, torch.Generator().manual_seed(1))
    bad = [dict(atom[0], io=torch.randperm(dm.d, generator=g).int())]          # o_proj input gathered wrongly
    wrong = _layer_update_rel_err(bad, fp, dm, torch.Generator().manual_seed(1))
    assert ok < 0.3, f"Atom layer update deviates {ok:.3f} from the FP layer's (4-bit quantization alone)"
    assert wrong > 3 * ok, f"a wrong permutation ({wrong:.3f}) is not told apart from the right one ({ok:.3f})"


def test_equal_memory_accounting_by_hand():
    dm = AB._Dims(True)                       # 4 Llama-7B-shaped layers
    assert AB._kv_slot_bytes(dm, False) == 4 * 2 * 32 * 1024 * 128 * 2
    assert AB._kv_slot_bytes(dm, True) == 4 * 2 * 32 * 1024 * (64 + 2 + 2)
    budget = AB.SERVE_GPU_GB * 1e9 * dm.L / 32
    w16 = 4 * ((3 + 1) * 4096 * 4096 + 3 * 4096 * 11008) * 2 + 4 * 2 * 4096 * 2
    assert int((budget - w16) // AB._kv_slot_bytes(dm, False)) == 20
