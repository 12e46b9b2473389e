"""Small helpers the evaluation tasks share: devices, precision, progress, sums over ranks."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator

import torch
import torch.distributed as dist

from nanogpt.checkpoint import unwrap
from nanogpt.model import GPT
from nanogpt.runtime import autocast

log = logging.getLogger("nanogpt.evaluate")


def inner(model: torch.nn.Module) -> GPT:
    """The GPT inside DDP / torch.compile wrappers (for its config and device)."""
    return unwrap(model)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(inner(model).parameters()).device


@contextlib.contextmanager
def scoring(model: torch.nn.Module, device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """Eval mode (no dropout, so results are deterministic), no autograd, autocast when asked;
    the model's train/eval mode is restored afterwards (the trainer calls us mid-run)."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), autocast(device, dtype or torch.float32):
            yield
    finally:
        model.train(was_training)


def all_reduce_sum(t: torch.Tensor, world_size: int) -> torch.Tensor:
    """Sum a tensor over ranks in place; a no-op in a single process."""
    if world_size > 1:
        if not dist.is_initialized():
            raise RuntimeError(f"world_size={world_size} but torch.distributed is not initialised")
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


class Progress:
    """A tqdm bar on an interactive terminal, else a log line every ~10%; silent when disabled."""

    def __init__(self, total: int, desc: str, enabled: bool = True):
        self.total, self.desc, self.done, self.next_log = total, desc, 0, total / 10
        self.enabled = enabled and total > 0
        self.bar = None
        if self.enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm
            except ImportError:  # tqdm is optional: fall back to log lines
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and (self.done >= self.next_log or self.done == self.total):
            log.info("%s: %d/%d (%.0f%%)", self.desc, self.done, self.total, 100 * self.done / self.total)
            self.next_log = self.done + self.total / 10

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
