"""OpenWebText (or any Hugging Face dataset of documents) into train.bin / val.bin with the GPT-2 BPE.

nanoGPT's recipe (data/openwebtext/prepare.py): `train_test_split(test_size=0.0005, seed=2357,
shuffle=True)` with the test split renamed val, `encode_ordinary` on each document followed by the
end-of-text token 50256, uint16 ids in document order. So a literal "<|endoftext|>" inside a document
is ordinary text: every document contributes exactly one 50256. Here, in addition:

- Sources: a hub id (default Skylion007/openwebtext, where nanoGPT's "openwebtext" lives now, needs
  the internet or HF's cache), a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`,
  or local data files (`files`: .jsonl/.json/.parquet/.arrow/.csv, or .txt with one document per file).
- Bounded memory: the main process reads a few tasks of documents at a time, worker processes
  (`num_proc`) return their uint16 tokens, and the main process appends them in order. Nothing holds
  the corpus; the shuffled split's indices live in files beside the output. (The arrow files are
  memory-mapped by `datasets`: the page cache they occupy shows in RSS as file-backed pages, clean
  and reclaimable; `python -m nanogpt_jax.bench.data` reports that part apart.)
- Resumable: each split is written in shards of `shard_docs` documents into a hidden work folder;
  after each shard the file is synced and `progress.json` records it. Run the same command after an
  interruption and the finished shards are kept (the unfinished one is cut off and redone), giving
  the same bytes as an uninterrupted run. Different inputs or settings start over.
- Atomic: train.bin, val.bin and meta.json appear only when everything is done.
"""

from __future__ import annotations

import collections
import contextlib
import json
import multiprocessing as mp
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from absl import logging

from nanogpt_jax import prepare
from nanogpt_jax import tokenizer as tokenizers
from nanogpt_jax.errors import DataError

DEFAULT_DATASET = "Skylion007/openwebtext"
TEST_SIZE = 0.0005  # nanoGPT: ~4,000 of 8,013,769 documents are val
SPLIT_SEED = 2357  # nanoGPT's seed for the split
DOCS_PER_TASK = 256  # documents per worker task
SHARD_DOCS = 8192  # documents per resume point (~1,000 shards for OpenWebText)
WORK_DIR = ".openwebtext.partial"  # inside out_dir, removed when done
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow", ".csv": "csv",
            ".txt": "text"}


def _datasets():
    try:
        import datasets
    except ImportError:
        raise DataError("data_prep/openwebtext.py needs Hugging Face datasets: pip install "
                        "'nanogpt_jax[datasets]'") from None
    return datasets


def load_documents(dataset: str = DEFAULT_DATASET, files: Sequence[str] = (), *, text_field: str = "text",
                   num_proc: int = 1):
    """(documents, source): a `datasets.Dataset` with only the `text_field` column, and its description.

    Args:
      dataset: a hub id, or a folder written by `save_to_disk` (a DatasetDict's "train" split is used).
      files: local data files or globs; when given, `dataset` is ignored.
      num_proc: processes for a hub download (nanoGPT's num_proc_load_dataset).
    Raises:
      DataError: the source cannot be loaded (one line: the cause and the offline fix), has no
        `text_field` column, or has fewer than 2 documents.
    """
    datasets = _datasets()
    if files:
        paths = prepare.resolve_inputs(files, flag="--files")
        kinds = {BUILDERS.get(p.suffix.lower()) for p in paths}
        if None in kinds or len(kinds) > 1:
            raise DataError(f"--files must all be one kind of {', '.join(BUILDERS)} file; got "
                            f"{sorted({p.suffix or p.name for p in paths})}")
        builder, source = kinds.pop(), ",".join(map(str, files))
        extra = {"sample_by": "document"} if builder == "text" else {}
        load = lambda: datasets.load_dataset(builder, data_files=[str(p) for p in paths], split="train", **extra)
    elif Path(dataset).expanduser().is_dir() and any(
            (Path(dataset).expanduser() / f).is_file() for f in ("state.json", "dataset_dict.json")):
        source = str(Path(dataset).expanduser())
        load = lambda: datasets.load_from_disk(source)
    else:
        source = dataset
        load = lambda: datasets.load_dataset(dataset, split="train", num_proc=num_proc if num_proc > 1 else None)
    try:
        ds = load()
    except Exception as e:  # noqa: BLE001 - network, missing or malformed files: one line with the fix
        cause = (str(e).strip().splitlines() or [""])[0][:200]
        raise DataError(f"cannot load dataset {source!r} ({type(e).__name__}: {cause}); offline, pass --dataset "
                        "a folder written by save_to_disk or --files local .jsonl/.parquet/.txt files") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"dataset {source!r} has no 'train' split (it has {list(ds)}); save the documents "
                            "as its train split")
        ds = ds["train"]
    if text_field not in ds.column_names:
        raise DataError(f"dataset {source!r} has no column {text_field!r} (it has {ds.column_names}); "
                        "pass --text_field")
    if len(ds) < 2:
        raise DataError(f"dataset {source!r} has {len(ds)} document(s); a train and a val split need at least 2")
    return ds.select_columns([text_field]), source


