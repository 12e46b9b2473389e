"""Sampling from a GPT: a KV cache, one prefill pass, a jitted decode loop, streaming.

    tokens_BN = generate(model, params, idx_BT, max_new_tokens=50, temperature=0.8, top_k=200)
    for tok_B in stream(model, params, idx_BT, max_new_tokens=50):   # numpy int32 (B,) per step
        ...

`generate` compiles one function per (model, shapes, sampling options): the prompt is run once
through the model to fill a fixed-size `KVCache` (the prefill), then a `lax.while_loop` feeds one
token per step through `GPT.decode`, which reads the cache instead of recomputing the past.

Past block_size the result equals nanoGPT's `sample.py`, which crops the context to the last
block_size tokens before every step. GPT-2's positions are learned absolute embeddings: after a
crop every kept token sits at a new position, so cached keys cannot be shifted and reused. Once
the context is full, each further token is therefore a full forward pass over the last block_size
tokens (still inside the same jitted loop); generating within block_size is the fast path.

Shape letters as in model.py, plus N = T + max_new_tokens (the output length).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from nanogpt_jax.model import GPT, GPT2_VOCAB_SIZE, PADDED_VOCAB_SIZE, KVCache

Array = jax.Array


# ---- sampling filters: small pure functions on logits (B, V) ---------------------------------


def mask_vocab(logits_BV: Array, vocab_limit: int) -> Array:
    """Ids >= vocab_limit get -inf, so they are never sampled (the padded rows of a vocab
    rounded up to 50304 for speed are not tokens the tokenizer knows)."""
    if vocab_limit >= logits_BV.shape[-1]:
        return logits_BV
    return jnp.where(jnp.arange(logits_BV.shape[-1]) < vocab_limit, logits_BV, -jnp.inf)


def top_k_filter(logits_BV: Array, k: int) -> Array:
    """Keep the k largest logits of each row, -inf elsewhere (ties with the k-th all stay,
    as in nanoGPT). A k at least the vocab size keeps everything."""
    if k >= logits_BV.shape[-1]:
        return logits_BV
    kth_B1 = jax.lax.top_k(logits_BV, k)[0][:, -1:]
    return jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)


def top_p_filter(logits_BV: Array, p: float) -> Array:
    """Nucleus filtering (Holtzman et al. 2019, "The Curious Case of Neural Text Degeneration"):
    keep the smallest set of likeliest tokens whose probability reaches p, -inf elsewhere.

    A token stays when the tokens likelier than it hold less than p, so the top token always
    stays. Tokens tied with the least likely kept one stay too. p >= 1 keeps everything.
    """
    if p >= 1.0:
        return logits_BV
    sorted_BV = -jnp.sort(-logits_BV, axis=-1)  # descending
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    n_keep_B1 = jnp.sum(mass_before_BV < p, axis=-1, keepdims=True)  # >= 1: mass before the top is 0
    cutoff_B1 = jnp.take_along_axis(sorted_BV, n_keep_B1 - 1, axis=-1)
    return jnp.where(logits_BV < cutoff_B1, -jnp.inf, logits_BV)


def sample_logits(
    logits_BV: Array, key: Array, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> Array:
    """Draw one token per row from float logits (B, V) -> int32 (B,).

    temperature 0 is greedy (argmax; top_k and top_p then change nothing). Otherwise the logits
    are divided by temperature, then filtered by top_k, then by top_p (on the tempered
    distribution, as Hugging Face's and nanoGPT's samplers order them), and one id is drawn with
    `jax.random.categorical`. temperature, top_k and top_p are Python values (static under jit).
    """
    if temperature == 0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV.astype(jnp.float32) / temperature
    if top_k is not None:
        logits_BV = top_k_filter(logits_BV, top_k)
    if top_p is not None:
        logits_BV = top_p_filter(logits_BV, top_p)
    return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


# ---- the options and the loop state ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Validated sampling options; hashable, so they are static arguments of the jitted loop."""

    temperature: float
    top_k: int | None
    top_p: float | None
    vocab_limit: int
    stop_token: int | None


class _State(NamedTuple):
    """What one step carries to the next. i counts new tokens sampled so far."""

    i: Array  # int32 scalar
    tokens_BN: Array  # int32: the prompt, the tokens sampled so far, then padding
    cache: KVCache | None  # None when the prompt already fills block_size (no cached steps)
    done_B: Array  # bool: the row has produced stop_token
    finite: Array  # bool scalar: every logit seen so far was finite


def default_vocab_limit(vocab_size: int) -> int:
    """Ids a tokenizer can decode: the model's vocab, except GPT-2's 50257 inside a padded 50304."""
    return GPT2_VOCAB_SIZE if vocab_size == PADDED_VOCAB_SIZE else vocab_size


