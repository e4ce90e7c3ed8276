"""Runtime predictors (Vidur §4.3): one random forest per operator, fitted on the profile, served
from memoised lookups; and the step-time models the simulator asks ``step_time(shape)``.

Step time of a batch on a replica with ``L`` layers, TP degree ``t`` (Vidur's iteration time)::

    L · [ 2·rms_norm(N) + attn_pre_proj(N) + attn_rope(N) + kv_save(n) + attention(B, T, S)
          + attn_post_proj(N) + 2·add(N) + mlp_up_proj(N) + mlp_act(N) + mlp_down_proj(N)
          + 2·all_reduce(N·d·2 bytes, t) ]  + rms_norm(N) + lm_head(R) + overhead(shape)

with ``N = B·T`` padded tokens, ``n`` valid tokens, ``R`` sampled rows, ``S`` longest K/V length. The
``overhead`` term is Vidur's CPU-overhead model: what the engine spends outside the profiled
kernels (scheduling, batch assembly, block tables, launch gaps), fitted from the engine's own
per-step log as ``measured − Σ predicted ops`` (a linear model per step kind). All-reduce is the
analytic ring model ``α + 2(t−1)/t · bytes / bw`` (not profiled: single-GPU runs only).

Operator-model quality is reported as Vidur's time-weighted error ``Σ|y−ŷ| / Σy`` on held-out
points whose median is at least 50 µs, plus per-point MAPE.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from .profile import TOKEN_OPS

__all__ = ["StepShape", "OperatorModels", "fit_operator_models", "OperatorCost", "AnalyticCost",
           "ConstantCost", "ReplayCost", "synthetic_profile", "fit_overhead", "weighted_error", "compose_step_us"]


@dataclass(frozen=True)
class StepShape:
    """What a step's cost depends on: rows, padded width, K/V lengths, sampled rows."""

    rows: int = 0           # B
    width: int = 0          # T = max new tokens of a row
    max_kv: int = 0         # S = max K/V length after the step
    tokens: int = 0         # valid new tokens
    samples: int = 0        # rows that sample a token this step
    sum_kv: int = 0         # Σ K/V lengths after the step
    decode_rows: int = 0    # rows with one new token
    decode_max_kv: int = 0  # their longest K/V length
    prefill_rows: int = 0   # rows with more than one new token
    prefill_width: int = 0  # their longest chunk
    prefill_max_kv: int = 0

    @property
    def padded_tokens(self) -> int:
        return self.rows * self.width

    @property
    def decode_only(self) -> bool:
        return self.rows > 0 and self.width == 1

    @classmethod
    def from_rows(cls, rows) -> StepShape:
        """``rows``: (sequence, new tokens) pairs *before* the forward."""
        if not rows:
            return cls()
        dec = [s.num_computed + 1 for s, n in rows if n == 1]
        pre = [(n, s.num_computed + n) for s, n in rows if n > 1]
        return cls(rows=len(rows), width=max(n for _, n in rows),
                   max_kv=max(s.num_computed + n for s, n in rows), tokens=sum(n for _, n in rows),
                   samples=sum(1 for s, n in rows if s.num_computed + n >= s.num_tokens),
                   sum_kv=sum(s.num_computed + n for s, n in rows), decode_rows=len(dec),
                   decode_max_kv=max(dec, default=0), prefill_rows=len(pre),
                   prefill_width=max((n for n, _ in pre), default=0), prefill_max_kv=max((k for _, k in pre), default=0))


def weighted_error(y: np.ndarray, yhat: np.ndarray, min_us: float = 50.0) -> float:
    """Σ|y−ŷ| / Σy over points with y >= min_us (nan when none)."""
    m = y >= min_us
    return float(np.abs(y[m] - yhat[m]).sum() / y[m].sum()) if m.any() else float("nan")


def _features(op: str, num_tokens, batch, q_len, kv_len) -> np.ndarray:
    n = np.asarray(num_tokens, dtype=np.float64)
    if op != "attention":
        return n[:, None]
    B, T, S = (np.asarray(a, dtype=np.float64) for a in (batch, q_len, kv_len))
    return np.stack([B, T, S, B * T, B * S, B * T * S], axis=1)


def _fast_forest_predict(rf, X: np.ndarray) -> np.ndarray:
    X32 = np.ascontiguousarray(X, dtype=np.float32)
    return np.mean([est.tree_.predict(X32)[:, 0] for est in rf.estimators_], axis=0)


