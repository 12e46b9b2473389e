"""Batches from a split's tokens: training batches as a pure function of (seed, step), a background
prefetcher, fixed evaluation batches and exact sliding windows.

    ds = data.Dataset("data/openwebtext", block_size=1024, model_vocab_size=50304)   # nanogpt_jax.data
    batches = TrainBatches(ds.split("train"), batch_size=12, block_size=1024, grad_accum=40,
                           seed=1337, sharding=batch_sharding)
    x, y = batches.global_(step)              # jax.Arrays (grad_accum, batch_size, block_size) int32
    for step, x, y in batches.prefetch(start_step, max_iters): ...   # built ahead by a thread
    val = eval_batches(ds.split("val"), batch_size=12, block_size=1024, n_batches=200, seed=1337)

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

Reading and checking the data folder (meta.json, the splits) is nanogpt_jax.data's concern.
"""

from __future__ import annotations

import atexit
import queue
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from nanogpt_jax.data import check_length
from nanogpt_jax.errors import DataError

TRAIN_STREAM, EVAL_STREAM = 0, 1  # keep training and evaluation offsets independent for one seed


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
        check_length(tokens, block_size)
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
    check_length(tokens, block_size)
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
