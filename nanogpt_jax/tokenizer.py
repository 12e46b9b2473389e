"""Tokenizers behind one interface: GPT-2's BPE (tiktoken) and a character vocabulary.

Which one a dataset uses is recorded in its `meta.json` (written by `data_prep/`); the trainer,
sampler and evaluator read it from there and never guess.

    tok = tokenizer.gpt2()                 # GPT-2 BPE, 50257 tokens, <|endoftext|> = 50256
    tok = data.tokenizer_for(data_dir)     # whatever the data folder's meta.json names
    ids = tok.encode("hello")              # list[int]; special-token text is ordinary text
    tok.decode(ids)
    tok.meta()                             # the keys meta.json stores to rebuild it
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from nanogpt_jax.errors import DataError

GPT2_EOT = 50256  # "<|endoftext|>" in GPT-2's vocabulary (tiktoken's gpt2 encoding, eot_token)
UINT16_IDS = 1 << 16  # a uint16 .bin holds ids 0 .. 65535


def dtype_for(n_vocab: int) -> str:
    """The .bin dtype of a vocabulary of `n_vocab` ids: "uint16" up to 65,536 ids (GPT-2: 50,257), else "uint32"."""
    return "uint16" if n_vocab <= UINT16_IDS else "uint32"


class Tokenizer(Protocol):
    name: str  # "gpt2" or "char"
    n_vocab: int  # ids are 0 .. n_vocab - 1
    eot_token: int | None  # end-of-text id, when the vocabulary has one

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[np.ndarray]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def meta(self) -> dict: ...


class GPT2Tokenizer:
    """OpenAI's GPT-2 BPE via tiktoken (`encode_ordinary`: the text "<|endoftext|>" is ordinary text).

    Offline, tiktoken reads its files from TIKTOKEN_CACHE_DIR; when that is unset and
    NANOGPT_DATA_MIRROR has a `tiktoken_cache` folder, that folder is used.
    Raises DataError when tiktoken's files cannot be loaded.
    """

    name = "gpt2"
    eot_token = GPT2_EOT

    def __init__(self):
        import tiktoken

        from nanogpt_jax import download

        mirror_cache = download.tiktoken_cache_dir()
        if "TIKTOKEN_CACHE_DIR" not in os.environ and mirror_cache is not None:
            os.environ["TIKTOKEN_CACHE_DIR"] = str(mirror_cache)
        try:
            self._enc = tiktoken.get_encoding("gpt2")
        except Exception as e:  # noqa: BLE001 - a download failure surfaces as many types
            raise DataError(f"cannot load tiktoken's gpt2 encoding ({type(e).__name__}); offline, set "
                            "TIKTOKEN_CACHE_DIR to a folder holding its files (README: offline use)") from None
        self.n_vocab = self._enc.n_vocab
        assert self._enc.eot_token == GPT2_EOT

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[np.ndarray]:
        """Ids of each text as uint32 arrays; tiktoken releases the GIL, so threads use several cores."""
        if num_threads <= 1:  # no thread pool to set up per call (worker processes use one thread each)
            ids = [self._enc.encode_ordinary(t) for t in texts]
        else:
            ids = self._enc.encode_ordinary_batch(list(texts), num_threads=num_threads)
        return [np.asarray(x, dtype=np.uint32) for x in ids]

    def decode(self, ids: Sequence[int]) -> str:
        return self._enc.decode([int(i) for i in ids])

    def meta(self) -> dict:
        return {"tokenizer": self.name, "vocab_size": self.n_vocab, "dtype": dtype_for(self.n_vocab),
                "eot_token": self.eot_token}


class CharTokenizer:
    """One id per character, ids in the order of `chars` (nanoGPT's shakespeare_char: sorted).

    Raises DataError when `chars` is empty or holds a repeated or multi-character entry, and when
    encoding characters outside the vocabulary (the message names every one of them).
    """

    name = "char"
    eot_token = None

    def __init__(self, chars: Sequence[str]):
        self.chars = list(chars)
        if not self.chars or any(not isinstance(c, str) or len(c) != 1 for c in self.chars) \
                or len(set(self.chars)) != len(self.chars):
            raise DataError("a char vocabulary must be a non-empty list of distinct single characters; "
                            "re-run the data_prep script that made it")
        self.n_vocab = len(self.chars)
        self._stoi = {ch: i for i, ch in enumerate(self.chars)}
        # vectorised encoding: code points sorted, with the id each one maps to
        codes = np.array([ord(c) for c in self.chars], dtype=np.uint32)
        order = np.argsort(codes)
        self._codes, self._ids = codes[order], order.astype(np.uint32)

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_array(self, text: str) -> np.ndarray:
        """Ids of `text` as a uint32 array, without a Python loop over characters."""
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        pos = np.minimum(np.searchsorted(self._codes, codes), self.n_vocab - 1)
        bad = self._codes[pos] != codes
        if bad.any():  # name every unknown character once, in order of first appearance (a text of
            # another alphabet names the first 20 and counts the rest: the error stays a readable line)
            unknown = [chr(int(c)) for c in dict.fromkeys(codes[bad].tolist())]
            listed = ", ".join(repr(c) for c in unknown[:20]) + (f" and {len(unknown) - 20} more"
                                                                 if len(unknown) > 20 else "")
            what = f"character {listed} is" if len(unknown) == 1 else f"characters {listed} are"
            raise DataError(f"{what} not in this {self.n_vocab}-character vocabulary; "
                            "use only characters of the training data")
        return self._ids[pos]

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[np.ndarray]:
        return [self.encode_array(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.n_vocab]
        if bad:
            raise DataError(f"token id {bad[0]} is outside this {self.n_vocab}-character vocabulary; "
                            "the ids come from another tokenizer")
        return "".join(self.chars[i] for i in ids)

    def meta(self) -> dict:
        return {"tokenizer": self.name, "vocab_size": self.n_vocab, "dtype": dtype_for(self.n_vocab),
                "eot_token": None, "chars": self.chars}


def same_vocabulary(a: Tokenizer, b: Tokenizer) -> bool:
    """Whether ids mean the same text to both: the same kind, size and (char) characters in the same order."""
    return a.name == b.name and a.n_vocab == b.n_vocab and getattr(a, "chars", None) == getattr(b, "chars", None)


def describe(name: str, n_vocab: int) -> str:
    """A vocabulary in words, for messages: "GPT-2's 50257-token BPE", "a 65-token char vocabulary"."""
    return f"GPT-2's {n_vocab}-token BPE" if name == "gpt2" else f"a {n_vocab}-token {name} vocabulary"


_GPT2: GPT2Tokenizer | None = None


def gpt2() -> GPT2Tokenizer:
    """The GPT-2 BPE tokenizer (built once per process)."""
    global _GPT2
    if _GPT2 is None:
        _GPT2 = GPT2Tokenizer()
    return _GPT2


def from_meta(meta: dict) -> Tokenizer:
    """The tokenizer a dataset's meta.json names: {"tokenizer": "gpt2"} or {"tokenizer": "char", "chars": [...]}.

    Raises DataError for an unknown tokenizer, a char vocabulary without its `chars`, or a
    `vocab_size` that disagrees with the tokenizer's.
    """
    kind = meta.get("tokenizer")
    if kind == "gpt2":
        tok = gpt2()
    elif kind == "char":
        if not isinstance(meta.get("chars"), list):
            raise DataError("meta.json names a char tokenizer but has no 'chars' list; re-run its data_prep script")
        tok = CharTokenizer(meta["chars"])
    else:
        raise DataError(f"unknown tokenizer {kind!r} in meta.json; expected gpt2 or char")
    if meta.get("vocab_size", tok.n_vocab) != tok.n_vocab:
        raise DataError(f"meta.json says vocab_size={meta['vocab_size']} but its {kind} tokenizer has "
                        f"{tok.n_vocab} ids; re-run its data_prep script")
    return tok
