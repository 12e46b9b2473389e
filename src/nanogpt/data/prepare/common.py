"""What every dataset module shares: temporary bin files, batch encoding, and the final commit.

Nothing appears under its final name until a split is complete: tokens go to `.train.bin.tmp` /
`.val.bin.tmp` in the data folder, and `commit` renames them into place and writes meta.json last.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from itertools import islice
from pathlib import Path
from typing import TypeVar

import numpy as np

from nanogpt.data.tokenizer import CharTokenizer, Tokenizer
from nanogpt.errors import DataError

log = logging.getLogger(__name__)

FORMAT = "nanogpt-bins/1"
SPLITS = ("train", "val")
T = TypeVar("T")


def tmp_path(data_dir: Path, split: str) -> Path:
    return Path(data_dir) / f".{split}.bin.tmp"


class BinWriter:
    """Appends token ids (any int array) to a file in the tokenizer's dtype."""

    def __init__(self, path: Path, dtype: str, append: bool = False) -> None:
        self.path, self.dtype = Path(path), np.dtype(dtype)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(self.path, "ab" if append else "wb")
        self.tokens = self.f.tell() // self.dtype.itemsize

    def write(self, ids: np.ndarray | list[int]) -> None:
        arr = np.asarray(ids, dtype=self.dtype)
        self.f.write(arr.tobytes())
        self.tokens += arr.size

    def sync(self) -> None:
        """Flush to disk, so a resume point recorded after this is really there."""
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        self.f.close()


@contextmanager
def staged(data_dir: Path, keep_on_error: bool = False) -> Iterator[dict[str, Path]]:
    """Temporary bin paths per split; removed if the block fails (unless kept for a resume)."""
    paths = {split: tmp_path(data_dir, split) for split in SPLITS}
    try:
        yield paths
    except BaseException:
        if not keep_on_error:
            for p in paths.values():
                p.unlink(missing_ok=True)
        raise


def batched(items: Iterable[T], n: int) -> Iterator[list[T]]:
    it = iter(items)
    while batch := list(islice(it, n)):
        yield batch


def encode_arrays(tok: Tokenizer, texts: list[str], num_threads: int = 0) -> list[np.ndarray]:
    """Encode many texts on all cores (tiktoken threads; the char tokenizer is vectorised numpy)."""
    if isinstance(tok, CharTokenizer):
        return [tok.encode_array(t) for t in texts]
    return [np.asarray(ids, dtype=np.int64) for ids in tok.encode_batch(texts, special=False,
                                                                        num_threads=num_threads)]


def file_stats(path: Path, dtype: str, block: int = 1 << 22) -> dict:
    """Token count, sha256 and largest id of a bin file, read in blocks (flat memory)."""
    sha, n, max_id = hashlib.sha256(), 0, -1
    itemsize = np.dtype(dtype).itemsize
    with open(path, "rb") as f:
        while chunk := f.read(block * itemsize):
            sha.update(chunk)
            arr = np.frombuffer(chunk, dtype=dtype)
            n += arr.size
            max_id = max(max_id, int(arr.max()))
    return {"tokens": n, "sha256": sha.hexdigest(), "max_id": max_id}


def commit(data_dir: Path, tok: Tokenizer, source: str, paths: dict[str, Path]) -> dict:
    """Check both splits, rename them into place, then write meta.json (atomically, last)."""
    data_dir = Path(data_dir)
    splits = {}
    for split, path in paths.items():
        stats = file_stats(path, tok.dtype) if path.exists() else {"tokens": 0}
        if stats["tokens"] == 0:
            raise DataError(f"the {split} split came out empty ({source}); give more input text")
        splits[split] = stats
    meta = {"format": FORMAT, **tok.meta(), "splits": splits, "source": source}
    meta_tmp = data_dir / ".meta.json.tmp"
    meta_tmp.write_text(json.dumps(meta, indent=2) + "\n")
    for split, path in paths.items():
        os.replace(path, data_dir / f"{split}.bin")
    os.replace(meta_tmp, data_dir / "meta.json")
    log.info("wrote %s: %s", data_dir, ", ".join(f"{s} {v['tokens']:,} tokens" for s, v in splits.items()))
    return meta