def _check_inputs(
    model: GPT, idx_BT: Any, max_new_tokens: Any, temperature: Any, top_k: Any, top_p: Any,
    rng: Array | None, stop_token: Any, vocab_limit: Any,
) -> tuple[GPT, Array, Sampling, Array]:
    """Validate the arguments of generate/stream; ValueError with one line on bad input."""
    if getattr(model, "scope", None) is not None:  # a bound module: keep its (hashable) definition
        model = model.unbind()[0]
    V = model.config.vocab_size

    def is_int(x: Any) -> bool:
        return isinstance(x, (int, np.integer)) and not isinstance(x, bool)

    idx = np.asarray(idx_BT)
    if idx.ndim == 2 and idx.shape[0] == 0:
        raise ValueError("idx has no rows (batch size 0)")
    if idx.size == 0:  # before the dtype: np.asarray([]) is float
        raise ValueError("the prompt is empty: give at least one token (e.g. the tokenizer's end-of-text token)")
    if not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"idx must hold integer token ids, got dtype {idx.dtype}")
    if idx.ndim != 2:
        raise ValueError(f"idx must be (batch, tokens), got shape {idx.shape}; add a batch axis: idx[None]")
    if idx.min() < 0 or idx.max() >= V:
        raise ValueError(f"token ids must be in [0, {V}) for vocab_size={V}, got {idx.min()}..{idx.max()}")
    if not is_int(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 0")
    if not isinstance(temperature, (int, float, np.floating, np.integer)) or not math.isfinite(temperature) \
            or temperature < 0:
        raise ValueError(f"temperature={temperature!r} must be a finite number >= 0 (0 = greedy)")
    if top_k is not None and (not is_int(top_k) or top_k < 1):
        raise ValueError(f"top_k={top_k!r} must be a positive integer or None")
    if top_p is not None and not (isinstance(top_p, (int, float, np.floating)) and 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p={top_p!r} must be in (0, 1] or None")
    if vocab_limit is None:
        vocab_limit = default_vocab_limit(V)
    if not is_int(vocab_limit) or not 1 <= vocab_limit <= V:
        raise ValueError(f"vocab_limit={vocab_limit!r} must be an integer in [1, {V}]")
    if stop_token is not None and (not is_int(stop_token) or not 0 <= stop_token < V):
        raise ValueError(f"stop_token={stop_token!r} must be a token id in [0, {V}) or None")
    sampling = Sampling(
        temperature=float(temperature),
        # a top_k at least the vocabulary is no filter: None shares the compiled function
        top_k=None if top_k is None or top_k >= vocab_limit else int(top_k),
        top_p=None if top_p is None or top_p >= 1.0 else float(top_p),
        vocab_limit=int(vocab_limit),
        stop_token=None if stop_token is None else int(stop_token),
    )
    if rng is None:
        rng = jax.random.key(0)
    elif not isinstance(rng, jax.Array) or not (
            (jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) and rng.shape == ())
            or (rng.dtype == jnp.uint32 and rng.shape == (2,))):  # a typed key, or a legacy PRNGKey
        got = f"{rng.dtype}{list(rng.shape)}" if isinstance(rng, jax.Array) else repr(rng)
        raise ValueError(f"rng must be a single key from jax.random.key(seed), got {got}")
    return model, jnp.asarray(idx, jnp.int32), sampling, rng


# ---- the steps: one place for sampling, shared by generate's loop and stream ---------------------


def _emit(logits_BV: Array, state: _State, rng: Array, prompt_len: int, sampling: Sampling) -> tuple[_State, Array]:
    """Sample new token i from logits (B, V), write it at prompt_len + i; -> (state, token (B,))."""
    finite = state.finite & jnp.all(jnp.isfinite(logits_BV) | state.done_B[:, None])
    logits_BV = mask_vocab(logits_BV, sampling.vocab_limit)
    tok_B = sample_logits(logits_BV, jax.random.fold_in(rng, state.i), sampling.temperature, sampling.top_k,
                          sampling.top_p)
    done_B = state.done_B
    if sampling.stop_token is not None:  # finished rows keep emitting stop_token
        tok_B = jnp.where(done_B, sampling.stop_token, tok_B)
        done_B = done_B | (tok_B == sampling.stop_token)
    tokens_BN = jax.lax.dynamic_update_slice(state.tokens_BN, tok_B[:, None], (0, prompt_len + state.i))
    return _State(state.i + 1, tokens_BN, state.cache, done_B, finite), tok_B


def _prefill(model: GPT, params: dict, tokens_BN: Array, rng: Array, prompt_len: int, sampling: Sampling):
    """Run the prompt (its last block_size tokens) through the model and sample token 0.

    The cache holds min(block_size, N) positions: enough for every cached step of this call.
    """
    B, N = tokens_BN.shape
    block_size = model.config.block_size
    context_BT = tokens_BN[:, max(0, prompt_len - block_size):prompt_len]
    if prompt_len < block_size:
        cache = KVCache.zeros(model.config, B, min(block_size, N))
        logits_BV, cache = model.apply({"params": params}, context_BT, cache, 0, method=GPT.decode)
    else:  # the prompt fills the context: every step is a cropped full forward, no cache
        cache = None
        logits_BV = model.apply({"params": params}, context_BT, targets=False, method=GPT.predict)[:, 0]
    state = _State(jnp.int32(0), tokens_BN, cache, jnp.zeros((B,), bool), jnp.bool_(True))
    return _emit(logits_BV, state, rng, prompt_len, sampling)


def _cached_step(model: GPT, params: dict, state: _State, rng: Array, prompt_len: int, sampling: Sampling):
    """Feed the newest token (at position prompt_len + i - 1 < block_size) through the cache."""
    pos = prompt_len + state.i - 1
    last_B1 = jax.lax.dynamic_slice_in_dim(state.tokens_BN, pos, 1, axis=1)
    logits_BV, cache = model.apply({"params": params}, last_B1, state.cache, pos, method=GPT.decode)
    return _emit(logits_BV, state._replace(cache=cache), rng, prompt_len, sampling)


def _window_step(model: GPT, params: dict, state: _State, rng: Array, prompt_len: int, sampling: Sampling):
    """The context is full: a forward pass over the last block_size tokens (nanoGPT's crop)."""
    block_size = model.config.block_size
    window_BT = jax.lax.dynamic_slice_in_dim(state.tokens_BN, prompt_len + state.i - block_size, block_size, axis=1)
    logits_BV = model.apply({"params": params}, window_BT, targets=False, method=GPT.predict)[:, 0]
    return _emit(logits_BV, state, rng, prompt_len, sampling)


def _n_cached(block_size: int, prompt_len: int, max_new_tokens: int) -> int:
    """Steps i in [1, this) run through the cache; from there on the context is full.

    Step i feeds the token at position prompt_len + i - 1, which must be < block_size.
    """
    return max(1, min(max_new_tokens, block_size - prompt_len + 1))


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "sampling"))
def _generate_jit(model: GPT, params: dict, idx_BT: Array, rng: Array, max_new_tokens: int, sampling: Sampling):
    B, T = idx_BT.shape
    pad = 0 if sampling.stop_token is None else sampling.stop_token  # what rows that stopped early show
    tokens_BN = jnp.concatenate([idx_BT, jnp.full((B, max_new_tokens), pad, jnp.int32)], axis=1)
    state, _ = _prefill(model, params, tokens_BN, rng, T, sampling)

    def loop(step, state: _State, stop: int) -> _State:
        def cond(s: _State) -> Array:
            return (s.i < stop) & ~jnp.all(s.done_B)

        def body(s: _State) -> _State:
            return step(model, params, s, rng, T, sampling)[0]

        return jax.lax.while_loop(cond, body, state)

    n_cached = _n_cached(model.config.block_size, T, max_new_tokens)
    if n_cached > 1:
        state = loop(_cached_step, state, n_cached)
    if max_new_tokens > n_cached:
        state = loop(_window_step, state._replace(cache=None), max_new_tokens)
    return state.tokens_BN, state.finite


