"""Memory per rank: an estimate before a run (`python -m nanogpt.fsdp estimate`) and the
measured peak after it (summary.json: peak_mem_gb).

The estimate, for P parameters on W ranks (bytes per rank):
    weights      4P fp32 master weights; FSDP: 4P/W
    grads        4P fp32; FSDP: 4P/W
    optimizer    8P, AdamW's exp_avg and exp_avg_sq in fp32; FSDP: 8P/W
    buffers      DDP on W > 1: 4P of gradient buckets for the all-reduce. FSDP: what is gathered
                 at a time: the root (embeddings, ln_f) for the whole step and two blocks (one
                 running, one prefetched) in the compute dtype, plus their unsharded fp32 grads
    activations  kept for backward, per micro-batch of B x T tokens: ~17 values of width C per
                 token and layer (no T x T attention matrix: SDPA does not store one), or one
                 per layer with activation checkpointing plus one layer being recomputed; and
                 the logits (B x T x V: themselves, their fp32 copy for the loss, its gradient)
With cpu_offload the weights, grads and optimizer shards live in CPU memory instead. Not
counted: the CUDA context (~0.5 GB), allocator fragmentation, temporaries of single kernels.
"""

from __future__ import annotations

import functools
import logging
import resource
import sys
from dataclasses import astuple
from typing import Any

import torch
import torch.distributed as dist

from nanogpt.distributed import DistInfo
from nanogpt.model import GPT, GPTConfig

log = logging.getLogger(__name__)

GB = 1e9
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def estimate_memory(cfg: GPTConfig, strategy: str = "ddp", world_size: int = 1, dtype: str = "float32",
                    batch_size: int = 1, activation_checkpointing: bool = False,
                    cpu_offload: bool = False) -> dict[str, float]:
    """Expected memory per rank in GB (see the module docstring); `total` is on the device,
    `cpu_offloaded` in CPU memory. dtype is the compute dtype (autocast / FSDP's param_dtype)."""
    n, n_block = _param_counts(cfg)
    n_root = n - cfg.n_layer * n_block
    fsdp = strategy == "fsdp"
    shard = world_size if fsdp else 1
    state = {"weights": 4 * n / shard, "grads": 4 * n / shard, "optimizer": 8 * n / shard}
    if fsdp:
        buffers = (n_root + 2 * n_block) * BYTES[dtype] + (n_root + n_block) * 4
    else:
        buffers = 4 * n if world_size > 1 else 0
    acts = _activation_bytes(cfg, batch_size, BYTES[dtype], activation_checkpointing)
    offloaded = sum(state.values()) if fsdp and cpu_offload else 0
    total = sum(state.values()) - offloaded + buffers + acts
    return {"params": n, **{k: v / GB for k, v in state.items()}, "buffers": buffers / GB,
            "activations": acts / GB, "total": total / GB, "cpu_offloaded": offloaded / GB}


def _param_counts(cfg: GPTConfig) -> tuple[int, int]:
    """(all parameters with the tied embedding once, one block's), from a model on the meta device."""
    return _count_params(*astuple(cfg))


@functools.lru_cache(maxsize=16)
def _count_params(*fields: Any) -> tuple[int, int]:
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = GPT(GPTConfig(*fields))
    return model.num_params(), sum(p.numel() for p in model.transformer.h[0].parameters())


def _activation_bytes(cfg: GPTConfig, batch_size: int, width: int, checkpointed: bool) -> float:
    tokens = batch_size * cfg.block_size
    layer = 17 * tokens * cfg.n_embd * width  # one layer's saved tensors (Korthikanti et al., 2022)
    layers = cfg.n_layer * tokens * cfg.n_embd * width + layer if checkpointed else cfg.n_layer * layer
    return layers + tokens * cfg.vocab_size * (width + 4 + 4)


def format_estimate(est: dict[str, float]) -> str:
    parts = ", ".join(f"{k} {est[k]:.3g}" for k in ("weights", "grads", "optimizer", "buffers", "activations"))
    offload = f"; {est['cpu_offloaded']:.3g} GB offloaded to CPU" if est["cpu_offloaded"] else ""
    return f"{est['total']:.3g} GB per rank ({parts}){offload}"


def log_estimate(cfg: GPTConfig, strategy: str, world_size: int, dtype: torch.dtype, batch_size: int,
                 activation_checkpointing: bool, cpu_offload: bool) -> None:
    est = estimate_memory(cfg, strategy, world_size, str(dtype).removeprefix("torch."), batch_size,
                          activation_checkpointing, cpu_offload)
    log.info("memory estimate (%s, %d rank(s)): %s", strategy, world_size, format_estimate(est))


def memory_table(models: dict[str, GPTConfig], world_sizes: tuple[int, ...] = (1, 2, 8)) -> str:
    """Markdown: weights + grads + AdamW state per rank, DDP and FSDP at each world size, and
    the whole estimate for one 1024-token sequence per micro-step in bf16 on 8 ranks."""
    fsdp_cols = " | ".join(f"FSDP {w}" for w in world_sizes)
    rows = [f"| model | params | DDP (any) | {fsdp_cols} | DDP 8, total | FSDP 8, total | FSDP 8 + AC, total |",
            "|---|---:|---:|" + "---:|" * (len(world_sizes) + 3)]
    state = lambda e: e["weights"] + e["grads"] + e["optimizer"]  # noqa: E731
    for name, cfg in models.items():
        ddp = estimate_memory(cfg, "ddp", 8, "bfloat16")
        shards = [estimate_memory(cfg, "fsdp", w) for w in world_sizes]
        fsdp8 = [estimate_memory(cfg, "fsdp", 8, "bfloat16", activation_checkpointing=ac) for ac in (False, True)]
        cells = [f"{state(ddp):.1f}", *(f"{state(e):.1f}" for e in shards),
                 f"{ddp['total']:.1f}", *(f"{e['total']:.1f}" for e in fsdp8)]
        rows.append(f"| {name} | {ddp['params'] / 1e6:,.0f}M | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def peak_memory_gb(device: torch.device) -> float:
    """This process's peak: allocated CUDA memory on a GPU, else its peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GB
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss * (1 if sys.platform == "darwin" else 1024) / GB


def peak_memory_per_rank(info: DistInfo) -> list[float]:
    """peak_memory_gb of every rank, in rank order (collective under torchrun)."""
    mine = round(peak_memory_gb(info.device), 3)
    if not info.enabled:
        return [mine]
    peaks: list[float] = [0.0] * info.world_size
    dist.all_gather_object(peaks, mine)
    return peaks
