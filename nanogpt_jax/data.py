"""Reading prepared data: meta.json, memory-mapped splits, and batches as a pure function of the step.

    ds = data.Dataset("data/openwebtext", block_size=1024, model_vocab_size=50304)   # checks everything once
    batches = data.TrainBatches(ds.split("train"), batch_size=12, block_size=1024, grad_accum=40,
                                seed=1337, sharding=batch_sharding)
    x, y = batches.global_(step)              # jax.Arrays (grad_accum, batch_size, block_size) int32
    for step, x, y in batches.prefetch(start_step, max_iters): ...   # built ahead by a thread
    val = data.eval_batches(ds.split("val"), batch_size=12, block_size=1024, n_batches=200, seed=1337)

How hosts split the data: the offsets of the whole global batch of a step, (grad_accum, batch_size)
window starts, are drawn from a generator seeded by (seed, step) alone. Each process then reads only
the rows its devices hold (found from the batch `sharding`, whatever the mesh) and
`jax.make_array_from_process_local_data` assembles the global array. So batch (seed, step) is the
same on 1 or 64 hosts, and a run resumed at step s sees exactly the batches it would have seen; no
iterator state is saved. Windows are drawn with replacement, as nanoGPT's get_batch does.

Memory: a long-lived memmap over a 17 GB train.bin would keep every page it ever touched resident,
so the reader maps the file afresh for each batch and unmaps it after (nanoGPT recreates its memmap
per batch for the same reason). Resident memory stays at a few batches' pages over millions of steps
(`python -m nanogpt_jax.bench.data` shows it).
"""

from __future__ import annotations

import atexit
import json
import pickle
import queue
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
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
TRAIN_STREAM, EVAL_STREAM = 0, 1  # keep training and evaluation offsets independent for one seed
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

    One rule for run_sample.py and run_eval.py (`sample.load_model` applies it to a checkpoint):
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


def _check_length(tokens: np.ndarray, block_size: int, name: str = "the split") -> None:
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
            _check_length(tokens, block_size, label)
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


# ---- windows -------------------------------------------------------------------------------------


class _WindowReader:
    """Reads windows of tokens as int32. For a file-backed memmap the file is mapped afresh per read and
    unmapped after, so resident memory does not grow toward the file size over a long run."""

    def __init__(self, tokens: np.ndarray):
        self.n = len(tokens)
        if isinstance(tokens, np.memmap) and tokens.filename:
            self._file = (tokens.filename, tokens.dtype, tokens.offset, tokens.shape)
            self._tokens = None
        else:
            self._file, self._tokens = None, np.asarray(tokens)

    def read(self, starts: np.ndarray, length: int) -> np.ndarray:
        """int32 (*starts.shape, length): tokens[s : s + length] for each start s."""
        if self._tokens is not None:
            tokens = self._tokens
        else:
            filename, dtype, offset, shape = self._file
            tokens = np.memmap(filename, dtype=dtype, mode="r", offset=offset, shape=shape)
        idx = np.asarray(starts, dtype=np.int64)[..., None] + np.arange(length)
        return np.asarray(tokens[idx], dtype=np.int32)  # a copy: the mapping is released with `tokens`


def process_indices(sharding, global_shape: tuple[int, ...]) -> tuple[np.ndarray, ...]:
    """For each axis of a `global_shape` array on `sharding`, the global indices this process holds, in
    the order `jax.make_array_from_process_local_data` lays out local data (its shards' starts, sorted).

    Only `sharding.addressable_devices_indices_map` and `.shard_shape` are used, so any mesh works.
    Raises DataError when the shape does not divide evenly over the sharding.
    """
    try:
        shard_shape = sharding.shard_shape(global_shape)
    except ValueError:
        raise DataError(f"a batch of shape {global_shape} (grad_accum, batch_size, block_size) does not divide "
                        f"evenly over the devices of its sharding ({sharding}); make train.batch_size a multiple "
                        "of the devices it is split over") from None
    indices = list(sharding.addressable_devices_indices_map(global_shape).values())
    out = []
    for axis, size in enumerate(shard_shape):
        starts = sorted({idx[axis].start or 0 for idx in indices})
        out.append(np.concatenate([np.arange(s, s + size) for s in starts]))
    return tuple(out)


