"""CKKS evaluation of PAFs with TenSEAL: context, per-level cost, encrypted PAF, encrypted PAF layer.

One context for everything (SmartPAF needs deep circuits and TenSEAL has no bootstrapping):
ring degree N = 32768 (16384 slots), modulus chain [60] + [40]*19 + [60] (880 bits: 128-bit secure
by the HomomorphicEncryption.org table, the default limit SEAL enforces; N = 16384 allows only 438
bits), scale 2^40. The 19 40-bit primes give 19 rescalings: a circuit of multiplicative depth <= 19
runs without bootstrapping.

Evaluation of one odd component sum_i a_i T_(2i+1)(u) of degree 2m+1 (coefficients converted to the
odd Chebyshev basis, because monomial coefficients of high-degree fits reach 1e8 and CKKS noise of
~1e-6 would be amplified by them):

    y = (u + u)^2 - 2              (= 2 T_2(u); one ct x ct product, depth 1)
    T_3 = y * T_1 - T_1,  T_(k+2) = y * T_k - T_(k-2)        (one ct x ct product each)
    out = sum_i a_i * T_(2i+1)     (scalar products)

This is the same work as the official code's power chain (u^2, then u^(2i+1) = u^(2i-1) * u^2):
m+1 ciphertext products, the highest term at depth m+1, +1 for the scalar products. The ReLU form
0.5 u + u * (0.5 sign(u)) folds the 0.5 into the last component and adds one product and one level.

The evaluator is written once against a tiny op interface and run by three backends: TenSEAL
(encrypted), NumPy (float64 twin of the exact same op sequence) and :class:`LevelTracer` (records
every op with the depth of its inputs: the cost model multiplies that trace by the measured
per-level cost of each op). Layout of packed images: slot (b, c, p) = b*C*P + c*P + p.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .paf import odd_to_chebyshev

__all__ = [
    "POLY_DEGREE", "CHAIN", "SCALE_BITS", "MAX_BITS", "security_bits", "make_context", "context_info",
    "NumpyOps", "LevelTracer", "TensealOps", "eval_sign", "eval_relu", "trace_relu", "OpRecord",
    "measure_level_costs", "LevelCosts", "model_latency", "time_relu_paf", "pack_conv_taps",
    "encrypted_conv_relu", "max_depth",
]

POLY_DEGREE = 32768
CHAIN: tuple[int, ...] = (60,) + (40,) * 19 + (60,)
SCALE_BITS = 40

# Largest total coefficient-modulus bit count per ring degree for a security level (classical attacks,
# ternary secret): HomomorphicEncryption.org standard, as tabulated in SEAL (CoeffModulus::MaxBitCount).
MAX_BITS: dict[int, dict[int, int]] = {
    128: {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881},
    192: {1024: 19, 2048: 37, 4096: 75, 8192: 152, 16384: 305, 32768: 611},
    256: {1024: 14, 2048: 29, 4096: 58, 8192: 118, 16384: 237, 32768: 476},
}


def security_bits(poly_degree: int, chain: Sequence[int]) -> int:
    """The highest standard security level (256/192/128) the parameters meet, or 0 if none."""
    total = sum(chain)
    for lam in (256, 192, 128):
        limit = MAX_BITS[lam].get(poly_degree)
        if limit is not None and total <= limit:
            return lam
    return 0


def max_depth(chain: Sequence[int] = CHAIN) -> int:
    """Rescalings available: one per middle prime (the first prime holds the result, the last is special)."""
    return len(chain) - 2


def make_context(poly_degree: int = POLY_DEGREE, chain: Sequence[int] = CHAIN, scale_bits: int = SCALE_BITS):
    """A TenSEAL CKKS context (secret key, public key, relinearisation keys; no Galois keys).

    Raises ValueError if the parameters are below 128-bit security (checked here, and SEAL refuses them too).
    """
    import tenseal as ts

    lam = security_bits(poly_degree, chain)
    if lam < 128:
        raise ValueError(f"CKKS parameters N={poly_degree}, chain of {sum(chain)} bits: below 128-bit security "
                         f"(limit {MAX_BITS[128].get(poly_degree)} bits)")
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=poly_degree, coeff_mod_bit_sizes=list(chain))
    ctx.global_scale = 2.0 ** scale_bits
    return ctx


def context_info(poly_degree: int = POLY_DEGREE, chain: Sequence[int] = CHAIN,
                 scale_bits: int = SCALE_BITS) -> dict:
    return {"poly_degree": poly_degree, "slots": poly_degree // 2, "chain": list(chain),
            "log_q": sum(chain), "scale_bits": scale_bits, "security_bits": security_bits(poly_degree, chain),
            "max_depth": max_depth(chain)}


# ----------------------------------------------------------------------------------------------
# op backends
# ----------------------------------------------------------------------------------------------

class NumpyOps:
    """Float64 twin: the same op sequence on plain arrays."""

    name = "numpy"

    def mul(self, a, b):
        return a * b

    def mul_const(self, a, c):
        return a * c

    def add(self, a, b):
        return a + b

    def sub(self, a, b):
        return a - b

    def add_const(self, a, c):
        return a + c


class TensealOps(NumpyOps):
    """TenSEAL CKKSVector ops (auto relinearise / rescale / modulus-switch, as TenSEAL does by default).

    Note: TenSEAL's automatic modulus switching lowers the level of the shallower operand *in place*;
    values are unchanged, but an input reused after a deeper op sits at the deeper level.

    ``mul_const`` with an array argument is a plaintext-vector product (one encode + product + rescale).
    """

    name = "tenseal"

    def mul_const(self, a, c):
        return a * (c.tolist() if isinstance(c, np.ndarray) else float(c))

    def add_const(self, a, c):
        return a + (c.tolist() if isinstance(c, np.ndarray) else float(c))


@dataclass(frozen=True)
class OpRecord:
    op: str        # "ct_mul" (x relin x rescale), "pt_mul" (plain product x rescale), "add", "add_const"
    depth: int     # depth of the (deeper) input


@dataclass
class LevelTracer:
    """Values are depths (ints); every op is recorded with the depth it ran at."""

    name: str = "trace"
    ops: list[OpRecord] = field(default_factory=list)

    def mul(self, a, b):
        d = max(a, b)
        self.ops.append(OpRecord("ct_mul", d))
        return d + 1

    def mul_const(self, a, c):
        self.ops.append(OpRecord("pt_mul", a))
        return a + 1

    def add(self, a, b):
        d = max(a, b)
        self.ops.append(OpRecord("add", d))
        return d

    sub = add

    def add_const(self, a, c):
        self.ops.append(OpRecord("add_const", a))
        return a

    def count(self, op: str) -> int:
        return sum(1 for r in self.ops if r.op == op)


# ----------------------------------------------------------------------------------------------
# PAF evaluation (generic over the backend)
# ----------------------------------------------------------------------------------------------

def _odd_chebyshev(ops, u, a: np.ndarray):
    """sum_i a[i] * T_(2i+1)(u) by the odd Chebyshev recurrence."""
    terms = [ops.mul_const(u, float(a[0]))]
    if len(a) > 1:
        two_u = ops.add(u, u)
        y = ops.add_const(ops.mul(two_u, two_u), -2.0)          # 2 T_2(u)
        t_prev, t_cur = u, u                                     # T_{-1} = T_1
        for i in range(1, len(a)):
            t_next = ops.sub(ops.mul(y, t_cur), t_prev)          # T_(2i+1)
            t_prev, t_cur = t_cur, t_next
            terms.append(ops.mul_const(t_cur, float(a[i])))
    out = terms[0]
    for t in terms[1:]:
        out = ops.add(out, t)
    return out


def _odd_monomial(ops, u, c: Sequence[float]):
    """sum_i c[i] * u^(2i+1) by the official code's power chain (u^2 once, then u^(2i+1) = u^(2i-1) u^2)."""
    out = ops.mul_const(u, float(c[0]))
    if len(c) > 1:
        u2 = ops.mul(u, u)
        p = u
        for i in range(1, len(c)):
            p = ops.mul(p, u2)
            out = ops.add(out, ops.mul_const(p, float(c[i])))
    return out


