"""Data benchmark: prepare throughput and peak memory, loader speed, and resident memory over a long run.

    python -m nanogpt_jax.bench.data [--corpus_mb 16,64] [--loader_tokens 67108864] [--rss_batches 30000]

1. prepare: data_prep/openwebtext.py's pipeline (nanogpt_jax.openwebtext) on a synthetic English-like
   corpus saved as a local Hugging Face dataset of ~4 kB documents, each run in a fresh process:
   tokens/s (wall clock, start-up included) with 1 and 2 worker processes, the CPU seconds of the main
   process and its workers (comparable when other jobs share the machine), and peak memory at two
   corpus sizes (flat = streaming).
   Memory is the main process's peak RSS (VmHWM), split into its peak anonymous part (RssAnon, sampled
   every 10 ms: what the process itself allocates) and its file-backed part (RssFile: shared libraries
   and pages of the memory-mapped arrow corpus; each shuffled document read maps the page cache around
   it, ~1 MB with large folios, so this part tends to the corpus size, but the pages are clean cache
   that the kernel drops under memory pressure; reopening the dataset cannot bound it below ~1 MB per
   document read), and the largest worker's peak RSS.
2. loader: TrainBatches at B=12, T=1024 (nanoGPT's GPT-2 micro-batch) over a memory-mapped .bin held in
   the page cache: batches/s and host milliseconds per batch for the numpy part (`local`) and with the
   copy to the default device (`global_`), and for a whole nanoGPT OpenWebText step (40 micro-steps).
3. rss: resident memory after reading many random batches from a file, with this loader (which maps
   the file afresh per batch) and with one long-lived memmap (what it avoids): growth in MB.

`run_bench.py --config.bench.mode=data` runs `bench_rows(config)`: the loader part alone, at the
config's batch and block size.

Figures only: nothing is asserted. Timings depend on the machine and its load.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from absl import app, flags, logging

SYLLABLES = [c + v for c in "bcdfghklmnprstvwy" for v in "aeiou"] + ["th", "st", "qu", "ng"]


def synthetic_text(n_chars: int, seed: int = 0) -> str:
    """About `n_chars` of English-like text: Zipf-distributed made-up words, punctuation, line breaks."""
    rng = np.random.default_rng(seed)
    vocab = np.array(["".join(rng.choice(SYLLABLES, k)) for k in rng.integers(1, 5, 30_000)])
    p = 1.0 / (np.arange(len(vocab)) + 3.0)
    words = vocab[rng.choice(len(vocab), n_chars // 6, p=p / p.sum())]
    seps = np.array([" "] * 12 + [", ", ". ", ".\n", "; "])[rng.integers(0, 16, len(words))]
    return "".join(np.char.add(words, seps).tolist())


def make_corpus(folder: Path, mb: float) -> int:
    """A save_to_disk dataset of ~4 kB documents totalling `mb` MB; returns the document count."""
    import datasets

    text = synthetic_text(int(mb * 1e6), seed=int(mb))
    docs = [text[i:i + 4000] for i in range(0, len(text), 4000)]
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(folder), num_proc=1)
    return len(docs)


# Run in a fresh process so that its peak memory is its own.
PREPARE_CHILD = r"""
import json, resource, sys, threading, time
from pathlib import Path
peak = {"RssAnon": 0, "RssFile": 0}
def status(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
def sample(stop):
    while not stop.wait(0.01):
        for key in peak:
            peak[key] = max(peak[key], status(key))
stop = threading.Event()
threading.Thread(target=sample, args=(stop,), daemon=True).start()
from nanogpt_jax import openwebtext
t0 = time.perf_counter()
meta = openwebtext.prepare_openwebtext(sys.argv[2], dataset=sys.argv[1], num_proc=int(sys.argv[3]),
                                       test_size=0.005)
seconds = time.perf_counter() - t0
stop.set()
cpu = sum(r.ru_utime + r.ru_stime for r in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)))
print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "tokens": sum(s["tokens"] for s in meta["splits"].values()),
                  "peak_rss_mb": status("VmHWM"), "peak_anon_mb": max(peak["RssAnon"], status("RssAnon")),
                  "peak_file_mb": max(peak["RssFile"], status("RssFile")),
                  "worker_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def bench_prepare(corpus: Path, mb: float, num_proc: int, tmp: Path) -> dict:
    out = tmp / f"out-{mb}-{num_proc}"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "TQDM_DISABLE": "1"}
    r = subprocess.run([sys.executable, "-c", PREPARE_CHILD, str(corpus), str(out), str(num_proc)], env=env,
                       capture_output=True, text=True, check=False)
    if r.returncode:
        raise RuntimeError(r.stderr[-3000:])
    result = json.loads(r.stdout.strip().splitlines()[-1])
    result.update(corpus_mb=mb, num_proc=num_proc, tokens_per_s=result["tokens"] / result["seconds"])
    return result