class TrainBatches:
    """Training batches as a pure function of (seed, step): window starts drawn with replacement.

    Args:
      tokens: a split's 1-D tokens (`Dataset.split("train")`: a memmap, read without growing memory).
      batch_size: global sequences per micro-step (over all devices and hosts).
      block_size: tokens per sequence.
      grad_accum: micro-steps per optimizer step (the leading axis).
      seed: with the step, the only input to the offsets; a non-negative int.
      sharding: the batch's sharding, e.g. NamedSharding(mesh, P(None, ("data", "fsdp"), None)); None:
        one process holding everything, arrays on the default device.
    Raises:
      DataError: the split is not longer than block_size, or the batch does not divide over `sharding`.
    """

    def __init__(self, tokens: np.ndarray, *, batch_size: int, block_size: int, grad_accum: int = 1,
                 seed: int = 0, sharding=None):
        _check_length(tokens, block_size)
        if batch_size < 1 or grad_accum < 1 or seed < 0:
            raise DataError(f"batch_size={batch_size} and grad_accum={grad_accum} must be >= 1 and seed={seed} >= 0")
        self.batch_size, self.block_size, self.grad_accum, self.seed = batch_size, block_size, grad_accum, seed
        self.sharding = sharding
        self.global_shape = (grad_accum, batch_size, block_size)
        self.indices = (process_indices(sharding, self.global_shape) if sharding is not None
                        else tuple(np.arange(n) for n in self.global_shape))
        self._reader = _WindowReader(tokens)

    def offsets(self, step: int) -> np.ndarray:
        """int64 (grad_accum, batch_size): the start of every window of global batch `step`."""
        rng = np.random.default_rng([TRAIN_STREAM, self.seed, step])
        return rng.integers(0, self._reader.n - self.block_size, size=(self.grad_accum, self.batch_size))

    def batch(self, step: int, rows: np.ndarray | slice | None = None,
              micro: np.ndarray | slice | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) numpy int32 (micro-steps, rows, block_size) for the given global rows (default all);
        y is x shifted by one token."""
        starts = self.offsets(step)
        starts = starts[slice(None) if micro is None else micro][:, slice(None) if rows is None else rows]
        windows = self._reader.read(starts, self.block_size + 1)
        return windows[..., :-1], windows[..., 1:]

    def local(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) numpy int32 (grad_accum, local rows, block_size): this process's part of global batch `step`."""
        micro, rows, cols = self.indices
        x, y = self.batch(step, rows, micro)
        if len(cols) != self.block_size:  # the sequence axis is split over processes as well
            x, y = x[..., cols], y[..., cols]
        return x, y

    def global_(self, step: int):
        """(x, y) jax.Arrays int32 (grad_accum, batch_size, block_size) on `sharding`; each process reads
        only its own rows."""
        import jax

        x, y = self.local(step)
        if self.sharding is None:
            return jax.device_put(x), jax.device_put(y)
        make = jax.make_array_from_process_local_data
        return make(self.sharding, x, self.global_shape), make(self.sharding, y, self.global_shape)

    def prefetch(self, start: int, stop: int | None = None, depth: int = 2) -> Prefetcher:
        """An iterator of (step, x, y) for steps start .. stop - 1 (forever when stop is None), with
        `global_` batches built `depth` steps ahead by a background thread. Close it (or use `with`)
        when leaving early; an error in the thread is raised by the next `next()`."""
        steps = range(start, stop) if stop is not None else _count(start)
        return Prefetcher(self.global_, steps, depth)


def _count(start: int) -> Iterator[int]:
    while True:
        yield start
        start += 1


# ---- background prefetch -------------------------------------------------------------------------

_DONE = object()
_LIVE: weakref.WeakSet = weakref.WeakSet()


def _fill(make: Callable[[int], tuple], steps: Iterator[int], q: queue.Queue, stop: threading.Event) -> None:
    """The prefetch thread: put (step, *make(step)) for each step, then _DONE; an exception as _Failed."""

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    try:
        for step in steps:
            if stop.is_set() or not put((step, *make(step))):
                return
        put(_DONE)
    except BaseException as e:  # noqa: BLE001 - handed to the consumer
        put(_Failed(e))


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


