"""Model invariants: GQA, RoPE relativity, backends, probes/capture, linear replacement."""

import pytest
import torch
from torch import nn

from mlsys24.models import (
    AttentionCall,
    Llama,
    LlamaConfig,
    apply_rope,
    named_linears,
    register_attention_backend,
    replace_linears,
)
from mlsys24.models.llama import rope_inv_freq

from ._util import small_model

ATOL = 2e-5


def test_tiny_llama_shape_and_parameter_count():
    cfg = LlamaConfig()
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.head_dim_, cfg.n_kv_heads, cfg.ffn_dim, cfg.vocab_size,
            cfg.max_seq_len) == (256, 4, 4, 64, 4, 768, 256, 512)
    assert Llama(cfg).num_parameters == cfg.n_params() == 3_541_248
    assert set(n.split(".")[-1] for n in named_linears(Llama(cfg))) == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_gqa_equals_mha_with_repeated_kv_heads():
    gqa = small_model(n_kv_heads=2)
    mha = small_model(n_kv_heads=4)
    sd = gqa.state_dict()
    hd, group = 16, 2
    for k, v in list(sd.items()):
        if k.endswith(("k_proj.weight", "v_proj.weight")):
            sd[k] = v.view(2, hd, -1).repeat_interleave(group, dim=0).reshape(4 * hd, -1)
    mha.load_state_dict(sd)
    x = torch.randint(0, 256, (2, 29))
    with torch.no_grad():
        assert torch.allclose(gqa(x), mha(x), atol=ATOL)


