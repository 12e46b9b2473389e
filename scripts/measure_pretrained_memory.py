"""Peak host memory of `load_pretrained` on a gpt2-xl-shaped checkpoint (random weights, ~6.2 GB fp32).

    python scripts/measure_pretrained_memory.py [--dir /tmp/gpt2-xl-random] [--keep]

Writes the checkpoint in HF's Hub layout with safetensors directly (one tensor at a time is random,
so the writer stays small), then loads it in a fresh process and reports that process's peak
resident set (VmHWM) and the peaks of its anonymous and file-backed parts (sampled every 10 ms).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

LOADER = r"""
import json, sys, threading, time, torch
from nanogpt.hf import load_pretrained

def status():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM", "RssAnon", "RssFile")}

peak = {"RssAnon": 0, "RssFile": 0}
done = False
def sample():
    while not done:
        s = status()
        for k in peak:
            peak[k] = max(peak[k], s[k])
        time.sleep(0.01)

before = status()
thread = threading.Thread(target=sample, daemon=True)
thread.start()
t0 = time.time()
model = load_pretrained(sys.argv[1], dtype=getattr(torch, sys.argv[2]))
seconds = time.time() - t0
done = True
thread.join()
after = status()
bytes_ = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"params": model.num_params(), "weights_bytes": bytes_, "seconds": round(seconds, 1),
                  "rss_before": before["VmRSS"], "rss_after": after["VmRSS"], "peak_rss": after["VmHWM"],
                  "peak_anon": peak["RssAnon"], "peak_file": peak["RssFile"]}))
"""


def write_checkpoint(folder: Path) -> None:
    """gpt2-xl's tensors in the Hub layout (no prefix, Conv1D (in, out)), random, fp32."""
    import torch
    from safetensors.torch import save_file

    n_layer, n_embd, vocab, ctx = 48, 1600, 50257, 1024
    folder.mkdir(parents=True, exist_ok=True)
    shapes = {"wte.weight": (vocab, n_embd), "wpe.weight": (ctx, n_embd),
              "ln_f.weight": (n_embd,), "ln_f.bias": (n_embd,)}
    for i in range(n_layer):
        for name, shape in [("ln_1.weight", (n_embd,)), ("ln_1.bias", (n_embd,)),
                            ("attn.c_attn.weight", (n_embd, 3 * n_embd)), ("attn.c_attn.bias", (3 * n_embd,)),
                            ("attn.c_proj.weight", (n_embd, n_embd)), ("attn.c_proj.bias", (n_embd,)),
                            ("ln_2.weight", (n_embd,)), ("ln_2.bias", (n_embd,)),
                            ("mlp.c_fc.weight", (n_embd, 4 * n_embd)), ("mlp.c_fc.bias", (4 * n_embd,)),
                            ("mlp.c_proj.weight", (4 * n_embd, n_embd)), ("mlp.c_proj.bias", (n_embd,))]:
            shapes[f"h.{i}.{name}"] = shape
    tensors = {k: torch.randn(s) * 0.02 for k, s in shapes.items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": vocab,
              "n_positions": ctx, "n_embd": n_embd, "n_layer": n_layer, "n_head": 25}
    (folder / "config.json").write_text(json.dumps(config))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/gpt2-xl-random", type=Path)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint for another run")
    args = parser.parse_args()
    if not (args.dir / "model.safetensors").is_file():
        write_checkpoint(args.dir)  # its tensors are freed on return; the loader runs in a fresh process
    try:
        out = subprocess.run([sys.executable, "-c", LOADER, str(args.dir), args.dtype],
                             check=True, capture_output=True, text=True).stdout
    finally:
        if not args.keep:
            shutil.rmtree(args.dir)
    r = json.loads(out.splitlines()[-1])
    gb = lambda n: f"{n / 1e9:.2f} GB"  # noqa: E731
    print(f"gpt2-xl shape, {r['params'] / 1e9:.3f}B parameters, {args.dtype} weights "
          f"{gb(r['weights_bytes'])}, loaded in {r['seconds']} s")
    print(f"RSS before load {gb(r['rss_before'])}, after {gb(r['rss_after'])}, "
          f"peak (VmHWM) {gb(r['peak_rss'])}")
    print(f"sampled peaks: anonymous {gb(r['peak_anon'])}, file-backed (mmap) {gb(r['peak_file'])}")


if __name__ == "__main__":
    main()
