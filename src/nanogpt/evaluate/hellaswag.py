"""HellaSwag zero-shot accuracy, completion style (as build-nanogpt and llm.c score it).

Each example is a context and four endings. The model reads context + " " + ending and we sum the
log-probabilities of the ending's tokens only: `acc` picks the ending with the largest sum,
`acc_norm` the largest mean per token (length-normalised, so long endings are not penalised for
their length). The four endings of several examples run as one right-padded batch.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from nanogpt.data.download import fetch
from nanogpt.data.tokenizer import Tokenizer
from nanogpt.errors import DataError
from nanogpt.evaluate.common import Progress, all_reduce_sum, inner, model_device, scoring
from nanogpt.model import lm_loss

MIRROR_PATH = "hellaswag/hellaswag_val.jsonl"
URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
N_VAL = 10042  # examples in the validation split


def load_hellaswag(cache_dir: str | Path = "data", limit: int | None = None) -> list[dict]:
    """The validation examples (the first `limit`), fetched once into cache_dir/hellaswag/."""
    path = fetch(MIRROR_PATH, URL, Path(cache_dir) / MIRROR_PATH)
    examples = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if limit is not None and len(examples) >= limit:
                break
            examples.append(json.loads(line))
    return examples


def render(tok: Tokenizer, example: dict, max_len: int) -> tuple[list[list[int]], list[int]]:
    """Token rows (context + ending) of the four endings and how many tokens of each row's end
    are the ending. Rows longer than max_len keep their end (the context is cut from the left)."""
    try:
        ctx = tok.encode(example["ctx"], special=False)
        endings = [tok.encode(" " + e, special=False) for e in example["endings"]]
    except DataError as e:  # a char model whose vocabulary lacks a character of the text
        raise DataError(f"HellaSwag needs a tokenizer that can encode its text: {e}; "
                        "use a model with the GPT-2 tokenizer") from None
    rows = [(ctx + end)[-max_len:] for end in endings]
    return rows, [min(len(end), len(row) - 1) for end, row in zip(endings, rows, strict=True)]


def score_endings(model: torch.nn.Module, rows: list[list[int]], n_end: list[int],
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed and mean negative log-likelihood of each row's last n_end tokens -> (R,), (R,)."""
    length = max(len(r) for r in rows)
    buf = torch.zeros(len(rows), length, dtype=torch.long)
    targets = torch.full((len(rows), length - 1), -1, dtype=torch.long)  # -1: not scored
    for i, (row, n) in enumerate(zip(rows, n_end, strict=True)):
        buf[i, : len(row)] = torch.tensor(row)
        targets[i, len(row) - 1 - n : len(row) - 1] = buf[i, len(row) - n : len(row)]
    x, y = buf[:, :-1].to(device), targets.to(device)  # right padding: causal attention never sees it
    logits, _ = model(x)
    losses = lm_loss(logits, y, reduction="none").double()  # (R, L-1); 0 where not scored
    sums = losses.sum(dim=1)
    return sums, sums / torch.tensor(n_end, device=device, dtype=torch.float64)


def hellaswag_eval(model: torch.nn.Module, tok: Tokenizer, examples: list[dict], *, batch_size: int = 8,
                   device: torch.device | str | None = None, dtype: torch.dtype | None = None, rank: int = 0,
                   world_size: int = 1, progress: bool = False) -> dict:
    """Accuracy over the examples: {"acc", "acc_norm", "examples", "seconds"}. Under torchrun
    each rank takes every world_size-th example and the counts are all-reduced."""
    t0 = time.perf_counter()
    device = torch.device(device) if device is not None else model_device(model)
    max_len = inner(model).config.block_size
    mine = sorted(examples[rank::world_size], key=_length)  # similar lengths together: less padding
    counts = torch.zeros(3, dtype=torch.float64, device=device)  # (examples, correct, correct_norm)
    bar = Progress(len(mine), "hellaswag", progress and rank == 0)
    with scoring(model, device, dtype):
        for i in range(0, len(mine), batch_size):
            batch = mine[i : i + batch_size]
            counts += _score_batch(model, tok, batch, max_len, device)
            bar.update(len(batch))
    bar.close()
    all_reduce_sum(counts, world_size)
    n = int(counts[0].item())
    if n == 0:
        raise DataError("no HellaSwag examples to score")
    return {"acc": counts[1].item() / n, "acc_norm": counts[2].item() / n, "examples": n,
            "seconds": time.perf_counter() - t0}


def _length(example: dict) -> int:
    """Characters in the longest row: a cheap stand-in for its token count."""
    return len(example["ctx"]) + max(len(e) for e in example["endings"])


def _score_batch(model: torch.nn.Module, tok: Tokenizer, batch: list[dict], max_len: int,
                 device: torch.device) -> torch.Tensor:
    rows, n_end = [], []
    for example in batch:
        r, n = render(tok, example, max_len)
        rows += r
        n_end += n
    sums, means = score_endings(model, rows, n_end, device)
    k = len(batch[0]["endings"])  # 4 in HellaSwag
    labels = torch.tensor([int(ex["label"]) for ex in batch], device=device)
    acc = (sums.view(-1, k).argmin(dim=1) == labels).sum()  # lowest loss = highest log-prob
    acc_norm = (means.view(-1, k).argmin(dim=1) == labels).sum()
    return torch.stack([torch.tensor(len(batch), device=device), acc, acc_norm]).double()
