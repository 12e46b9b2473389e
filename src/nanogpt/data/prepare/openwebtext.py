"""OpenWebText (or any Hugging Face dataset of documents) with the GPT-2 BPE, streamed and resumable.

- Documents come from `data.hf_dataset`: a hub id (default Skylion007/openwebtext), a folder written
  by `Dataset.save_to_disk`, or local .parquet / .jsonl / .json / .arrow / .csv files (globs allowed).
- `data.val_docs` evenly spaced documents are validation; every document is followed by EOT (50256).
- Worker processes tokenize batches of documents; the main process appends their tokens in order,
  so peak memory is one shard's tokens, whatever the corpus size.
- Train documents are processed in shards of `data.shard_docs`. After each shard the bin is synced
  and `.progress.json` records it; an interrupted run resumes after the last finished shard.
"""

from __future__ import annotations

import functools
import json
import logging
import multiprocessing as mp
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from nanogpt.data.prepare.common import BinWriter, commit, staged
from nanogpt.data.prepare.hf_documents import load_documents
from nanogpt.data.tokenizer import GPT2Tokenizer

log = logging.getLogger(__name__)

PROGRESS = ".progress.json"
ITEMSIZE = 2  # bytes per token: uint16 holds GPT-2's 50,257 ids
DOCS_PER_TASK = 64  # documents per worker task
_WORKER: dict = {}  # per-process state set by _init_worker: documents, field, val ids, tokenizer


def _init_worker(ds, field: str, val_idx: np.ndarray) -> None:
    _WORKER.update(ds=ds, field=field, val=val_idx, tok=GPT2Tokenizer())


def encode_docs(task: tuple[int, int] | np.ndarray) -> np.ndarray:
    """Tokens of a range (lo, hi) of train documents, or of listed documents, each + EOT."""
    ds, field, tok = _WORKER["ds"], _WORKER["field"], _WORKER["tok"]
    if isinstance(task, tuple):
        lo, hi = task
        keep = ~np.isin(np.arange(lo, hi), _WORKER["val"])  # val documents are not train documents
        texts = [t for t, k in zip(ds[lo:hi][field], keep, strict=True) if k]
    else:
        texts = ds[task.tolist()][field]
    ids = tok.encode_batch(texts, special=False, num_threads=1)  # one thread: a process per core
    if not ids:
        return np.empty(0, dtype=np.uint16)
    return np.concatenate([np.array(x + [tok.eot_token], dtype=np.uint16) for x in ids])


@contextmanager
def worker_map(num_proc: int, initargs: tuple) -> Iterator[Callable]:
    """An ordered map over tasks in `num_proc` processes (in this process when num_proc == 1)."""
    if num_proc == 1:
        _init_worker(*initargs)
        yield lambda tasks: map(encode_docs, tasks)
        return
    with mp.get_context().Pool(num_proc, _init_worker, initargs) as pool:
        # one shard's tasks at a time: Pool.imap would otherwise queue the whole corpus
        yield lambda tasks: pool.imap(encode_docs, list(tasks))


def val_indices(n_docs: int, val_docs: int) -> np.ndarray:
    """`val_docs` evenly spaced document indices (spread over the corpus, no RNG state to keep)."""
    return np.arange(val_docs, dtype=np.int64) * n_docs // val_docs


def shard_tasks(k: int, shard_docs: int, n_docs: int) -> Iterator[tuple[int, int]]:
    lo, hi = k * shard_docs, min((k + 1) * shard_docs, n_docs)
    for start in range(lo, hi, DOCS_PER_TASK):
        yield start, min(start + DOCS_PER_TASK, hi)


def load_progress(data_dir: Path, fingerprint: dict, train_tmp: Path) -> dict:
    """The resume point left by an interrupted run with the same inputs, else a fresh start."""
    path = data_dir / PROGRESS
    fresh = {"fingerprint": fingerprint, "val_tokens": None, "shards_done": 0, "train_tokens": 0}
    if not path.exists():
        return fresh
    state = json.loads(path.read_text())
    size_ok = train_tmp.exists() and train_tmp.stat().st_size >= ITEMSIZE * state["train_tokens"]
    if state.get("fingerprint") != fingerprint or not size_ok:
        log.warning("ignoring the partial files of an earlier, different or damaged run; starting over")
        return fresh
    log.info("resuming: %d shards (%s train tokens) already done", state["shards_done"],
             f"{state['train_tokens']:,}")
    return state


def save_progress(data_dir: Path, state: dict) -> None:
    tmp = data_dir / (PROGRESS + ".tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, data_dir / PROGRESS)


def write_val(run: Callable, val_idx: np.ndarray, path: Path) -> int:
    out = BinWriter(path, "uint16")
    for arr in run(np.array_split(val_idx, max(1, len(val_idx) // DOCS_PER_TASK))):
        out.write(arr)
    out.sync()
    out.close()
    return out.tokens


def write_train(run: Callable, state: dict, tasks: Callable[[int], Iterator], n_shards: int, path: Path,
                data_dir: Path) -> None:
    """Append the shards not yet done to the train file, recording each finished one."""
    if path.exists():
        os.truncate(path, ITEMSIZE * state["train_tokens"])  # drop the tail of an unfinished shard
    out = BinWriter(path, "uint16", append=state["shards_done"] > 0)
    for k in range(state["shards_done"], n_shards):
        for arr in run(tasks(k)):
            out.write(arr)
        out.sync()
        state.update(shards_done=k + 1, train_tokens=out.tokens)
        save_progress(data_dir, state)
        log.info("shard %d/%d done, %s train tokens", k + 1, n_shards, f"{out.tokens:,}")
    out.close()


def prepare(cfg) -> dict:
    """`nanogpt-prepare data=openwebtext` (data.hf_dataset=... for another source)."""
    ds = load_documents(cfg.hf_dataset, cfg.hf_split, cfg.text_field, cfg.val_docs)
    n_docs, data_dir = len(ds), Path(cfg.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    val_idx = val_indices(n_docs, cfg.val_docs)
    fingerprint = {"source": cfg.hf_dataset, "split": cfg.hf_split, "field": cfg.text_field, "docs": n_docs,
                   "val_docs": cfg.val_docs, "shard_docs": cfg.shard_docs,
                   "hf_fingerprint": getattr(ds, "_fingerprint", None)}
    n_shards = -(-n_docs // cfg.shard_docs)
    num_proc = cfg.num_proc or os.cpu_count() or 1
    with staged(data_dir, keep_on_error=True) as paths:
        state = load_progress(data_dir, fingerprint, paths["train"])
        with worker_map(num_proc, (ds, cfg.text_field, val_idx)) as run:
            if state["val_tokens"] is None:
                state["val_tokens"] = write_val(run, val_idx, paths["val"])
                save_progress(data_dir, state)
            tasks = functools.partial(shard_tasks, shard_docs=cfg.shard_docs, n_docs=n_docs)
            write_train(run, state, tasks, n_shards, paths["train"], data_dir)
        meta = commit(data_dir, GPT2Tokenizer(), f"hf:{cfg.hf_dataset}:{cfg.hf_split}", paths)
    (data_dir / PROGRESS).unlink()
    return meta
