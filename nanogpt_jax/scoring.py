"""Scoring token rows with a model, data-parallel over a mesh and every host: the one path behind run_eval.py's
perplexity and HellaSwag tasks and the lm-evaluation-harness model's loglikelihood requests.

    Scorer              one jitted call: each row's summed token losses (and greedy misses) of padded
                        (N, K, T) batches, N split over the mesh's data x fsdp devices
    perplexity          exact mean loss over every token of a text, sliding windows, each token scored once
    score_rows          the last n tokens of each of many rows (`nanogpt_jax.rows`): sorted by length, padded
                        to a few length buckets, so a task compiles a handful of shapes
    hellaswag_accuracy  HellaSwag's accuracies from score_rows over its 4 endings per example

Every process builds the same global batch on the host (cheap), its devices score their rows, each process
sums the rows it holds (`local_rows`), and the totals are gathered from all processes once at the end
(`gather_sum`). Logits and the log-softmax are float32 (`loss.token_losses`, the one loss).

evaluate.py (the tasks, the report) and harness.py (lm-eval's model) both build on this module; neither
imports the other for it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from nanogpt_jax import hellaswag, rows, sharding
from nanogpt_jax.batches import sliding_windows
from nanogpt_jax.loss import token_losses
from nanogpt_jax.progress import Progress

# ---- the jitted scorer --------------------------------------------------------------------------


class Scorer:
    """Summed token losses of each row of padded batches, data-parallel over a mesh.

    `scorer(params, x, y, mask)` takes global numpy arrays int32 x, y and float32 mask of shape
    (N, K, T) (N split over the mesh's data x fsdp axes; every process passes the same arrays) and
    returns a float32 jax.Array (N, K): sum over t of mask * cross-entropy(logits(x)[t], y[t]), nats.
    With greedy=True it returns (sums, misses): misses int32 (N, K) counts the scored targets that
    are not the argmax of their logits (0 = greedy decoding would produce the row: the harness's
    `is_greedy`). `apply_fn(params, x_BT) -> logits (B, T, V)` is the model (or a stand-in in tests);
    params keep the shardings they have. One compilation per distinct (N, K, T, greedy).
    """

    def __init__(self, apply_fn: Callable[[Any, jax.Array], jax.Array], mesh: Mesh):
        self.mesh = mesh
        self.in_sharding = NamedSharding(mesh, P(sharding.BATCH_AXES, None, None))

        def score(params: Any, x_NKT: jax.Array, y_NKT: jax.Array, mask_NKT: jax.Array,
                  greedy: bool) -> jax.Array | tuple[jax.Array, jax.Array]:
            N, K, T = x_NKT.shape
            logits_BTV = apply_fn(params, x_NKT.reshape(N * K, T))
            y_BT, scored_BT = y_NKT.reshape(N * K, T), mask_NKT.reshape(N * K, T) > 0
            losses_BT = jnp.where(scored_BT, token_losses(logits_BTV, y_BT), 0.0)
            sums_NK = losses_BT.sum(axis=-1).reshape(N, K)
            if not greedy:
                return sums_NK
            misses_BT = scored_BT & (jnp.argmax(logits_BTV, axis=-1) != y_BT)
            return sums_NK, misses_BT.sum(axis=-1, dtype=jnp.int32).reshape(N, K)

        self.jitted = jax.jit(score, static_argnames="greedy",
                              out_shardings=NamedSharding(mesh, P(sharding.BATCH_AXES, None)))

    def __call__(self, params: Any, x: np.ndarray, y: np.ndarray, mask: np.ndarray,
                 greedy: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
        arrays = [jax.make_array_from_callback(a.shape, self.in_sharding, lambda i, a=a: a[i]) for a in (x, y, mask)]
        with sharding.activate(self.mesh):
            return self.jitted(params, *arrays, greedy=greedy)


def local_rows(out: jax.Array) -> list[tuple[slice, np.ndarray]]:
    """(rows, values) of the shards of `out` this process holds, each row block once (replica 0)."""
    return [(s.index[0], np.asarray(s.data)) for s in out.addressable_shards if s.replica_id == 0]


def gather_sum(local: np.ndarray) -> np.ndarray:
    """Sum a float64 vector over processes: one collective. jax has no float64 by default, so each
    value travels as a float32 pair (high part, remainder): ~1e-14 relative, exact for counts < 2^48."""
    if jax.process_count() == 1:
        return local
    hi = local.astype(np.float32)
    lo = (local - hi.astype(np.float64)).astype(np.float32)
    both = multihost_utils.process_allgather(np.stack([hi, lo])).astype(np.float64)  # (processes, 2, k)
    return both.sum(axis=(0, 1))


def perplexity(scorer: Scorer, params: Any, tokens: np.ndarray, *, block_size: int, stride: int, batch_size: int,
               n_bytes: int | None = None, label: str | None = None) -> dict:
    """Exact mean loss over every token of `tokens` after the first (1-D ints), each scored once with
    sliding windows (`batches.sliding_windows`); the same result on every process.

    Returns {"tokens", "windows", "loss" (nats/token), "ppl", "bytes", "bpb" (None without n_bytes)}.
    batch_size: global windows per call, a multiple of the mesh's data x fsdp size.
    label: when given, a progress line (`Progress`) under this name every few seconds.
    Raises DataError for fewer than 2 tokens or a stride outside 1 .. block_size.
    """
    local = np.zeros(2)  # this process's rows: summed nats, scored tokens
    windows, pending = 0, None
    # windows start every stride tokens up to the one that ends at the last target (batches.sliding_windows)
    total = 1 + -(-max(0, len(tokens) - 1 - block_size) // stride)
    progress = Progress(label, total, "windows") if label else None

    def read(out: jax.Array, counts: np.ndarray) -> np.ndarray:
        return sum((np.array([v.astype(np.float64).sum(), counts[rows].sum()]) for rows, v in local_rows(out)),
                   np.zeros(2))

    for x, y, mask in sliding_windows(tokens, block_size=block_size, stride=stride, batch_size=batch_size):
        counts = mask.sum(axis=1, dtype=np.float64)
        windows += int((counts > 0).sum())
        out = scorer(params, x[:, None], y[:, None], mask[:, None])
        if pending is not None:  # read the previous batch while this one runs
            local += read(*pending)
        pending = (out, counts)
        if progress:
            progress.update(int((counts > 0).sum()))
    local += read(*pending)
    nats, n = gather_sum(local)
    loss = nats / n
    ppl = math.exp(loss) if loss < 700 else math.inf  # exp overflows a float past ~709
    return {"tokens": int(round(n)), "windows": windows, "loss": loss, "ppl": ppl, "bytes": n_bytes,
            "bpb": nats / math.log(2) / n_bytes if n_bytes else None}


def score_rows(scorer: Scorer, params: Any, token_rows: Sequence[Sequence[int]], n_scored: Sequence[int], *,
               batch_size: int, block_size: int, greedy: bool = False, progress: Progress | None = None,
               rows_per_unit: int = 1) -> tuple[np.ndarray, np.ndarray | None, list[int]]:
    """The summed negative log-likelihood of the last n_scored[i] targets of each row: the one path
    behind HellaSwag and lm-evaluation-harness's loglikelihood and rolling requests.

    Rows (`nanogpt_jax.rows`: 2 .. block_size + 1 ids each) are sorted by length and padded to a few
    length buckets, batch_size rows per jitted call over the mesh; every process passes the same
    rows and gets every row's result (one gather at the end). Returns (nll float64 (n,) nats,
    greedy bool (n,) or None, the padded lengths used). progress: counted in units of
    rows_per_unit rows (HellaSwag: 4 rows, one example).
    """
    n = len(token_rows)
    local = np.zeros(2 * n)  # this process's rows: summed nats, then greedy misses
    pending, lengths, done = None, set(), 0

    def read(out: Any, ids: np.ndarray) -> np.ndarray:
        total = np.zeros_like(local)
        for offset, array in zip((0, n), out if greedy else (out,), strict=False):  # the sums, then the misses
            for rows_, values in local_rows(array):
                held = ids[rows_]
                keep = held >= 0
                total[offset + held[keep]] += values[keep, 0]
        return total

    for x, y, mask, ids in rows.batches(token_rows, n_scored, batch_size, block_size):
        lengths.add(x.shape[-1])
        out = scorer(params, x, y, mask, greedy=greedy)
        if pending is not None:  # read the previous batch while this one runs
            local += read(*pending)
        pending = (out, ids)
        if progress:
            before, done = done, done + int((ids >= 0).sum())
            progress.update(done // rows_per_unit - before // rows_per_unit)
    if pending is not None:
        local += read(*pending)
    totals = gather_sum(local)
    return totals[:n], (totals[n:] == 0 if greedy else None), sorted(lengths)


def hellaswag_accuracy(scorer: Scorer, params: Any, examples: Sequence[hellaswag.Rendered], *, batch_size: int,
                       block_size: int, label: str | None = None) -> dict:
    """HellaSwag accuracies (acc, acc_norm_token, acc_norm_char; see nanogpt_jax/hellaswag.py) over
    rendered examples, their 4 x batch_size ending rows per call (`score_rows`); the same result on
    every process. Returns {"examples", "row_lengths" (the padded lengths used), and each accuracy
    (a fraction)}. label: when given, a progress line (`Progress`) under this name every few seconds."""
    token_rows = [r for ex in examples for r in ex.rows]
    n_scored = [k for ex in examples for k in ex.n_scored]
    progress = Progress(label, len(examples), "examples") if label else None
    nll, _, lengths = score_rows(scorer, params, token_rows, n_scored, batch_size=hellaswag.N_ENDINGS * batch_size,
                                 block_size=block_size, progress=progress, rows_per_unit=hellaswag.N_ENDINGS)
    nll_E4 = nll.reshape(len(examples), hellaswag.N_ENDINGS)
    correct = np.array([hellaswag.correct(ex, s) for ex, s in zip(examples, nll_E4, strict=True)]).reshape(
        len(examples), len(hellaswag.METRICS))
    result = {"examples": len(examples), "row_lengths": lengths}
    result.update({m: (float(c) / len(examples) if examples else None)
                   for m, c in zip(hellaswag.METRICS, correct.sum(axis=0), strict=True)})
    return result