def eval_sign(ops, u, components: Sequence[Sequence[float]], *, basis: str = "chebyshev", out_scale: float = 1.0):
    """Composite odd polynomial on u (already scaled into [-1, 1]); ``out_scale`` folds into the last component."""
    if basis not in ("chebyshev", "monomial"):
        raise ValueError(f"basis must be 'chebyshev' or 'monomial', got {basis!r}")
    for k, comp in enumerate(components):
        c = np.asarray(comp, dtype=np.float64) * (out_scale if k == len(components) - 1 else 1.0)
        u = _odd_chebyshev(ops, u, odd_to_chebyshev(c)) if basis == "chebyshev" else _odd_monomial(ops, u, c)
    return u


def eval_relu(ops, u, components: Sequence[Sequence[float]], *, basis: str = "chebyshev"):
    """ReLU(u) ~ 0.5 u + u * (0.5 PAF(u))."""
    half_sign = eval_sign(ops, u, components, basis=basis, out_scale=0.5)
    return ops.add(ops.mul_const(u, 0.5), ops.mul(u, half_sign))


def trace_relu(components: Sequence[Sequence[float]], *, basis: str = "chebyshev",
               start_depth: int = 0) -> LevelTracer:
    tr = LevelTracer()
    out_depth = eval_relu(tr, start_depth, components, basis=basis)
    tr.ops.append(OpRecord("output", out_depth))
    return tr


