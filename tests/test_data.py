"""The data folder: meta files, checked splits, vocabulary checks (batches: test_batches.py)."""

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from nanogpt_jax import data, tokenizer
from nanogpt_jax.errors import DataError


def make_dir(path: Path, train: np.ndarray, val: np.ndarray | None = None, **meta) -> Path:
    """A prepared folder holding `train` (and `val`) with a meta.json like data_prep writes."""
    path.mkdir(parents=True, exist_ok=True)
    splits = {"train": train} if val is None else {"train": train, "val": val}
    m = {"tokenizer": "gpt2", "vocab_size": 50257, "dtype": "uint16", "eot_token": 50256,
         "splits": {s: {"tokens": len(a)} for s, a in splits.items()}, "source": "test", **meta}
    for s, a in splits.items():
        a.astype(m["dtype"]).tofile(path / f"{s}.bin")
    (path / "meta.json").write_text(json.dumps(m))
    return path


@pytest.fixture
def folder(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    return make_dir(tmp_path / "d", rng.integers(0, 50257, 5000), rng.integers(0, 50257, 700))


# ---- meta ----------------------------------------------------------------------------------------


def test_meta_json_is_the_source_of_truth(folder):
    meta = data.load_meta(folder)
    assert (meta["tokenizer"], meta["vocab_size"], meta["dtype"]) == ("gpt2", 50257, "uint16")
    assert data.tokenizer_for(folder) is tokenizer.gpt2()
    assert data.model_vocab_size(meta) == 50304  # nanoGPT's padded GPT-2 vocabulary
    assert data.model_vocab_size({"tokenizer": "char", "vocab_size": 65}) == 65
    ds = data.Dataset(folder, block_size=64, model_vocab_size=50304)  # the padded GPT-2 vocabulary fits
    assert ds.tokenizer is tokenizer.gpt2() and ds.vocab_size == 50257
    assert ds.split("train").dtype == np.uint16 and len(ds.split("val")) == 700


def test_nanogpt_meta_pkl_loads(tmp_path):
    chars = sorted(set("First Citizen:\nBefore we proceed"))
    make_dir(tmp_path, np.arange(100) % len(chars))
    (tmp_path / "meta.json").unlink()
    with open(tmp_path / "meta.pkl", "wb") as f:  # what nanoGPT's shakespeare_char/prepare.py writes
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)),
                     "stoi": {c: i for i, c in enumerate(chars)}}, f)
    meta = data.load_meta(tmp_path)
    assert (meta["tokenizer"], meta["vocab_size"], meta["chars"]) == ("char", len(chars), chars)
    tok = data.tokenizer_for(tmp_path)
    assert tok.decode(tok.encode("Before we")) == "Before we"
    ds = data.Dataset(tmp_path, block_size=8, splits=("train",))
    assert ds.split("train")[:3].tolist() == [0, 1, 2]


class RunsCode:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def test_a_pickle_that_would_run_code_is_refused_without_running(tmp_path):
    side_effect = tmp_path / "pwned"
    make_dir(tmp_path / "d", np.arange(100))
    (tmp_path / "d" / "meta.json").unlink()
    payload = pickle.dumps({"vocab_size": 2, "itos": {0: "a", 1: "b"}, "hook": RunsCode(str(side_effect))})
    (tmp_path / "d" / "meta.pkl").write_bytes(payload)
    with pytest.raises(DataError, match=r"not a plain nanoGPT meta.pkl \(refusing to load (posix|os|nt).system\)"):
        data.load_meta(tmp_path / "d")
    assert not side_effect.exists()
    pickle.loads(payload)  # the same bytes through the ordinary unpickler would have run it
    assert side_effect.exists()