def _nonfinite(dtype: str) -> str:
    """The message for NaN or inf logits; float32 is suggested only to a model that does not run in it."""
    fix = "the parameters may hold NaN or inf: check the checkpoint"
    if dtype != "float32":
        fix += f", or compute in float32 instead of {dtype} (--config.model.dtype=float32)"
    return "non-finite logits (NaN or inf) while generating: the parameters or the activations overflowed; " + fix


def generate(
    model: GPT, params: dict, idx_BT: Array, max_new_tokens: int, *, temperature: float = 1.0,
    top_k: int | None = None, top_p: float | None = None, rng: Array | None = None,
    stop_token: int | None = None, vocab_limit: int | None = None,
) -> Array:
    """Continue each prompt row by max_new_tokens sampled tokens.

    Args:
        model: an (unbound) `GPT`; `lm.generate(...)` on a bound module calls this.
        params: its parameters (the "params" collection).
        idx_BT: int (B, T) token ids in [0, vocab_size), T >= 1. A prompt longer than
            block_size keeps its last block_size tokens as context; the output still starts
            with the whole prompt.
        max_new_tokens: tokens to add, >= 0.
        temperature: >= 0; 0 is greedy (argmax), 1 samples the model's distribution.
        top_k: keep the k likeliest tokens (k above the vocab size keeps all).
        top_p: nucleus sampling: keep the smallest set of likeliest tokens whose probability
            reaches top_p, in (0, 1].
        rng: a `jax.random.key`; new token i uses `fold_in(rng, i)`. Default `key(0)`.
        stop_token: a row that samples it keeps emitting it; the loop ends once every row
            has, and the rest of the output is padded with it.
        vocab_limit: ids >= vocab_limit are never sampled. Default: the model's vocab_size,
            or 50257 (GPT-2's tokens) for a vocabulary padded to 50304.

    Returns:
        int32 (B, T + max_new_tokens): the prompt followed by the new tokens.

    Raises:
        ValueError: an empty or non-integer prompt, ids out of range, a negative temperature or
            max_new_tokens, a top_k < 1, a top_p outside (0, 1], a bad stop_token/vocab_limit.
        FloatingPointError: the model produced NaN or inf logits.

    One jitted function per (model, B, T, max_new_tokens, sampling options), cached by jit: a
    prefill pass into a `KVCache` of min(block_size, T + max_new_tokens) positions, then a
    `lax.while_loop` of single-token decode steps; past block_size each step is a full forward
    over the last block_size tokens, which is exactly nanoGPT's crop.
    """
    model, idx_BT, sampling, rng = _check_inputs(model, idx_BT, max_new_tokens, temperature, top_k, top_p, rng,
                                                 stop_token, vocab_limit)
    if max_new_tokens == 0:
        return idx_BT
    tokens_BN, finite = _generate_jit(model, params, idx_BT, rng, max_new_tokens, sampling)
    if not bool(finite):
        raise FloatingPointError(_nonfinite(model.config.dtype))
    return tokens_BN