def test_rope_relative_property():
    """<R(p) q, R(p') k> depends only on p - p'."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 3, 64, generator=g), torch.randn(1, 1, 3, 64, generator=g)
    inv = rope_inv_freq(64, 10000.0)

    def rot(x, p):
        ang = torch.tensor([[float(p)]])[..., None] * inv
        return apply_rope(x, ang.cos(), ang.sin())

    s = [(rot(q, p + 5) * rot(k, p)).sum(-1) for p in (0, 17, 300)]
    assert torch.allclose(s[0], s[1], atol=1e-4) and torch.allclose(s[0], s[2], atol=1e-4)
    assert not torch.allclose((rot(q, 5) * rot(k, 0)).sum(-1), (rot(q, 6) * rot(k, 0)).sum(-1), atol=1e-3)


def test_position_offset_leaves_logits_unchanged(model):
    """Shifting every position id by a constant keeps all relative positions: same logits,
    and the same attention logits; a gap between positions changes them."""
    x = torch.randint(0, 256, (2, 21))
    pos = torch.arange(21)[None].repeat(2, 1)
    with torch.no_grad(), model.capture(outputs=["*.attn_logits"]) as cap:
        a = model(x, position_ids=pos)
        b = model(x, position_ids=pos + 1000)
        c = model(x, position_ids=torch.where(pos < 10, pos, pos + 50))
    assert torch.allclose(a, b, atol=2e-4)
    la, lb, _ = cap.outputs["layers.0.self_attn.attn_logits"]
    keep = la > -1e30
    assert torch.allclose(la[keep], lb[keep], atol=2e-4)
    assert not torch.allclose(a[:, 10:], c[:, 10:], atol=1e-3)
    assert torch.allclose(a[:, :10], c[:, :10], atol=ATOL)  # causal: earlier tokens unaffected


def test_eager_and_sdpa_agree_and_probs_are_causal(model):
    x = torch.randint(0, 256, (2, 17))
    with torch.no_grad():
        ref = model(x)
        with model.capture(outputs=["*.attn_probs"], inputs=["*_proj"]) as cap:
            got = model(x)  # observing probs switches the layer to the eager path
    assert torch.allclose(ref, got, atol=ATOL)
    p = cap.outputs["layers.1.self_attn.attn_probs"][0]
    assert p.shape == (2, 4, 17, 17)
    assert torch.allclose(p.sum(-1), torch.ones(2, 4, 17), atol=1e-5)
    assert p.triu(1).abs().max() == 0
    assert cap.inputs["layers.0.mlp.down_proj"][0].shape == (2, 17, 96)
    assert len(cap.inputs) == 14  # 7 linears x 2 layers
    assert not model.layers[0].self_attn.attn_probs.observed  # hooks removed on exit


def test_probe_hook_rewrites_tensor(model):
    """A forward hook returning a tensor replaces it: here K (pre-RoPE) of layer 0 is zeroed."""
    x = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        ref = model(x)
        h = model.layers[0].self_attn.k_raw.register_forward_hook(lambda m, i, o: torch.zeros_like(o))
        out = model(x)
        h.remove()
        again = model(x)
    assert not torch.allclose(ref, out, atol=1e-3)
    assert torch.equal(ref, again)


def test_user_attention_mask(model):
    x = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        ref = model(x)
        ones = model(x, attention_mask=torch.ones(1, 1, 10, 10, dtype=torch.bool))
        zero_bias = model(x, attention_mask=torch.zeros(1, 1, 10, 10))
        m = torch.ones(1, 1, 10, 10, dtype=torch.bool)
        m[..., 3] = False  # nobody may attend to slot 3 (except itself is masked too)
        m[..., 3, 3] = True
        masked = model(x, attention_mask=m)
    assert torch.allclose(ones, ref, atol=ATOL) and torch.allclose(zero_bias, ref, atol=ATOL)
    assert torch.allclose(masked[:, :4], ref[:, :4], atol=ATOL)
    assert not torch.allclose(masked[:, 4:], ref[:, 4:], atol=1e-4)


def test_replace_linears_and_norm_permutation(model):
    x = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        ref = model(x)

    class Wrapped(nn.Module):
        def __init__(self, lin):
            super().__init__()
            self.lin = lin
            self.calls = 0

        def forward(self, t):
            self.calls += 1
            return self.lin(t)

    done = replace_linears(model, lambda name, lin: Wrapped(lin), names=["*.q_proj", "*.down_proj"])
    assert done == ["layers.0.self_attn.q_proj", "layers.0.mlp.down_proj", "layers.1.self_attn.q_proj",
                    "layers.1.mlp.down_proj"]
    with torch.no_grad():
        assert torch.equal(model(x), ref)
    assert model.layers[1].mlp.down_proj.calls == 1

    # permute the channels of a norm's output and the input columns of its consumers: same function
    blk = model.layers[0]
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    blk.post_attention_layernorm.set_output_permutation(perm)
    with torch.no_grad():
        for lin in (blk.mlp.gate_proj, blk.mlp.up_proj):
            lin.weight.copy_(lin.weight[:, perm])
        assert torch.allclose(model(x), ref, atol=ATOL)


def test_custom_attention_backend_is_used(model):
    seen = []

    def backend(call: AttentionCall):
        seen.append((call.layer, call.cache is not None))
        from mlsys24.models.attention import eager_attention

        return eager_attention(call)

    register_attention_backend("test-recording", backend)
    model.set_attention_backend("test-recording")
    cache = model.new_cache("paged", n_blocks=4, block_size=16)
    cache.new_batch(1)
    with torch.no_grad():
        model(torch.zeros(1, 5, dtype=torch.long), kv_cache=cache)
    assert seen == [(0, True), (1, True)]
    with pytest.raises(ValueError):
        model.set_attention_backend("no-such-backend")


def test_dropout_only_in_training():
    m = small_model(dropout=0.3)
    x = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        assert torch.equal(m(x), m(x))
        m.train()
        assert not torch.allclose(m(x), m(x))


def test_random_llama_from_preset_is_seeded():
    from mlsys24.models import preset, random_llama

    cfg = preset("llama2-70b", d_model=64, n_layers=1, n_heads=8, n_kv_heads=2, ffn_dim=96, vocab_size=300)
    a, b = random_llama(cfg, seed=3), random_llama(cfg, seed=3)
    x = torch.randint(0, 300, (1, 6))
    with torch.no_grad():
        assert torch.equal(a(x), b(x)) and torch.isfinite(a(x)).all()
    assert a.cfg.n_kv_heads == 2 and a.layers[0].self_attn.rotary.inv_freq.shape == (4,)
    with pytest.raises(ValueError):
        preset("no-such-model")
