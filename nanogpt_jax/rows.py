"""Scored rows: a context and a continuation as one token row, sorted and padded to length buckets.

Everything that asks "how likely is this continuation after this context?" builds its inputs here
(HellaSwag's endings, lm-evaluation-harness's loglikelihood requests and rolling windows), and
`nanogpt_jax.scoring.score_rows` runs them through the one jitted scorer. Nothing here needs jax.

    row, n = continuation_row(ctx_ids, cont_ids, block_size)     # cut from the left to block_size + 1
    for x, y, mask, ids in batches(rows, n_scored, 32, block_size): ...

A row of L tokens is L - 1 input positions; its last n_scored targets are scored. Rows are padded
on the right to the shortest bucket (MIN_BUCKET, doubling, up to block_size) that holds them, so a
task compiles a handful of shapes; causal attention never looks right, so padding changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

MIN_BUCKET = 16  # shortest padded row length; buckets double up to block_size


def continuation_row(context: Sequence[int], continuation: Sequence[int], block_size: int) -> tuple[tuple[int, ...],
                                                                                                     int]:
    """(row, n_scored): context + continuation, its first tokens dropped when it is longer than
    block_size + 1 (the context is cut from the left, as lm-evaluation-harness's models do), and how
    many of its last targets are the continuation's: min(len(continuation), len(row) - 1), so at most
    block_size continuation tokens are scored."""
    row = tuple(int(t) for t in (list(context) + list(continuation))[-(block_size + 1):])
    return row, min(len(continuation), len(row) - 1)


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


def batches(rows: Sequence[Sequence[int]], n_scored: Sequence[int], batch_size: int,
            block_size: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """(x, y, mask, ids): int32 (B, 1, T), int32 (B, 1, T), float32 (B, 1, T), int64 (B,).

    B = batch_size rows per batch, in order of length (so a batch pads little); T = the bucket of the
    batch's longest row. Row i holds its tokens but the last as x, shifted by one as y, right-padded
    with zeros; mask is 1.0 on its last n_scored[i] targets. `ids` index `rows`; -1 marks padding.
    Rows must hold 2 .. block_size + 1 tokens and 1 <= n_scored[i] <= len(rows[i]) - 1
    (`continuation_row` makes such rows). The K axis of size 1 is the scorer's (N, K, T) layout.
    """
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    for start in range(0, len(order), batch_size):
        ids = order[start:start + batch_size]
        T = bucket(max(len(rows[i]) - 1 for i in ids), block_size)
        x = np.zeros((batch_size, 1, T), np.int32)
        y = np.zeros((batch_size, 1, T), np.int32)
        mask = np.zeros((batch_size, 1, T), np.float32)
        for b, i in enumerate(ids):
            row, L = rows[i], len(rows[i]) - 1
            x[b, 0, :L], y[b, 0, :L] = row[:-1], row[1:]
            mask[b, 0, L - n_scored[i]:L] = 1.0
        yield x, y, mask, np.array(ids + [-1] * (batch_size - len(ids)), np.int64)