class Prefetcher:
    """Iterates (step, *make(step)) over `steps`, with up to `depth` items made ahead by a daemon thread.

    `close()` (also on `with` exit, garbage collection and interpreter exit) stops the thread; an
    exception raised by `make` is re-raised in the consumer with its traceback.
    """

    def __init__(self, make: Callable[[int], tuple], steps: Iterable[int], depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._closed = False
        # the thread holds the queue and the event, not self: an abandoned Prefetcher is collected
        self._thread = threading.Thread(target=_fill, args=(make, iter(steps), self._queue, self._stop),
                                        name="nanogpt-prefetch", daemon=True)
        if not _LIVE:  # registered late, so it runs before the exit handlers of jax (imported earlier)
            atexit.unregister(_close_all)
            atexit.register(_close_all)
        _LIVE.add(self)
        self._thread.start()

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> tuple:
        if self._closed:
            raise StopIteration
        item = self._queue.get()
        if item is _DONE:
            self.close()
            raise StopIteration
        if isinstance(item, _Failed):
            self.close()
            raise item.error
        return item

    def close(self) -> None:
        """Stop the thread and drop what it made; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        while True:  # unblock a put in progress
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if hasattr(self, "_stop"):
            self._stop.set()


def _close_all() -> None:
    """At exit, stop threads still making batches before the interpreter (and jax) tear down."""
    for p in list(_LIVE):
        p.close()


# ---- evaluation ----------------------------------------------------------------------------------


def eval_batches(tokens: np.ndarray, *, batch_size: int, block_size: int, n_batches: int,
                 seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """`n_batches` fixed batches (x, y), numpy int32 (batch_size, block_size): windows at offsets drawn
    once from `seed` (independent of the training offsets), the same at every call, so successive
    evaluations of a run compare like with like. Raises DataError when the split is too short."""
    _check_length(tokens, block_size)
    reader = _WindowReader(tokens)
    starts = np.random.default_rng([EVAL_STREAM, seed]).integers(0, reader.n - block_size,
                                                                 size=(n_batches, batch_size))
    out = []
    for s in starts:
        w = reader.read(s, block_size + 1)
        out.append((w[:, :-1], w[:, 1:]))
    return out


def sliding_windows(tokens: np.ndarray, *, block_size: int, stride: int,
                    batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Exact evaluation: (x, y, mask) numpy (batch_size, block_size), int32 / int32 / float32, over which
    every token after the first is scored exactly once (mask 1.0 where y is scored).

    Windows of block_size tokens start every `stride` tokens (the last one ends at the split's end), and
    each scores the targets the previous windows did not, so a scored token sees block_size - stride
    tokens of context or more (the first window: from the start). The same scheme as Hugging Face's
    perplexity guide. Padding (a short split, the last batch) has x = y = 0 and mask 0.
    Raises DataError unless 1 <= stride <= block_size.
    """
    if not 1 <= stride <= block_size:
        raise DataError(f"stride={stride} must lie in 1 .. block_size={block_size}")
    if len(tokens) < 2:
        raise DataError("the split has fewer than 2 tokens; nothing to evaluate")
    reader = _WindowReader(tokens)
    rows = []
    for item in window_spans(len(tokens), block_size=block_size, stride=stride):
        rows.append(item)
        if len(rows) == batch_size:
            yield _window_batch(reader, rows, block_size, batch_size)
            rows = []
    if rows:
        yield _window_batch(reader, rows, block_size, batch_size)


def window_spans(n_tokens: int, *, block_size: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """The windows of `sliding_windows` over n_tokens tokens (n_tokens >= 2, 1 <= stride <= block_size):
    (start, first, length) each: the window's inputs are tokens[start:start + length], its targets one
    further on, and positions first .. length - 1 of it are scored (the targets no window before scored)."""
    n_targets = n_tokens - 1
    last_start = max(0, n_targets - block_size)  # the window that ends at the last target
    scored, start = 0, 0  # targets 1 .. scored are done
    while scored < n_targets:
        start = min(start, last_start)
        length = min(block_size, n_targets - start)
        yield start, scored - start, length
        scored = start + length
        start += stride


def _window_batch(reader: _WindowReader, rows: list[tuple[int, int, int]], block_size: int,
                  batch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = np.zeros((batch_size, block_size), np.int32)
    y = np.zeros((batch_size, block_size), np.int32)
    mask = np.zeros((batch_size, block_size), np.float32)
    for i, (start, first, length) in enumerate(rows):
        w = reader.read(np.array([start]), length + 1)[0]
        x[i, :length], y[i, :length] = w[:-1], w[1:]
        mask[i, first:length] = 1.0
    return x, y, mask
