import numpy as np
import pytest

from nanogpt.data.tokenizer import CharTokenizer, dtype_for, get_tokenizer, tokenizer_from_meta
from nanogpt.errors import DataError


def test_gpt2_is_tiktoken_gpt2():
    tok = get_tokenizer("gpt2")
    assert (tok.name, tok.vocab_size, tok.eot_token, tok.dtype) == ("gpt2", 50257, 50256, "uint16")
    assert tok.encode("hello world") == [31373, 995]
    assert tok.decode([31373, 995]) == "hello world"


def test_gpt2_special_token_only_when_allowed():
    tok = get_tokenizer("gpt2")
    assert tok.encode("a<|endoftext|>b") == [64, 50256, 65]
    assert 50256 not in tok.encode("a<|endoftext|>b", special=False)  # corpus text stays text
    texts = ["hello world", "a<|endoftext|>b", ""]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    ordinary = [tok.encode(t, special=False) for t in texts]
    assert tok.encode_batch(texts, special=False, num_threads=2) == ordinary


def test_char_tokenizer_sorted_vocab_round_trip():
    tok = get_tokenizer("char", list("hello world"))
    assert tok.chars == sorted(set("hello world")) and tok.vocab_size == 8 and tok.eot_token is None
    ids = tok.encode("hello")
    assert ids == [tok.chars.index(c) for c in "hello"] and tok.decode(ids) == "hello"
    assert tok.encode_batch(["he", "lo"]) == [tok.encode("he"), tok.encode("lo")]
    np.testing.assert_array_equal(tok.encode_array("old"), tok.encode("old"))


def test_char_tokenizer_unicode_and_unknown():
    tok = CharTokenizer(list("aé漢😀"))
    assert tok.decode(tok.encode("😀漢aé")) == "😀漢aé"
    with pytest.raises(DataError, match="'z' is not in"):
        tok.encode("az")


def test_from_meta_and_errors():
    meta = get_tokenizer("char", list("abc")).meta()
    assert meta == {"tokenizer": "char", "vocab_size": 3, "dtype": "uint16", "eot_token": None,
                    "chars": ["a", "b", "c"]}
    assert tokenizer_from_meta(meta).encode("cab") == [2, 0, 1]
    assert tokenizer_from_meta({"tokenizer": "gpt2"}).vocab_size == 50257
    with pytest.raises(DataError, match="unknown tokenizer"):
        get_tokenizer("sentencepiece")
    with pytest.raises(DataError, match="needs its characters"):
        get_tokenizer("char")


def test_dtype_rule():
    assert dtype_for(65) == dtype_for(65535) == "uint16"
    assert dtype_for(65536) == dtype_for(100277) == "uint32"


def test_gpt2_offline_without_files_is_one_clear_error(monkeypatch, tmp_path):
    import tiktoken.registry

    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})  # forget the loaded encoding
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # empty cache
    import tiktoken.load

    def offline(url):
        raise ConnectionError("no network")

    monkeypatch.setattr(tiktoken.load, "read_file", offline)
    with pytest.raises(DataError, match="TIKTOKEN_CACHE_DIR"):
        get_tokenizer("gpt2")
