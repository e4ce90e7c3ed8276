"""1.5D distributed matrix sampling on ``torch.distributed`` (gloo on CPU, NCCL on GPU), with every
byte that goes through a collective counted.

Process grid (CAGNET's ``dist_spgemm15D``): p processes, replication factor c, ``c^2 | p``.
Grid rank ``r = i c + j``: ``i in [0, p/c)`` is the block-row id, ``j in [0, c)`` the replica id.
A is split into p/c block rows ``A_t``; process (i, j) stores ``A_i`` and ``Q_i`` (the frontier
rows of the minibatches owned by block row i). With Q_i's columns cut at A's block boundaries,
``Q_i A = sum_t Q_{i,t} A_t``. Replica j handles the stages ``t`` in its contiguous share of
``range(p/c)`` (p/c^2 stages): ``A_t`` is broadcast by its owner (t, j) inside *replica group*
j = {(·, j)}; each process multiplies ``Q_{i,t} A_t`` locally (ESC SpGEMM) and accumulates. A
sparse all-reduce inside *row group* i = {(i, ·)} (all-gather of padded (rows, cols, values),
then a sum) gives every replica the full ``P_i``.

Per process: the broadcasts move ~nnz(A)/c nonzeros (exactly: the mean over processes of the A
nonzeros handled in their stages is nnz(A)/c), the reduction ~(c-1) nnz(P_i): a larger c trades
A traffic for reduction traffic. The *sparsity-aware* variant (``dist_saspgemm15D``) replaces the
broadcast of ``A_t`` by point-to-point requests: a requester sends the ids of the rows of ``A_t``
it needs (the nonzero columns of ``Q_{i,t}``) and receives only those rows.

Features are partitioned like A's block rows and replicated c times; :func:`fetch_features`
gets the rows a process needs with ``all_to_all_single`` inside its replica group.

Byte accounting (:class:`CommLog`): for every collective the payload each process sends and
receives *logically* (broadcast: the root sends the payload to each of the g-1 others, each
receives it once; all-gather: g-1 chunks each way; all-reduce of a header: g-1 copies each way;
point-to-point: the message). :func:`expected_comm_15d` derives the same numbers from the
matrices alone, single-process.

Message layouts: ``A_t`` is sent as ``[nnz]`` (int64 header), then ``indptr ++ indices`` (int64)
and the values (the matrix's dtype; omitted for 0/1 matrices). Partial products are exchanged as
``[2, M]`` int64 (rows, cols; rows = -1 in the padding) and ``[M]`` values.
"""

from __future__ import annotations

import datetime
import io
import os
import socket
import traceback
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .samplers import (
    LadiesSample,
    SageSample,
    _squared,
    ladies_extract,
    ladies_frontier_q,
    ladies_rows_q,
    ladies_select,
    sage_expand,
    sage_frontier_q,
)
from .sparse import COO, CSR, coalesce, esc_spgemm, segment_offsets

__all__ = ["CommLog", "Grid15D", "block_bounds", "dist_spgemm_15d", "dist_sage_sample", "dist_ladies_sample",
           "fetch_features", "expected_comm_15d", "spawn", "experiment_worker", "payload_bytes"]

_I64 = 8