# stream's compiled pieces: the same step functions, one token per call. The state is donated, so
# the cache is updated in place between calls instead of copied.
_STATIC = ("model", "prompt_len", "sampling")
_prefill_jit = jax.jit(_prefill, static_argnames=_STATIC)
_cached_step_jit = jax.jit(_cached_step, static_argnames=_STATIC, donate_argnames=("state",))
_window_step_jit = jax.jit(_window_step, static_argnames=_STATIC, donate_argnames=("state",))


def stream(
    model: GPT, params: dict, idx_BT: Array, max_new_tokens: int, *, temperature: float = 1.0,
    top_k: int | None = None, top_p: float | None = None, rng: Array | None = None,
    stop_token: int | None = None, vocab_limit: int | None = None,
) -> Iterator[np.ndarray]:
    """Like `generate`, but yields each new token as numpy int32 (B,) as soon as it is sampled.

    The same arguments, checks and per-step keys as `generate`, so the tokens are the same.
    Stops after max_new_tokens, or early once every row has produced stop_token (the
    step that completes the last row is yielded). Arguments are checked on the call, before
    the first token; FloatingPointError is raised instead of yielding a token drawn from
    non-finite logits.
    """
    model, idx_BT, sampling, rng = _check_inputs(model, idx_BT, max_new_tokens, temperature, top_k, top_p, rng,
                                                 stop_token, vocab_limit)
    return _stream(model, params, idx_BT, max_new_tokens, rng, sampling)


def _stream(model: GPT, params: dict, idx_BT: Array, max_new_tokens: int, rng: Array,
            sampling: Sampling) -> Iterator[np.ndarray]:
    if max_new_tokens == 0:
        return
    B, T = idx_BT.shape
    pad = 0 if sampling.stop_token is None else sampling.stop_token
    tokens_BN = jnp.concatenate([idx_BT, jnp.full((B, max_new_tokens), pad, jnp.int32)], axis=1)
    kwargs = dict(model=model, prompt_len=T, sampling=sampling)
    state, tok_B = _prefill_jit(params=params, tokens_BN=tokens_BN, rng=rng, **kwargs)
    n_cached = _n_cached(model.config.block_size, T, max_new_tokens)
    for i in range(1, max_new_tokens + 1):
        if not bool(state.finite):
            raise FloatingPointError(_nonfinite(model.config.dtype))
        yield np.asarray(tok_B)
        if i == max_new_tokens or bool(jnp.all(state.done_B)):
            return
        if i < n_cached:
            state, tok_B = _cached_step_jit(params=params, state=state, rng=rng, **kwargs)
        else:
            state, tok_B = _window_step_jit(params=params, state=state._replace(cache=None), rng=rng, **kwargs)