def split_documents(ds, work: Path, *, test_size: float = TEST_SIZE, seed: int = SPLIT_SEED) -> dict:
    """nanoGPT's split: {"train": ..., "val": ...}; the shuffled indices are files in `work`, not memory."""
    parts = ds.train_test_split(test_size=test_size, seed=seed, shuffle=True,
                                train_indices_cache_file_name=str(work / "train-indices.arrow"),
                                test_indices_cache_file_name=str(work / "val-indices.arrow"))
    return {"train": parts["train"], "val": parts["test"]}


# ---- worker side ---------------------------------------------------------------------------------


def encode_documents(texts: list[str | None]) -> np.ndarray:
    """uint16 tokens of the documents, each followed by the end-of-text token 50256 (`encode_ordinary`)."""
    tok = tokenizers.gpt2()
    ids = tok.encode_batch([t or "" for t in texts])
    eot = np.array([tok.eot_token], dtype=np.uint32)
    return np.concatenate([part for x in ids for part in (x, eot)]).astype(np.uint16)


@contextlib.contextmanager
def worker_pool(num_proc: int) -> Iterator[Callable[[Iterable[list]], Iterator[np.ndarray]]]:
    """A function mapping `encode_documents` over tasks, in order, in `num_proc` spawned processes
    (in this process when 1). At most 2 x num_proc tasks are in flight, so memory holds a few tasks
    whatever the corpus size."""
    if num_proc <= 1:
        yield lambda tasks: map(encode_documents, tasks)
        return

    def run(tasks: Iterable[list]) -> Iterator[np.ndarray]:
        pending: collections.deque = collections.deque()
        for task in tasks:
            pending.append(pool.apply_async(encode_documents, (task,)))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

    # spawn, not fork: the parent may hold threads (tqdm, jax) that fork would copy mid-lock
    with mp.get_context("spawn").Pool(num_proc) as pool:
        yield run


# ---- the resumable writer ------------------------------------------------------------------------


