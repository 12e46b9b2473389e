"""Tokenizers: GPT-2 BPE (tiktoken's `gpt2`, the real thing) and a character vocabulary.

Both expose the same small surface: `name`, `vocab_size`, `eot_token`, `encode`, `encode_batch`,
`decode`, `dtype`, and `meta()` (the keys meta.json stores to rebuild the tokenizer).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from nanogpt.errors import DataError

EOT_TEXT = "<|endoftext|>"
UINT16_MAX = 65535


def dtype_for(vocab_size: int) -> str:
    """The smallest bin dtype for a vocabulary: uint16 up to 65,535 symbols, else uint32."""
    return "uint16" if vocab_size <= UINT16_MAX else "uint32"


class Tokenizer:
    """Common interface; see GPT2Tokenizer and CharTokenizer."""

    name: str
    vocab_size: int
    eot_token: int | None

    def encode(self, text: str, *, special: bool = True) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: list[str], *, special: bool = True,
                     num_threads: int = 0) -> list[list[int]]:
        return [self.encode(t, special=special) for t in texts]

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    @property
    def dtype(self) -> str:
        return dtype_for(self.vocab_size)

    def meta(self) -> dict:
        return {"tokenizer": self.name, "vocab_size": self.vocab_size, "dtype": self.dtype,
                "eot_token": self.eot_token}


class GPT2Tokenizer(Tokenizer):
    """OpenAI's GPT-2 BPE via tiktoken. `special=True` lets the text `<|endoftext|>` become EOT."""

    name = "gpt2"

    def __init__(self) -> None:
        _use_mirror_tiktoken_cache()
        import tiktoken

        try:
            self.enc = tiktoken.get_encoding("gpt2")
        except Exception as e:  # tiktoken downloads its files on first use
            raise DataError(
                f"cannot load tiktoken's gpt2 files ({type(e).__name__}); offline, set TIKTOKEN_CACHE_DIR "
                "to a folder holding them (e.g. $NANOGPT_DATA_MIRROR/tiktoken_cache)"
            ) from None
        self.vocab_size = self.enc.n_vocab  # 50257
        self.eot_token = self.enc.eot_token  # 50256

    def encode(self, text: str, *, special: bool = True) -> list[int]:
        if special:
            return self.enc.encode(text, allowed_special={EOT_TEXT})
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str], *, special: bool = True,
                     num_threads: int = 0) -> list[list[int]]:
        # tiktoken encodes in Rust with the GIL released, so threads use every core
        threads = num_threads or os.cpu_count() or 1
        if special:
            return self.enc.encode_batch(texts, num_threads=threads, allowed_special={EOT_TEXT})
        return self.enc.encode_ordinary_batch(texts, num_threads=threads)

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode(list(ids))


class CharTokenizer(Tokenizer):
    """One token per character; ids follow the sorted character list (as nanoGPT's shakespeare_char)."""

    name = "char"
    eot_token = None

    def __init__(self, chars: list[str]) -> None:
        if not chars or any(len(c) != 1 for c in chars):
            raise DataError("a char tokenizer needs a non-empty list of single characters")
        self.chars = sorted(set(chars))
        self.vocab_size = len(self.chars)
        self._codes = np.array([ord(c) for c in self.chars], dtype=np.uint32)  # sorted code points

    def encode_array(self, text: str) -> np.ndarray:
        """Vectorised encode: code points looked up in the sorted vocabulary (no Python loop)."""
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        ids = np.searchsorted(self._codes, codes)
        ids = np.minimum(ids, self.vocab_size - 1)
        bad = self._codes[ids] != codes
        if bad.any():
            ch = chr(int(codes[bad][0]))
            raise DataError(f"character {ch!r} is not in this data's {self.vocab_size}-symbol vocabulary")
        return ids.astype(np.int64)

    def encode(self, text: str, *, special: bool = True) -> list[int]:
        return self.encode_array(text).tolist()

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def meta(self) -> dict:
        return {**super().meta(), "chars": self.chars}


def get_tokenizer(name: str, chars: list[str] | None = None) -> Tokenizer:
    """`gpt2` or `char` (which needs its character list)."""
    if name == "gpt2":
        return GPT2Tokenizer()
    if name == "char":
        if chars is None:
            raise DataError("the char tokenizer needs its characters (meta.json 'chars')")
        return CharTokenizer(chars)
    raise DataError(f"unknown tokenizer {name!r}; use gpt2 or char")


def tokenizer_from_meta(meta: dict) -> Tokenizer:
    """Rebuild the tokenizer a dataset was prepared with, from its meta.json contents."""
    return get_tokenizer(meta.get("tokenizer", "gpt2"), meta.get("chars"))


def _use_mirror_tiktoken_cache() -> None:
    """Offline: let tiktoken read `$NANOGPT_DATA_MIRROR/tiktoken_cache` unless told otherwise."""
    mirror = os.environ.get("NANOGPT_DATA_MIRROR")
    if mirror and "TIKTOKEN_CACHE_DIR" not in os.environ and (Path(mirror) / "tiktoken_cache").is_dir():
        os.environ["TIKTOKEN_CACHE_DIR"] = str(Path(mirror) / "tiktoken_cache")
