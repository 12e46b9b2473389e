"""Sharding a GPT across ranks with FSDP2 (`fully_shard`), and activation checkpointing.

DDP keeps every parameter, gradient and AdamW state on every rank and all-reduces gradients.
FSDP keeps 1/world_size of each on a rank: a block's full weights are all-gathered just before
it runs (in forward, and again in backward) and freed afterwards, and gradients are
reduce-scattered so that each rank keeps only its shard, which its own optimizer updates.
"""

from __future__ import annotations

import atexit
import gc
import logging
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor

from nanogpt.config import TrainJob
from nanogpt.distributed import DistInfo
from nanogpt.errors import ConfigError
from nanogpt.fsdp.memory import log_estimate
from nanogpt.model import GPT, Block

log = logging.getLogger(__name__)


def prepare(model: GPT, job: TrainJob, info: DistInfo, dtype: torch.dtype) -> None:
    """What the trainer does to its model before DDP / torch.compile: log the memory estimate,
    apply activation checkpointing, and shard it when system.strategy=fsdp (all in place)."""
    s = job.system
    strategy = "fsdp" if s.strategy == "fsdp" else "ddp"
    log_estimate(model.config, strategy, info.world_size, dtype, job.data.batch_size,
                 s.activation_checkpointing, s.cpu_offload)
    if s.activation_checkpointing:
        checkpoint_blocks(model)
    if strategy == "fsdp":
        shard_model(model, info, dtype, cpu_offload=s.cpu_offload)


def checkpoint_blocks(model: GPT) -> None:
    """Activation checkpointing: each block keeps only its input for the backward pass and
    recomputes the rest there (one more forward pass of compute). Works with any strategy.

    The wrapper's `_checkpoint_wrapped_module.` is stripped from state-dict keys, so checkpoints
    are the same with and without it. Recomputation replays the RNG state, so dropout matches.
    """
    apply_activation_checkpointing(model, check_fn=lambda module: isinstance(module, Block))


def shard_model(model: GPT, info: DistInfo, dtype: torch.dtype, cpu_offload: bool = False) -> None:
    """fully_shard every transformer block, then the root (embeddings, final LayerNorm and the
    lm_head, which is tied to the token embedding and so must sit in the same unit), in place.

    Parameters become DTensor shards on this rank's device (in CPU memory with cpu_offload):
    build the optimizer afterwards. The model may still be on the CPU: fully_shard moves each
    shard to the device, so no device ever holds the whole fp32 model.
    """
    if dtype == torch.float16:
        raise ConfigError("system.strategy=fsdp trains in bfloat16 or float32 (float16 needs a GradScaler "
                          "that agrees across shards); set system.dtype=bfloat16 or float32")
    if info.device.type not in ("cuda", "cpu"):
        raise ConfigError(f"system.strategy=fsdp runs on cuda or cpu, not {info.device.type}")
    _join_group(info)
    atexit.unregister(_collect_before_exit)  # once per process, however many models
    atexit.register(_collect_before_exit)
    mesh = init_device_mesh(info.device.type, (info.world_size,))
    offload = CPUOffloadPolicy(pin_memory=info.device.type == "cuda") if cpu_offload else OffloadPolicy()
    # compute in the run's dtype; reduce gradients and keep the master weights in fp32
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh, mp_policy=mp, offload_policy=offload)
    fully_shard(model, mesh=mesh, mp_policy=mp, offload_policy=offload)
    log.info("FSDP: %d blocks + root sharded over %d rank(s), compute %s, reduce float32%s",
             len(model.transformer.h), info.world_size, str(dtype).removeprefix("torch."),
             ", parameters/gradients/optimizer state offloaded to CPU" if cpu_offload else "")


def _join_group(info: DistInfo) -> None:
    """fully_shard needs a process group: a single process (no torchrun) gets a group of one,
    so FSDP's CPU offload can serve one GPU too."""
    if not dist.is_initialized():
        backend = "nccl" if info.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def _collect_before_exit() -> None:
    """FSDP keeps handles of gloo's asynchronous collectives in reference cycles (modules and
    their hooks). Freed only while the interpreter shuts down, they abort the process ("terminate
    called without an active exception"): collect them while Python is still fully alive."""
    gc.collect()


def clip_grad_norm(parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip gradients to max_norm by their global L2 norm; returns the norm before clipping.

    Under FSDP the gradients are DTensor shards and torch computes the norm over every shard of
    every rank, returned as a replicated DTensor: made a plain tensor here, the same on all ranks.
    """
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm
