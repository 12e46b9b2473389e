"""Tokenizers: GPT-2 BPE through tiktoken (offline cache) and the char vocabulary, chosen by meta."""

import numpy as np
import pytest

from nanogpt_jax import tokenizer
from nanogpt_jax.errors import DataError


def test_gpt2_known_ids_and_literal_special_text():
    tok = tokenizer.gpt2()
    assert (tok.name, tok.n_vocab, tok.eot_token) == ("gpt2", 50257, 50256)
    assert tok.encode("hello world") == [31373, 995]  # tiktoken's README example
    ids = tok.encode("a<|endoftext|>b")
    assert 50256 not in ids and tok.decode(ids) == "a<|endoftext|>b"  # ordinary text, not the separator
    batch = tok.encode_batch(["hello world", "", "<|endoftext|>"], num_threads=2)
    assert [b.tolist() for b in batch] == [[31373, 995], [], tok.encode("<|endoftext|>")]
    assert tok.meta() == {"tokenizer": "gpt2", "vocab_size": 50257, "dtype": "uint16", "eot_token": 50256}


def test_char_round_trip_and_vectorised_encode():
    chars = sorted(set("hello, world!\n\u00e9\u4e2d"))
    tok = tokenizer.CharTokenizer(chars)
    s = "world, hello!\n\u4e2d\u00e9"
    assert tok.decode(tok.encode(s)) == s
    assert tok.encode(s) == [chars.index(c) for c in s]  # ids follow the order of `chars`
    unsorted = tokenizer.CharTokenizer(["b", "a", "c"])  # a vocabulary in any order, e.g. nanoGPT's itos
    assert unsorted.encode("abc") == [1, 0, 2] and unsorted.decode([2, 1, 0]) == "cab"
    assert tok.encode_array(s).dtype == np.uint32 and tok.encode("") == []
    assert tok.meta()["chars"] == chars and tok.meta()["eot_token"] is None


def test_char_errors_name_the_problem():
    tok = tokenizer.CharTokenizer(list("abc"))
    with pytest.raises(DataError, match=r"character 'z' is not in this 3-character vocabulary"):
        tok.encode("abz")
    with pytest.raises(DataError, match=r"characters 'z', 'é', '!' are not in this 3-character vocabulary"):
        tok.encode("azbéz!a")  # every unknown one, once, in order
    with pytest.raises(DataError, match=r"^characters 'd', 'e', .*, 'w' and 3 more are not in"):
        tok.encode("abcdefghijklmnopqrstuvwxyz")  # another alphabet: a readable line
    with pytest.raises(ValueError):  # an API user's usual catch works: the library's input errors are ValueErrors
        tok.encode("hello")
    with pytest.raises(DataError, match="token id 3 is outside"):
        tok.decode([0, 3])
    with pytest.raises(DataError, match="token id -1 is outside"):
        tok.decode([-1])
    for bad in ([], ["a", "a"], ["ab"]):
        with pytest.raises(DataError, match="distinct single characters"):
            tokenizer.CharTokenizer(bad)


def test_dtype_for_vocab_size():
    assert tokenizer.dtype_for(65) == "uint16" and tokenizer.dtype_for(50257) == "uint16"
    assert tokenizer.dtype_for(65536) == "uint16" and tokenizer.dtype_for(65537) == "uint32"


def test_from_meta():
    assert tokenizer.from_meta({"tokenizer": "gpt2", "vocab_size": 50257}) is tokenizer.gpt2()
    assert tokenizer.from_meta({"tokenizer": "char", "vocab_size": 2, "chars": ["a", "b"]}).encode("ba") == [1, 0]
    with pytest.raises(DataError, match="unknown tokenizer 'sentencepiece'"):
        tokenizer.from_meta({"tokenizer": "sentencepiece"})
    with pytest.raises(DataError, match="no 'chars' list"):
        tokenizer.from_meta({"tokenizer": "char", "vocab_size": 2})
    with pytest.raises(DataError, match="vocab_size=3 but its char tokenizer has 2"):
        tokenizer.from_meta({"tokenizer": "char", "vocab_size": 3, "chars": ["a", "b"]})


def test_gpt2_uses_the_mirror_cache_when_tiktoken_cache_dir_is_unset(monkeypatch, tmp_path):
    import os

    cache = os.environ["TIKTOKEN_CACHE_DIR"]
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR")
    monkeypatch.setenv("NANOGPT_DATA_MIRROR", str(tmp_path))
    (tmp_path / "tiktoken_cache").symlink_to(cache)
    tok = tokenizer.GPT2Tokenizer()  # a fresh one, not the cached instance
    assert tok.encode("hello world") == [31373, 995]
    assert os.environ["TIKTOKEN_CACHE_DIR"] == str(tmp_path / "tiktoken_cache")
