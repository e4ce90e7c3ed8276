"""Byte-level tokenizer: token id = UTF-8 byte value (vocab 256, no merges, exact round trip).

Byte 0 (NUL) never occurs in the corpus; the training stream uses it between documents, so the
model may emit it at the end of a file (``eos_id``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["ByteTokenizer"]


class ByteTokenizer:
    vocab_size = 256
    eos_id = 0  # document separator in the training stream

    def encode(self, text: str | bytes) -> list[int]:
        return list(text if isinstance(text, bytes | bytearray) else text.encode("utf-8"))

    def encode_tensor(self, text: str | bytes, device=None) -> torch.Tensor:
        """``[len]`` int64 tensor of byte ids."""
        data = text if isinstance(text, bytes | bytearray) else text.encode("utf-8")
        if not data:
            return torch.zeros(0, dtype=torch.long, device=device)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device=device, dtype=torch.long)

    def decode_bytes(self, ids: Iterable[int] | torch.Tensor) -> bytes:
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        return bytes(int(i) for i in ids)

    def decode(self, ids: Iterable[int] | torch.Tensor, errors: str = "replace") -> str:
        """Bytes -> text; a multi-byte character cut by a length limit becomes U+FFFD (``errors``)."""
        return self.decode_bytes(ids).decode("utf-8", errors=errors)

    def __len__(self) -> int:
        return self.vocab_size
