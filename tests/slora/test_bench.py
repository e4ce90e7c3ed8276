"""The S-LoRA bench's per-step LoRA timing, on CPU: MBGMV and padded BMM agree, bytes counted from ranks."""

import torch

from mlsys24.slora import mbgmv as mb
from mlsys24.slora.bench import lora_kernel_timing


def test_lora_kernel_timing_cpu():
    before = mb.MBGMV_PROGRAMS_PER_SM
    ranks = [8, 16, 4, 8]
    recs = lora_kernel_timing(64, 1, ranks, "cpu", torch.float32, graph=False, repeats=1)
    kinds = {(r["kind"], r["method"]): r for r in recs}
    sweep = kinds[("lora_kernel_sweep", "mbgmv")]
    assert sweep["chosen"] == before and all(d < 1e-4 for d in sweep["max_abs_diff_vs_no_split"].values())
    m, b = kinds[("lora_kernel", "mbgmv")], kinds[("lora_kernel", "bmm")]
    assert m["max_abs_diff_vs_other"] < 1e-4 and b["max_abs_diff_vs_other"] < 1e-4
    assert m["weight_bytes_per_layer"] == 8 * 64 * sum(ranks) * 4               # Σ 8·H·r_b, fp32
    assert b["weight_bytes_per_layer"] == 8 * 64 * max(ranks) * len(ranks) * 4  # Σ 8·H·r_max
    assert mb.MBGMV_PROGRAMS_PER_SM == before
