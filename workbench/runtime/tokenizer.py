"""Tokenizers: Hugging Face ``tokenizer.json`` through ``tokenizers``, or plain bytes."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol


class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int | None
    eos_id: int | None

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...
    def token_text(self, token_id: int) -> str: ...


class ByteTokenizer:
    """Token i < 256 is byte i; ids from 256 up are specials (bos, eos, pad)."""

    SPECIALS = ("<bos>", "<eos>", "<pad>")

    def __init__(self, vocab_size: int = 259, bos_id: int | None = 256, eos_id: int | None = 257) -> None:
        self.vocab_size, self.bos_id, self.eos_id = vocab_size, bos_id, eos_id

    def encode(self, text: str) -> list[int]:
        ids = list(text.encode("utf-8"))
        return ([self.bos_id] if self.bos_id is not None else []) + ids

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def token_text(self, token_id: int) -> str:
        if token_id >= 256:
            k = token_id - 256
            return self.SPECIALS[k] if k < len(self.SPECIALS) else f"<{token_id}>"
        b = bytes([token_id])
        return b.decode("utf-8") if token_id < 128 else f"\\x{token_id:02x}"

    def to_dict(self) -> dict:
        return {"kind": "bytes", "vocab_size": self.vocab_size, "bos_id": self.bos_id, "eos_id": self.eos_id}


class HFTokenizer:
    def __init__(self, path: Path, bos_id: int | None, eos_id: int | None) -> None:
        from tokenizers import Tokenizer as _Tok
        self.path = Path(path)
        self._tok = _Tok.from_file(str(path))
        self.vocab_size = self._tok.get_vocab_size()
        self.bos_id, self.eos_id = bos_id, eos_id

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    def token_text(self, token_id: int) -> str:
        return self._tok.decode([token_id], skip_special_tokens=False)

    def to_dict(self) -> dict:
        return {"kind": "tokenizer.json", "vocab_size": self.vocab_size, "bos_id": self.bos_id, "eos_id": self.eos_id}


def load_tokenizer(model_dir: Path, vocab_size: int, bos_id: int | None, eos_id) -> Tokenizer:
    """``tokenizer.json`` when the checkpoint has one, else bytes (``workbench_tokenizer.json`` may set ids)."""
    model_dir = Path(model_dir)
    eos = eos_id[0] if isinstance(eos_id, list) and eos_id else eos_id
    if (model_dir / "tokenizer.json").exists():
        return HFTokenizer(model_dir / "tokenizer.json", bos_id, eos)
    meta = model_dir / "workbench_tokenizer.json"
    if meta.exists():
        d = json.loads(meta.read_text())
        return ByteTokenizer(d.get("vocab_size", vocab_size), d.get("bos_id"), d.get("eos_id"))
    return ByteTokenizer(vocab_size, bos_id if (bos_id or 0) >= 256 else None, eos if (eos or 0) >= 256 else None)