def bench_loader(path: Path | np.ndarray, grad_accum: int, batches: int = 300, batch_size: int = 12,
                 block_size: int = 1024, sharding=None) -> dict:
    """Batches/s and host ms per batch of `TrainBatches` over a uint16 .bin file (or 1-D tokens):
    `local` (the numpy windows: this host's work) and `global` (with the copy to the devices, on
    `sharding` when given), after 5 untimed batches."""
    from nanogpt_jax.batches import TrainBatches

    tokens = np.memmap(path, dtype=np.uint16, mode="r") if isinstance(path, (str, Path)) else path
    b = TrainBatches(tokens, batch_size=batch_size, block_size=block_size, grad_accum=grad_accum, seed=0,
                     sharding=sharding)
    row = {"batch_size": batch_size, "block_size": block_size, "grad_accum": grad_accum}
    for name, fn in (("local", b.local), ("global", lambda s: [a.block_until_ready() for a in b.global_(s)])):
        for s in range(5):  # warm up
            fn(s)
        t0 = time.perf_counter()
        for s in range(batches):
            fn(s)
        dt = (time.perf_counter() - t0) / batches
        row[f"{name}_batches_per_s"], row[f"{name}_ms_per_batch"] = 1 / dt, dt * 1e3
    return row


RSS_CHILD = r"""
import sys
from pathlib import Path
import numpy as np
from nanogpt_jax.batches import TrainBatches
def rss():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
path, mode, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
tokens = np.memmap(path, dtype=np.uint16, mode="r")
b = TrainBatches(tokens, batch_size=12, block_size=1024, seed=0)
if mode == "naive":  # one long-lived mapping, as a loader that opens the file once would read it
    read = lambda s: tokens[b.offsets(s)[..., None] + np.arange(1025)].astype(np.int32)
else:
    read = b.local
read(0)
start = rss()
marks = []
for s in range(1, n + 1):
    read(s)
    if s % (n // 4) == 0:
        marks.append(round(rss() - start, 1))
print(start, *marks)
"""


