"""Tokenizers: Hugging Face ``tokenizer.json`` through ``tokenizers``, or plain bytes."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Protocol, Sequence


class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int | None
    eos_id: int | None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...
    def token_text(self, token_id: int) -> str: ...


class ByteTokenizer:
    """Token i < 256 is byte i; ids from 256 up are specials (bos, eos, pad)."""

    SPECIALS = ("<bos>", "<eos>", "<pad>")

    def __init__(self, vocab_size: int = 259, bos_id: int | None = 256, eos_id: int | None = 257) -> None:
        self.vocab_size, self.bos_id, self.eos_id = vocab_size, bos_id, eos_id

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return ([self.bos_id] if self.bos_id is not None and add_special_tokens else []) + ids

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
        # A token that decodes to one plain character, the same alone and first (see token_text).
        self._ref = next((i for c in "aex0." if (i := self._tok.token_to_id(c)) is not None
                          and self.decode([i]) == c), None)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    def token_text(self, token_id: int) -> str:
        """The text ``token_id`` adds after another token. Decoded alone, a token loses what its
        decoder does at the start of a text (SentencePiece-style decoders strip the first space:
        "▁the" would show as "the"), so it is decoded after a reference token and that token's
        text is cut off. A token that holds part of a multi-byte character shows its bytes
        (\\xNN), as byte tokenizers show them, not U+FFFD."""
        before = [] if self._ref is None else [self._ref]
        text = text_after(self.decode, before, [token_id])
        if "\ufffd" in text:
            raw = _token_bytes(self._tok.id_to_token(token_id) or "")
            if raw is not None:
                return raw.decode("utf-8", errors="backslashreplace")
        return text

    def to_dict(self) -> dict:
        return {"kind": "tokenizer.json", "vocab_size": self.vocab_size, "bos_id": self.bos_id, "eos_id": self.eos_id}


def text_after(decode: Callable[[list[int]], str], before: Sequence[int], ids: Sequence[int]) -> str:
    """The text tokens ``ids`` add after the tokens ``before``: decoded after them, their text cut
    off. Decoded alone, a first token can lose its leading space (SentencePiece-style decoders
    strip a text's first space)."""
    head = decode(list(before))
    both = decode([*before, *ids])
    return both[len(head):] if both.startswith(head) else decode(list(ids))


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: the printable character that stands for each byte."""
    keep = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


BYTE_LEVEL = _byte_level_alphabet()
BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _token_bytes(piece: str) -> bytes | None:
    """The bytes of a vocabulary piece that stands for bytes: a byte-fallback piece ("<0xC3>") or
    a byte-level BPE piece ("Ã©"); None for other pieces."""
    m = BYTE_FALLBACK.fullmatch(piece)
    if m:
        return bytes([int(m.group(1), 16)])
    if piece and all(c in BYTE_LEVEL for c in piece):
        return bytes(BYTE_LEVEL[c] for c in piece)
    return None


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
