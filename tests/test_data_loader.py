import json
import logging

import numpy as np
import pytest
import torch

from nanogpt.data.loader import TrainBatches, check_vocab, open_split, read_meta, val_batches
from nanogpt.data.prepare.text import prepare_text
from nanogpt.errors import DataError


@pytest.fixture
def tokens():
    return np.arange(1000, dtype=np.uint16)  # token i at position i: windows are easy to read back


@pytest.fixture
def char_dir(tmp_path):
    (tmp_path / "in.txt").write_text("hello world, the quick brown fox\n" * 40)
    prepare_text([tmp_path / "in.txt"], "char", tmp_path / "mydata", 0.1, "test")
    return tmp_path / "mydata"


def test_read_and_open_prepared(char_dir):
    meta = read_meta(char_dir)
    assert meta["tokenizer"] == "char" and meta["dtype"] == "uint16"
    train = open_split(char_dir, "train")
    assert isinstance(train, np.memmap) and train.dtype == np.uint16 and len(train) == 1188
    assert len(open_split(char_dir, "val")) == 132


def test_missing_dir_names_the_prepare_command(tmp_path):
    with pytest.raises(DataError, match="nanogpt-prepare data=shakespeare_char"):
        read_meta(tmp_path / "shakespeare_char")
    with pytest.raises(DataError, match="nanogpt-prepare data=text data.input=YOUR_FILES"):
        read_meta(tmp_path / "corpus")
    (tmp_path / "corpus").mkdir()
    with pytest.raises(DataError, match="no train.bin/val.bin"):
        open_split(tmp_path / "corpus", "train")


def test_plain_nanogpt_bins_load_with_warning(tmp_path, caplog):
    np.arange(5000, dtype=np.uint16).tofile(tmp_path / "train.bin")
    np.arange(700, dtype=np.uint16).tofile(tmp_path / "val.bin")
    with caplog.at_level(logging.WARNING):
        meta = read_meta(tmp_path)
    assert "no meta.json" in caplog.text
    assert (meta["tokenizer"], meta["vocab_size"], meta["dtype"]) == ("gpt2", 50257, "uint16")
    np.testing.assert_array_equal(open_split(tmp_path, "val"), np.arange(700))


def test_bins_disagreeing_with_meta_or_empty(char_dir):
    with open(char_dir / "val.bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(DataError, match="meta.json says 132"):
        open_split(char_dir, "val")
    meta = read_meta(char_dir)
    meta["splits"]["val"]["tokens"] = 0
    (char_dir / "val.bin").write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        open_split(char_dir, "val", meta)


def test_check_vocab(char_dir):
    meta = read_meta(char_dir)
    check_vocab(meta, meta["vocab_size"])
    with pytest.raises(DataError, match="model.vocab_size=5"):
        check_vocab(meta, 5)
    gpt2 = {"tokenizer": "gpt2", "vocab_size": 50257, "splits": {"train": {"max_id": 50256}}}
    check_vocab(gpt2, 50304)
    with pytest.raises(DataError, match="vocabulary 50257"):
        check_vocab(gpt2, 65)
    odd = {"tokenizer": "gpt2", "vocab_size": 100, "splits": {"train": {"max_id": 300}}}  # ids beyond vocab
    with pytest.raises(DataError, match="vocabulary 301"):
        check_vocab(odd, 128)


@pytest.mark.parametrize("sampler", ["random", "epoch"])
def test_batches_are_shifted_windows(tokens, sampler):
    x, y = TrainBatches(tokens, 4, 8, sampler=sampler, seed=3).next()
    assert x.shape == y.shape == (4, 8) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1)  # y is x shifted by one (tokens are positions)
    assert int(y.max()) < len(tokens)


@pytest.mark.parametrize("sampler", ["random", "epoch"])
def test_global_index_makes_ranks_equivalent(tokens, sampler):
    single = TrainBatches(tokens, 4, 8, sampler=sampler, seed=7)
    r0 = TrainBatches(tokens, 4, 8, sampler=sampler, seed=7, rank=0, world_size=2)
    r1 = TrainBatches(tokens, 4, 8, sampler=sampler, seed=7, rank=1, world_size=2)
    for _ in range(3):
        for rank in (r0, r1):
            assert all(torch.equal(a, b) for a, b in zip(single.next(), rank.next(), strict=True))
    other = TrainBatches(tokens, 4, 8, sampler=sampler, seed=8).next()[0]
    assert not torch.equal(other, TrainBatches(tokens, 4, 8, sampler=sampler, seed=7).next()[0])