def bench_rss(path: Path, mode: str, n: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    out = subprocess.run([sys.executable, "-c", RSS_CHILD, str(path), mode, str(n)], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    return {"reader": mode, "batches": n, "rss_start_mb": float(out[0]),
            "growth_mb_at_quarters": [float(v) for v in out[1:]]}


def bench_rows(config) -> list[dict]:
    """run_bench.py's data mode: the training loader at the config's shape, per batch size.

    Tokens come from data.data_dir's train split when the folder holds prepared data, else from a
    synthetic uint16 file of 4M random ids in a temporary folder (page-cached either way: the figures
    are the host's work, not the disk's). One row per batch size of bench.batch_sizes (default
    train.batch_size) and, with gradient_accumulation_steps > 1, a row for a whole step's micro-batches;
    at least 100 batches timed. Results as `nanogpt_jax.bench.report.KEYS["data"]`.
    """
    from nanogpt_jax import config as config_lib
    from nanogpt_jax import data, sharding, storage

    c = config
    block_size = c.model.block_size
    mesh = sharding.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor)
    A = c.train.gradient_accumulation_steps
    sizes = tuple(c.bench.batch_sizes) or (c.train.batch_size,)
    n_batches = max(100, c.bench.steps)
    with tempfile.TemporaryDirectory() as tmp:
        if (storage.path(c.data.data_dir) / "train.bin").is_file():  # a local folder or a bucket's (copied, checked)
            dataset = data.Dataset(c.data.data_dir, block_size=block_size, splits=("train",),
                                   cache_dir=c.data.cache_dir)
            tokens, source = dataset.split("train"), c.data.data_dir
        else:
            path = Path(tmp) / "train.bin"
            vocab = c.model.vocab_size or config_lib.model_kwargs(c)["vocab_size"]
            np.random.default_rng(0).integers(0, min(vocab, 1 << 16), 1 << 22, dtype=np.uint16).tofile(path)
            tokens, source = np.memmap(path, dtype=np.uint16, mode="r"), "random"
            logging.warning("data.data_dir=%s holds no train.bin: timing the loader on 4M random token ids instead "
                            "(the same work per batch; the report's source column says 'random')", c.data.data_dir)
        if tokens.nbytes < 1 << 30:  # into the page cache (a larger file is read as training would read it)
            np.asarray(tokens).sum()
        rows = []
        for batch_size in sizes:
            for grad_accum in sorted({1, A}):
                r = bench_loader(tokens, grad_accum, n_batches if grad_accum == 1 else max(10, n_batches // grad_accum),
                                 batch_size, block_size, sharding.batch_sharding(mesh, 3))
                tokens_per_batch = grad_accum * batch_size * block_size
                rows.append({"settings": {"source": source, "batch_size": batch_size, "block_size": block_size,
                                          "grad_accum": grad_accum, "devices": mesh.size},
                             "results": {"host_ms_per_batch": r["local_ms_per_batch"],
                                         "host_batches_per_s": r["local_batches_per_s"],
                                         "ms_per_batch": r["global_ms_per_batch"],
                                         "batches_per_s": r["global_batches_per_s"],
                                         "tokens_per_s": tokens_per_batch * r["global_batches_per_s"]}})
        del tokens
    return rows


def main(argv: list[str]) -> None:
    del argv
    report: dict = {"machine": {"cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0]}}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        sizes = [float(v) for v in flags.FLAGS.corpus_mb]
        prep = []
        for mb in sizes:
            corpus = tmp / f"corpus-{mb}"
            docs = make_corpus(corpus, mb)
            for num_proc in ((1, 2) if mb == sizes[-1] else (2,)):
                prep.append({**bench_prepare(corpus, mb, num_proc, tmp), "docs": docs})
                print("prepare", json.dumps(prep[-1]), flush=True)
        report["prepare"] = prep

        path = tmp / "train.bin"
        rng = np.random.default_rng(0)
        n = flags.FLAGS.loader_tokens
        with open(path, "wb") as f:
            for lo in range(0, n, 1 << 24):
                rng.integers(0, 50257, min(1 << 24, n - lo), dtype=np.uint16).tofile(f)
        path.read_bytes()  # into the page cache: the timings are the host's work, not the disk's
        report["loader"] = [bench_loader(path, 1), bench_loader(path, 40, batches=40)]
        for row in report["loader"]:
            print("loader", json.dumps(row), flush=True)
        report["rss"] = [bench_rss(path, mode, flags.FLAGS.rss_batches) for mode in ("this loader", "naive")]
        for row in report["rss"]:
            print("rss", json.dumps(row), flush=True)
        report["file_mb"] = path.stat().st_size / 2**20

    print()
    print(f"prepare (openwebtext pipeline, synthetic corpus; {os.cpu_count()} CPUs, shared machine)")
    print(f"{'corpus MB':>9} {'procs':>5} {'tokens':>11} {'tokens/s':>10} {'CPU s':>6} {'peak RSS MB':>11} "
          f"{'peak anon MB':>12} {'peak file MB':>12} {'worker RSS MB':>13}")
    for r in prep:
        print(f"{r['corpus_mb']:>9.0f} {r['num_proc']:>5} {r['tokens']:>11,} {r['tokens_per_s']:>10,.0f} "
              f"{r['cpu_seconds']:>6.1f} "
              f"{r['peak_rss_mb']:>11.0f} {r['peak_anon_mb']:>12.0f} {r['peak_file_mb']:>12.0f} "
              f"{r['worker_peak_rss_mb']:>13.0f}")
    print("  (peak file MB: libraries and page cache of the memory-mapped arrow corpus, up to its size;"
          " clean, dropped under memory pressure)")
    print("\nloader (TrainBatches, B=12, T=1024, page-cached .bin)")
    for r in report["loader"]:
        print(f"  grad_accum={r['grad_accum']:>2}: local {r['local_batches_per_s']:8.0f} batches/s "
              f"({r['local_ms_per_batch']:.3f} ms), with device copy {r['global_batches_per_s']:8.0f} batches/s "
              f"({r['global_ms_per_batch']:.3f} ms)")
    print(f"\nresident memory while reading random batches from a {report['file_mb']:.0f} MB file")
    for r in report["rss"]:
        print(f"  {r['reader']:>11}: +{r['growth_mb_at_quarters']} MB after each quarter of {r['batches']:,} "
              "batches")
    if flags.FLAGS.json:
        Path(flags.FLAGS.json).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    # absl flags are process-global: defined only when this module is the script, so that importing it
    # beside another module with a flag of the same name (e.g. --json) cannot fail
    flags.DEFINE_list("corpus_mb", ["16", "64"], "Synthetic corpus sizes in MB for the prepare runs.")
    flags.DEFINE_integer("loader_tokens", 1 << 26, "Tokens in the loader's .bin file (uint16).")
    flags.DEFINE_integer("rss_batches", 30_000, "Batches read in the resident-memory runs.")
    flags.DEFINE_string("json", None, "Also write the figures to this JSON file.")
    app.run(main)
