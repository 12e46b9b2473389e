"""The one place that builds the optimizer and the learning-rate schedule."""

from __future__ import annotations

import logging
import math

import torch

from nanogpt.config import OptimConfig

log = logging.getLogger(__name__)


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, device_type: str) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (matmul weights, embeddings) only.

    Biases and LayerNorm gains are vectors: decaying them towards zero only hurts.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # fused kernels exist for CUDA; elsewhere ask for foreach explicitly (torch would pick the slower
    # per-tensor loop for CPU tensors)
    extra = {"fused": True} if device_type == "cuda" else {"foreach": True}
    log.info(
        "optimizer: %d decayed tensors (%s params), %d not decayed (%s params)%s",
        len(decay), f"{sum(p.numel() for p in decay):,}", len(no_decay),
        f"{sum(p.numel() for p in no_decay):,}", ", fused" if "fused" in extra else "",
    )
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **extra)


def lr_at(it: int, cfg: OptimConfig) -> float:
    """Linear warmup to lr, then cosine decay to min_lr at lr_decay_iters, then min_lr."""
    if it < cfg.warmup_iters:
        return cfg.lr * (it + 1) / (cfg.warmup_iters + 1)
    if not cfg.decay_lr:
        return cfg.lr
    if it >= cfg.lr_decay_iters:
        return cfg.min_lr
    progress = (it - cfg.warmup_iters) / max(1, cfg.lr_decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)