# ----------------------------------------------------------------------------------------------
# measured per-level costs and the latency model
# ----------------------------------------------------------------------------------------------

COST_OPS = ("ct_mul", "pt_mul", "add", "add_const")


@dataclass
class LevelCosts:
    """Median seconds of each op for inputs at each depth (0 = fresh ciphertext).

    ``seconds``: CPU time of the calling thread (SEAL runs each op there, single-threaded) — what the model
    uses, because it is robust to other processes sharing the cores; on an idle machine it equals the wall
    time, which is kept in ``wall``.
    """

    seconds: dict[str, dict[int, float]]
    extra: dict[str, float] = field(default_factory=dict)   # keygen_s, encrypt_s, decrypt_s (wall)
    wall: dict[str, dict[int, float]] = field(default_factory=dict)

    def cost(self, op: str, depth: int) -> float:
        table = self.seconds[op]
        if depth in table:
            return table[depth]
        ds = sorted(table)
        if depth <= ds[0]:
            return table[ds[0]]
        if depth >= ds[-1]:
            return table[ds[-1]]
        hi = next(d for d in ds if d > depth)
        lo = max(d for d in ds if d < depth)
        w = (depth - lo) / (hi - lo)
        return (1 - w) * table[lo] + w * table[hi]          # linear in depth (cost ~ primes left)

    def records(self) -> list[dict]:
        out = [{"kind": "level_cost", "op": op, "depth": d, "cpu_s": s,
                "median_s": self.wall.get(op, {}).get(d)}
               for op, t in self.seconds.items() for d, s in sorted(t.items())]
        out += [{"kind": "fixed_cost", "op": k, "median_s": v} for k, v in self.extra.items()]
        return out

    @classmethod
    def from_records(cls, records: Sequence[dict]) -> LevelCosts:
        sec: dict[str, dict[int, float]] = {}
        wall: dict[str, dict[int, float]] = {}
        extra = {}
        for r in records:
            if r.get("kind") == "level_cost":
                sec.setdefault(r["op"], {})[int(r["depth"])] = float(r.get("cpu_s") or r["median_s"])
                if r.get("median_s") is not None:
                    wall.setdefault(r["op"], {})[int(r["depth"])] = float(r["median_s"])
            elif r.get("kind") == "fixed_cost":
                extra[r["op"]] = float(r["median_s"])
        return cls(sec, extra, wall)

    def scaled(self, factor: float) -> LevelCosts:
        return LevelCosts({op: {d: s * factor for d, s in t.items()} for op, t in self.seconds.items()},
                          dict(self.extra), self.wall)


