"""Evaluation helpers on a small random model: windowed NLL bookkeeping and generation paths agree."""

import math

import pytest
import torch
import torch.nn.functional as F

from mlsys24.models import ByteTokenizer, complete, generate, sliding_window_nll


def _direct_nll(model, ids):
    with torch.no_grad():
        logits = model(ids[None])[0]
    return F.cross_entropy(logits[:-1], ids[1:], reduction="sum").item()


def test_single_window_equals_direct_loss(model):
    ids = torch.randint(0, 256, (50,), generator=torch.Generator().manual_seed(0))
    r = sliding_window_nll(model, ids, window=64, stride=32)
    assert r["n_tokens"] == 49
    assert math.isclose(r["nll_sum"], _direct_nll(model, ids), rel_tol=1e-5)
    assert math.isclose(r["bpb"], r["loss"] / math.log(2)) and math.isclose(r["ppl"], math.exp(r["loss"]))


@pytest.mark.parametrize("n", [100, 127, 129])
def test_every_byte_scored_once(model, n):
    ids = torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(1))
    for stride in (1, 8, 17, 31):
        r = sliding_window_nll(model, ids, window=32, stride=stride, batch_size=3)
        assert r["n_tokens"] == n - 1
    # stride 31 with window 32: window w > 0 scores its last 31 bytes, each with 1..31 bytes of context;
    # the same sum computed by hand
    with torch.no_grad():
        tot = 0.0
        for s0 in range(0, n, 31):
            w = ids[s0: s0 + 32]
            logp = torch.log_softmax(model(w[None])[0], -1)
            first = 1  # window 0 scores bytes 1.., later windows their last 31 (= bytes 1.. too)
            tot -= logp[first - 1: w.numel() - 1].gather(-1, w[first:, None]).sum().item()
            if s0 + 32 >= n:
                break
    assert math.isclose(sliding_window_nll(model, ids, window=32, stride=31)["nll_sum"], tot, rel_tol=1e-5)
    with pytest.raises(ValueError):
        sliding_window_nll(model, ids, window=32, stride=32)


@pytest.mark.parametrize("kv", ["paged", "none"])
def test_generation_paths_agree(model, kv):
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8], [100] * 13]
    ref = generate(model, prompts, 12, cache="contiguous")
    got = generate(model, prompts, 12, cache=kv, block_size=4)
    assert torch.equal(ref, got)
    for i, p in enumerate(prompts):  # ragged batch == one prompt at a time
        assert torch.equal(generate(model, [p], 12)[0], ref[i])


def test_sampling_is_seeded(model):
    p = [[65, 66, 67]]
    a = generate(model, p, 20, temperature=1.0, top_k=20, seed=3)
    b = generate(model, p, 20, temperature=1.0, top_k=20, seed=3)
    c = generate(model, p, 20, temperature=1.0, top_k=20, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    with torch.no_grad():
        logits = model(torch.tensor(p))[0, -1]
    top1 = generate(model, p, 1, temperature=1.0, top_k=1, seed=5)
    assert int(top1[0, 0]) == int(logits.argmax())
    assert isinstance(complete(model, "abc", 5), str)


def test_eos_padding_and_eval_mode_guard(model):
    free = generate(model, [[1, 2]], 30)
    eos = int(free[0, 3])
    out = generate(model, [[1, 2]], 30, eos_id=eos)
    k = int((free[0] == eos).nonzero()[0])  # first time the greedy run emits it
    assert torch.equal(out[0, : k + 1], free[0, : k + 1]) and torch.all(out[0, k:] == eos)
    model.train()
    with pytest.raises(ValueError, match="eval"):
        sliding_window_nll(model, ByteTokenizer().encode_tensor("hello world"))
