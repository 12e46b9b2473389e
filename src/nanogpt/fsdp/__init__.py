"""FSDP for the trainer (system.strategy=fsdp), activation checkpointing, sharded checkpoints and
memory figures.

    shard.py    fully_shard (FSDP2) per block then the root, mixed precision, CPU offload;
                activation checkpointing (any strategy); the global gradient norm
    sharded.py  sharded save/load with torch.distributed.checkpoint; conversion to one file
    memory.py   the per-rank memory estimate and the measured peak
    __main__.py python -m nanogpt.fsdp convert <out_dir | ckpt.dcp> [out.pt]
                python -m nanogpt.fsdp estimate --model gpt2-xl --strategy fsdp --world-size 8
"""

from nanogpt.fsdp.memory import estimate_memory, log_estimate, peak_memory_gb, peak_memory_per_rank
from nanogpt.fsdp.shard import checkpoint_blocks, clip_grad_norm, prepare, shard_model
from nanogpt.fsdp.sharded import (
                                  convert,
                                  find_sharded,
                                  load_run_state,
                                  load_sharded,
                                  resume_model,
                                  save_sharded,
                                  sharded_path,
)

__all__ = [
    "checkpoint_blocks",
    "clip_grad_norm",
    "convert",
    "estimate_memory",
    "find_sharded",
    "load_run_state",
    "load_sharded",
    "log_estimate",
    "peak_memory_gb",
    "peak_memory_per_rank",
    "prepare",
    "resume_model",
    "save_sharded",
    "shard_model",
    "sharded_path",
]