def measure_level_costs(ctx, depths: Sequence[int] | None = None, *, ops: Sequence[str] = COST_OPS,
                        repeats: int = 3, warmup: int = 1, seed: int = 0, progress: bool = False) -> LevelCosts:
    """Median time of each op on full (16384-slot) ciphertexts at the given depths.

    A ciphertext is brought to depth d by d plaintext products by 1.0 (each rescales once).
    """
    from mlsys24.bench import measure

    n_max = max_depth(CHAIN)
    depths = list(range(n_max)) if depths is None else sorted(set(depths))
    if depths and (depths[0] < 0 or depths[-1] >= n_max):
        raise ValueError(f"depths must lie in [0, {n_max - 1}]")
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, POLY_DEGREE // 2)
    import tenseal as ts

    a = ts.ckks_vector(ctx, x.tolist())
    b = ts.ckks_vector(ctx, x[::-1].tolist())
    cur = 0
    seconds: dict[str, dict[int, float]] = {op: {} for op in ops}
    wall: dict[str, dict[int, float]] = {op: {} for op in ops}
    plain = (0.5 * x).tolist()
    it = depths
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(depths, leave=False, desc="CKKS per-level cost")
    for d in it:
        while cur < d:
            a, b, cur = a * 1.0, b * 1.0, cur + 1
        fns = {"ct_mul": lambda: a * b, "pt_mul": lambda: a * plain, "add": lambda: a + b,
               "add_const": lambda: a + 0.25}
        for op in ops:
            cpu: list[float] = []

            def timed(f=fns[op], cpu=cpu):
                c0 = time.thread_time()
                f()
                cpu.append(time.thread_time() - c0)

            wall[op][d] = measure(timed, warmup=warmup, repeats=repeats, device="cpu").median_s
            seconds[op][d] = float(np.median(cpu[warmup:]))
    return LevelCosts(seconds, wall=wall)


def model_latency(trace: LevelTracer, costs: LevelCosts) -> float:
    """Seconds predicted for a traced circuit: sum over its ops of the measured (CPU) cost at that depth."""
    return sum(costs.cost(r.op, r.depth) for r in trace.ops if r.op in costs.seconds)


@dataclass
class PafTiming:
    paf: str
    seconds: float               # wall clock, median (mlsys24.bench.measure)
    cpu_seconds: float           # CPU time of the evaluating thread, median (robust to other processes' load)
    max_abs_err: float           # |decrypt(CKKS) - float64 twin|
    max_abs_err_exact: float     # |decrypt(CKKS) - exact PAF ReLU (np.polynomial)|
    depth: int
    ct_mults: int
    n_slots: int


def time_relu_paf(ctx, components: Sequence[Sequence[float]], *, name: str = "", n: int | None = None,
                  seed: int = 0, lo: float = -1.0, hi: float = 1.0, basis: str = "chebyshev",
                  repeats: int = 1) -> PafTiming:
    """Encrypt n values in [lo, hi], time the encrypted ReLU-PAF (median of ``repeats``), check vs float64."""
    import tenseal as ts

    from mlsys24.bench import measure

    from .paf import relu_form_numpy

    n = n or POLY_DEGREE // 2
    x = np.random.default_rng(seed).uniform(lo, hi, n)
    # TenSEAL's auto modulus switching lowers an operand's level in place, so every repeat starts from its
    # own fresh encryption, made here outside the timed region (CKKSVector.copy() is slower than the PAF).
    fresh = iter([ts.ckks_vector(ctx, x.tolist()) for _ in range(repeats)])
    ops = TensealOps()
    box = {}

    cpu: list[float] = []

    def run():
        c0 = time.thread_time()
        box["out"] = eval_relu(ops, next(fresh), components, basis=basis)
        cpu.append(time.thread_time() - c0)

    t = measure(run, warmup=0, repeats=repeats, device="cpu")
    got = np.asarray(box["out"].decrypt())
    twin = eval_relu(NumpyOps(), x, components, basis=basis)
    tr = trace_relu(components, basis=basis)
    return PafTiming(paf=name, seconds=t.median_s, cpu_seconds=float(np.median(cpu)), max_abs_err=float(np.abs(got - twin).max()),
                     max_abs_err_exact=float(np.abs(got - relu_form_numpy(x, components)).max()),
                     depth=tr.ops[-1].depth, ct_mults=tr.count("ct_mul"), n_slots=n)


