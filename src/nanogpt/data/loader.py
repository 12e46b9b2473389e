"""Reading prepared data: memory-mapped bins, training batches from two samplers, fixed val batches.

Batches are defined by a global micro-batch index, so a run is the same on any number of ranks:
rank r's c-th call to `next()` is global batch g = c * world_size + r, and batch g depends only on
(seed, g). Samplers:
  random  start offsets drawn with replacement (nanoGPT's), from a generator seeded by (seed, g).
  epoch   a stream of non-overlapping windows, a fresh seeded permutation each epoch; global batch g
          takes stream items g*B ... g*B + B-1, so no window repeats within an epoch on any rank.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from nanogpt.errors import DataError

log = logging.getLogger(__name__)
Device = str | torch.device

KNOWN = ("shakespeare_char", "shakespeare", "openwebtext")  # data dirs nanogpt-prepare names itself
PLAIN_META = {"format": "nanogpt-bins/1", "tokenizer": "gpt2", "vocab_size": 50257, "dtype": "uint16",
              "eot_token": 50256, "source": "nanoGPT bins without meta.json"}


def prepare_hint(data_dir: str | Path) -> str:
    """The command that creates a data dir."""
    d = Path(data_dir)
    if d.name in KNOWN:
        default = str(d) == f"data/{d.name}"
        return f"nanogpt-prepare data={d.name}" + ("" if default else f" data.data_dir={d}")
    return f"nanogpt-prepare data=text data.input=YOUR_FILES data.data_dir={d}"


def read_meta(data_dir: str | Path) -> dict:
    """meta.json of a data dir; GPT-2/uint16 defaults (with a warning) for plain nanoGPT bins."""
    d = Path(data_dir)
    if (d / "meta.json").is_file():
        meta = json.loads((d / "meta.json").read_text())
        if not str(meta.get("format", "")).startswith("nanogpt-bins/"):
            raise DataError(f"{d / 'meta.json'} is not a nanogpt meta.json; re-create it: {prepare_hint(d)}")
        return meta
    bins = [s for s in ("train", "val") if (d / f"{s}.bin").is_file()]
    if not bins:
        raise DataError(f"no train.bin/val.bin in {d}; create them with: {prepare_hint(d)}")
    log.warning("%s has no meta.json: reading its bins as nanoGPT's (GPT-2 tokens, uint16)", d)
    sizes = {s: (d / f"{s}.bin").stat().st_size // 2 for s in bins}
    return {**PLAIN_META, "splits": {s: {"tokens": n, "sha256": None} for s, n in sizes.items()}}


def open_split(data_dir: str | Path, split: str, meta: dict | None = None) -> np.memmap:
    """The split's tokens as a read-only 1-D memmap (nothing is read until indexed)."""
    d = Path(data_dir)
    meta = meta or read_meta(d)
    path = d / f"{split}.bin"
    if not path.is_file():
        raise DataError(f"{path} does not exist; create it with: {prepare_hint(d)}")
    dtype = np.dtype(meta["dtype"])
    n = path.stat().st_size // dtype.itemsize
    expected = meta.get("splits", {}).get(split, {}).get("tokens", n)
    if n != expected or path.stat().st_size % dtype.itemsize:
        raise DataError(f"{path} holds {n} tokens but meta.json says {expected}; re-run {prepare_hint(d)}")
    if n == 0:
        raise DataError(f"{path} is empty; re-run {prepare_hint(d)}")
    return np.memmap(path, dtype=dtype, mode="r")


def check_vocab(meta: dict, vocab_size: int) -> None:
    """The model must have an embedding for every token id in the data."""
    max_ids = [s.get("max_id", -1) for s in meta.get("splits", {}).values()]
    need = max([meta["vocab_size"], *(m + 1 for m in max_ids if m is not None)])
    if need > vocab_size:
        raise DataError(f"the data ({meta['tokenizer']} tokens, vocabulary {need}) does not fit "
                        f"model.vocab_size={vocab_size}; set model.vocab_size>={need} or use matching data")


def _check_length(tokens: np.ndarray, block_size: int) -> None:
    if len(tokens) <= block_size:
        raise DataError(f"the split has {len(tokens)} tokens, not more than block_size={block_size}; "
                        "lower model.block_size or prepare more data")