def _load_progress(work: Path, fingerprint: dict) -> dict:
    """The record of an interrupted run with the same inputs and settings, else a fresh start."""
    path = work / "progress.json"
    if path.is_file():
        try:
            state = json.loads(path.read_text())
            intact = all((work / f"{s}.bin").is_file() and (work / f"{s}.bin").stat().st_size >= 2 * v["tokens"]
                         for s, v in state["splits"].items())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            state, intact = {}, False
        if state.get("fingerprint") == fingerprint and intact:
            logging.info("resuming: %s", ", ".join(f"{s} {v['shards_done']} shards done"
                                                   for s, v in state["splits"].items()))
            return state
        logging.warning("%s holds an earlier run with other inputs or settings, or damaged files; starting over",
                        work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    return {"fingerprint": fingerprint, "splits": {}}


def _write_split(split: str, docs, field: str, work: Path, state: dict, *, shard_docs: int, run: Callable,
                 bar) -> dict:
    """Append the split's unfinished shards to work/<split>.bin; returns {"tokens", "max_id"}."""
    done = state["splits"].setdefault(split, {"shards_done": 0, "tokens": 0, "max_id": -1})
    n = len(docs)
    n_shards = -(-n // shard_docs)
    path = work / f"{split}.bin"
    out = prepare.BinWriter(path, "uint16", keep_tokens=done["tokens"] if done["shards_done"] else None)
    out.max_id = done["max_id"]
    bar.update(min(n, done["shards_done"] * shard_docs))
    try:
        for k in range(done["shards_done"], n_shards):
            ranges = [(lo, min(lo + DOCS_PER_TASK, n, (k + 1) * shard_docs))
                      for lo in range(k * shard_docs, min(n, (k + 1) * shard_docs), DOCS_PER_TASK)]
            tasks = (docs[lo:hi][field] for lo, hi in ranges)  # read here, a task at a time
            for (lo, hi), ids in zip(ranges, run(tasks), strict=True):
                out.write(ids)
                bar.update(hi - lo)
            out.sync()  # the shard is on disk before the record says so
            done.update(shards_done=k + 1, tokens=out.tokens, max_id=out.max_id)
            prepare.write_json(work / "progress.json", state)
    finally:
        out.close()
    return {"tokens": done["tokens"], "max_id": done["max_id"]}


def prepare_openwebtext(out_dir: str | os.PathLike = "data/openwebtext", *, dataset: str = DEFAULT_DATASET,
                        files: Sequence[str] = (), text_field: str = "text", num_proc: int = 0,
                        test_size: float = TEST_SIZE, seed: int = SPLIT_SEED, shard_docs: int = SHARD_DOCS) -> dict:
    """Tokenize a dataset of documents into out_dir/{train,val}.bin + meta.json; returns the meta dict.

    Args are those of `load_documents` and nanoGPT's split; num_proc: worker processes (0: every core).
    Raises DataError for a source that cannot be loaded or an out_dir that cannot be written.
    An interruption (Ctrl-C, a kill) leaves out_dir/.openwebtext.partial to resume from.
    """
    from tqdm import tqdm

    if not 0.0 < test_size < 1.0:
        raise DataError(f"--test_size={test_size} must lie strictly between 0 and 1")
    if shard_docs < 1:
        raise DataError(f"--shard_docs={shard_docs} must be at least 1")
    out = prepare.check_out_dir(out_dir)
    num_proc = num_proc or os.cpu_count() or 1
    ds, source = load_documents(dataset, files, text_field=text_field, num_proc=num_proc)
    fingerprint = {"source": source, "docs": len(ds), "dataset_fingerprint": ds._fingerprint,
                   "text_field": text_field, "test_size": test_size, "seed": seed, "shard_docs": shard_docs}
    prepare.make_out_dir(out)
    work = out / WORK_DIR
    state = _load_progress(work, fingerprint)
    splits = split_documents(ds, work, test_size=test_size, seed=seed)
    logging.info("%s: %s train and %s val documents, %d processes", source, f"{len(splits['train']):,}",
                 f"{len(splits['val']):,}", num_proc)
    stats = {}
    try:
        with worker_pool(num_proc) as run, tqdm(total=len(ds), unit="doc", desc="tokenizing", smoothing=0.05) as bar:
            for split in ("val", "train"):  # val first: small
                stats[split] = _write_split(split, splits[split], text_field, work, state, shard_docs=shard_docs,
                                            run=run, bar=bar)
    except BaseException:
        logging.warning("stopped; the finished shards are kept in %s: run the same command again to resume", work)
        raise
    for split in ("train", "val"):
        os.replace(work / f"{split}.bin", prepare.partial_path(out, split))
    meta = prepare.commit(out, tokenizers.gpt2(), {s: stats[s] for s in ("train", "val")},
                          f"{source} (nanoGPT split: test_size={test_size}, seed={seed})")
    shutil.rmtree(work, ignore_errors=True)
    return meta