def test_epoch_sampler_no_overlap_across_ranks(tokens):
    world, B, T = 3, 5, 8
    n_windows = (len(tokens) - 1) // T  # 124
    ranks = [TrainBatches(tokens, B, T, sampler="epoch", seed=1, rank=r, world_size=world)
             for r in range(world)]
    seen = [r.next()[0][:, 0].tolist() for _ in range(n_windows // (B * world)) for r in ranks]
    starts = [s for batch in seen for s in batch]
    assert len(starts) == len(set(starts))  # no window twice in the epoch, on any rank
    offset = starts[0] % T
    assert all(s % T == offset for s in starts)  # non-overlapping windows: one grid per epoch


def test_epoch_sampler_covers_each_epoch_then_reshuffles():
    data = np.arange(41, dtype=np.uint16)  # 40 usable tokens: 10 windows of 4
    b = TrainBatches(data, 5, 4, sampler="epoch", seed=0)
    e0 = b.next()[0][:, 0].tolist() + b.next()[0][:, 0].tolist()
    e1 = b.next()[0][:, 0].tolist() + b.next()[0][:, 0].tolist()
    assert sorted(e0) == list(range(0, 40, 4)) and sorted(e1) == sorted(e0) and e0 != e1
    assert b.epoch() == 2.0


@pytest.mark.parametrize("sampler", ["random", "epoch"])
def test_state_restores_exactly_through_a_checkpoint(tokens, tmp_path, sampler):
    a = TrainBatches(tokens, 4, 8, sampler=sampler, seed=5)
    for _ in range(7):
        a.next()
    torch.save({"sampler": a.state_dict()}, tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)["sampler"]
    b = TrainBatches(tokens, 4, 8, sampler=sampler, seed=5)
    b.load_state_dict(state)
    for _ in range(5):
        assert all(torch.equal(p, q) for p, q in zip(a.next(), b.next(), strict=True))
    # a 2-rank resume of a 1-rank run continues the same global stream
    r1 = TrainBatches(tokens, 4, 8, sampler=sampler, seed=5, rank=1, world_size=2)
    r1.load_state_dict(a.state_dict())
    a.next()
    assert torch.equal(a.next()[0], r1.next()[0])


def test_block_size_larger_than_split(tokens):
    with pytest.raises(DataError, match="block_size=1000"):
        TrainBatches(tokens, 4, 1000)
    with pytest.raises(DataError, match="lower model.block_size"):
        val_batches(tokens[:10], 2, 16, 3)


def test_val_batches_fixed_and_sharded(tokens):
    full = val_batches(tokens, 4, 8, 5)
    again = val_batches(tokens, 4, 8, 5)
    assert len(full) == 5 and all(torch.equal(a[0], b[0]) for a, b in zip(full, again, strict=True))
    starts = torch.cat([x[:, 0] for x, _ in full]).tolist()
    assert starts[0] == 0 and starts[-1] == len(tokens) - 9  # evenly spaced over the whole split
    assert all(torch.equal(y, x + 1) for x, y in full)
    r0 = val_batches(tokens, 4, 8, 5, rank=0, world_size=2)
    r1 = val_batches(tokens, 4, 8, 5, rank=1, world_size=2)
    assert [x[0, 0] for x, _ in r0] == [full[i][0][0, 0] for i in (0, 2, 4)]
    assert [x[0, 0] for x, _ in r1] == [full[i][0][0, 0] for i in (1, 3)]


def test_meta_json_is_plain_json(char_dir):
    meta = json.loads((char_dir / "meta.json").read_text())
    keys = {"format", "tokenizer", "vocab_size", "dtype", "eot_token", "chars", "splits", "source"}
    assert set(meta) == keys
    assert set(meta["splits"]["train"]) == {"tokens", "sha256", "max_id"}
