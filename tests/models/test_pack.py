"""pack_projections: one GEMM over [q; k; v] and [gate; up], same outputs, hooks still honoured."""

import torch

from mlsys24.models import Llama, LlamaConfig, pack_projections, replace_linears


def test_packed_projections_give_the_same_logits():
    cfg = LlamaConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96)
    torch.manual_seed(0)
    m = Llama(cfg).eval()
    x = torch.randint(0, 256, (2, 9))
    want = m(x)
    pack_projections(m)
    attn = m.layers[0].self_attn
    assert attn._packed.shape == (64 + 2 * 32, 64)
    assert attn.q_proj.weight.untyped_storage().data_ptr() == attn._packed.untyped_storage().data_ptr()
    calls = []
    orig = torch.nn.functional.linear

    def spy(inp, w, b=None):
        calls.append(tuple(w.shape))
        return orig(inp, w, b)

    torch.nn.functional.linear = spy
    try:
        got = m(x)
    finally:
        torch.nn.functional.linear = orig
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (128, 64) in calls and (192, 64) in calls, calls  # the packed GEMMs ran
    # a capture hook on q_proj takes the per-projection path (and sees its input)
    with m.capture(inputs=["layers.0.self_attn.q_proj"]) as cap:
        torch.testing.assert_close(m(x), want, atol=1e-5, rtol=1e-5)
    assert len(cap.inputs["layers.0.self_attn.q_proj"]) == 1
    # replaced projections are used as replaced
    def zero_up(name, lin):
        if name.endswith("layers.1.mlp.up_proj"):
            z = torch.nn.Linear(lin.in_features, lin.out_features, bias=False)
            torch.nn.init.zeros_(z.weight)
            return z
        return None

    replace_linears(m, zero_up)
    assert not torch.allclose(m(x), want)
