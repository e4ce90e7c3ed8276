"""S-LoRA tensor-parallel LoRA on 2 gloo processes equals one process; LoRA traffic is rank-sized."""

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
