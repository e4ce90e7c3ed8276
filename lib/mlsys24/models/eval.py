"""Evaluation of byte-level language models: perplexity, bits per byte, generation, tokens/s.

- :func:`sliding_window_nll` — windows of ``window`` bytes advanced by ``stride``; each window scores
  only the bytes the previous one did not, so every byte after the first is scored once with at
  least ``window - stride`` bytes of context (the first window: all it has).
  ``ppl = exp(mean nll)``, ``bpb = mean nll / ln 2`` (one token = one byte, so bits per token).
- :func:`generate` — greedy (``temperature=0``) or sampled (temperature, top-k, seeded generator)
  decoding with a KV cache (contiguous or paged); ragged prompts are batched.
- :func:`decode_speed` — tokens/s of cached decoding, timed with :func:`mlsys24.bench.measure`.

CLI (writes the committed ``metrics.json`` of a checkpoint; runs on CPU in well under a minute)::

    python -m mlsys24.models.eval --checkpoint data/models/tiny_llama --out data/models/tiny_llama/metrics.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from .corpus import load_split_bytes
from .ngram import ByteTrigram
from .tokenizer import ByteTokenizer

__all__ = ["sliding_window_nll", "perplexity", "generate", "complete", "decode_speed", "validation_ids",
           "EVAL_SUBSET_BYTES"]

#: The fixed cheap evaluation subset: the first bytes of the validation split (CPU, seconds).
EVAL_SUBSET_BYTES = 8192


def validation_ids(n_bytes: int | None = None, device=None) -> torch.Tensor:
    """The validation stream (or its first ``n_bytes``) as int64 token ids."""
    data = load_split_bytes("validation")
    if n_bytes is not None:
        data = data[:n_bytes]
    return ByteTokenizer().encode_tensor(data, device=device)


@torch.no_grad()
def sliding_window_nll(model, ids: torch.Tensor, *, window: int = 512, stride: int = 256, batch_size: int = 16,
                       autocast_dtype: torch.dtype | None = None, progress: bool = False) -> dict:
    """Negative log-likelihood of ``ids [N]`` under ``model`` with overlapping windows.

    Returns ``{"n_tokens", "nll_sum", "loss", "ppl", "bpb", "window", "stride"}`` (nats per token).
    """
    if not 0 < stride < window:
        raise ValueError("need 0 < stride < window (each window scores bytes after `window - stride` of context)")
    if model.training:
        raise ValueError("call model.eval() first (dropout would perturb the evaluation)")
    dev = next(model.parameters()).device
    ids = ids.to(dev).reshape(-1)
    N = ids.numel()
    # window w covers [s, s+window); it scores targets (s+first, s+window) where first is 0 for w=0
    starts, firsts = [], []
    s = 0
    while True:
        starts.append(s)
        firsts.append(0 if s == 0 else window - stride)
        if s + window >= N:
            break
        s += stride
    nll_sum, n_tok = 0.0, 0
    it = range(0, len(starts), batch_size)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, leave=False, desc="ppl")
    for i in it:
        chunk = starts[i: i + batch_size]
        rows = [ids[s: s + window] for s in chunk]
        lens = [r.numel() for r in rows]
        L = max(lens)
        x = torch.zeros(len(rows), L, dtype=torch.long, device=dev)
        for r, row in enumerate(rows):
            x[r, : row.numel()] = row
        lens_t = torch.tensor(lens, device=dev)
        with torch.autocast(dev.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(x, input_lens=None if min(lens) == L else lens_t)
        logp = torch.log_softmax(logits.float(), dim=-1)
        for r in range(len(chunk)):
            first = firsts[i + r]
            n = lens[r]
            tgt = x[r, first + 1: n] if first == 0 else x[r, first: n]
            pred = logp[r, first: n - 1] if first == 0 else logp[r, first - 1: n - 1]
            nll_sum += float(-pred.gather(-1, tgt[:, None]).sum())
            n_tok += tgt.numel()
    loss = nll_sum / max(n_tok, 1)
    return {"n_tokens": n_tok, "nll_sum": nll_sum, "loss": loss, "ppl": math.exp(loss),
            "bpb": loss / math.log(2), "window": window, "stride": stride}


def perplexity(model, text: str | bytes, **kw) -> float:
    """Per-byte perplexity of ``text`` (see :func:`sliding_window_nll`)."""
    ids = ByteTokenizer().encode_tensor(text)
    return sliding_window_nll(model, ids, **kw)["ppl"]


def _pick(logits: torch.Tensor, temperature: float, top_k: int | None, gen: torch.Generator | None):
    # logits [B, V] -> next ids [B]
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=gen)[:, 0]


@torch.no_grad()
def generate(model, prompts: torch.Tensor | Sequence[Sequence[int]], max_new_tokens: int, *,
             temperature: float = 0.0, top_k: int | None = None, seed: int = 0, cache: str = "contiguous",
             block_size: int = 16, eos_id: int | None = None) -> torch.Tensor:
    """New tokens ``[B, max_new_tokens]`` after each prompt (ragged prompts allowed).

    ``temperature=0`` is greedy; otherwise softmax sampling at ``temperature`` restricted to the
    ``top_k`` most likely tokens, from a generator seeded with ``seed``. With ``eos_id`` a row that
    produced it is padded with ``eos_id`` afterwards. ``cache``: "contiguous" | "paged" | "none"
    (recompute the whole prefix every step: the slow reference).
    """
    if model.training:
        raise ValueError("call model.eval() first (dropout would perturb generation)")
    dev = next(model.parameters()).device
    if isinstance(prompts, torch.Tensor):
        rows = [prompts.tolist()] if prompts.dim() == 1 else prompts.tolist()
    else:
        rows = [list(p) for p in prompts]
    B = len(rows)
    lens = torch.tensor([len(r) for r in rows], device=dev)
    if int(lens.min()) < 1:
        raise ValueError("every prompt needs at least one token")
    T0 = int(lens.max())
    x = torch.zeros(B, T0, dtype=torch.long, device=dev)
    for i, r in enumerate(rows):
        x[i, : len(r)] = torch.tensor(r, device=dev)
    gen = torch.Generator(device=dev).manual_seed(seed) if temperature > 0 else None
    out = torch.zeros(B, max_new_tokens, dtype=torch.long, device=dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    if cache == "none":
        seqs = [list(r) for r in rows]
        for t in range(max_new_tokens):
            L = max(len(s) for s in seqs)
            xx = torch.zeros(B, L, dtype=torch.long, device=dev)
            for i, s in enumerate(seqs):
                xx[i, : len(s)] = torch.tensor(s, device=dev)
            ln = torch.tensor([len(s) for s in seqs], device=dev)
            logits = model(xx, input_lens=ln)
            nxt = _pick(logits[torch.arange(B, device=dev), ln - 1], temperature, top_k, gen)
            out[:, t] = nxt
            for i in range(B):
                seqs[i].append(int(nxt[i]))
    else:
        kv = model.new_cache(cache, batch=B, max_len=T0 + max_new_tokens, block_size=block_size,
                             n_blocks=B * (-(-(T0 + max_new_tokens) // block_size)))
        if cache == "paged":
            kv.new_batch(B)
        logits = model(x, kv_cache=kv, input_lens=lens)
        last = logits[torch.arange(B, device=dev), lens - 1]
        for t in range(max_new_tokens):
            nxt = _pick(last, temperature, top_k, gen)
            out[:, t] = nxt
            if t + 1 < max_new_tokens:
                last = model(nxt[:, None], kv_cache=kv)[:, 0]
    if eos_id is not None:
        for t in range(max_new_tokens):
            out[done, t] = eos_id
            done |= out[:, t] == eos_id
    return out


def complete(model, text: str, max_new_tokens: int = 200, **kw) -> str:
    """Continue ``text``; returns only the continuation, decoded (invalid UTF-8 -> U+FFFD)."""
    tok = ByteTokenizer()
    ids = generate(model, [tok.encode(text)], max_new_tokens, **kw)[0]
    return tok.decode(ids)


def decode_speed(model, *, batch: int = 1, prompt_len: int = 64, new_tokens: int = 64, cache: str = "contiguous",
                 repeats: int = 3, warmup: int = 1) -> dict:
    """Tokens/s of greedy generation (prefill + ``new_tokens`` cached decode steps)."""
    from mlsys24.bench import measure

    dev = next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(1, 256, (batch, prompt_len), generator=g).to(dev)
    t = measure(lambda: generate(model, prompts, new_tokens, cache=cache), warmup=warmup, repeats=repeats,
                flush_l2=False)
    return {"batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens, "cache": cache,
            "median_s": t.median_s, "tokens_per_s": batch * new_tokens / t.median_s, "device": str(dev)}


def _main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mlsys24.models.eval", description="Evaluate a checkpoint")
    ap.add_argument("--checkpoint", default=None, help="HF-layout directory (default: the committed tiny Llama)")
    ap.add_argument("--out", default=None, help="write metrics JSON here (merged into an existing file)")
    ap.add_argument("--subset-bytes", type=int, default=EVAL_SUBSET_BYTES)
    ap.add_argument("--full", action="store_true", help="also the whole validation split (slow on CPU)")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--stride", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--samples", type=int, default=3, help="generations from validation prompts")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from .loading import load_hf_llama, load_tiny_llama

    model = load_hf_llama(args.checkpoint) if args.checkpoint else load_tiny_llama()
    val = load_split_bytes("validation")
    sub = val[: args.subset_bytes]
    res: dict = {"eval_subset": {"split": "validation", "first_bytes": args.subset_bytes,
                                 "window": args.window, "stride": args.stride, "dtype": "float32", "device": "cpu"}}
    res["model_subset"] = sliding_window_nll(model, validation_ids(args.subset_bytes), window=args.window,
                                             stride=args.stride)
    tri = {m: ByteTrigram(m).fit(load_split_bytes("train")) for m in ("kn", "add_k")}
    res["trigram_subset"] = {m: t.evaluate(sub) for m, t in tri.items()}
    res["trigram_validation"] = {m: t.evaluate(val) for m, t in tri.items()}
    if args.full:
        res["model_validation"] = sliding_window_nll(model, validation_ids(), window=args.window,
                                                     stride=args.stride, progress=True)
    tok = ByteTokenizer()
    docs = list(__import__("mlsys24.models.corpus", fromlist=["x"]).iter_documents("validation"))
    samples = []
    for i in range(args.samples):
        path, text = docs[(i * 7) % len(docs)]
        cut = text.find("\ndef ", len(text) // 3)
        cut = cut + 1 if cut > 0 else len(text) // 2
        prompt = text[max(0, cut - 200): cut + 40]
        p_ids = tok.encode(prompt)
        samples.append({
            "doc": path, "prompt": prompt,
            "greedy": tok.decode(generate(model, [p_ids], 240)[0]),
            "seed": i,
            "sampled_t0.8_k40": tok.decode(generate(model, [p_ids], 240, temperature=0.8, top_k=40, seed=i)[0]),
            "trigram_kn_sampled": tri["kn"].sample(prompt.encode(), 240, seed=i).decode("utf-8", "replace"),
        })
    res["samples"] = samples
    res["decode_speed_cpu"] = decode_speed(model, batch=1, prompt_len=64, new_tokens=64)
    ckpt = Path(args.checkpoint) if args.checkpoint else None
    if ckpt is None:
        from .loading import tiny_llama_dir

        ckpt = tiny_llama_dir()
    if (ckpt / "train_log.json").exists():
        tl = json.loads((ckpt / "train_log.json").read_text())
        res["training"] = {"gpu": tl["environment"].get("gpu"), "torch": tl["environment"].get("torch"),
                           "trained_steps": tl["trained_steps"], "epochs": tl["epochs"],
                           "loop_seconds": tl["loop_seconds"], "reproduce": tl["reproduce"],
                           "validation_sliding_gpu_fp32": tl["final"]["validation_sliding"]}
    best = min(res["trigram_subset"].values(), key=lambda r: r["ppl"])
    best_val = min(res["trigram_validation"].values(), key=lambda r: r["ppl"])
    res["summary"] = {
        "model_ppl_subset": res["model_subset"]["ppl"], "model_bpb_subset": res["model_subset"]["bpb"],
        "trigram_best_ppl_subset": best["ppl"], "trigram_best_method": best["method"],
        "trigram_best_ppl_validation": best_val["ppl"], "trigram_best_bpb_validation": best_val["bpb"],
        "model_beats_trigram": res["model_subset"]["ppl"] < best["ppl"],
    }
    full = res.get("model_validation") or res.get("training", {}).get("validation_sliding_gpu_fp32")
    if full:
        res["summary"]["model_ppl_validation"] = full["ppl"]
        res["summary"]["model_bpb_validation"] = full["bpb"]
        res["summary"]["model_beats_trigram_validation"] = full["ppl"] < best_val["ppl"]
    print(json.dumps({k: v for k, v in res.items() if k != "samples"}, indent=1))
    if args.out:
        out = Path(args.out)
        old = json.loads(out.read_text()) if out.exists() else {}
        old.update(res)
        out.write_text(json.dumps(old, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