GRIDS = {
    "fast": {"n_estimators": [32], "max_depth": [16], "min_samples_split": [2]},   # one setting, no CV search
    "ci": {"n_estimators": [50], "max_depth": [8, 16], "min_samples_split": [2]},
    "full": {"n_estimators": [250, 500, 750], "max_depth": [8, 16, 32], "min_samples_split": [2, 5, 10]},
}


@dataclass
class OperatorModels:
    """Fitted forests per op, their held-out errors, and memoised predictions (µs)."""

    models: dict
    errors: dict                      # op -> {"weighted_err", "mape", "n_train", "n_test", "n_test_ge50"}
    max_tokens: dict                  # op -> largest num_tokens profiled (clamp + linear beyond)
    test_points: dict = field(default_factory=dict)  # op -> (y, yhat) held-out arrays
    _tables: dict = field(default_factory=dict)
    _memo: dict = field(default_factory=dict)

    def token_op(self, op: str, n: int) -> float:
        if n <= 0:
            return 0.0
        tab = self._tables.get(op)
        if tab is None:
            top = self.max_tokens[op]
            tab = self._tables[op] = _fast_forest_predict(self.models[op], np.arange(1, top + 1)[:, None])
        top = len(tab)
        return float(tab[n - 1]) if n <= top else float(tab[-1]) * n / top

    def attention(self, B: int, T: int, S: int) -> float:
        if B <= 0:
            return 0.0
        key = (B, T if T == 1 else -(-T // 8) * 8, -(-S // 16) * 16)
        v = self._memo.get(key)
        if v is None:
            v = self._memo[key] = float(_fast_forest_predict(self.models["attention"],
                                                              _features("attention", [key[0] * key[1]], [key[0]],
                                                                        [key[1]], [key[2]]))[0])
        return v


def fit_operator_models(rows: list[dict], *, grid: str | dict = "ci", test_frac: float = 0.25, cv: int = 3,
                        seed: int = 0, n_jobs: int = 1) -> OperatorModels:
    """GridSearchCV(RandomForestRegressor) per op on a random ``1 − test_frac`` of its points (target:
    median µs, scorer: MAPE as in Vidur); errors are measured on the held-out rest."""
    from sklearn.ensemble import RandomForestRegressor
    from sklearn.model_selection import GridSearchCV

    params = GRIDS[grid] if isinstance(grid, str) else grid
    by_op: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_op[r["op"]].append(r)
    rng = np.random.default_rng(seed)
    models, errors, max_tok, tests = {}, {}, {}, {}
    for op, rs in by_op.items():
        X = _features(op, [r["num_tokens"] for r in rs], [r["batch"] for r in rs], [r["q_len"] for r in rs],
                      [r["kv_len"] for r in rs])
        y = np.array([r["median_us"] for r in rs])
        idx = rng.permutation(len(y))
        n_test = max(1, int(round(test_frac * len(y)))) if len(y) >= 8 else 0
        te, tr = idx[:n_test], idx[n_test:]
        if all(len(v) == 1 for v in params.values()):
            rf = RandomForestRegressor(random_state=seed, **{k: v[0] for k, v in params.items()}).fit(X[tr], y[tr])
            best = {k: v[0] for k, v in params.items()}
        else:
            search = GridSearchCV(RandomForestRegressor(random_state=seed), params, cv=min(cv, len(tr)),
                                  scoring="neg_mean_absolute_percentage_error", n_jobs=n_jobs)
            search.fit(X[tr], y[tr])
            rf, best = search.best_estimator_, search.best_params_
        models[op] = rf
        max_tok[op] = int(max(r["num_tokens"] for r in rs))
        if n_test:
            yhat = _fast_forest_predict(rf, X[te])
            tests[op] = (y[te], yhat)
            errors[op] = {"weighted_err": weighted_error(y[te], yhat), "mape": float(np.mean(np.abs(y[te] - yhat) / y[te])),
                          "n_train": len(tr), "n_test": len(te), "n_test_ge50": int((y[te] >= 50).sum()),
                          "best_params": best}
    return OperatorModels(models, errors, max_tok, tests)


# --------------------------------------------------------------------------- step-time models
@dataclass
class Overhead:
    """Linear per-step overhead, one coefficient vector per step kind (decode-only, other)."""

    coef_decode: np.ndarray
    coef_mixed: np.ndarray

    @staticmethod
    def features(shape: StepShape, op_s: float) -> np.ndarray:
        bucket = 1 << max(0, shape.rows - 1).bit_length()  # CUDA-graph batch bucket of a decode step
        return np.array([1.0, shape.rows, shape.padded_tokens, shape.samples, op_s, bucket])

    def __call__(self, shape: StepShape, op_s: float) -> float:
        c = self.coef_decode if shape.decode_only else self.coef_mixed
        return float(self.features(shape, op_s) @ c)


def compose_step_us(ops, shape: StepShape, n_layers: int, padded: bool = True) -> float:
    """Vidur's iteration time (µs) from per-op times: ``ops.token_op(op, n)``, ``ops.attention(B, T, S)``.

    padded=True: this workbench's engine (a right-padded ``[B, T]`` batch: token ops over ``B·T``,
    one attention over ``(B, T, S)``). padded=False: a varlen engine as the paper's systems
    (token ops over the valid tokens; prefill rows and decode rows in separate attention calls)."""
    if shape.rows == 0:
        return 0.0
    o = ops
    if padded:
        N = shape.padded_tokens
        att = o.attention(shape.rows, shape.width, shape.max_kv)
    else:
        N = shape.tokens
        att = (o.attention(shape.prefill_rows, shape.prefill_width, shape.prefill_max_kv)
               + o.attention(shape.decode_rows, 1, shape.decode_max_kv))
    per_layer = (2 * o.token_op("rms_norm", N) + o.token_op("attn_pre_proj", N) + o.token_op("attn_rope", N)
                 + o.token_op("kv_save", shape.tokens) + att
                 + o.token_op("attn_post_proj", N) + 2 * o.token_op("add", N) + o.token_op("mlp_up_proj", N)
                 + o.token_op("mlp_act", N) + o.token_op("mlp_down_proj", N))
    return n_layers * per_layer + o.token_op("rms_norm", N) + o.token_op("lm_head", shape.samples)


@dataclass
class OperatorCost:
    """Vidur's iteration time from operator models (seconds). ``n_layers`` of the full model,
    ``tp`` the tensor-parallel degree the profile was taken at (shard shapes)."""

    ops: OperatorModels
    n_layers: int
    d_model: int
    tp: int = 1
    overhead: Overhead | None = None
    allreduce_alpha_s: float = 20e-6
    allreduce_GBps: float = 200.0
    min_step_s: float = 1e-6
    padded: bool = True               # the workbench engine's padded batch (False: a varlen engine)

    def op_seconds(self, shape: StepShape) -> float:
        t = compose_step_us(self.ops, shape, self.n_layers, self.padded) * 1e-6
        if self.tp > 1 and shape.rows:
            nbytes = (shape.padded_tokens if self.padded else shape.tokens) * self.d_model * 2
            t += 2 * self.n_layers * (self.allreduce_alpha_s + 2 * (self.tp - 1) / self.tp * nbytes / (self.allreduce_GBps * 1e9))
        return t

    def step_time(self, shape: StepShape) -> float:
        t = self.op_seconds(shape)
        if self.overhead is not None:
            t += self.overhead(shape, t)
        return max(t, self.min_step_s)


def fit_overhead(shapes: list[StepShape], measured_s: list[float], cost: OperatorCost, ridge: float = 1e-6) -> Overhead:
    """Ridge least-squares fit of ``measured − Σ ops`` per step kind (the engine's CPU/launch
    overhead) on ``[1, rows, padded tokens, sampled rows, Σ ops]`` — the last feature absorbs a
    systematic in-situ vs isolated-profile ratio (warm caches, overlap, contention)."""
    coefs = []
    for want_decode in (True, False):
        idx = [i for i, s in enumerate(shapes) if s.rows > 0 and s.decode_only == want_decode]
        if len(idx) < 6:
            coefs.append(np.zeros(6))
            continue
        ops = [cost.op_seconds(shapes[i]) for i in idx]
        X = np.stack([Overhead.features(shapes[i], o) for i, o in zip(idx, ops)])
        r = np.array([measured_s[i] - o for i, o in zip(idx, ops)])
        scale = np.maximum(np.abs(X).max(axis=0), 1e-12)
        A = X / scale
        keep = np.ones(len(r), dtype=bool)
        for _ in range(3):  # trim outliers (one-off costs such as CUDA-graph captures), refit
            Ak, rk = A[keep], r[keep]
            c = np.linalg.solve(Ak.T @ Ak + ridge * len(rk) * np.eye(A.shape[1]), Ak.T @ rk)
            dev = np.abs(A @ c - r)
            keep = dev <= 4 * np.median(dev[keep]) + 1e-5
        coefs.append(c / scale)
    return Overhead(coefs[0], coefs[1])


@dataclass(frozen=True)
class AnalyticCost:
    """A known cost function (the synthetic ground truth): token-level ops linear in tokens,
    attention linear in B·T·S (scores) and B·S (K/V reads), lm_head linear in sampled rows,
    composed per layer exactly like :class:`OperatorCost`, plus a per-step and per-row overhead."""

    n_layers: int = 4
    per_token_s: float = 2e-6
    per_attn_s: float = 2e-10       # per (query token × key slot) of the padded batch
    per_kv_s: float = 5e-9          # per key slot read
    per_layer_s: float = 50e-6
    per_step_s: float = 300e-6
    per_row_s: float = 20e-6
    padded: bool = True

    def op_us(self, op: str, num_tokens: int, batch: int = 0, q_len: int = 0, kv_len: int = 0) -> float:
        """The same cost split per operator (µs): what a profiler would measure of it."""
        frac = {"rms_norm": 0.05, "attn_pre_proj": 0.25, "attn_rope": 0.05, "attn_post_proj": 0.1, "add": 0.025,
                "mlp_up_proj": 0.25, "mlp_act": 0.05, "mlp_down_proj": 0.125, "kv_save": 0.05}
        if op == "attention":
            return 1e6 * (self.per_attn_s * batch * q_len * kv_len + self.per_kv_s * batch * kv_len
                          + self.per_layer_s / 2)
        if op == "lm_head":
            return 1e6 * self.per_token_s * 4 * num_tokens
        share = frac[op] / (2 * frac["rms_norm"] + 2 * frac["add"] + sum(v for k, v in frac.items()
                                                                          if k not in ("rms_norm", "add")))
        return 1e6 * share * (self.per_token_s * num_tokens + self.per_layer_s / 2)

    def token_op(self, op: str, n: int) -> float:
        return self.op_us(op, n) if n > 0 else 0.0

    def attention(self, B: int, T: int, S: int) -> float:
        return self.op_us("attention", B * T, B, T, S) if B > 0 else 0.0

    def op_seconds(self, shape: StepShape) -> float:
        return compose_step_us(self, shape, self.n_layers, self.padded) * 1e-6

    def step_time(self, shape: StepShape) -> float:
        if shape.rows == 0:
            return 1e-6
        return self.op_seconds(shape) + self.per_step_s + self.per_row_s * shape.rows


def synthetic_profile(cost: AnalyticCost, grid, noise: float = 0.03, seed: int = 0) -> list[dict]:
    """Profile rows a profiler would write for ``cost`` on ``grid`` (a ProfileGrid), with
    multiplicative Gaussian noise of relative std ``noise``."""
    rng = np.random.default_rng(seed)
    out = []

    def add(op, n=0, B=0, T=0, S=0):
        t = cost.op_us(op, n, B, T, S) * (1 + noise * rng.standard_normal())
        out.append({"op": op, "num_tokens": n, "batch": B, "q_len": T, "kv_len": S, "median_us": t,
                    "p10_us": t, "p90_us": t})

    for n in grid.num_tokens:
        for op in TOKEN_OPS:
            add(op, n)
    for B in grid.decode_batch:
        for S in grid.decode_kv:
            add("attention", B, B, 1, S)
    for B in grid.prefill_batch:
        for T in grid.prefill_q:
            for P in grid.prefill_prefix:
                add("attention", B * T, B, T, T + P)
    for R in grid.lm_rows:
        add("lm_head", R, R)
    return out


@dataclass(frozen=True)
class ConstantCost:
    """Every non-empty step takes ``seconds`` (deterministic service: queueing-theory checks)."""

    seconds: float

    def step_time(self, shape: StepShape) -> float:
        return self.seconds if shape.rows else 1e-9


class ReplayCost:
    """Replays a list of step durations in order (drives the simulator with the engine's clock)."""

    def __init__(self, durations: list[float]):
        self.durations = list(durations)
        self.i = 0

    def step_time(self, shape: StepShape) -> float:
        d = self.durations[self.i] if self.i < len(self.durations) else self.durations[-1]
        self.i += 1
        return d