def test_meta_pkl_of_the_wrong_shape(tmp_path):
    make_dir(tmp_path, np.arange(100))
    (tmp_path / "meta.json").unlink()
    (tmp_path / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": 3, "itos": {0: "a", 1: "bc"}}))
    with pytest.raises(DataError, match="not a nanoGPT char meta.pkl"):
        data.load_meta(tmp_path)
    (tmp_path / "meta.pkl").write_bytes(b"garbage")
    with pytest.raises(DataError, match="not a plain nanoGPT meta.pkl"):
        data.load_meta(tmp_path)


def test_nanogpt_bins_without_meta_read_as_gpt2(tmp_path):
    make_dir(tmp_path / "openwebtext", np.arange(100))
    (tmp_path / "openwebtext" / "meta.json").unlink()
    meta = data.load_meta(tmp_path / "openwebtext")
    assert (meta["tokenizer"], meta["vocab_size"], meta["dtype"]) == ("gpt2", 50257, "uint16")


# ---- bad input: one line naming the problem and the fix -----------------------------------------


def bad(fn, message: str):
    with pytest.raises(DataError, match=message) as e:
        fn()
    assert "\n" not in str(e.value)
    return str(e.value)


def test_bad_data_dirs(tmp_path, folder):
    msg = bad(lambda: data.Dataset(tmp_path / "shakespeare_char", block_size=8), "does not exist")
    assert "python data_prep/shakespeare_char.py --out_dir" in msg  # names the command that creates it
    (tmp_path / "empty").mkdir()
    bad(lambda: data.load_meta(tmp_path / "empty"), "holds no prepared data.*data_prep/text.py")
    (folder / "val.bin").unlink()
    bad(lambda: data.Dataset(folder, block_size=8), r"val.bin does not exist; create it with")
    assert data.Dataset(folder, block_size=8, splits=("train",)).split("train").shape == (5000,)
    (folder / "val.bin").write_bytes(b"")
    bad(lambda: data.open_split(folder, "val"), "val.bin is empty")
    (folder / "val.bin").write_bytes(b"\x01\x00\x02")
    bad(lambda: data.open_split(folder, "val"), "truncated: 3 bytes is not a whole number of uint16 tokens")
    (folder / "val.bin").write_bytes(b"\x01\x00" * 10)
    bad(lambda: data.open_split(folder, "val"), "holds 10 tokens but meta.json says 700")
    (folder / "meta.json").write_text("{not json")
    bad(lambda: data.load_meta(folder), "cannot read .*meta.json")
    (folder / "meta.json").write_text(json.dumps({"tokenizer": "gpt2"}))
    bad(lambda: data.load_meta(folder), "lacks vocab_size, dtype")
    (folder / "meta.json").write_text(json.dumps({"tokenizer": "bpe", "vocab_size": 9, "dtype": "uint16"}))
    bad(lambda: data.tokenizer_for(folder), "unknown tokenizer 'bpe'")
    (folder / "meta.json").write_text(json.dumps({"tokenizer": "gpt2", "vocab_size": 9, "dtype": "int8"}))
    bad(lambda: data.load_meta(folder), "dtype 'int8'")


def test_pretrained_gpt2_weights_on_another_vocabulary_are_refused_before_anything_is_written(tmp_path):
    from conftest import tiny_run_config, write_token_data

    from nanogpt_jax.train import train

    chars = write_token_data(tmp_path / "chars", vocab_size=65, n_train=200, n_val=100)  # shakespeare_char's size
    meta = data.load_meta(chars)
    hf = tmp_path / "hf"  # config.json alone: the check reads nothing else
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 50257, "n_positions": 32,
                                                "n_layer": 1, "n_head": 2, "n_embd": 16}))
    for init in ("gpt2", str(hf)):
        bad(lambda init=init: data.check_init_vocabulary(init, chars, meta),
            rf"init_from={init}: .*weights are for GPT-2's 50257-token BPE, but data.data_dir={chars} is tokenized "
            r"with a 65-token char vocabulary")
    gpt2_meta = {"tokenizer": "gpt2", "vocab_size": 50257, "dtype": "uint16"}
    for init, m in (("gpt2-xl", gpt2_meta), (str(hf), gpt2_meta), ("scratch", meta), ("resume", meta)):
        data.check_init_vocabulary(init, chars, m)  # fine
    (hf / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 65}))  # e.g. an exported char run
    data.check_init_vocabulary(str(hf), chars, meta)
    # through the trainer: refused at start-up, before out_dir is created or any weight is read
    (hf / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 50304}))
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"vocab_size 50304\) weights are for GPT-2's 50257-token BPE, but .* "
                                        r"65-token char vocabulary"):
        train(tiny_run_config(chars, out, init_from=str(hf)))
    assert not out.exists()


def test_vocab_and_block_size_checks(tmp_path, folder):
    bad(lambda: data.Dataset(folder, block_size=8, model_vocab_size=65),
        r"vocab_size=50257 \(gpt2\) does not fit the model's vocab_size=65; set model.vocab_size >= 50257")
    bad(lambda: data.Dataset(folder, block_size=700), r"val.bin has 700 tokens, not more than block_size=700")
    assert len(data.Dataset(folder, block_size=699).split("val")) == 700
    big = np.zeros(2_000_000, np.uint16)  # ids beyond the vocabulary, found by the sampled scan
    sampled = int(np.linspace(0, len(big) - data.SCAN_CHUNK_TOKENS, data.SCAN_CHUNKS)[40]) + 5
    for where in (0, len(big) - 1, sampled):
        tokens = big.copy()
        tokens[where] = 70
        make_dir(tmp_path / "ids", tokens, vocab_size=65, tokenizer="char", chars=[chr(33 + i) for i in range(65)])
        bad(lambda: data.Dataset(tmp_path / "ids", block_size=8, splits=("train",)),
            rf"holds token id 70 \(at token {where:,}\), beyond the model's vocab_size=65")
    meta = json.loads((tmp_path / "ids" / "meta.json").read_text())
    meta["splits"]["train"]["max_id"] = 80  # prepare records the largest id: checked exactly, for free
    (tmp_path / "ids" / "meta.json").write_text(json.dumps(meta))
    (tmp_path / "ids" / "train.bin").write_bytes(big.tobytes())
    bad(lambda: data.Dataset(tmp_path / "ids", block_size=8, splits=("train",)),
        r"train.bin holds token id 80 \(meta.json's max_id\), beyond the model's vocab_size=65")
