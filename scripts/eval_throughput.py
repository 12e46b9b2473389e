"""HellaSwag throughput of a randomly initialised GPT-2-shaped model (no weights needed).

    NANOGPT_DATA_MIRROR=../shared/data python scripts/eval_throughput.py --examples 50 --dtype float32

Prints examples/s (the accuracy of random weights is chance, ~0.25, and means nothing).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from nanogpt.data.tokenizer import get_tokenizer
from nanogpt.distributed import resolve_device
from nanogpt.evaluate import hellaswag_eval, load_hellaswag
from nanogpt.hf import pretrained_config
from nanogpt.model import GPT


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gpt2", help="a GPT-2 shape: gpt2, gpt2-medium, ...")
    p.add_argument("--examples", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=8, help="examples (x4 endings) per forward pass")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads; 0: torch's default")
    p.add_argument("--cache-dir", default="data")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    model = GPT(pretrained_config(args.model)).to(device).eval()
    examples = load_hellaswag(args.cache_dir, args.examples)
    tok = get_tokenizer("gpt2")
    dtype = getattr(torch, args.dtype)
    hellaswag_eval(model, tok, examples[: args.batch_size], batch_size=args.batch_size, device=device,
                   dtype=dtype)  # warm-up: first-call allocations
    t0 = time.perf_counter()
    r = hellaswag_eval(model, tok, examples, batch_size=args.batch_size, device=device, dtype=dtype)
    seconds = time.perf_counter() - t0
    print(json.dumps({"model": args.model, "device": str(device), "dtype": args.dtype,
                      "threads": torch.get_num_threads(), "batch_size": args.batch_size,
                      "examples": r["examples"], "seconds": round(seconds, 2),
                      "examples_per_sec": round(r["examples"] / seconds, 2)}))


if __name__ == "__main__":
    main()
