"""Compressor families and the hook's invariants (single process)."""

import datetime
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist

from mlsys24.compress.compressors import (
    CompressionState,
    FlatBucket,
    PowerSGD,
    Quantizer,
    TopK,
    layerwise_compression_hook,
    orthogonalize,
    pack_bits,
    powersgd_allreduce_ref,
    unpack_bits,
)
from mlsys24.compress.lgreco import LGreCoTuner, LinkModel, error_table, plan, predict_step_s

SHAPES = [(1, 7), (7, 83), (83, 127), (127, 7), (64, 64)]


@pytest.fixture(scope="module")
def world1():
    """A one-process gloo group, so the hook's collectives run in-process."""
    from mlsys24.compress.train import free_port
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                                timeout=datetime.timedelta(seconds=30))
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("c", [1, 2, 3, 7])
def test_orthogonalize(c):
    m = torch.randn(83, c, generator=torch.Generator().manual_seed(c))
    q = orthogonalize(m.clone())
    torch.testing.assert_close(q.t() @ q, torch.eye(c), atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", [(7, 83), (83, 127), (64, 64)])
def test_powersgd_svd_error_is_tail_energy_and_power_cannot_beat_it(shape):
    g = torch.Generator().manual_seed(0)
    m = torch.randn(*shape, generator=g) @ torch.diag(torch.linspace(3, 0.1, shape[1]))   # decaying spectrum
    ranks = [1, 2, 3, 5]
    svd = PowerSGD(error_method="svd").errors(m, ranks)
    u, s, vh = torch.linalg.svd(m.double(), full_matrices=False)
    for r, e in zip(ranks, svd):
        best = (u[:, :r] * s[:r]) @ vh[:r]
        assert e == pytest.approx(float((best - m.double()).norm()), rel=1e-6)
        assert e == pytest.approx(math.sqrt(float((s[r:] ** 2).sum())), rel=1e-6)   # fp32 svdvals
    power = PowerSGD(error_method="power").errors(m, ranks)
    assert np.all(power >= svd * (1 - 1e-5))


def test_powersgd_full_rank_reproduces_the_mean():
    g = torch.Generator().manual_seed(1)
    mats = [torch.randn(7, 83, generator=g) for _ in range(3)]
    q = torch.randn(83, 7, generator=g)
    approx, _ = powersgd_allreduce_ref(mats, q)
    mean = sum(mats) / 3
    assert float((approx - mean).norm() / mean.norm()) < 1e-4


@pytest.mark.parametrize("shape", SHAPES)
def test_topk_errors_match_roundtrip_and_sizes(shape):
    m = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    tk = TopK()
    cands = tk.candidates(shape, 0.05) if shape[0] > 1 else [0.05, 0.5]
    errs = tk.errors(m, cands)
    for c, e in zip(cands, errs):
        assert e == pytest.approx(float((tk.roundtrip(m, c) - m).norm()), rel=1e-5, abs=1e-6)
        assert tk.size(shape, c) == 2 * tk.k_of(shape, c)
    assert np.all(np.diff(errs) <= 1e-9)                   # more entries, less error


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("n", [1, 7, 83, 127])
def test_pack_unpack_roundtrip(bits, n):
    codes = torch.randint(0, 1 << bits, (n,), generator=torch.Generator().manual_seed(n))
    packed = pack_bits(codes, bits)
    assert packed.numel() == math.ceil(n * bits / 8)
    assert torch.equal(unpack_bits(packed, bits, n), codes)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantizer_is_unbiased_and_error_falls_with_bits(bits):
    qz = Quantizer()
    x = torch.randn(83 * 7, generator=torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(4)
    acc = torch.zeros_like(x)
    n = 400
    for _ in range(n):
        codes, scale = qz.quantize(x, bits, gen)
        acc += qz.dequantize(codes, scale, bits, x.numel())
    step = 2 * x.abs().max() / ((1 << bits) - 1)
    assert float((acc / n - x).abs().max()) < 0.25 * float(step)   # 4+ sigma of the averaged rounding noise
    errs = qz.errors(x.view(83, 7), [2, 4, 8])
    assert errs[0] > errs[1] > errs[2]
    assert qz.size((83, 7), bits) == math.ceil(83 * 7 * bits / 32) + math.ceil(83 * 7 / 128)


def test_powersgd_candidates_and_sizes():
    ps = PowerSGD()
    assert ps.candidates((256, 1024), 2) == [1, 2, 3, 4]
    assert ps.candidates((32, 9), 2) == [1, 2, 3, 4]        # 4·41 = 164 < 288
    assert ps.candidates((10, 12), 4) == [2, 3, 4, 5]       # 6·22 = 132 > 120 dropped
    assert ps.size((256, 1024), 3) == 3 * 1280
    assert not ps.compressible((10, 256), 8) and ps.compressible((10, 256), 2)


def _toy_state(compressor, c0, tuner=None, warmup=2):
    torch.manual_seed(0)
    mod = torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.Linear(30, 5))
    return mod, CompressionState(mod, compressor, c0, warmup_iters=warmup, tuner=tuner, seed=0)


def _hook_step(mod, state, grads):
    params = list(mod.parameters())
    bucket = FlatBucket(params, grads)
    layerwise_compression_hook(state, bucket).wait()
    return [v.clone() for v in bucket.gradients()]


@pytest.mark.parametrize("family,c0", [("powersgd", 2), ("topk", 0.05), ("quant", 2)])
def test_error_feedback_invariants(world1, family, c0):
    comp = {"powersgd": PowerSGD(), "topk": TopK(), "quant": Quantizer()}[family]
    mod, state = _toy_state(comp, c0)
    gen = torch.Generator().manual_seed(5)
    shapes = [p.shape for p in mod.parameters()]
    sent_sum = [torch.zeros(s) for s in shapes]
    grad_sum = [torch.zeros(s) for s in shapes]
    for t in range(8):
        grads = [torch.randn(s, generator=gen) for s in shapes]
        ef_before = [s.ef.clone() if s.ef is not None else torch.zeros(s.rows, s.cols) for s in state.layers]
        out = _hook_step(mod, state, grads)
        for i, s in enumerate(state.layers):
            sent_sum[i] += out[i]
            grad_sum[i] += grads[i]
            if t >= 2 and s.compressed:
                # What was sent plus the new residual is exactly what the compressor saw (G + e_old).
                seen = grads[i].view(s.rows, s.cols) + ef_before[i]
                torch.testing.assert_close(out[i].view(s.rows, s.cols) + s.ef, seen, atol=1e-5, rtol=1e-5)
            elif not s.compressed or t < 2:
                torch.testing.assert_close(out[i], grads[i])   # world of one: the mean is the gradient
    for i, s in enumerate(state.layers):
        if s.compressed:   # telescoping: Σ sent = Σ G − e_T
            torch.testing.assert_close(sent_sum[i].view(s.rows, s.cols), grad_sum[i].view(s.rows, s.cols) - s.ef,
                                       atol=1e-4, rtol=1e-4)
    assert [r.phase for r in state.history] == ["warmup"] * 2 + ["compressed"] * 6


def test_hook_bytes_match_compressor_sizes(world1):
    for comp, c0 in [(PowerSGD(), 2), (TopK(), 0.05), (Quantizer(), 4)]:
        mod, state = _toy_state(comp, c0)
        shapes = [p.shape for p in mod.parameters()]
        for _ in range(3):
            _hook_step(mod, state, [torch.randn(s) for s in shapes])
        words = sum(comp.size(s.shape, s.choice) if s.compressed else s.numel for s in state.layers)
        assert state.history[-1].bytes == 4 * words
        assert state.history[0].bytes == 4 * sum(s.numel for s in state.layers)


def test_retune_in_one_process_respects_budget(world1):
    tuner = LGreCoTuner(alpha=1.0, buckets=1000, adjust_freq=3, acc_iters=2)
    mod, state = _toy_state(PowerSGD(error_method="svd"), 2, tuner=tuner, warmup=2)
    gen = torch.Generator().manual_seed(6)
    shapes = [p.shape for p in mod.parameters()]
    low = torch.randn(40, 1, generator=gen) @ torch.randn(1, 1, generator=gen)
    for _ in range(12):
        grads = [torch.randn(s, generator=gen) for s in shapes]
        grads[0] = grads[0] * 0.01 + torch.randn(30, 1, generator=gen) @ low.t()  # layer 0 nearly rank 1
        _hook_step(mod, state, grads)
    assert [e.iteration for e in tuner.events] == [2, 5, 8, 11]
    for e in tuner.events:
        assert e.chosen_error <= e.budget * (1 + 1e-9)
        assert e.chosen_size <= e.uniform_size
    assert state.choices() == tuner.events[-1].choices


def test_error_table_plan_and_step_model():
    g = torch.Generator().manual_seed(7)
    refs = [torch.randn(30, 40, generator=g), torch.randn(5, 30, generator=g)]
    table = error_table(PowerSGD(error_method="svd"), refs, 2)
    sol, values = plan(table, alpha=1.0, buckets=500)
    assert sol.total_error <= table.uniform_error + 1e-9 and sol.total_size <= table.uniform_size
    link = LinkModel.fit_allreduce([1e3, 1e5, 1e6], [1e-4 + 1e3 / 1e9, 1e-4 + 1e5 / 1e9, 1e-4 + 1e6 / 1e9], world=2)
    assert link.bandwidth_Bps == pytest.approx(1e9, rel=1e-6) and link.latency_s == pytest.approx(1e-4, rel=1e-6)
    fast = predict_step_s(0.01, 0.0, 1e6, 0, 2, link, 2)
    slow = predict_step_s(0.01, 0.0, 2e6, 0, 2, link, 2)
    assert slow > fast
