"""S-LoRA tensor-parallel LoRA on 2 gloo processes equals one process; LoRA traffic is rank-sized."""

import pytest

from mlsys24.slora.tp import run_tp_check


def test_tp_two_gloo_ranks_equal_single_process():
    tokens, r = 5, 8
    res = run_tp_check(2, tokens=tokens, h=64, d=96, r=r, port=29547)
    assert res["exitcodes"] == [0, 0]
    assert max(res["max_abs_err"]) <= 1e-5
    # one column-parallel (all-gather B x r) + one row-parallel (all-reduce B x r) projection
    assert res["lora_elems"] == [2 * tokens * r] * 2
    assert [k for k, _, _ in res["log"]] == ["lora", "lora", "base"]
    assert res["base_elems"] == [tokens * 64] * 2


def test_tp_bench_worker_runs_on_gloo():
    """The NCCL timing's worker, run on 2 CPU processes: exact output, rank-sized LoRA traffic."""
    from mlsys24.slora.tp import run_tp_bench

    recs = run_tp_bench(world=2, h=32, d=48, ranks=(8,), tokens=(1, 3), warmup=1, repeats=2, port=29557,
                        backend="gloo")
    assert [(r["rank"], r["tokens"]) for r in recs] == [(8, 1), (8, 3)]
    for r in recs:
        assert r["rel_err"] < 1e-5
        assert r["lora_elems"] == 2 * r["tokens"] * r["rank"] and r["base_elems"] == r["tokens"] * 32
        assert r["base_tp_us"] > 0 and r["slora_tp_us"] > 0 and r["slora_1gpu_us"] > 0


def test_tp_bench_rejects_bad_arguments():
    from mlsys24.slora.tp import run_tp_bench

    with pytest.raises(ValueError, match="backend"):
        run_tp_bench(backend="mpi")
    with pytest.raises(ValueError, match="world"):
        run_tp_bench(world=1, backend="gloo")
