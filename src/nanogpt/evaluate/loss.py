"""Exact loss and perplexity over every token of a token array, with strided sliding windows.

With window W and stride S <= W, window k starts at k*S and the last one is aligned to the end
of the data. The first window scores all W of its targets; every later one scores only the
targets the previous windows have not reached (S of them, fewer in the tail window). So each
token after the first is scored exactly once, with at least W - S tokens of context, and
S = W is the plain non-overlapping evaluation.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from nanogpt.data.loader import to_batch
from nanogpt.data.tokenizer import Tokenizer
from nanogpt.errors import ConfigError, DataError
from nanogpt.evaluate.common import Progress, all_reduce_sum, inner, log, model_device, scoring
from nanogpt.model import lm_loss


def plan_windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int]]:
    """(start, n_scored) for each window over n_tokens tokens: the window's inputs are
    tokens[start : start + window] and it scores its last n_scored targets."""
    if n_tokens < 2:
        raise DataError(f"need at least 2 tokens to score a prediction, got {n_tokens}")
    if not 1 <= stride <= window:
        raise ConfigError(f"stride={stride} must be in [1, block_size={window}]")
    window = min(window, n_tokens - 1)  # a short sequence is one window of all its targets
    plan, start, covered = [(0, window)], 0, window  # covered: index of the last target scored
    while covered < n_tokens - 1:
        start = min(start + stride, n_tokens - 1 - window)  # the tail window ends at the data's end
        plan.append((start, start + window - covered))
        covered = start + window
    return plan


def split_loss(model: torch.nn.Module, tokens: np.ndarray | torch.Tensor, *, block_size: int | None = None,
               stride: int | None = None, batch_size: int = 8, device: torch.device | str | None = None,
               dtype: torch.dtype | None = None, rank: int = 0, world_size: int = 1,
               progress: bool = False) -> dict:
    """Mean loss and perplexity over every token of a 1-D token array (each scored once).

    block_size: the window (default and maximum: the model's); stride: default the window.
    Under torchrun each rank scores every world_size-th window and the sums are all-reduced, so
    all ranks return the same {"loss", "ppl", "tokens", "windows", "seconds"}.
    """
    t0 = time.perf_counter()
    tokens = tokens.cpu().numpy() if isinstance(tokens, torch.Tensor) else tokens
    limit = inner(model).config.block_size
    window = block_size or limit
    if window > limit:
        raise ConfigError(f"block_size={window} exceeds the model's block_size {limit}")
    plan = plan_windows(len(tokens), window, stride or window)
    window = min(window, len(tokens) - 1)
    device = torch.device(device) if device is not None else model_device(model)
    mine = plan[rank::world_size]
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of token losses, tokens)
    bar = Progress(len(mine), "loss", progress and rank == 0)
    with scoring(model, device, dtype):
        for i in range(0, len(mine), batch_size):
            total += _score_windows(model, tokens, mine[i : i + batch_size], window, device)
            bar.update(len(mine[i : i + batch_size]))
    bar.close()
    all_reduce_sum(total, world_size)
    loss = (total[0] / total[1]).item()
    return {"loss": loss, "ppl": _ppl(loss), "tokens": int(total[1].item()), "windows": len(plan),
            "seconds": time.perf_counter() - t0}


def _score_windows(model: torch.nn.Module, tokens: np.ndarray, batch: list[tuple[int, int]], window: int,
                   device: torch.device) -> torch.Tensor:
    """(sum of losses, count) over the scored targets of a batch of windows."""
    x, y = to_batch(tokens, np.array([s for s, _ in batch]), window, device)  # (B, W) each
    skip = torch.tensor([window - n for _, n in batch], device=device)  # unscored targets per row
    y = y.masked_fill(torch.arange(window, device=device)[None, :] < skip[:, None], -1)
    logits, _ = model(x)
    losses = lm_loss(logits, y, reduction="none")  # (B, W); 0 where the target is -1
    return torch.stack([losses.sum(dtype=torch.float64), (y >= 0).sum().double()])


def _ppl(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf  # exp overflows a float past ~709


def text_tokens(tok: Tokenizer, path: str | Path) -> np.ndarray:
    """A raw text file as one document for the model's tokenizer. With GPT-2's, it follows an
    <|endoftext|> (as a document in the training data does), so its first token is scored too."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"text file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    ids = tok.encode(text, special=False)
    if tok.eot_token is not None:
        ids = [tok.eot_token, *ids]
    log.info("%s: %s characters, %s %s tokens", path, f"{len(text):,}", f"{len(ids):,}", tok.name)
    return np.asarray(ids, dtype=np.int64)