def to_batch(tokens: np.ndarray, starts: np.ndarray, block_size: int, device: Device):
    """x = tokens[s : s+T], y = tokens[s+1 : s+1+T] for each start s, as int64 (B, T) on device."""
    idx = np.asarray(starts, dtype=np.int64)[:, None] + np.arange(block_size + 1)
    buf = torch.from_numpy(tokens[idx].astype(np.int64))  # (B, T+1), one gather from the memmap
    x, y = buf[:, :-1].contiguous(), buf[:, 1:].contiguous()
    if torch.device(device).type == "cuda":  # pinned memory lets the copy overlap compute
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


class TrainBatches:
    """Training batches for one rank; `next()` -> (x, y); state is a call counter."""

    def __init__(self, tokens: np.ndarray, batch_size: int, block_size: int, *, sampler: str = "random",
                 seed: int = 0, rank: int = 0, world_size: int = 1, device: Device = "cpu") -> None:
        if sampler not in ("random", "epoch"):
            raise DataError(f"unknown sampler {sampler!r}; use data.sampler=random or epoch")
        _check_length(tokens, block_size)
        self.tokens, self.B, self.T = tokens, batch_size, block_size
        self.sampler, self.seed, self.device = sampler, seed, device
        self.rank, self.world_size = rank, world_size
        self.calls = 0
        n = len(tokens) - 1  # a window needs T + 1 tokens
        self.n_windows = n // block_size  # non-overlapping windows per epoch
        self.spare = n - self.n_windows * block_size  # tokens an epoch can shift its windows by
        self._perm: tuple[int, np.ndarray, int] | None = None  # (epoch, permutation, offset)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.calls * self.world_size + self.rank
        self.calls += 1
        return to_batch(self.tokens, self.starts(g), self.T, self.device)

    def starts(self, g: int) -> np.ndarray:
        """Start offsets of global batch g."""
        if self.sampler == "random":
            return np.random.default_rng([self.seed, g]).integers(0, len(self.tokens) - self.T, self.B)
        items = np.arange(g * self.B, (g + 1) * self.B)
        return np.array([self._window_start(int(k)) for k in items])

    def _window_start(self, k: int) -> int:
        epoch, pos = divmod(k, self.n_windows)
        if self._perm is None or self._perm[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            # each epoch shifts all windows by a random offset, so the spare tail tokens get used too
            self._perm = (epoch, rng.permutation(self.n_windows), int(rng.integers(0, self.spare + 1)))
        return self._perm[2] + int(self._perm[1][pos]) * self.T

    def epoch(self) -> float:
        """Epochs done so far by all ranks together, in windows of T tokens (for logging)."""
        return self.calls * self.world_size * self.B / self.n_windows

    def state_dict(self) -> dict:
        return {"sampler": self.sampler, "seed": self.seed, "batch_size": self.B, "block_size": self.T,
                "batches": self.calls * self.world_size}

    def load_state_dict(self, state: dict) -> None:
        """Continue after `state['batches']` global batches (also with another number of ranks)."""
        for key, mine in (("sampler", self.sampler), ("seed", self.seed), ("batch_size", self.B),
                          ("block_size", self.T)):
            if key in state and state[key] != mine:
                log.warning("data resumed with %s=%s (was %s): batches change", key, mine, state[key])
        if state["batches"] % self.world_size:
            log.warning("%d batches done do not divide among %d ranks", state["batches"], self.world_size)
        self.calls = int(state["batches"]) // self.world_size


def val_batches(tokens: np.ndarray, batch_size: int, block_size: int, num_batches: int, *, rank: int = 0,
                world_size: int = 1, device: Device = "cpu") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed set of `num_batches` batches of windows evenly spaced over the split; rank r of W gets
    batches r, r+W, ... So every evaluation of the same weights sees the same tokens."""
    _check_length(tokens, block_size)
    starts = np.linspace(0, len(tokens) - block_size - 1, num_batches * batch_size).astype(np.int64)
    starts = starts.reshape(num_batches, batch_size)
    return [to_batch(tokens, starts[j], block_size, device) for j in range(rank, num_batches, world_size)]
