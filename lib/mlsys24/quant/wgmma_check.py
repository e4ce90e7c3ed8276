"""Does Triton overlap a W4A4 group GEMM's per-group fp32 rescale with the next group's INT8 MMAs on Hopper?

``python -m mlsys24.quant.wgmma_check`` compiles two forms of the Atom group loop for sm_90 (no GPU needed:
Triton's compiler and ptxas run on the CPU) and reports, from the PTX, how many ``wgmma`` instructions each
loop body issues and the ``wgmma.wait_group N`` that follow them:

* ``serial``: per group, two INT8 dots into a fresh int32 product, then ``acc += float(product) * scale``
  (the form of :func:`mlsys24.quant.w4a4.w4a4_gemm`);
* ``skewed``: the loop issues group g's dots first and rescales group g-1's product after them, the form in
  which the MMAs of group g could run on the tensor cores while the CUDA cores rescale group g-1.

``wait_group 0`` right after a group's dots means the warps stop until those MMAs finish: no overlap.
Notebook 14 quotes the result for the installed Triton. Run it without ``TRITON_INTERPRET=1`` (the
interpreter replaces parts of ``triton.language`` that the compiler needs); ``--json`` prints the dict.
"""

from __future__ import annotations

import re

import triton
import triton.language as tl

__all__ = ["check", "group_loop_kernel"]


def group_loop_kernel(a_ptr, w_ptr, sa_ptr, sw_ptr, y_ptr, n_groups, kh, stride_s,
                      BM: tl.constexpr, BN: tl.constexpr, HG: tl.constexpr, SKEW: tl.constexpr):
    """[BM, BN] tile of the W4A4 group GEMM over ``n_groups`` groups of 2*HG channels (packed nibbles).
    A plain function, compiled by :func:`check` (never launched): int32 -> fp32 by the exact magic-number
    conversion, as in the real kernel."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    rk = tl.arange(0, HG)
    a_ptrs = a_ptr + rm[:, None] * kh + rk[None, :]
    w_ptrs = w_ptr + rn[None, :] * kh + rk[:, None]
    acc = tl.zeros((BM, BN), tl.float32)
    if SKEW:
        ab = tl.load(a_ptrs)
        wb = tl.load(w_ptrs)
        prev = tl.dot((ab << 4).to(tl.int8), (wb << 4).to(tl.int8), out_dtype=tl.int32)
        prev = tl.dot((ab & -16).to(tl.int8), (wb & -16).to(tl.int8), prev, out_dtype=tl.int32)
        s_prev = tl.load(sa_ptr + rm)[:, None] * tl.load(sw_ptr + rn)[None, :]
        for g in range(1, n_groups):
            ab = tl.load(a_ptrs + g * HG)
            wb = tl.load(w_ptrs + g * HG)
            part = tl.dot((ab << 4).to(tl.int8), (wb << 4).to(tl.int8), out_dtype=tl.int32)
            part = tl.dot((ab & -16).to(tl.int8), (wb & -16).to(tl.int8), part, out_dtype=tl.int32)
            acc += ((prev + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0) * s_prev   # g-1, after g
            s_prev = tl.load(sa_ptr + g * stride_s + rm)[:, None] * tl.load(sw_ptr + g * stride_s + rn)[None, :]
            prev = part
        acc += ((prev + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0) * s_prev
    else:
        for g in range(0, n_groups):
            ab = tl.load(a_ptrs + g * HG)
            wb = tl.load(w_ptrs + g * HG)
            part = tl.dot((ab << 4).to(tl.int8), (wb << 4).to(tl.int8), out_dtype=tl.int32)
            part = tl.dot((ab & -16).to(tl.int8), (wb & -16).to(tl.int8), part, out_dtype=tl.int32)
            s = tl.load(sa_ptr + g * stride_s + rm)[:, None] * tl.load(sw_ptr + g * stride_s + rn)[None, :]
            acc += ((part + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0) * s
    tl.store(y_ptr + rm[:, None] * stride_s + rn[None, :], acc.to(tl.float16))


def _loop_body(ptx: str) -> str:
    """The PTX between the loop's first label (its header) and the loop exit label (``%._crit_edge``)."""
    m = re.search(r"\$L__BB0_\d+:[^\n]*(?:%\.lr\.ph|Loop Header)[^\n]*\n(.*?)\$L__BB0_\d+:\s*//\s*%\._crit_edge",
                  ptx, re.S)
    if m is None:
        raise RuntimeError("loop body not found in the PTX")
    return m.group(1)


def check(block_m: int = 128, block_n: int = 128, num_warps: int = 8, num_stages: int = 3) -> dict:
    """{form: {"wgmma": n, "waits": [N, ...]}} for the loop body of each form, compiled for sm_90."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    fn = JITFunction(group_loop_kernel)      # compiled for the GPU target even under TRITON_INTERPRET=1
    out = {}
    for name, skew in (("serial", False), ("skewed", True)):
        sig = {"a_ptr": "*i8", "w_ptr": "*i8", "sa_ptr": "*fp32", "sw_ptr": "*fp32", "y_ptr": "*fp16",
               "n_groups": "i32", "kh": "i32", "stride_s": "i32", "BM": "constexpr", "BN": "constexpr",
               "HG": "constexpr", "SKEW": "constexpr"}
        src = ASTSource(fn=fn, signature=sig,
                        constexprs={(8,): block_m, (9,): block_n, (10,): 64, (11,): skew})
        ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                             options={"num_warps": num_warps, "num_stages": num_stages}).asm["ptx"]
        body = _loop_body(ptx)
        out[name] = {"wgmma": body.count("wgmma.mma_async"),
                     "waits": [int(w) for w in re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", body)]}
    return out


def _main() -> None:  # pragma: no cover - CLI
    import sys

    if "--json" in sys.argv[1:]:
        import json

        print(json.dumps(check()))
        return
    print(f"triton {triton.__version__}, sm_90, 128x128 tile, 8 warps, 3 stages")
    for name, r in check().items():
        print(f"  {name:7s}: {r['wgmma']} wgmma per group, then wait_group {r['waits']}"
              + ("  -> the warps wait for every group's MMAs: no overlap with the rescale"
                 if r["waits"] and max(r["waits"]) == 0 else ""))


if __name__ == "__main__":  # pragma: no cover
    _main()
