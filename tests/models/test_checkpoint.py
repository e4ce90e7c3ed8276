"""The committed tiny Llama: the spec'd shape, its recorded perplexity, beating the byte 3-gram."""

import json

import pytest
import torch

from mlsys24.models import (
    ByteTokenizer,
    ByteTrigram,
    generate,
    iter_documents,
    load_split_bytes,
    load_tiny_llama,
    sliding_window_nll,
    validation_ids,
)
from mlsys24.models.loading import tiny_llama_dir


@pytest.fixture(scope="module")
def tiny():
    return load_tiny_llama()


@pytest.fixture(scope="module")
def metrics():
    return json.loads((tiny_llama_dir() / "metrics.json").read_text())


def test_checkpoint_shape_and_storage(tiny):
    c = tiny.cfg
    assert (c.d_model, c.n_layers, c.n_heads, c.head_dim_, c.n_kv_heads, c.ffn_dim, c.vocab_size, c.max_seq_len) == (
        256, 4, 4, 64, 4, 768, 256, 512)
    from safetensors import safe_open

    with safe_open(str(tiny_llama_dir() / "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"F16"}
    assert not tiny.training and next(tiny.parameters()).dtype == torch.float32


def test_reproduces_recorded_perplexity(tiny, metrics):
    sub = metrics["eval_subset"]
    r = sliding_window_nll(tiny, validation_ids(sub["first_bytes"]), window=sub["window"], stride=sub["stride"])
    recorded = metrics["model_subset"]["ppl"]
    assert abs(r["ppl"] - recorded) / recorded < 0.01, (r["ppl"], recorded)


def test_beats_byte_trigram(tiny, metrics):
    n = metrics["eval_subset"]["first_bytes"]
    sub = load_split_bytes("validation")[:n]
    tri = ByteTrigram("kn").fit(load_split_bytes("train")).evaluate(sub)
    model = sliding_window_nll(tiny, validation_ids(n), window=512, stride=256)
    assert model["ppl"] < tri["ppl"]
    assert abs(tri["ppl"] - metrics["trigram_subset"]["kn"]["ppl"]) < 1e-6 * tri["ppl"]
    s = metrics["summary"]  # and on the whole validation split, as recorded by the training run
    assert s["model_ppl_validation"] < s["trigram_best_ppl_validation"]


def test_greedy_generation_looks_like_python(tiny):
    tok = ByteTokenizer()
    _, text = next(iter(iter_documents("validation")))
    prompt = text[:300]
    outs = {kind: generate(tiny, [tok.encode(prompt)], 64, cache=kind) for kind in ("contiguous", "paged")}
    assert torch.equal(outs["contiguous"], outs["paged"])
    out = tok.decode(outs["paged"][0])
    printable = sum(ch.isprintable() or ch in "\n\t" for ch in out) / len(out)
    assert printable > 0.95
    nll_model = sliding_window_nll(tiny, tok.encode_tensor(prompt + out))["loss"]
    assert nll_model < 1.5  # the model finds its own continuation plausible (uniform would be 5.55)
