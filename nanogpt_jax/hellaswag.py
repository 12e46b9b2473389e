"""HellaSwag (Zellers et al. 2019), completion style: the data, the padded batches and the three accuracies.

Each validation example is a context and four endings, one of them right (`label`). The model reads
the context tokens followed by each ending encoded with a leading space (`encode(" " + ending)`), and
only the ending's tokens are scored: the sum of their log-probabilities is the ending's score. This is
the completion style of llm.c's `dev/data/hellaswag.py` (and build-nanogpt's): raw `ctx`, raw endings.
Three accuracies, each the fraction of examples whose chosen ending is the labelled one:

    acc             the largest sum of log-probabilities (unnormalised)
    acc_norm_token  the largest mean log-probability per ending token: llm.c's `acc_norm`
                    (gpt2 124M: acc 0.2859, acc_norm 0.2955 in llm.c's docstring)
    acc_norm_char   the largest log-probability per character of the ending (without its leading
                    space): the normalisation of lm-evaluation-harness's `acc_norm`
                    (`lls / len(choice)` in its multiple-choice `process_results`). Its prompt differs
                    (activity label, cleaned text), so its published figures are not this protocol's.

Ties go to the first ending, as `np.argmax` does. Nothing here needs jax: `nanogpt_jax.evaluate`
runs the batches through the model.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from nanogpt_jax import download
from nanogpt_jax.errors import DataError
from nanogpt_jax.tokenizer import Tokenizer

MIRROR_PATH = "hellaswag/hellaswag_val.jsonl"
URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
N_VAL = 10_042  # examples in the validation split
N_ENDINGS = 4
MIN_BUCKET = 16  # shortest padded row length; buckets double up to block_size
METRICS = ("acc", "acc_norm_token", "acc_norm_char")


def load(cache_dir: str | Path, limit: int | None = None) -> list[dict]:
    """The validation examples as dicts (`ctx`, `endings`, `label`, ...), the first `limit` of them.

    The file is fetched once into cache_dir/hellaswag/ (from $NANOGPT_DATA_MIRROR when set).
    Raises DataError when it cannot be fetched or a line is not a HellaSwag example.
    """
    path = download.fetch(MIRROR_PATH, URL, Path(cache_dir) / MIRROR_PATH)
    examples = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if limit is not None and len(examples) >= limit:
                break
            try:
                ex = json.loads(line)
                ok = isinstance(ex["ctx"], str) and len(ex["endings"]) == N_ENDINGS and 0 <= int(ex["label"]) < 4
            except (ValueError, KeyError, TypeError):
                ok = False
            if not ok:
                raise DataError(f"{path} line {i + 1} is not a HellaSwag example; delete the file to fetch it again")
            examples.append(ex)
    return examples


@dataclasses.dataclass(frozen=True)
class Rendered:
    """One example as token rows: `rows[k]` is context + ending k (ints), of which the last
    `n_scored[k]` tokens are scored; `n_chars[k]` is the length of ending k in characters."""

    rows: tuple[tuple[int, ...], ...]
    n_scored: tuple[int, ...]
    n_chars: tuple[int, ...]
    label: int

    @property
    def length(self) -> int:
        """Input positions of the longest row (its tokens but the last)."""
        return max(len(r) for r in self.rows) - 1


def render(tok: Tokenizer, example: dict, block_size: int) -> Rendered:
    """Tokenize an example: context, then each ending with a leading space. A row longer than
    block_size + 1 tokens keeps its end (the context is cut from the left), so at most block_size
    ending tokens are scored. Raises DataError when the tokenizer cannot encode the text."""
    try:
        ctx = tok.encode(example["ctx"])
        endings = [tok.encode(" " + e) for e in example["endings"]]
    except DataError as e:
        raise DataError(f"HellaSwag's text cannot be encoded by this model's tokenizer ({e}); use a GPT-2 "
                        "model") from None
    rows = tuple(tuple((ctx + end)[-(block_size + 1):]) for end in endings)
    n_scored = tuple(min(len(end), len(row) - 1) for end, row in zip(endings, rows, strict=True))
    if min(n_scored) < 1:
        raise DataError(f"HellaSwag example {example.get('ind')} has an empty ending; the file is damaged")
    n_chars = tuple(max(len(e), 1) for e in example["endings"])  # an empty ending would divide by 0
    return Rendered(rows, n_scored, n_chars, int(example["label"]))


def buckets(block_size: int) -> list[int]:
    """Padded row lengths: MIN_BUCKET, doubling, below block_size; then block_size itself."""
    out, n = [], MIN_BUCKET
    while n < block_size:
        out.append(n)
        n *= 2
    return out + [block_size]


def bucket(length: int, block_size: int) -> int:
    """The shortest bucket holding `length` positions."""
    return next(b for b in buckets(block_size) if b >= length)


def batches(examples: Sequence[Rendered], batch_size: int,
            block_size: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """(x, y, mask, ids): int32 (E, 4, T), int32 (E, 4, T), float32 (E, 4, T), int64 (E,).

    E = batch_size examples per batch, in order of length (so a batch pads little); T = the bucket of
    the batch's longest row. Row k of example e holds its tokens but the last as x, shifted by one as
    y, right-padded with zeros (causal attention never looks right, so padding changes nothing);
    mask is 1.0 on the ending tokens' targets. `ids` are indices into `examples`; -1 marks padding.
    """
    order = sorted(range(len(examples)), key=lambda i: examples[i].length)
    for start in range(0, len(order), batch_size):
        ids = order[start:start + batch_size]
        T = bucket(max(examples[i].length for i in ids), block_size)
        x = np.zeros((batch_size, N_ENDINGS, T), np.int32)
        y = np.zeros((batch_size, N_ENDINGS, T), np.int32)
        mask = np.zeros((batch_size, N_ENDINGS, T), np.float32)
        for e, i in enumerate(ids):
            for k, (row, n) in enumerate(zip(examples[i].rows, examples[i].n_scored, strict=True)):
                L = len(row) - 1
                x[e, k, :L], y[e, k, :L] = row[:-1], row[1:]
                mask[e, k, L - n:L] = 1.0
        yield x, y, mask, np.array(ids + [-1] * (batch_size - len(ids)), np.int64)


def correct(example: Rendered, loss_sums: np.ndarray) -> np.ndarray:
    """[acc, acc_norm_token, acc_norm_char] of one example as 0/1 floats, from the summed negative
    log-likelihood of each ending's scored tokens, (4,) nats."""
    nll = np.asarray(loss_sums, np.float64)
    picks = (np.argmin(nll), np.argmin(nll / np.array(example.n_scored)), np.argmin(nll / np.array(example.n_chars)))
    return np.array([float(p == example.label) for p in picks])
