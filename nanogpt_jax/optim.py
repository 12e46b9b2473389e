"""The optimizer: nanoGPT's learning-rate schedule and AdamW with global-norm clipping (optax).

This is the one place that builds the optimizer; the train step calls `update` once per step
(gradient accumulation happens before it, never through `optax.MultiSteps`/`apply_every`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """The optim section of a config (see configs/default.py for units)."""

    learning_rate: float = 6e-4
    min_lr: float = 6e-5
    warmup_iters: int = 2000
    lr_decay_iters: int = 600_000
    decay_lr: bool = True
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0

    @classmethod
    def from_section(cls, optim: Mapping[str, Any]) -> OptimConfig:
        """From a config's optim section (a ConfigDict or dict holding at least these fields)."""
        return cls(**{k: optim[k] for k in cls.__dataclass_fields__})


def lr_schedule(c: OptimConfig) -> optax.Schedule:
    """Learning rate at optimizer step `it` (0-based), nanoGPT's `get_lr`:

    - warmup: learning_rate * (it + 1) / (warmup_iters + 1), never 0 at step 0;
    - then a cosine from learning_rate down to min_lr at lr_decay_iters;
    - then min_lr. With decay_lr=False, learning_rate throughout.
    (Loshchilov & Hutter 2017, SGDR; linear warmup per Goyal et al. 2017.)
    """
    if not c.decay_lr:
        return optax.constant_schedule(c.learning_rate)

    def schedule(it: jax.Array) -> jax.Array:
        it = jnp.asarray(it, jnp.float32)
        warm = c.learning_rate * (it + 1) / (c.warmup_iters + 1)
        span = max(c.lr_decay_iters - c.warmup_iters, 1)
        ratio = jnp.clip((it - c.warmup_iters) / span, 0.0, 1.0)
        cosine = c.min_lr + 0.5 * (1.0 + jnp.cos(math.pi * ratio)) * (c.learning_rate - c.min_lr)
        return jnp.where(it < c.warmup_iters, warm, cosine)

    return schedule


def decay_mask(params: Any) -> Any:
    """True for the parameters that get weight decay: matrices and embeddings, not biases or
    LayerNorm scales. In HF GPT-2's layout that is nanoGPT's rule, "every parameter of rank >= 2";
    we decide by name because our attention kernels and biases carry extra head axes."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) in ("kernel", "embedding"), params)


def make_optimizer(c: OptimConfig) -> optax.GradientTransformation:
    """clip_by_global_norm(grad_clip) (if > 0), then AdamW (decoupled weight decay on `decay_mask`).

    Epsilon 1e-8 as torch.optim.AdamW (nanoGPT). `optax.inject_hyperparams` is not used: the
    learning rate of step t is recomputed from the schedule for logging.
    """
    adamw = optax.adamw(lr_schedule(c), b1=c.beta1, b2=c.beta2, eps=1e-8, weight_decay=c.weight_decay,
                        mask=decay_mask)
    return optax.chain(optax.clip_by_global_norm(c.grad_clip), adamw) if c.grad_clip > 0 else adamw
