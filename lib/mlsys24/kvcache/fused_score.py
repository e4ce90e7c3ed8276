"""Keyformer's decode step with the score taken from the attention pass itself (Triton).

One decode step of a compacted per-(layer, KV head) cache needs (i) attention of the new query over
the ``W`` kept slots and (ii) for H2O / Keyformer the per-slot score ``f`` over the same logits, added
to the accumulated score, then (iii) the eviction of the lowest-scoring unprotected slot. Running
(ii) as a second pass over K doubles the K traffic; here the logits come out of the attention kernel:

1. ``_attn_split_kernel`` (split-KV, FlashDecoding-style): each program reads its share of K and V
   once, keeps an online softmax, and also stores the logits ``x = q . k * scale`` as float32
   ``[B, H, W]`` (4 bytes per slot and query head, next to the 2 x 2 x d = 512 bytes of fp16 K/V it
   reads); ``_combine_kernel`` merges the splits and writes the base-2 log-sum-exp per row.
2. ``_score_evict_kernel``, one program per (sequence, KV head): H2O's ``f = exp(x - lse)`` (the
   attention probabilities, no second softmax) or Keyformer's ``f = softmax((x + g) / tau)`` with
   Gumbel noise ``g`` drawn in the kernel (Philox, keyed by the step) or read from a tensor, the
   temperature ``tau = tau_init + (t + 1) * dtau`` read from the device step counter (so a captured
   CUDA graph stays valid), the score update in place, and the argmin over the unprotected slots
   (lowest score, ties to the oldest position; window/sink: oldest) in the same sweep. It marks the
   evicted slot empty and writes it to ``free`` (where the next token goes).
3. ``_write_slot_kernel``: the new token's K/V, position and zero score into the ``free`` slot of
   every (sequence, KV head) in one launch (O(1) data movement per step).

Everything is float32 inside; the cache may be fp16/bf16/fp32. References: :func:`attn_logits_ref`,
:func:`score_evict_ref` (plain PyTorch, the policy code in :mod:`.policies`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

import mlsys24.kernels  # noqa: F401  (Triton interpreter fixes on CPU)

from .policies import evict_one, score_probs

__all__ = ["FusedConfig", "CONFIG", "set_config", "attn_logits", "attn_logits_ref", "score_evict",
           "score_evict_ref", "write_slot", "MODES", "NOISES"]

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
MODES = {"oldest": 0, "h2o": 1, "keyformer": 2}
NOISES = {"none": 0, "tensor": 1, "philox": 2}


@dataclass(frozen=True)
class FusedConfig:
    """Launch configuration of the kernels (the GPU benchmark sweeps these and uses the fastest).

    Defaults: the fastest of the benchmark's sweep on an H200 (one layer of Llama-2-7B shape, 8K prompt at
    50 % KV, batch 24; data/results/keyformer/h200.json, records "kernel_sweep" / "kernel_choice")."""

    block_n: int = 16            # slots per inner iteration
    num_warps: int = 2
    num_stages: int = 2
    programs_per_sm: int = 16    # target number of (split, sequence, KV head) programs per SM
    score_block: int = 512       # slots per iteration of the score / evict kernel
    score_warps: int = 4


CONFIG = [FusedConfig()]  # the active configuration (a list so that set_config can replace it)


def set_config(cfg: FusedConfig) -> None:
    CONFIG[0] = cfg


_SMS: dict = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    if device not in _SMS:
        _SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SMS[device]


# --------------------------------------------------------------------------------------------------
# 1. split-KV attention that also writes the logits
# --------------------------------------------------------------------------------------------------

@triton.jit
def _attn_split_kernel(q_ptr, k_ptr, v_ptr, x_ptr, po_ptr, pm_ptr, pl_ptr, w_ptr, W_static, split_len, qk_scale2,
                       stride_qb, stride_qh, stride_kb, stride_kh, stride_kc, stride_vb, stride_vh, stride_vc,
                       stride_xb, stride_xh,
                       KV: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr,
                       BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, DYN_W: tl.constexpr, WRITE_X: tl.constexpr):
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    n_splits = tl.num_programs(0)
    b = pid_bh // KV
    hk = pid_bh % KV
    if DYN_W:
        W = tl.load(w_ptr).to(tl.int32)
    else:
        W = W_static
    start = pid_s * split_len
    end = tl.minimum(start + split_len, W)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    g_ok = offs_g < G
    d_ok = offs_d < D
    q = tl.load(q_ptr + b * stride_qb + (hk * G + offs_g)[:, None] * stride_qh + offs_d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32) * qk_scale2  # base-2 logits
    k_base = k_ptr + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = v_ptr + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    x_base = x_ptr + b.to(tl.int64) * stride_xb + (hk * G + offs_g).to(tl.int64)[:, None] * stride_xh
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < end
        kv_mask = n_ok[:, None] & d_ok[None, :]
        rows = offs_n.to(tl.int64)[:, None]
        k = tl.load(k_base + rows * stride_kc + offs_d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        v = tl.load(v_base + rows * stride_vc + offs_d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2)                       # [BLOCK_G, BLOCK_N]
        s = tl.where(n_ok[None, :], s, float("-inf"))
        if WRITE_X:
            tl.store(x_base + offs_n[None, :], s * 0.6931471805599453, mask=g_ok[:, None] & n_ok[None, :])
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m = m_new
    row = (b * (KV * G) + hk * G + offs_g).to(tl.int64) * n_splits + pid_s
    tl.store(pm_ptr + row, m, mask=g_ok)
    tl.store(pl_ptr + row, l, mask=g_ok)
    tl.store(po_ptr + row[:, None] * D + offs_d[None, :], acc, mask=g_ok[:, None] & d_ok[None, :])


@triton.jit
def _combine_kernel(po_ptr, pm_ptr, pl_ptr, out_ptr, lse_ptr, n_splits, stride_ob, stride_oh,
                    H: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    pid = tl.program_id(0)                       # b * H + h
    b = pid // H
    h = pid % H
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < n_splits
    base = pid.to(tl.int64) * n_splits
    pm = tl.load(pm_ptr + base + offs_s, mask=s_ok, other=float("-inf"))
    pl = tl.load(pl_ptr + base + offs_s, mask=s_ok, other=0.0)
    mx = tl.max(pm, axis=0)
    w = tl.where(s_ok & (pm > float("-inf")), tl.exp2(pm - mx), 0.0)
    L = tl.sum(w * pl, axis=0)
    po = tl.load(po_ptr + (base + offs_s)[:, None] * D + offs_d[None, :], mask=s_ok[:, None] & (offs_d < D)[None, :],
                 other=0.0)
    o = tl.sum(w[:, None] * po, axis=0) / L
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, o.to(out_ptr.dtype.element_ty), mask=offs_d < D)
    tl.store(lse_ptr + pid, mx + tl.log2(L))


def _splits(B: int, KV: int, W: int, cfg: FusedConfig, device) -> tuple[int, int]:
    max_splits = max(1, triton.cdiv(W, cfg.block_n))
    n = triton.cdiv(cfg.programs_per_sm * _num_sms(device), B * KV)
    n = max(1, min(n, max_splits, 128))
    split_len = triton.cdiv(triton.cdiv(W, n), cfg.block_n) * cfg.block_n
    return triton.cdiv(W, split_len), split_len


def attn_logits(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, W: int, scale: float, *,
                w_dev: torch.Tensor | None = None, write_logits: bool = True, cfg: FusedConfig | None = None,
                x_out: torch.Tensor | None = None):
    """Decode attention over the first ``W`` slots of a ``[B, KV, C, D]`` cache (every slot valid).

    q ``[B, H, D]``. ``w_dev``: optional 0-d integer device tensor holding the number of valid slots
    (``<= W``; ``W`` then only sizes the launch), so that a captured graph follows a growing cache.
    Returns ``(out [B, H, D] in q's dtype, x [B, H, W] float32 logits or None, lse2 [B, H] float32,
    the base-2 log-sum-exp of the logits)``.
    """
    cfg = cfg or CONFIG[0]
    B, H, D = q.shape
    KV = k_cache.shape[1]
    G = H // KV
    assert H == KV * G and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1 and q.stride(-1) == 1
    n_splits, split_len = _splits(B, KV, W, cfg, q.device)
    dev = q.device
    po = torch.empty(B * H * n_splits, D, dtype=torch.float32, device=dev)
    pm = torch.empty(B * H * n_splits, dtype=torch.float32, device=dev)
    pl = torch.empty_like(pm)
    x = None
    if write_logits:
        x = x_out if x_out is not None else torch.empty(B, H, W, dtype=torch.float32, device=dev)
    xt = x if x is not None else pm  # (unused pointer when WRITE_X is off)
    wt = w_dev if w_dev is not None else pm
    _attn_split_kernel[(n_splits, B * KV)](
        q, k_cache, v_cache, xt, po, pm, pl, wt, W, split_len, float(scale) * LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        xt.stride(0) if x is not None else 0, xt.stride(1) if x is not None else 0,
        KV=KV, G=G, BLOCK_G=max(1, triton.next_power_of_2(G)), D=D, BLOCK_D=triton.next_power_of_2(D),
        BLOCK_N=cfg.block_n, DYN_W=w_dev is not None, WRITE_X=write_logits,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    out = torch.empty(B, H, D, dtype=q.dtype, device=dev)
    lse = torch.empty(B, H, dtype=torch.float32, device=dev)
    _combine_kernel[(B * H,)](po, pm, pl, out, lse, n_splits, out.stride(0), out.stride(1), H=H, D=D,
                              BLOCK_D=triton.next_power_of_2(D), BLOCK_S=max(2, triton.next_power_of_2(n_splits)),
                              num_warps=4)
    return out, x, lse


def attn_logits_ref(q, k_cache, v_cache, W: int, scale: float):
    """float32 PyTorch reference: (out, logits, base-2 log-sum-exp)."""
    H, KV = q.shape[1], k_cache.shape[1]
    k = k_cache[:, :, :W].float().repeat_interleave(H // KV, dim=1)
    v = v_cache[:, :, :W].float().repeat_interleave(H // KV, dim=1)
    x = torch.einsum("bhd,bhnd->bhn", q.float(), k) * scale
    p = torch.softmax(x, dim=-1)
    return torch.einsum("bhn,bhnd->bhd", p, v), x, torch.logsumexp(x, dim=-1) * LOG2E


# --------------------------------------------------------------------------------------------------
# 2. score update + eviction in one sweep
# --------------------------------------------------------------------------------------------------

@triton.jit
def _z_block(x_base, n_base, offs_g, offs_n, g_ok, n_ok, stride_xh, stride_nh, seed, row0, C, scale2,
             NOISE: tl.constexpr):
    """Base-2 Keyformer logits (x + g) / tau * log2(e) of one block, [BLOCK_G, BLOCK_N]."""
    m2 = g_ok[:, None] & n_ok[None, :]
    x = tl.load(x_base + offs_g[:, None] * stride_xh + offs_n[None, :], mask=m2, other=0.0)
    if NOISE == 1:
        x += tl.load(n_base + offs_g[:, None] * stride_nh + offs_n[None, :], mask=m2, other=0.0)
    if NOISE == 2:
        offs = ((row0 + offs_g)[:, None] * C + offs_n[None, :]).to(tl.int32)
        u = tl.rand(seed, offs)
        u = tl.minimum(tl.maximum(u, 1.1754943508222875e-38), 1.0 - 1e-7)
        x += -tl.log(-tl.log(u))
    z = x * scale2
    return tl.where(n_ok[None, :], z, float("-inf"))


@triton.jit
def _score_evict_kernel(x_ptr, lse_ptr, noise_ptr, score_ptr, pos_ptr, free_ptr, cur_ptr, step_ptr,
                        W, C, seed, tau_init, dtau, w_recent, n_sink,
                        stride_xb, stride_xh, stride_nb, stride_nh, stride_sb, stride_sh, stride_pb, stride_ph,
                        stride_fb, stride_fh,
                        KV: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
                        MODE: tl.constexpr, NOISE: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // KV
    hk = pid % KV
    cur = tl.load(cur_ptr).to(tl.int64)             # absolute position of the newest token
    offs_g = tl.arange(0, BLOCK_G)
    g_ok = offs_g < G
    x_base = x_ptr + b.to(tl.int64) * stride_xb + (hk * G).to(tl.int64) * stride_xh
    n_base = noise_ptr + b.to(tl.int64) * stride_nb + (hk * G).to(tl.int64) * stride_nh
    s_base = score_ptr + b.to(tl.int64) * stride_sb + hk.to(tl.int64) * stride_sh
    p_base = pos_ptr + b.to(tl.int64) * stride_pb + hk.to(tl.int64) * stride_ph
    row0 = pid * G
    seed_t = seed + cur
    scale2 = 1.4426950408889634
    m = tl.zeros([BLOCK_G], tl.float32)
    l = tl.full([BLOCK_G], 1.0, tl.float32)
    if MODE == 2:  # Keyformer: row max / sum of exp((x + g) / tau) first (the noise is regenerated below)
        step = tl.load(step_ptr).to(tl.float32)
        scale2 = 1.4426950408889634 / (tau_init + (step + 1.0) * dtau)
        m = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_G], tl.float32)
        for n0 in range(0, W, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            z = _z_block(x_base, n_base, offs_g, offs_n, g_ok, offs_n < W, stride_xh, stride_nh, seed_t, row0, C,
                         scale2, NOISE)
            m_new = tl.maximum(m, tl.max(z, axis=1))
            l = l * tl.exp2(m - m_new) + tl.sum(tl.exp2(z - m_new[:, None]), axis=1)
            m = m_new
    if MODE == 1:  # H2O: the attention probabilities exp(x - lse)
        m = tl.load(lse_ptr + b * (KV * G) + hk * G + offs_g, mask=g_ok, other=0.0)
    best_s = tl.full([BLOCK_N], float("inf"), tl.float32)
    best_p = tl.full([BLOCK_N], 4611686018427387904, tl.int64)
    best_i = tl.full([BLOCK_N], 4611686018427387904, tl.int64)
    for n0 in range(0, W, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < W
        pos = tl.load(p_base + offs_n, mask=n_ok, other=-1).to(tl.int64)
        s = tl.zeros([BLOCK_N], tl.float32)
        if MODE > 0:
            s = tl.load(s_base + offs_n, mask=n_ok, other=0.0)
            if MODE == 1:
                xb = tl.load(x_base + offs_g[:, None] * stride_xh + offs_n[None, :],
                             mask=g_ok[:, None] & n_ok[None, :], other=float("-inf"))
                f = tl.exp2(xb * 1.4426950408889634 - m[:, None])
            else:
                z = _z_block(x_base, n_base, offs_g, offs_n, g_ok, n_ok, stride_xh, stride_nh, seed_t, row0, C,
                             scale2, NOISE)
                f = tl.exp2(z - m[:, None]) / l[:, None]
            f = tl.where(g_ok[:, None] & n_ok[None, :], f, 0.0)
            s = s + tl.sum(f, axis=0)
            tl.store(s_base + offs_n, s, mask=n_ok)
        cand = n_ok & (pos >= 0) & (pos <= cur - w_recent) & (pos >= n_sink)
        sc = tl.where(cand, s, float("inf"))
        pc = tl.where(cand, pos, 4611686018427387904)
        better = (sc < best_s) | ((sc == best_s) & (pc < best_p))
        best_s = tl.where(better, sc, best_s)
        best_p = tl.where(better, pc, best_p)
        best_i = tl.where(better, offs_n.to(tl.int64), best_i)
    mn = tl.min(best_s, axis=0)
    pmin = tl.min(tl.where(best_s == mn, best_p, 4611686018427387904), axis=0)
    e = tl.min(tl.where((best_s == mn) & (best_p == pmin), best_i, 4611686018427387904), axis=0)
    e = tl.where(e == 4611686018427387904, 0, e)
    tl.debug_barrier()  # the block's score stores above are visible before the evicted slot is reset
    tl.store(p_base + e, -1)
    if MODE > 0:
        tl.store(s_base + e, 0.0)
    tl.store(free_ptr + b * stride_fb + hk * stride_fh, e)


def score_evict(score: torch.Tensor | None, pos: torch.Tensor, free: torch.Tensor, cur_pos: torch.Tensor, W: int, *,
                mode: str, w_recent: int, n_sink: int = 0, x: torch.Tensor | None = None,
                lse2: torch.Tensor | None = None, step: torch.Tensor | None = None, tau_init: float = 1.0,
                dtau: float = 0.0, noise: str | torch.Tensor = "none", seed: int = 0,
                cfg: FusedConfig | None = None) -> None:
    """Accumulate this step's score and evict one slot per (sequence, KV head), in place.

    score/pos ``[B, KV, C]`` (float32 / int64, one layer), free ``[B, KV]`` int64, cur_pos and step 0-d
    device tensors (newest absolute position; decode steps done before this one). mode: "oldest"
    (window/sink), "h2o" (needs ``lse2``) or "keyformer"; x ``[B, H, >= W]`` float32 logits;
    noise (keyformer): "none", "philox" (Gumbel drawn in the kernel, keyed by seed and position) or a
    ``[B, H, W]`` float32 tensor of noise to add."""
    cfg = cfg or CONFIG[0]
    B, KV, C = pos.shape
    MODE = MODES[mode]
    if isinstance(noise, torch.Tensor):
        nz, NOISE = noise, 1
        assert noise.stride(-1) == 1
    else:
        nz, NOISE = None, NOISES[noise]
    if MODE != 2:
        NOISE = 0
    H = x.shape[1] if x is not None else KV
    G = H // KV
    dummy = pos
    xt = x if x is not None else score if score is not None else dummy
    st = score if score is not None else dummy
    nt = nz if nz is not None else xt
    assert pos.stride(-1) == 1 and (score is None or score.stride(-1) == 1)
    _score_evict_kernel[(B * KV,)](
        xt, lse2 if lse2 is not None else xt, nt, st, pos, free, cur_pos, step if step is not None else cur_pos,
        W, C, int(seed), float(tau_init), float(dtau), int(w_recent), int(n_sink),
        xt.stride(0) if x is not None else 0, xt.stride(1) if x is not None else 0,
        nt.stride(0) if nz is not None else 0, nt.stride(1) if nz is not None else 0,
        st.stride(0), st.stride(1), pos.stride(0), pos.stride(1), free.stride(0), free.stride(1),
        KV=KV, G=G, BLOCK_G=max(1, triton.next_power_of_2(G)),
        BLOCK_N=min(cfg.score_block, max(16, triton.next_power_of_2(W))), MODE=MODE, NOISE=NOISE,
        num_warps=cfg.score_warps)


def score_evict_ref(score, pos, cur_pos: int, W: int, *, mode: str, w_recent: int, n_sink: int = 0, x=None,
                    tau: float = 1.0, noise: torch.Tensor | None = None):
    """PyTorch reference of :func:`score_evict` on copies: returns (new score, new pos, evicted slot)."""
    from .policies import KVPolicyConfig

    B, KV, C = pos.shape
    p = pos[..., :W].clone()
    valid = p >= 0
    s = score[..., :W].clone() if score is not None else None
    if mode != "oldest":
        H = x.shape[1]
        G = H // KV
        xs = x[..., :W].float().view(B, KV, G, W)
        if mode == "h2o":
            f = torch.softmax(xs.masked_fill(~valid[:, :, None], float("-inf")), dim=-1)
        else:
            g = noise[..., :W].view(B, KV, G, W) if noise is not None else None
            f = score_probs(xs, valid[:, :, None].expand(-1, -1, G, -1), tau, g)
        s = s + f.sum(2)
    pol = KVPolicyConfig("h2o" if mode != "oldest" else "window")
    e = evict_one(s, p, valid, cur_pos, w_recent, n_sink, pol)
    p.scatter_(-1, e[..., None], -1)
    if s is not None:
        s.scatter_(-1, e[..., None], 0.0)
    return s, p, e


# --------------------------------------------------------------------------------------------------
# 3. write the new token into the free slot
# --------------------------------------------------------------------------------------------------

@triton.jit
def _write_slot_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, pos_ptr, score_ptr, free_ptr, cur_ptr,
                       stride_kb, stride_kh, stride_vb, stride_vh, stride_cb, stride_ch, stride_cc,
                       stride_pb, stride_ph, stride_sb, stride_sh, stride_fb, stride_fh,
                       KV: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, HAS_SCORE: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // KV
    hk = pid % KV
    slot = tl.load(free_ptr + b * stride_fb + hk * stride_fh).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    k = tl.load(k_ptr + b * stride_kb + hk * stride_kh + offs_d, mask=d_ok, other=0.0)
    v = tl.load(v_ptr + b * stride_vb + hk * stride_vh + offs_d, mask=d_ok, other=0.0)
    dst = b.to(tl.int64) * stride_cb + hk.to(tl.int64) * stride_ch + slot * stride_cc + offs_d
    tl.store(kc_ptr + dst, k.to(kc_ptr.dtype.element_ty), mask=d_ok)
    tl.store(vc_ptr + dst, v.to(vc_ptr.dtype.element_ty), mask=d_ok)
    tl.store(pos_ptr + b * stride_pb + hk * stride_ph + slot, tl.load(cur_ptr).to(tl.int64))
    if HAS_SCORE:
        tl.store(score_ptr + b * stride_sb + hk * stride_sh + slot, 0.0)


def write_slot(k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               pos: torch.Tensor, score: torch.Tensor | None, free: torch.Tensor, cur_pos: torch.Tensor) -> None:
    """k_new/v_new ``[B, KV, D]`` into slot ``free[b, h]`` of ``[B, KV, C, D]`` caches; pos = cur_pos,
    score = 0 there."""
    B, KV, D = k_new.shape
    assert k_new.stride(-1) == 1 and v_new.stride(-1) == 1 and k_cache.stride(-1) == 1
    assert k_cache.stride() == v_cache.stride()
    st = score if score is not None else pos
    _write_slot_kernel[(B * KV,)](k_new, v_new, k_cache, v_cache, pos, st, free, cur_pos,
                                  k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
                                  k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                                  pos.stride(0), pos.stride(1), st.stride(0), st.stride(1),
                                  free.stride(0), free.stride(1),
                                  KV=KV, D=D, BLOCK_D=triton.next_power_of_2(D), HAS_SCORE=score is not None,
                                  num_warps=1)
