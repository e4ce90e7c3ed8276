"""Measure CKKS costs on this CPU and write ``data/results/smartpaf/cpu.json``.

    PYTHONPATH=lib python -m mlsys24.privacy.ckks_bench [--repeats 3] [--out DIR]

What it measures (TenSEAL, N = 32768, chain [60]+[40]*19+[60], scale 2^40, 128-bit):
  - context creation (key generation), encryption and decryption of one 16384-slot vector;
  - for every depth 0..18: ciphertext x ciphertext product (+ relinearise + rescale), plaintext product
    (+ rescale), ciphertext addition and plaintext-constant addition — the per-level cost table;
  - the ReLU form of every PAF end to end on 16384 values in [-1, 1], with its error vs the float64 twin,
    next to the latency the per-level model predicts for its traced op sequence.
Each timing is the median of ``--repeats`` runs (mlsys24.bench.measure, perf_counter) and, for the ops and
PAFs, also the median CPU time of the calling thread (SEAL is single-threaded there; robust to other load).
~2-5 min on 2 shared cores.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np


def run(repeats: int = 3, out: Path | None = None, progress: bool = True) -> Path:
    import tenseal as ts

    from mlsys24.bench import measure, save_results

    from .ckks import (
        CHAIN,
        POLY_DEGREE,
        context_info,
        make_context,
        measure_level_costs,
        model_latency,
        time_relu_paf,
        trace_relu,
    )
    from .paf import PAF_FAMILIES, components_of, paf_info

    t0 = time.perf_counter()
    load_start = os.getloadavg()
    box = {}
    keygen = measure(lambda: box.__setitem__("ctx", make_context()), warmup=0, repeats=1, device="cpu")
    ctx = box["ctx"]
    info = context_info()
    assert info["security_bits"] >= 128
    x = np.random.default_rng(0).uniform(-1, 1, POLY_DEGREE // 2).tolist()
    enc_t = measure(lambda: box.__setitem__("v", ts.ckks_vector(ctx, x)), warmup=1, repeats=repeats, device="cpu")
    dec_t = measure(lambda: box["v"].decrypt(), warmup=1, repeats=repeats, device="cpu")

    costs = measure_level_costs(ctx, repeats=repeats, warmup=1, progress=progress)
    costs.extra = {"keygen_s": keygen.median_s, "encrypt_s": enc_t.median_s, "decrypt_s": dec_t.median_s}
    records = [dict(r, **{"repeats": repeats}) for r in costs.records()]

    for paf in PAF_FAMILIES:
        comps = components_of(paf)
        r = time_relu_paf(ctx, comps, name=paf, repeats=repeats)
        pi = paf_info(paf)
        records.append({"kind": "paf_e2e", "paf": paf, "measured_s": r.seconds, "cpu_s": r.cpu_seconds,
                        "modelled_cpu_s": model_latency(trace_relu(comps), costs), "max_abs_err": r.max_abs_err,
                        "max_abs_err_exact": r.max_abs_err_exact, "depth": r.depth, "ct_mults": r.ct_mults,
                        "degree_sum": pi.degree_sum, "composed_degree": pi.composed_degree,
                        "n_slots": r.n_slots, "repeats": repeats})
        if progress:
            print(f"{paf:>7}: {r.seconds:.2f} s measured, depth {r.depth}, err {r.max_abs_err:.1e}", flush=True)

    e2e = {r["paf"]: r["cpu_s"] for r in records if r["kind"] == "paf_e2e"}
    headline = {"name": "CKKS latency (thread CPU time) of one ReLU-PAF, 16384 slots: 27-degree stand-in / f1²∘g1²",
                "ours": e2e["deg27"] / e2e["2f12g1"], "paper": 7.81, "unit": "x",
                "baseline": "paper: 27-degree minimax PAF vs SmartPAF's 14-degree f1²∘g1², ResNet-18 ImageNet"}
    config = {**info, "chain": list(CHAIN), "repeats": repeats, "tenseal": ts.__version__,
              "processor": platform.processor(), "wall_s": time.perf_counter() - t0,
              "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
              "note": "single-threaded SEAL ops; other processes shared the 2 cores (see loadavg)"}
    return save_results("smartpaf", records, headline=headline, config=config, out_dir=out,
                        meta={"command": "PYTHONPATH=lib python -m mlsys24.privacy.ckks_bench"
                                         f" --repeats {repeats}"})


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None, help="directory (default data/results/smartpaf)")
    args = ap.parse_args(argv)
    print(run(args.repeats, args.out))


if __name__ == "__main__":
    main()