# ------------------------------------------------------------------------------------------ bookkeeping
@dataclass
class CommLog:
    """Bytes sent / received per (phase, collective) by this process, plus work counters."""

    events: list[tuple[str, str, int, int]] = field(default_factory=list)   # (phase, op, sent, recv)
    counters: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def add(self, phase: str, op: str, sent: int, recv: int) -> None:
        self.events.append((phase, op, int(sent), int(recv)))

    def total(self, what: str = "recv", *, phase: str | None = None, op: str | None = None) -> int:
        col = 2 if what == "sent" else 3
        return sum(e[col] for e in self.events
                   if (phase is None or e[0].startswith(phase)) and (op is None or e[1] == op))

    def by_op(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for _, op, s, r in self.events:
            d = out.setdefault(op, {"sent": 0, "recv": 0})
            d["sent"] += s
            d["recv"] += r
        return out

    def as_dict(self) -> dict:
        return {"events": list(self.events), "counters": dict(self.counters), "by_op": self.by_op()}


def _log(log: CommLog | None, phase: str, op: str, sent: int, recv: int) -> None:
    if log is not None:
        log.add(phase, op, sent, recv)


def block_bounds(n: int, nb: int) -> list[int]:
    """Boundaries of ``nb`` near-equal contiguous blocks of ``range(n)``."""
    return [t * n // nb for t in range(nb + 1)]


def _value_bytes(a: CSR) -> int:
    return 0 if a.values is None else a.values.element_size()


def payload_bytes(n_rows: int, nnz: int, value_bytes: int) -> int:
    """Bytes of one broadcast block row: header + indptr + indices + values."""
    return _I64 + _I64 * (n_rows + 1) + nnz * (_I64 + value_bytes)


class Grid15D:
    """The 1.5D process grid over global ranks ``ranks`` (ascending) with replication ``c``.

    Collective: every process of the default group must construct it, in the same order, since
    it creates the row and replica groups. Processes outside ``ranks`` get ``rank = None``.
    """

    def __init__(self, ranks, c: int, n: int):
        ranks = list(ranks)
        p = len(ranks)
        if ranks != sorted(ranks):
            raise ValueError("Grid15D: ranks must be ascending")
        if c < 1 or p % (c * c):
            raise ValueError(f"Grid15D: the replication factor c={c} needs c^2 | p (p={p})")
        self.ranks, self.p, self.c, self.nb, self.n = ranks, p, c, p // c, n
        me = dist.get_rank()
        self.rank = ranks.index(me) if me in ranks else None
        self.row_groups = [dist.new_group([ranks[i * c + j] for j in range(c)]) for i in range(self.nb)]
        self.col_groups = [dist.new_group([ranks[i * c + j] for i in range(self.nb)]) for j in range(c)]
        self.bounds = block_bounds(n, self.nb)

    @property
    def i(self) -> int:
        return self.rank // self.c

    @property
    def j(self) -> int:
        return self.rank % self.c

    def stages(self, j: int | None = None) -> range:
        """Block rows whose product stage replica ``j`` computes (p/c^2 of them)."""
        j = self.j if j is None else j
        per = self.nb // self.c
        return range(j * per, (j + 1) * per)

    def global_rank(self, i: int, j: int) -> int:
        return self.ranks[i * self.c + j]

    def block(self, a: CSR, t: int | None = None) -> CSR:
        """Block row ``t`` (default: this process's) of a global CSR."""
        t = self.i if t is None else t
        return a.row_block(self.bounds[t], self.bounds[t + 1])


# ------------------------------------------------------------------------------------ 1.5D SpGEMM
def _bcast_block(a_local: CSR, t: int, grid: Grid15D, log, phase: str) -> CSR:
    """Replica-group broadcast of A_t from its owner (t, j)."""
    g = grid.nb
    owner = grid.global_rank(t, grid.j)
    group = grid.col_groups[grid.j]
    me = grid.i == t
    dev = a_local.device
    n_t = grid.bounds[t + 1] - grid.bounds[t]
    has_vals = a_local.values is not None
    hdr = torch.tensor([a_local.nnz if me else 0], dtype=torch.int64, device=dev)
    dist.broadcast(hdr, src=owner, group=group)
    nnz = int(hdr)
    ints = (torch.cat([a_local.indptr, a_local.indices]) if me
            else torch.empty(n_t + 1 + nnz, dtype=torch.int64, device=dev))
    dist.broadcast(ints, src=owner, group=group)
    vals = None
    if has_vals:
        vals = a_local.values if me else torch.empty(nnz, dtype=a_local.values.dtype, device=dev)
        dist.broadcast(vals, src=owner, group=group)
    size = payload_bytes(n_t, nnz, a_local.values.element_size() if has_vals else 0)
    _log(log, phase, "broadcast", (g - 1) * size if me else 0, 0 if me else size)
    return CSR(ints[: n_t + 1], ints[n_t + 1:], a_local.n_cols, vals)


def _request_rows(q_cols: torch.Tensor, a_local: CSR, t: int, grid: Grid15D, log, phase: str):
    """Sparsity-aware stage t: members send the row ids they need to the owner (t, j), which answers
    with those rows only. Returns ``(row_ids, CSR of those rows)`` for this process."""
    dev = a_local.device
    lo = grid.bounds[t]
    vdtype = a_local.values.dtype if a_local.values is not None else None
    vb = _value_bytes(a_local)
    owner = grid.global_rank(t, grid.j)
    if grid.i != t:                                                    # requester
        ids = torch.unique(q_cols) - lo
        hdr = torch.tensor([ids.numel()], dtype=torch.int64, device=dev)
        dist.send(hdr, dst=owner)
        u = ids.numel()
        sent = _I64 + _I64 * u
        recv = 0
        if u == 0:
            _log(log, phase, "p2p", sent, recv)
            return ids, CSR(torch.zeros(1, dtype=torch.int64, device=dev), ids, a_local.n_cols,
                            None if vdtype is None else torch.empty(0, dtype=vdtype, device=dev))
        dist.send(ids, dst=owner)
        deg = torch.empty(u, dtype=torch.int64, device=dev)
        dist.recv(deg, src=owner)
        nnz = int(deg.sum())
        idx = torch.empty(nnz, dtype=torch.int64, device=dev)
        vals = None if vdtype is None else torch.empty(nnz, dtype=vdtype, device=dev)
        if nnz:
            dist.recv(idx, src=owner)
            if vals is not None:
                dist.recv(vals, src=owner)
        recv = _I64 * u + nnz * (_I64 + vb)
        _log(log, phase, "p2p", sent, recv)
        return ids, CSR(segment_offsets(deg), idx, a_local.n_cols, vals)
    # owner: serve every other member of the replica group, in grid order
    sent = recv = 0
    for m in range(grid.nb):
        if m == t:
            continue
        peer = grid.global_rank(m, grid.j)
        hdr = torch.empty(1, dtype=torch.int64, device=dev)
        dist.recv(hdr, src=peer)
        u = int(hdr)
        recv += _I64
        if u == 0:
            continue
        ids = torch.empty(u, dtype=torch.int64, device=dev)
        dist.recv(ids, src=peer)
        recv += _I64 * u
        start = a_local.indptr[ids]
        deg = a_local.indptr[ids + 1] - start
        owner_of = torch.repeat_interleave(torch.arange(u, device=dev), deg)
        pos = torch.arange(owner_of.numel(), device=dev) - segment_offsets(deg)[owner_of] + start[owner_of]
        dist.send(deg, dst=peer)
        nnz = pos.numel()
        if nnz:
            dist.send(a_local.indices[pos].contiguous(), dst=peer)
            if vdtype is not None:
                dist.send(a_local.values[pos].contiguous(), dst=peer)
        sent += _I64 * u + nnz * (_I64 + vb)
    _log(log, phase, "p2p", sent, recv)
    return None, None


def _sparse_allreduce(p: COO, grid: Grid15D, log, phase: str) -> COO:
    """Sum the partial products of the c replicas of row group i (padded all-gather, then coalesce)."""
    c = grid.c
    if c == 1:
        return p
    group = grid.row_groups[grid.i]
    dev = p.rows.device
    m = torch.tensor([p.nnz], dtype=torch.int64, device=dev)
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    _log(log, phase, "all_reduce", (c - 1) * _I64, (c - 1) * _I64)
    M = int(m)
    ints = torch.full((2, M), -1, dtype=torch.int64, device=dev)
    ints[0, : p.nnz] = p.rows
    ints[1, : p.nnz] = p.cols
    vals = torch.zeros(M, dtype=p.values.dtype, device=dev)
    vals[: p.nnz] = p.values
    all_ints = [torch.empty_like(ints) for _ in range(c)]
    all_vals = [torch.empty_like(vals) for _ in range(c)]
    dist.all_gather(all_ints, ints, group=group)
    dist.all_gather(all_vals, vals, group=group)
    chunk = M * (2 * _I64 + vals.element_size())
    _log(log, phase, "all_gather", (c - 1) * chunk, (c - 1) * chunk)
    ints = torch.cat(all_ints, 1)
    vals = torch.cat(all_vals)
    keep = ints[0] >= 0
    return coalesce(ints[0, keep], ints[1, keep], vals[keep], p.shape)


def dist_spgemm_15d(q: COO, a_local: CSR, grid: Grid15D, log: CommLog | None = None, *, phase: str = "spgemm",
                    sparsity_aware: bool = False, value_dtype=None) -> COO:
    """``P_i = Q_i A`` on the 1.5D grid. ``q``: this process's rows (global column ids);
    ``a_local``: block row ``A_i`` (local row ids, global column ids). Returns the coalesced P_i,
    identical on the c replicas of row group i."""
    dtype = value_dtype or q.values.dtype
    parts_r, parts_c, parts_v = [], [], []
    for t in grid.stages():
        lo, hi = grid.bounds[t], grid.bounds[t + 1]
        in_t = (q.cols >= lo) & (q.cols < hi)
        q_t = COO(q.rows[in_t], q.cols[in_t], q.values[in_t], q.shape)
        if grid.nb == 1:
            a_t = a_local
        elif not sparsity_aware:
            a_t = _bcast_block(a_local, t, grid, log, phase)                 # the owner sends, the others receive
        elif t == grid.i:
            _request_rows(q_t.cols, a_local, t, grid, log, phase)            # the owner serves the requests
            a_t = a_local
        else:
            ids, rows_csr = _request_rows(q_t.cols, a_local, t, grid, log, phase)
            if log is not None:
                log.counters["a_nnz_handled"] += rows_csr.nnz
            compact = COO(q_t.rows, torch.searchsorted(ids, q_t.cols - lo), q_t.values, q_t.shape)
            prod = esc_spgemm(compact, rows_csr, value_dtype=dtype)
            a_t = None
        if a_t is not None:
            if log is not None:
                log.counters["a_nnz_handled"] += a_t.nnz
            prod = esc_spgemm(q_t, a_t, value_dtype=dtype, col_offset=lo)
        parts_r.append(prod.rows)
        parts_c.append(prod.cols)
        parts_v.append(prod.values)
    if parts_r:
        partial = coalesce(torch.cat(parts_r), torch.cat(parts_c), torch.cat(parts_v), (q.shape[0], a_local.n_cols))
    else:
        e = torch.empty(0, dtype=torch.int64, device=q.rows.device)
        partial = COO(e, e.clone(), torch.empty(0, dtype=dtype, device=q.rows.device), (q.shape[0], a_local.n_cols))
    return _sparse_allreduce(partial, grid, log, phase)


# ---------------------------------------------------------------------------------- distributed samplers
def _mb_range(grid: Grid15D, k_total: int) -> tuple[int, int]:
    """Minibatches owned by this process's block row: a contiguous share of ``range(k_total)``."""
    b = block_bounds(k_total, grid.nb)
    return b[grid.i], b[grid.i + 1]


def dist_sage_sample(grid: Grid15D, a_local: CSR, seeds: torch.Tensor, fanouts, *, seed: int = 0,
                     first_batch: int = 0, log: CommLog | None = None, sparsity_aware: bool = False) -> SageSample:
    """Bulk GraphSAGE for this block row's minibatches ``seeds [k_i, b]`` with P = Q A on the grid.
    Same seed and ``first_batch`` as the single-process call -> the same sample."""
    fr = seeds
    frontiers = [fr]
    for layer, s in enumerate(fanouts):
        p = dist_spgemm_15d(sage_frontier_q(fr, grid.n), a_local, grid, log, phase=f"sage-L{layer}",
                            sparsity_aware=sparsity_aware, value_dtype=torch.float32).to_csr()
        fr = sage_expand(fr, p.indptr[:-1], p.degrees(), p.indices, s, seed=seed, layer=layer,
                         first_batch=first_batch)
        frontiers.append(fr)
    return SageSample(frontiers, tuple(fanouts), first_batch)


def dist_ladies_sample(grid: Grid15D, ahat_local: CSR, seeds: torch.Tensor, sizes, *, seed: int = 0,
                       first_batch: int = 0, log: CommLog | None = None, sparsity_aware: bool = False) -> LadiesSample:
    """Bulk LADIES for this block row's minibatches: P = Q (Â∘Â) and the row extraction Q_R Â on the grid."""
    sq_local = _squared(ahat_local)
    out = LadiesSample([seeds])
    cur = seeds
    for layer, s in enumerate(sizes):
        p = dist_spgemm_15d(ladies_frontier_q(cur, grid.n), sq_local, grid, log, phase=f"ladies-P{layer}",
                            sparsity_aware=sparsity_aware, value_dtype=torch.float64)
        nxt, probs = ladies_select(p, s, seed=seed, layer=layer, first_batch=first_batch)
        r = dist_spgemm_15d(ladies_rows_q(cur, grid.n), ahat_local, grid, log, phase=f"ladies-R{layer}",
                            sparsity_aware=sparsity_aware, value_dtype=torch.float64)
        out.adjs.append(ladies_extract(r, cur, nxt, probs, s))
        out.nodes.append(nxt)
        out.probs.append(probs)
        cur = nxt
    return out


def fetch_features(grid: Grid15D, x_local: torch.Tensor, ids: torch.Tensor, log: CommLog | None = None, *,
                   phase: str = "features") -> torch.Tensor:
    """Rows ``ids`` of the feature matrix (block-row partitioned, replicated c times) with
    ``all_to_all_single`` inside this process's replica group: ids out, rows back."""
    nb = grid.nb
    dev = x_local.device
    d = x_local.shape[1]
    if nb == 1:
        return x_local[ids]
    bounds = torch.tensor(grid.bounds, device=dev)
    dest = torch.searchsorted(bounds[1:], ids, right=True)                 # block owning each id
    order = torch.argsort(dest, stable=True)
    send_ids = ids[order]
    send_counts = torch.bincount(dest, minlength=nb)
    recv_counts = torch.empty_like(send_counts)
    group = grid.col_groups[grid.j]
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    sc, rc = send_counts.tolist(), recv_counts.tolist()
    recv_ids = torch.empty(sum(rc), dtype=torch.int64, device=dev)
    dist.all_to_all_single(recv_ids, send_ids, rc, sc, group=group)
    rows = x_local[recv_ids - grid.bounds[grid.i]]
    got = torch.empty(len(ids), d, dtype=x_local.dtype, device=dev)
    dist.all_to_all_single(got, rows.contiguous(), sc, rc, group=group)
    me = grid.i
    el = x_local.element_size()
    _log(log, phase, "all_to_all", (nb - 1) * _I64 + _I64 * (sum(sc) - sc[me]) + d * el * (sum(rc) - rc[me]),
         (nb - 1) * _I64 + _I64 * (sum(rc) - rc[me]) + d * el * (sum(sc) - sc[me]))
    out = torch.empty_like(got)
    out[order] = got
    return out


# ----------------------------------------------------------------------------------------- the formula
def expected_comm_15d(q_blocks: list[COO], a: CSR, p: int, c: int, *, sparsity_aware: bool = False,
                      value_dtype=torch.float32) -> list[dict]:
    """Per grid rank, the bytes :func:`dist_spgemm_15d` sends and receives and the A nonzeros it
    handles, computed single-process from ``q_blocks[i]`` (Q_i, global columns) and the global A."""
    nb = p // c
    bounds = block_bounds(a.n_rows, nb)
    vb = _value_bytes(a)
    pb = torch.empty(0, dtype=value_dtype).element_size()
    blocks = [a.row_block(bounds[t], bounds[t + 1]) for t in range(nb)]
    per = nb // c

    def q_t(i, t):
        q = q_blocks[i]
        m = (q.cols >= bounds[t]) & (q.cols < bounds[t + 1])
        return COO(q.rows[m], q.cols[m], q.values[m], q.shape)

    def uniq_sel(i, t):
        ids = torch.unique(q_t(i, t).cols) - bounds[t]
        deg = blocks[t].indptr[ids + 1] - blocks[t].indptr[ids]
        return ids.numel(), int(deg.sum())

    partial_nnz = {}
    for i in range(nb):
        for j in range(c):
            parts = [esc_spgemm(q_t(i, t), blocks[t], value_dtype=value_dtype, col_offset=bounds[t])
                     for t in range(j * per, (j + 1) * per)]
            rows = torch.cat([x.rows for x in parts])
            cols = torch.cat([x.cols for x in parts])
            partial_nnz[i, j] = torch.unique(rows * a.n_cols + cols).numel()
    out = []
    for r in range(p):
        i, j = divmod(r, c)
        sent = recv = handled = 0
        for t in range(j * per, (j + 1) * per):
            if nb == 1:
                handled += blocks[t].nnz
                continue
            if not sparsity_aware:
                handled += blocks[t].nnz
                size = payload_bytes(bounds[t + 1] - bounds[t], blocks[t].nnz, vb)
                if t == i:
                    sent += (nb - 1) * size
                else:
                    recv += size
                continue
            if t == i:
                handled += blocks[t].nnz
                for m in range(nb):
                    if m == t:
                        continue
                    u, sel = uniq_sel(m, t)
                    recv += _I64 + _I64 * u
                    if u:
                        sent += _I64 * u + sel * (_I64 + vb)
            else:
                u, sel = uniq_sel(i, t)
                handled += sel
                sent += _I64 + _I64 * u
                if u:
                    recv += _I64 * u + sel * (_I64 + vb)
        red = 0
        if c > 1:
            M = max(partial_nnz[i, jj] for jj in range(c))
            red = (c - 1) * _I64 + (c - 1) * M * (2 * _I64 + pb)
        out.append({"rank": r, "i": i, "j": j, "spgemm_sent": sent, "spgemm_recv": recv,
                    "reduce_sent": red, "reduce_recv": red, "a_nnz_handled": handled})
    return out


# ----------------------------------------------------------------------------------------- process spawn
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world_size, backend, port, fn, args, queue):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=float(os.environ.get("MLSYS24_DIST_TIMEOUT", "300"))))
        result = fn(rank, world_size, *args)
        buf = io.BytesIO()
        torch.save(result, buf)
        queue.put((rank, True, buf.getvalue()))
    except BaseException:  # report every failure to the parent, with its traceback
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(fn, world_size: int, *args, backend: str = "gloo", timeout_s: float = 600.0) -> list:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` fresh processes (``torch.multiprocessing``,
    spawn context) with ``torch.distributed`` initialised; returns the per-rank results.
    ``fn`` must be importable (defined at module level)."""
    import queue as _queue

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(r, world_size, backend, port, fn, args, q), daemon=False)
             for r in range(world_size)]
    for pr in procs:
        pr.start()
    results: dict[int, object] = {}
    errors = []
    try:
        for _ in range(world_size):
            rank, ok, payload = q.get(timeout=timeout_s)
            if ok:
                results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            else:
                errors.append(f"rank {rank}:\n{payload}")
                break
    except _queue.Empty:
        errors.append(f"timed out after {timeout_s} s")
    finally:
        for pr in procs:
            pr.join(timeout=5 if errors else timeout_s)
            if pr.is_alive():
                pr.terminate()
                pr.join()
    if errors:
        raise RuntimeError("distributed run failed: " + "\n".join(errors))
    return [results[r] for r in range(world_size)]


# ---------------------------------------------------------------------------------------- the experiment
def _coo_cpu(p: COO) -> dict:
    return {"rows": p.rows.cpu(), "cols": p.cols.cpu(), "values": p.values.cpu(), "shape": p.shape}


def experiment_worker(rank: int, world_size: int, cfg: dict) -> dict:
    """One process of the distributed experiment (run it with :func:`spawn`).

    cfg: ``graph ("rmat" | "sbm"), scale, edge_factor, graph_seed, batch_size, n_batches, fanouts, ladies_sizes, seed,
    grids [(p, c), ...], sparsity_aware [bool, ...], samplers ["sage", "ladies"], feat_dim,
    time_repeats (0 = no timing), device, return_samples (default True)``. Every process builds the same seeded graph and keeps
    its block row. Returns, per run, this process's samples, its first-layer P_i, the comm log,
    a feature-fetch check and (optionally) the median time of one bulk sampling call.
    """
    from ..bench import measure
    from .generators import rmat, sbm
    from .samplers import ladies_normalize, make_minibatches

    dev = torch.device(cfg.get("device", "cpu"))
    if dev.type == "cuda":
        dev = torch.device("cuda", torch.cuda.current_device())
    if cfg.get("graph", "rmat") == "rmat":
        graph = rmat(cfg["scale"], cfg["edge_factor"], seed=cfg["graph_seed"], device=dev)
    else:                                   # the notebook's SBM variant: 8 blocks
        graph = sbm(8, max(2, (1 << cfg["scale"]) // 8), 0.02, 0.001, seed=cfg["graph_seed"], device=dev).graph
    n = graph.n_rows
    ahat = ladies_normalize(graph) if "ladies" in cfg.get("samplers", ("sage",)) else None
    batches = make_minibatches(torch.arange(n, device=dev), cfg["batch_size"], seed=cfg["seed"])[: cfg["n_batches"]]
    gx = torch.Generator(device=dev).manual_seed(cfg["seed"] + 1)
    x = torch.randn(n, cfg.get("feat_dim", 8), generator=gx, device=dev)
    grids = [Grid15D(list(range(p)), c, n) for p, c in cfg["grids"]]        # collective: all ranks, same order
    keep = cfg.get("return_samples", True)
    runs = []
    for (p, c), grid in zip(cfg["grids"], grids):
        dist.barrier()
        if grid.rank is None:
            continue
        a_local = grid.block(graph)
        lo, hi = _mb_range(grid, batches.shape[0])
        seeds = batches[lo:hi]
        for sampler in cfg.get("samplers", ("sage",)):
            for sa in cfg.get("sparsity_aware", (False,)):
                log = CommLog()
                rec = {"p": p, "c": c, "rank": grid.rank, "i": grid.i, "j": grid.j, "sampler": sampler,
                       "sparsity_aware": sa, "first_batch": lo, "n_local": hi - lo}
                if sampler == "sage":
                    q0 = sage_frontier_q(seeds, n)
                    p0 = dist_spgemm_15d(q0, a_local, grid, log, phase="P0", sparsity_aware=sa)
                    if keep:
                        rec["P0"] = _coo_cpu(p0)
                    rec["P0_log"] = log.as_dict()
                    log = CommLog()
                    s = dist_sage_sample(grid, a_local, seeds, cfg["fanouts"], seed=cfg["seed"], first_batch=lo,
                                         log=log, sparsity_aware=sa)
                    if keep:
                        rec["frontiers"] = [f.cpu() for f in s.frontiers]

                    def call(a_local=a_local, seeds=seeds, lo=lo, grid=grid, sa=sa):
                        return dist_sage_sample(grid, a_local, seeds, cfg["fanouts"], seed=cfg["seed"],
                                                first_batch=lo, sparsity_aware=sa)
                    # feature fetch: replica j fetches the inputs of its share of the block row's minibatches
                    final = s.frontiers[-1][grid.j::grid.c].reshape(-1)
                    ids = torch.unique(final[final >= 0])
                    flog = CommLog()
                    feats = fetch_features(grid, x[grid.bounds[grid.i]:grid.bounds[grid.i + 1]], ids, flog)
                    rec["features_ok"] = bool(torch.equal(feats, x[ids]))
                    rec["features_log"] = flog.as_dict()
                    rec["n_feature_ids"] = ids.numel()
                else:
                    ah_local = grid.block(ahat)
                    s = dist_ladies_sample(grid, ah_local, seeds, cfg["ladies_sizes"], seed=cfg["seed"],
                                           first_batch=lo, log=log, sparsity_aware=sa)
                    if keep:
                        rec["nodes"] = [x_.cpu() for x_ in s.nodes]
                        rec["adjs"] = [_coo_cpu(a) for a in s.adjs]

                    def call(ah_local=ah_local, seeds=seeds, lo=lo, grid=grid, sa=sa):
                        return dist_ladies_sample(grid, ah_local, seeds, cfg["ladies_sizes"], seed=cfg["seed"],
                                                  first_batch=lo, sparsity_aware=sa)
                rec["log"] = log.as_dict()
                reps = cfg.get("time_repeats", 0)
                if reps:
                    t = measure(call, warmup=1, repeats=reps, flush_l2=False, device=dev)
                    rec["time_s"] = t.median_s
                runs.append(rec)
    dist.barrier()
    return {"rank": rank, "runs": runs}
