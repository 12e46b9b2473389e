"""Peak memory and time of converting HF GPT-2 weights: `load_pretrained` on a random checkpoint.

    python -m nanogpt_jax.bench.convert_memory                 # gpt2-xl: ~6.2 GB written to a temp folder
    python -m nanogpt_jax.bench.convert_memory --size gpt2 --dir /scratch

Writes a random checkpoint of the size's shape (fp32, through `export_hf`, in a subprocess so the
writer's memory is its own), then converts it with `load_pretrained(folder, scan_layers=...)` in
a fresh subprocess per setting and prints each one's peak resident memory (VmHWM: everything the
process ever held, jax and Python included) against the fp32 weights, and the wall time. The
target is a peak of at most 1.3x the weights: one copy of them plus transients, never two.
The file is read right after it was written, so it is in the page cache: times are warm-cache.
GB here is 10^9 bytes. The temp folder is deleted afterwards unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GB = 1e9
TARGET = 1.3


def _status_bytes(field: str) -> int:
    """A memory figure of this process from /proc/self/status (Linux), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _write(folder: str, size: str) -> dict:
    """Child: a random fp32 checkpoint of GPT-2 `size` written with export_hf."""
    import jax
    import numpy as np

    from nanogpt_jax import convert
    from nanogpt_jax.model import GPTConfig

    config = GPTConfig.gpt2(size)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape, dtype=np.float32) * np.float32(0.02),
                          convert._expected_params(config))
    start = time.perf_counter()
    convert.export_hf(config, params, folder)
    return {"export_s": time.perf_counter() - start, "peak_rss": _status_bytes("VmHWM")}


def _load(folder: str, scan_layers: bool) -> dict:
    """Child: convert the checkpoint and report this process's peak memory and the time."""
    import jax

    from nanogpt_jax.convert import load_pretrained

    jax.devices()  # start the backend before the baseline
    baseline = _status_bytes("VmRSS")
    start = time.perf_counter()
    model, params = load_pretrained(folder, scan_layers=scan_layers)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    return {"load_s": seconds, "peak_rss": _status_bytes("VmHWM"), "baseline_rss": baseline,
            "param_bytes": sum(x.nbytes for x in jax.tree.leaves(params)), "backend": jax.default_backend()}


def _child(args: list[str], platform: str) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": platform}
    out = subprocess.run([sys.executable, "-m", "nanogpt_jax.bench.convert_memory", *args], env=env,
                         capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"child {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="gpt2-xl", choices=["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"])
    parser.add_argument("--dir", default=None, help="where the temporary checkpoint goes (default: the system temp)")
    parser.add_argument("--platform", default="cpu", help="JAX_PLATFORMS of the converting process")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint folder")
    parser.add_argument("--_write", help=argparse.SUPPRESS)
    parser.add_argument("--_load", help=argparse.SUPPRESS)
    parser.add_argument("--_scan", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._write:
        print(json.dumps(_write(args._write, args.size)))
        return
    if args._load:
        print(json.dumps(_load(args._load, bool(args._scan))))
        return

    from nanogpt_jax.model import GPTConfig

    n_params = GPTConfig.gpt2(args.size).num_params()
    weights = 4 * n_params
    tmp = Path(tempfile.mkdtemp(prefix="convert_memory-", dir=args.dir))
    folder = tmp / args.size
    try:
        print(f"{args.size}: {n_params:,} parameters = {weights / GB:.2f} GB of fp32 weights; writing a random "
              f"checkpoint to {folder}", flush=True)
        start = time.perf_counter()
        wrote = _child(["--_write", str(folder), "--size", args.size], "cpu")
        file_bytes = (folder / "model.safetensors").stat().st_size
        print(f"written in {time.perf_counter() - start:.1f} s (export_hf {wrote['export_s']:.1f} s; writer peak RSS "
              f"{wrote['peak_rss'] / GB:.2f} GB, the random weights included); model.safetensors "
              f"{file_bytes / GB:.2f} GB", flush=True)
        rows = []
        for scan in (False, True):
            r = _child(["--_load", str(folder), "--_scan", str(int(scan))], args.platform)
            assert r["param_bytes"] == weights, r
            rows.append((scan, r))
            print(f"  scan_layers={scan!s:5}  load {r['load_s']:6.1f} s  peak RSS {r['peak_rss'] / GB:6.2f} GB "
                  f"= {r['peak_rss'] / weights:.2f}x the weights  (RSS before loading {r['baseline_rss'] / GB:.2f} "
                  f"GB; backend {r['backend']})", flush=True)
        print()
        print(f"| {args.size} ({weights / GB:.2f} GB fp32) | load s | peak RSS GB | x weights | target |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for scan, r in rows:
            ratio = r["peak_rss"] / weights
            print(f"| scan_layers={scan} | {r['load_s']:.1f} | {r['peak_rss'] / GB:.2f} | {ratio:.2f} | "
                  f"<= {TARGET} {'ok' if ratio <= TARGET else 'MISSED'} |")
    finally:
        if args.keep:
            print(f"kept {folder}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
