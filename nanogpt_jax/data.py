"""Reading prepared data: meta.json and memory-mapped splits, checked once at start-up.

    ds = data.Dataset("data/openwebtext", block_size=1024, model_vocab_size=50304)   # checks everything once
    tokens = ds.split("train")                  # a read-only 1-D np.memmap, uint16 or uint32
    meta = data.load_meta("data/openwebtext")   # tokenizer, vocab_size, dtype, ... (nanogpt_jax.prepare)

Each problem (a missing folder, a damaged meta file, a truncated split, ids beyond the model's
vocabulary) is a one-line DataError that names the fix. Batches drawn from the splits are
nanogpt_jax.batches' concern.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from absl import logging

from nanogpt_jax import storage
from nanogpt_jax import tokenizer as tokenizers
from nanogpt_jax.errors import DataError

KNOWN_DATASETS = ("shakespeare_char", "shakespeare", "openwebtext")  # data_prep/<name>.py
# configs/default.py's data.data_dir: a config that leaves it here did not choose a data folder
DEFAULT_DATA_DIR = "data/openwebtext"
DTYPES = ("uint16", "uint32")
# nanoGPT's openwebtext and shakespeare folders have no meta file: GPT-2 ids as uint16
NANOGPT_GPT2_META = {"tokenizer": "gpt2", "vocab_size": 50257, "dtype": "uint16", "eot_token": 50256,
                     "source": "a nanoGPT data folder without meta.json (GPT-2 BPE, uint16)"}
SCAN_CHUNKS, SCAN_CHUNK_TOKENS = 64, 4096  # the sampled check of token ids at open: 256K tokens


# ---- meta ----------------------------------------------------------------------------------------


def prepare_hint(data_dir: str | Path) -> str:
    """The command that creates `data_dir`."""
    d = storage.path(data_dir)
    if d.name in KNOWN_DATASETS:
        return f"python data_prep/{d.name}.py --out_dir {d}"
    return f"python data_prep/text.py --inputs YOUR_FILES --out_dir {d}"


class _PlainUnpickler(pickle.Unpickler):
    """Builds only what pickle's own opcodes build (dicts, lists, str, int, ...): every class or
    function lookup is refused, so a pickle cannot run code (os.system via __reduce__, ...)."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _meta_from_pkl(path: Path) -> dict:
    """nanoGPT's char meta.pkl ({vocab_size, itos, stoi}) as our meta dict; never runs code."""
    try:
        with open(path, "rb") as f:
            raw = _PlainUnpickler(f).load()
    except Exception as e:  # noqa: BLE001 - a damaged or hostile pickle raises many types
        raise DataError(f"{path} is not a plain nanoGPT meta.pkl ({e}); only dicts of strings and ints are "
                        f"read; re-create the folder: {prepare_hint(path.parent)}") from None
    itos = raw.get("itos") if isinstance(raw, dict) else None
    n = raw.get("vocab_size") if isinstance(raw, dict) else None
    ok = isinstance(itos, dict) and isinstance(n, int) and sorted(itos) == list(range(n)) \
        and all(isinstance(c, str) and len(c) == 1 for c in itos.values())
    if not ok:
        raise DataError(f"{path} is not a nanoGPT char meta.pkl (needs vocab_size and itos: id -> character); "
                        f"re-create the folder: {prepare_hint(path.parent)}")
    return {"tokenizer": "char", "vocab_size": n, "dtype": "uint16", "eot_token": None,
            "chars": [itos[i] for i in range(n)], "source": f"nanoGPT {path}"}


def load_meta(data_dir: str | Path) -> dict:
    """The data folder's meta dict: `tokenizer`, `vocab_size`, `dtype`, and more (see nanogpt_jax.prepare).

    Read from meta.json; else from nanoGPT's meta.pkl (char data) through an unpickler that builds
    no objects; else, for a nanoGPT folder holding only .bin files, GPT-2 ids as uint16 (with a warning).
    Raises DataError for a missing folder, a folder without data, or a damaged or foreign meta file.
    """
    if storage.is_url(data_dir):
        return _load_remote_meta(str(data_dir))
    d = Path(data_dir)
    if not d.is_dir():
        raise DataError(f"data dir {d} does not exist; create it with: {prepare_hint(d)}")
    if (d / "meta.json").is_file():
        try:
            meta = json.loads((d / "meta.json").read_text())
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read {d / 'meta.json'} ({e}); re-create it: {prepare_hint(d)}") from None
        missing = [k for k in ("tokenizer", "vocab_size", "dtype") if not isinstance(meta, dict) or k not in meta]
        if missing:
            raise DataError(f"{d / 'meta.json'} lacks {', '.join(missing)}; re-create it: {prepare_hint(d)}")
    elif (d / "meta.pkl").is_file():
        meta = _meta_from_pkl(d / "meta.pkl")
    elif any((d / f"{s}.bin").is_file() for s in ("train", "val")):
        logging.warning("%s has no meta.json: reading its .bin files as nanoGPT's GPT-2 tokens (uint16)", d)
        meta = dict(NANOGPT_GPT2_META)
    else:
        raise DataError(f"{d} holds no prepared data (train.bin, val.bin, meta.json); create it with: "
                        f"{prepare_hint(d)}")
    return _checked_meta(meta, d)