# ----------------------------------------------------------------------------------------------
# encrypted conv + BN + PAF-ReLU layer on packed images
# ----------------------------------------------------------------------------------------------

def pack_conv_taps(images: np.ndarray, channels: int, kernel: int = 3, padding: int = 1) -> list[np.ndarray]:
    """Client-side im2col: one slot vector per kernel tap, images replicated over output channels.

    images: [B, 1, H, W] -> kernel*kernel vectors of length B*channels*H*W, slot (b, c, p) holding the
    input pixel that tap k of output position p reads (zero padding).
    """
    b, cin, h, w = images.shape
    if cin != 1:
        raise ValueError("pack_conv_taps: single input channel only")
    padded = np.pad(images[:, 0], ((0, 0), (padding, padding), (padding, padding)))
    taps = []
    for ky in range(kernel):
        for kx in range(kernel):
            shifted = padded[:, ky:ky + h, kx:kx + w].reshape(b, 1, h * w)       # [B, 1, P]
            taps.append(np.repeat(shifted, channels, axis=1).reshape(-1))       # [B*C*P]
    return taps


@dataclass
class EncryptedLayerResult:
    output: np.ndarray          # [B, C, H, W], decrypted, in units of the scaled input u
    twin: np.ndarray            # float64 evaluation of the same op sequence on the same inputs
    encrypt_s: float
    linear_s: float
    paf_s: float
    decrypt_s: float
    depth: int


def encrypted_conv_relu(ctx, images: np.ndarray, weight: np.ndarray, bias: np.ndarray,
                        components: Sequence[Sequence[float]], *, basis: str = "chebyshev",
                        slots: int = POLY_DEGREE // 2) -> EncryptedLayerResult:
    """ReLU-PAF(conv3x3(images) * w + b) under CKKS, for a conv with one input channel, padding 1.

    weight: [C, 1, 3, 3], bias: [C] — BN folded in and divided by the static scale s, so the
    ciphertext after the linear part holds u = BN(conv(x)) / s, which the PAF expects in [-1, 1].
    The output slot count B*C*H*W must not exceed the slot count.
    """
    import tenseal as ts

    b, _, h, w = images.shape
    c = weight.shape[0]
    n = b * c * h * w
    if n > slots:
        raise ValueError(f"{n} values do not fit in {slots} slots")
    taps = pack_conv_taps(images, c)
    wflat = weight.reshape(c, -1)                                             # [C, 9]
    tap_weights = [np.broadcast_to(wflat[:, k][None, :, None], (b, c, h * w)).reshape(-1) for k in range(wflat.shape[1])]
    bias_vec = np.broadcast_to(bias[None, :, None], (b, c, h * w)).reshape(-1)

    t0 = time.perf_counter()
    enc = [ts.ckks_vector(ctx, t.tolist()) for t in taps]
    t1 = time.perf_counter()
    ops = TensealOps()

    def linear(ops_, xs):
        acc = ops_.mul_const(xs[0], tap_weights[0])
        for k in range(1, len(xs)):
            acc = ops_.add(acc, ops_.mul_const(xs[k], tap_weights[k]))
        return ops_.add_const(acc, bias_vec)

    u = linear(ops, enc)
    t2 = time.perf_counter()
    out = eval_relu(ops, u, components, basis=basis)
    t3 = time.perf_counter()
    dec = np.asarray(out.decrypt())
    t4 = time.perf_counter()

    np_ops = NumpyOps()
    twin = eval_relu(np_ops, linear(np_ops, taps), components, basis=basis)
    tr = LevelTracer()
    depth = eval_relu(tr, linear(tr, [0] * len(taps)), components, basis=basis)
    return EncryptedLayerResult(output=dec[:n].reshape(b, c, h, w), twin=twin.reshape(b, c, h, w),
                                encrypt_s=t1 - t0, linear_s=t2 - t1, paf_s=t3 - t2, decrypt_s=t4 - t3, depth=depth)
