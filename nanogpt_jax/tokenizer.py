"""Tokenizers behind one interface: GPT-2's BPE (tiktoken) and a character vocabulary.

Which one a dataset uses is recorded in its `meta.json` (written by `data_prep/`); the trainer,
sampler and evaluator read it from there and never guess.

    tok = tokenizer.gpt2()                 # GPT-2 BPE, 50257 tokens, <|endoftext|> = 50256
    tok = tokenizer.from_data_dir(path)    # whatever the data folder's meta.json names
    ids = tok.encode("hello")              # list[int]; special-token text is ordinary text
    tok.decode(ids)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from nanogpt_jax.errors import DataError

GPT2_EOT = 50256


class Tokenizer(Protocol):
    name: str  # "gpt2" or "char"
    n_vocab: int  # ids are 0 .. n_vocab - 1
    eot_token: int | None  # end-of-text id, when the vocabulary has one

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class GPT2Tokenizer:
    """OpenAI's GPT-2 BPE via tiktoken. Offline, tiktoken reads TIKTOKEN_CACHE_DIR (README)."""

    name = "gpt2"
    eot_token = GPT2_EOT

    def __init__(self):
        import tiktoken

        try:
            self._enc = tiktoken.get_encoding("gpt2")
        except Exception as e:  # noqa: BLE001 - a download failure surfaces as many types
            raise DataError(f"cannot load tiktoken's gpt2 encoding ({type(e).__name__}); offline, set "
                            "TIKTOKEN_CACHE_DIR to a folder holding its files (README: offline use)") from None
        self.n_vocab = self._enc.n_vocab

    def encode(self, text: str) -> list[int]:
        # encode_ordinary: a literal "<|endoftext|>" in the text is text, not the separator token
        return self._enc.encode_ordinary(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._enc.decode(list(ids))


class CharTokenizer:
    """One id per character, ids in the order of `chars` (nanoGPT's shakespeare_char: sorted)."""

    name = "char"
    eot_token = None

    def __init__(self, chars: Sequence[str]):
        self.chars = list(chars)
        self.n_vocab = len(self.chars)
        self._stoi = {ch: i for i, ch in enumerate(self.chars)}

    def encode(self, text: str) -> list[int]:
        try:
            return [self._stoi[ch] for ch in text]
        except KeyError as e:
            raise DataError(f"character {e.args[0]!r} is not in this {self.n_vocab}-character vocabulary; "
                            "use only characters of the training data") from None

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[i] for i in ids)


_GPT2: GPT2Tokenizer | None = None


def gpt2() -> GPT2Tokenizer:
    """The GPT-2 BPE tokenizer (built once per process)."""
    global _GPT2
    if _GPT2 is None:
        _GPT2 = GPT2Tokenizer()
    return _GPT2


def from_meta(meta: dict) -> Tokenizer:
    """The tokenizer a dataset's meta.json names: {"tokenizer": "gpt2"} or {"tokenizer": "char", "chars": [...]}."""
    kind = meta.get("tokenizer")
    if kind == "gpt2":
        return gpt2()
    if kind == "char":
        return CharTokenizer(meta["chars"])
    raise DataError(f"unknown tokenizer {kind!r} in meta.json; expected gpt2 or char")
