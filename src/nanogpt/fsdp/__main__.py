"""python -m nanogpt.fsdp convert | estimate

    convert OUT_DIR                     every sharded checkpoint in it: ckpt.dcp -> ckpt.pt, best.dcp -> best.pt
    convert out/ckpt.dcp [x.pt]         one folder; --model-only leaves out the optimizer state
    estimate --model gpt2-xl --strategy fsdp --world-size 8 [--batch-size 1] [--dtype bfloat16]
             [--block-size 256] [--activation-checkpointing] [--cpu-offload]
    estimate --table                    the README's table for gpt2 ... gpt2-xl
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from omegaconf import OmegaConf

from nanogpt.config import CONFIG_DIR, STRATEGIES
from nanogpt.errors import NanoGPTError
from nanogpt.model import GPTConfig

GPT2_SIZES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


def model_config(name: str, block_size: int | None = None) -> GPTConfig:
    """A shipped model config (config/model/<name>.yaml) as a GPTConfig."""
    path = Path(CONFIG_DIR) / "model" / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in path.parent.glob("*.yaml")))
        raise NanoGPTError(f"no model config {name!r}; choose from {known}")
    cfg = GPTConfig(**OmegaConf.to_container(OmegaConf.load(path)))
    if block_size:
        cfg.block_size = block_size
    return cfg


def convert_cmd(args: argparse.Namespace) -> None:
    from nanogpt.fsdp.sharded import RUN_STATE, convert

    src = Path(args.src)
    folders = [src] if (src / RUN_STATE).is_file() else sorted(src.glob("*.dcp"))
    if not folders:
        raise NanoGPTError(f"no sharded checkpoint (a folder with {RUN_STATE}) at {src}")
    if args.out and len(folders) > 1:
        raise NanoGPTError(f"{src} holds {len(folders)} checkpoints: give one folder to name the output")
    for folder in folders:
        out = convert(folder, args.out, with_optimizer=not args.model_only)
        print(f"{folder} -> {out}")


def estimate_cmd(args: argparse.Namespace) -> None:
    from nanogpt.fsdp.memory import estimate_memory, format_estimate, memory_table

    if args.table:
        print(memory_table({name: model_config(name) for name in GPT2_SIZES}))
        return
    cfg = model_config(args.model, args.block_size)
    strategy = "ddp" if args.strategy == "auto" else args.strategy
    est = estimate_memory(cfg, strategy, args.world_size, args.dtype, args.batch_size,
                          args.activation_checkpointing, args.cpu_offload)
    print(f"{args.model} ({est['params']:,} parameters), {strategy} on {args.world_size} rank(s), "
          f"{args.dtype}, {args.batch_size} x {cfg.block_size} tokens per micro-step:")
    print(f"  {format_estimate(est)}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nanogpt.fsdp", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="sharded (FSDP) checkpoint -> single-file checkpoint")
    c.add_argument("src", help="a training out_dir or one ckpt.dcp / best.dcp folder")
    c.add_argument("out", nargs="?", help="output file (default: ckpt.dcp -> ckpt.pt beside it)")
    c.add_argument("--model-only", action="store_true", help="leave out the optimizer (not resumable)")
    e = sub.add_parser("estimate", help="expected memory per rank for a model, strategy and world size")
    e.add_argument("--model", default="gpt2-xl", help="a config/model name: gpt2 ... gpt2-xl, tiny, ...")
    e.add_argument("--strategy", default="fsdp", choices=STRATEGIES)
    e.add_argument("--world-size", type=int, default=1)
    e.add_argument("--batch-size", type=int, default=1, help="sequences per micro-step and rank")
    e.add_argument("--block-size", type=int, default=None, help="default: the model's")
    e.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    e.add_argument("--activation-checkpointing", action="store_true")
    e.add_argument("--cpu-offload", action="store_true")
    e.add_argument("--table", action="store_true", help="print the README's table and stop")
    return p


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    args = parser().parse_args(argv)
    try:
        (convert_cmd if args.command == "convert" else estimate_cmd)(args)
    except NanoGPTError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
