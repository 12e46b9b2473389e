"""Data throughput: preparing a synthetic corpus (tokens/s, peak RSS) and the loader (batches/s).

    python -m nanogpt.data.benchmark --mb 16 --dataset text

Each prepare runs in a fresh child process, so its peak RSS is its own (the worker processes'
peak is reported separately).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

COMMON = ("the of and to a in is it you that he was for on are with as I his they be at one have this from "
          "or had by not word but what some we can out other were all there when up use your how said an "
          "each she which do their time if will way about many then them write would like so these her long "
          "make thing see him two has look more day could go come did number sound no most people my over "
          "know water than call first who may down side been now find any new work part take get place made "
          "live where after back little only round man year came show every good me give our under").split()


def synthetic_text(mb: float, seed: int = 0) -> str:
    """About `mb` MB of English-like text: common words with some made-up ones, in lines."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlucmfwypvbgkjqxz"))
    made_up = ["".join(rng.choice(letters, rng.integers(2, 10))) for _ in range(5000)]
    vocab = COMMON + made_up
    p = np.r_[np.full(len(COMMON), 4.0), 1.0 / np.arange(1, len(made_up) + 1)]  # mostly common words
    words = rng.choice(len(vocab), int(mb * 1e6 / 5.5), p=p / p.sum())
    seps = rng.choice([" "] * 10 + [", ", ".\n", ". "], len(words))
    return "".join(vocab[w] + s for w, s in zip(words, seps, strict=True))


def peak_rss_mb() -> float:
    """This process's peak RSS in MB: Linux's VmHWM (getrusage's maxrss would include the peak
    of the parent that started this process, as it survives exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def _child(kind: str, cfg: dict, queue) -> None:
    from nanogpt.config import DataConfig
    from nanogpt.data.prepare import prepare

    t0 = time.perf_counter()
    meta = prepare(DataConfig(**cfg))
    seconds = time.perf_counter() - t0
    queue.put({"kind": kind, "seconds": seconds, "tokens": sum(s["tokens"] for s in meta["splits"].values()),
               "peak_rss_mb": peak_rss_mb(),
               "peak_rss_workers_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024})


def run_prepare(cfg: dict) -> dict:
    """Run one prepare in a fresh (spawned) process; its timing and peak memory."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(cfg["name"], cfg, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def make_source(folder: Path, mb: float, dataset: str) -> dict:
    """Write the synthetic corpus as text files, or as a save_to_disk dataset of ~4 kB documents."""
    text = synthetic_text(mb)
    if dataset == "text":
        for i, k in enumerate(range(0, len(text), 1 << 22)):
            (folder / f"part{i:04d}.txt").write_text(text[k: k + (1 << 22)])
        return {"input": str(folder)}
    from datasets import Dataset

    docs = [text[k: k + 4000] for k in range(0, len(text), 4000)]
    Dataset.from_dict({"text": docs}).save_to_disk(str(folder / "hf"))
    return {"hf_dataset": str(folder / "hf"), "val_docs": max(1, len(docs) // 200)}


def bench_prepare(mb: float = 16, dataset: str = "text", tokenizer: str = "gpt2", num_proc: int = 0,
                  shard_docs: int = 1024) -> dict:
    """Prepare `mb` MB of synthetic text with `dataset` (text | openwebtext); tokens/s and peak RSS."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        cfg = {"name": dataset, "data_dir": str(Path(tmp) / "out"), "tokenizer": tokenizer,
               "num_proc": num_proc, "shard_docs": shard_docs, **make_source(src, mb, dataset)}
        r = run_prepare(cfg)
    r.update(corpus_mb=mb, tokenizer=tokenizer, num_proc=num_proc or os.cpu_count(),
             tokens_per_s=r["tokens"] / r["seconds"], mb_per_s=mb / r["seconds"])
    return r


def bench_loader(tokens: int = 1 << 24, batch_size: int = 12, block_size: int = 1024, sampler: str = "random",
                 iters: int = 200, device: str = "cpu") -> dict:
    """Batches/s of TrainBatches over a memory-mapped bin of `tokens` random GPT-2 ids."""
    import torch

    from nanogpt.data.loader import TrainBatches

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.bin"
        np.random.default_rng(0).integers(0, 50257, tokens, dtype=np.uint16).tofile(path)
        data = np.memmap(path, dtype=np.uint16, mode="r")
        batches = TrainBatches(data, batch_size, block_size, sampler=sampler, device=device)
        for _ in range(5):  # warm up: page cache, first permutation
            batches.next()
        t0 = time.perf_counter()
        for _ in range(iters):
            x, y = batches.next()
        if x.is_cuda:  # the copies are non-blocking: wait for the last one
            torch.cuda.synchronize(x.device)
        seconds = time.perf_counter() - t0
        del data
    return {"sampler": sampler, "batch_size": batch_size, "block_size": block_size, "device": device,
            "batches_per_s": iters / seconds, "tokens_per_s": iters * batch_size * block_size / seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=float, default=16, help="synthetic corpus size in MB")
    p.add_argument("--dataset", default="text", choices=["text", "openwebtext"])
    p.add_argument("--tokenizer", default="gpt2", choices=["gpt2", "char"])
    p.add_argument("--num-proc", type=int, default=0, help="0: all cores")
    p.add_argument("--loader-tokens", type=int, default=1 << 24)
    p.add_argument("--iters", type=int, default=200)
    a = p.parse_args()
    loader = [bench_loader(a.loader_tokens, sampler=s, iters=a.iters) for s in ("random", "epoch")]
    report = {"prepare": bench_prepare(a.mb, a.dataset, a.tokenizer, a.num_proc), "loader": loader}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