def _checked_meta(meta: dict, d: str | Path) -> dict:
    if meta["dtype"] not in DTYPES or not isinstance(meta["vocab_size"], int) or meta["vocab_size"] < 1:
        raise DataError(f"{d}: meta dtype {meta['dtype']!r} / vocab_size {meta['vocab_size']!r} are not "
                        f"uint16/uint32 and a positive int; re-create it: {prepare_hint(d)}")
    return meta


def _load_remote_meta(url: str) -> dict:
    """meta.json of a data folder in a bucket, read there (no copy): a URL folder needs one."""
    path = storage.path(url) / "meta.json"
    try:
        text = path.read_text()
    except FileNotFoundError:
        storage.check_bucket(url, "data.data_dir")  # a missing bucket or no credentials say so first
        raise DataError(f"data.data_dir={url} has no meta.json (train.bin, val.bin, meta.json); prepare it there "
                        f"with: python data_prep/<dataset>.py --out_dir {url}") from None
    except Exception as e:  # noqa: BLE001 - gcsfs / google-auth errors
        raise storage.explain(e, path, "read") from None
    try:
        meta = json.loads(text)
    except ValueError as e:
        raise DataError(f"cannot read {path} ({e}); prepare the folder again") from None
    missing = [k for k in ("tokenizer", "vocab_size", "dtype") if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise DataError(f"{path} lacks {', '.join(missing)}; prepare the folder again")
    return _checked_meta(meta, url)


def model_vocab_size(meta: dict) -> int:
    """Embedding rows for a model trained on this data: GPT-2's 50,257 ids padded up to a multiple of 64
    (50,304, nanoGPT's choice: faster matmuls; the extra rows are never targets), any other vocabulary as is
    (nanoGPT uses meta.pkl's vocab_size for char data)."""
    n = meta["vocab_size"]
    return -(-n // 64) * 64 if meta["tokenizer"] == "gpt2" else n


def check_init_vocabulary(init_from: str, data_dir: str | Path, meta: dict) -> None:
    """Refuse pretrained GPT-2 weights on data of another vocabulary, before anything is loaded or written.

    init_from: a GPT-2 name (gpt2, ...) or a Hugging Face folder (its config.json's vocab_size is read;
    one of 50257 rows or more is GPT-2's BPE); scratch and resume are not checked here. meta: the
    data folder's (`load_meta`). A smaller HF vocabulary (e.g. a char model exported with export_hf)
    is left to the vocab_size checks of `Dataset`.
    Raises DataError naming both vocabularies when the weights' are GPT-2's BPE and the data's is not.
    """
    from nanogpt_jax.model import GPT2_SIZES, GPT2_VOCAB_SIZE  # jax and flax: only when weights are named

    if init_from in GPT2_SIZES:
        weights = f"{init_from}'s"
    else:
        try:
            n = json.loads((Path(init_from) / "config.json").read_text())["vocab_size"]
        except (OSError, ValueError, KeyError, TypeError):
            return  # not a readable HF folder: loading it reports why
        if not isinstance(n, int) or n < GPT2_VOCAB_SIZE:
            return
        weights = f"the folder's (vocab_size {n})"
    if meta["tokenizer"] != "gpt2":
        raise DataError(f"init_from={init_from}: {weights} weights are for "
                        f"{tokenizers.describe('gpt2', GPT2_VOCAB_SIZE)}, but data.data_dir={data_dir} is tokenized "
                        f"with {tokenizers.describe(meta['tokenizer'], meta['vocab_size'])} (its meta); its ids would "
                        "mean other text to the model: prepare the data with GPT-2's BPE (data_prep/shakespeare.py, "
                        "data_prep/text.py) or train from scratch (--config.init_from=scratch)")


def tokenizer_for(data_dir: str | Path) -> tokenizers.Tokenizer:
    """The tokenizer the folder's data was prepared with (its meta.json, or nanoGPT's meta.pkl)."""
    return tokenizers.from_meta(load_meta(data_dir))


def find_data_dir(data_dir: str | Path, recorded: str | Path | None = None) -> Path:
    """The data folder of a model being sampled or evaluated: its tokenizer, and the loss task's data.

    One rule for run_sample.py and run_eval.py (`restore.load_model` applies it to a checkpoint):
    the config's `data_dir` when it was given explicitly (any value but DEFAULT_DATA_DIR, the
    default); else the folder the checkpoint's run `recorded` (its record's data_dir) when it is on
    this machine; else `data_dir` (a run copied from elsewhere recorded a path that is not here).

    Raises DataError when the chosen folder does not exist (naming the recorded one when that one is
    here), or when an explicit folder's vocabulary is not the one the run trained on (naming both).
    """
    chosen, explicit = storage.path(data_dir), str(data_dir) != DEFAULT_DATA_DIR
    here = recorded is not None and _is_folder(recorded)
    if here and not explicit:
        return storage.path(recorded)
    if recorded is not None and not here and not explicit and _is_folder(chosen):
        logging.warning("the checkpoint's data_dir %s is not here; reading data.data_dir=%s", recorded, chosen)
    if not _is_folder(chosen):
        if here:
            raise DataError(f"data.data_dir={str(data_dir)!r} does not exist; the checkpoint was trained on "
                            f"{recorded}: pass --config.data.data_dir={recorded}, or leave data.data_dir unset")
        if recorded is not None:
            raise DataError(f"the checkpoint's data folder {recorded} is not on this machine and data.data_dir="
                            f"{str(data_dir)!r} does not exist; pass --config.data.data_dir=DIR, the data it was "
                            "trained on (its tokenizer is read from DIR/meta.json)")
        load_meta(chosen)  # raises DataError: how to create it
    if here and _resolved(recorded) != _resolved(chosen):
        mine, theirs = tokenizer_for(chosen), tokenizer_for(recorded)
        if not tokenizers.same_vocabulary(mine, theirs):
            raise DataError(f"data.data_dir={str(data_dir)!r} holds {tokenizers.describe(mine.name, mine.n_vocab)}, "
                            f"but the checkpoint was trained on {recorded} with "
                            f"{tokenizers.describe(theirs.name, theirs.n_vocab)} (other characters or ids); pass "
                            f"--config.data.data_dir={recorded} or data prepared with the same vocabulary")
    return chosen


def _is_folder(p: str | Path) -> bool:
    """A local folder, or a bucket folder holding meta.json (a URL `p` is not a path on this machine)."""
    if storage.is_url(p):
        try:
            return (storage.path(p) / "meta.json").exists()
        except Exception:  # noqa: BLE001 - no bucket or no credentials: load_meta reports it
            return False
    return Path(p).is_dir()


def _resolved(p: str | Path) -> str:
    return str(p).rstrip("/") if storage.is_url(p) else str(Path(p).resolve())


# ---- splits --------------------------------------------------------------------------------------


def open_split(data_dir: str | Path, split: str, meta: dict | None = None) -> np.memmap:
    """A split's tokens as a read-only 1-D np.memmap (uint16 or uint32, as meta.json says).

    Raises DataError when the file is missing, empty, truncated (its size is not a whole number of
    tokens) or holds another number of tokens than meta.json records.
    """
    d = Path(data_dir)
    meta = meta or load_meta(d)
    path = d / f"{split}.bin"
    hint = prepare_hint(d)
    if not path.is_file():
        raise DataError(f"{path} does not exist; create it with: {hint}")
    dtype = np.dtype(meta["dtype"])
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"{path} is empty; re-create it: {hint}")
    if size % dtype.itemsize:
        raise DataError(f"{path} is truncated: {size} bytes is not a whole number of {dtype.name} tokens; "
                        f"re-create it: {hint}")
    expected = meta.get("splits", {}).get(split, {}).get("tokens")
    if expected is not None and expected != size // dtype.itemsize:
        raise DataError(f"{path} holds {size // dtype.itemsize:,} tokens but meta.json says {expected:,}; "
                        f"re-create it: {hint}")
    return np.memmap(path, dtype=dtype, mode="r")


def check_token_ids(tokens: np.ndarray, vocab_size: int, name: str = "the split") -> None:
    """A cheap check that the ids fit `vocab_size`: SCAN_CHUNKS evenly spaced chunks (first and last
    included), 256K tokens whatever the file size. Raises DataError naming the first bad id."""
    n = len(tokens)
    span = min(n, SCAN_CHUNK_TOKENS)
    for start in np.unique(np.linspace(0, n - span, SCAN_CHUNKS).astype(np.int64)):
        chunk = np.asarray(tokens[start:start + span])
        if chunk.max() >= vocab_size:
            bad = int(np.argmax(chunk >= vocab_size))
            raise DataError(f"{name} holds token id {int(chunk[bad])} (at token {int(start) + bad:,}), beyond the "
                            f"model's vocab_size={vocab_size}; set model.vocab_size > {int(chunk.max())} or use data "
                            "prepared with the model's tokenizer")


def check_length(tokens: np.ndarray, block_size: int, name: str = "the split") -> None:
    """Raise DataError (naming `name`) unless the 1-D `tokens` hold more than block_size >= 1 tokens:
    a window of block_size inputs needs one more token for its last target."""
    if block_size < 1 or len(tokens) <= block_size:
        raise DataError(f"{name} has {len(tokens):,} tokens, not more than block_size={block_size}; lower "
                        "model.block_size or prepare more data")


class Dataset:
    """A prepared data folder, checked once at start-up.

    Args:
      data_dir: the folder with train.bin, val.bin and meta.json (or nanoGPT's meta.pkl); or a bucket URL
        (gs://...): its meta.json and the `splits` are first copied to `cache_dir` and checked
        (`storage.local_data_dir`), and that copy is memory-mapped.
      block_size: the model's context; every split must hold more tokens.
      model_vocab_size: the model's embedding rows (None: the data's vocab_size). meta.json's
        vocab_size and a sampled scan of each split's ids must fit it.
      splits: the splits to open and check.
      cache_dir: the local copies of bucket data folders (data.cache_dir).
    Raises:
      DataError: each problem above, with the fix, on one line.
    """

    def __init__(self, data_dir: str | Path, *, block_size: int, model_vocab_size: int | None = None,
                 splits: Iterable[str] = ("train", "val"), cache_dir: str | Path = storage.DEFAULT_CACHE_DIR):
        splits = tuple(splits)
        if storage.is_url(data_dir):  # memory-mapping needs local files: a checked copy (process 0 shows progress)
            import jax

            load_meta(data_dir)  # a missing bucket, credentials or meta.json: said before any copy
            data_dir = storage.local_data_dir(data_dir, cache_dir, splits, show_progress=jax.process_index() == 0)
        self.data_dir = Path(data_dir)
        self.meta = load_meta(self.data_dir)
        self.vocab_size: int = self.meta["vocab_size"]
        vocab = model_vocab_size or self.vocab_size
        if self.vocab_size > vocab:
            raise DataError(f"{self.data_dir}'s vocab_size={self.vocab_size} ({self.meta['tokenizer']}) does not fit "
                            f"the model's vocab_size={vocab}; set model.vocab_size >= {self.vocab_size} or use "
                            "data prepared for this model")
        self._splits: dict[str, np.memmap] = {}
        for name in splits:
            tokens = open_split(self.data_dir, name, self.meta)
            label = f"{self.data_dir / name}.bin"
            check_length(tokens, block_size, label)
            max_id = self.meta.get("splits", {}).get(name, {}).get("max_id")
            if max_id is not None and max_id >= vocab:  # recorded by data_prep: exact and free
                raise DataError(f"{label} holds token id {max_id} (meta.json's max_id), beyond the model's "
                                f"vocab_size={vocab}; set model.vocab_size > {max_id} or use data prepared "
                                "with the model's tokenizer")
            check_token_ids(tokens, vocab, label)
            self._splits[name] = tokens
        self._tokenizer: tokenizers.Tokenizer | None = None

    @property
    def tokenizer(self) -> tokenizers.Tokenizer:
        """The data's tokenizer (built on first use: GPT-2's loads tiktoken's files)."""
        if self._tokenizer is None:
            self._tokenizer = tokenizers.from_meta(self.meta)
        return self._tokenizer

    def split(self, name: str) -> np.memmap:
        """A split's tokens, 1-D (opened and checked at construction, or now)."""
        if name not in self._splits:
            self._splits[name] = open_split(self.data_dir, name, self.meta)
        return self._splits[name]
