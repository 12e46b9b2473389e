"""Generation: the KV-cache loop equals nanoGPT's recompute-and-crop loop; sampling filters; streaming;
stop tokens; vocabulary masking; bad input and non-finite logits."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanogpt_jax.generate import (
    default_vocab_limit,
    generate,
    mask_vocab,
    sample_logits,
    stream,
    top_k_filter,
    top_p_filter,
)
from nanogpt_jax.model import GPT, init_params


@functools.partial(jax.jit, static_argnums=0)
def last_logits(model, params, context_BT):
    return model.apply({"params": params}, context_BT, targets=False, method=GPT.predict)[:, 0]


def recompute(model, params, idx, n, temperature=0.0, top_k=None, top_p=None, rng=None):
    """nanoGPT's sample.py in JAX: crop to the last block_size tokens, a full forward, sample; repeat.

    No cache: `predict(idx[:, -block_size:], targets=False)` each step, with generate's per-step keys."""
    rng = jax.random.key(0) if rng is None else rng
    sample = jax.jit(functools.partial(sample_logits, temperature=temperature, top_k=top_k, top_p=top_p))
    for i in range(n):
        logits_BV = last_logits(model, params, idx[:, -model.config.block_size:])
        idx = jnp.concatenate([idx, sample(logits_BV, jax.random.fold_in(rng, i))[:, None]], axis=1)
    return np.asarray(idx)


def prompt(config, B, T, seed=1):
    return jax.random.randint(jax.random.key(seed), (B, T), 0, config.vocab_size, dtype=jnp.int32)


@pytest.fixture(scope="module")
def model(tiny_config):
    return GPT(tiny_config)


@pytest.fixture(scope="module")
def sharp_params(tiny_params):
    """A fresh init's logits are nearly uniform, so samples would hardly depend on the model; a larger
    tied embedding makes them peaked (top token ~0.45), as a trained model's are."""
    return dict(tiny_params, wte={"embedding": tiny_params["wte"]["embedding"] * 8})


# ---- the cache loop equals the recompute loop ---------------------------------------------------


@pytest.mark.parametrize("T, n", [(6, 14), (20, 4)], ids=["past-block-size", "prompt-longer-than-block"])
def test_greedy_equals_recompute(model, tiny_params, T, n):
    idx = prompt(model.config, 2, T)
    out = generate(model, tiny_params, idx, n, temperature=0)
    assert out.dtype == jnp.int32 and out.shape == (2, T + n)
    np.testing.assert_array_equal(out[:, :T], idx)  # the whole prompt, even when longer than block_size
    np.testing.assert_array_equal(out, recompute(model, tiny_params, idx, n))


def test_greedy_equals_recompute_with_scan_layers(tiny_config, tiny_params):
    model = GPT(dataclasses.replace(tiny_config, scan_layers=True))
    params = {k: v for k, v in tiny_params.items() if not k.startswith("h_")}  # blocks stacked under h
    params["h"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[tiny_params[f"h_{i}"] for i in range(2)])
    idx = prompt(tiny_config, 2, 12, seed=2)
    out = generate(model, params, idx, 8, temperature=0)  # 12 + 8 > block_size 16: crosses into the crop
    np.testing.assert_array_equal(out, recompute(model, params, idx, 8))


SAMPLED = dict(temperature=1.3, top_k=40, top_p=0.95)


@pytest.fixture(scope="module")
def sampled(model, sharp_params):
    idx = prompt(model.config, 2, 6, seed=3)
    return idx, generate(model, sharp_params, idx, 14, rng=jax.random.key(7), **SAMPLED)


def test_seeded_sampling_equals_recompute(model, sharp_params, sampled):
    idx, out = sampled
    np.testing.assert_array_equal(out, recompute(model, sharp_params, idx, 14, rng=jax.random.key(7), **SAMPLED))
    other = generate(model, sharp_params, idx, 14, rng=jax.random.key(8), **SAMPLED)
    assert not np.array_equal(out, other)  # the key matters


def test_stream_equals_generate(model, sharp_params, sampled):
    idx, out = sampled
    toks = list(stream(model, sharp_params, idx, 14, rng=jax.random.key(7), **SAMPLED))
    assert len(toks) == 14 and all(t.dtype == np.int32 and t.shape == (2,) for t in toks)
    np.testing.assert_array_equal(np.stack(toks, axis=1), out[:, 6:])


def test_bound_module_api(model, sharp_params, sampled):
    idx, out = sampled
    lm = model.bind({"params": sharp_params})
    np.testing.assert_array_equal(lm.generate(idx, 14, rng=jax.random.key(7), **SAMPLED), out)
    first = next(iter(lm.stream(idx, 14, rng=jax.random.key(7), **SAMPLED)))
    np.testing.assert_array_equal(first, out[:, 6])


def test_top_k_one_is_greedy_and_top_k_above_vocab_works(model, sharp_params):
    idx = prompt(model.config, 2, 6)
    greedy = generate(model, sharp_params, idx, 14, temperature=0)
    np.testing.assert_array_equal(generate(model, sharp_params, idx, 14, temperature=2.0, top_k=1), greedy)
    big = generate(model, sharp_params, idx, 14, top_k=10_000, rng=jax.random.key(3))  # the vocab is 97
    np.testing.assert_array_equal(big, recompute(model, sharp_params, idx, 14, 1.0, rng=jax.random.key(3)))


def test_max_new_tokens_zero_returns_the_prompt(model, tiny_params):
    idx = prompt(model.config, 1, 5)
    np.testing.assert_array_equal(generate(model, tiny_params, idx, 0), idx)
    assert list(stream(model, tiny_params, idx, 0)) == []


# ---- the filters on their own -------------------------------------------------------------------


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = jnp.array([[0.05, 0.5, 0.15, 0.3], [0.25, 0.25, 0.25, 0.25]])
    logits = jnp.log(probs)

    def kept(p):
        return np.isfinite(np.asarray(top_p_filter(logits, p)))

    np.testing.assert_array_equal(kept(0.4)[0], [False, True, False, False])  # the top token alone reaches 0.4
    np.testing.assert_array_equal(kept(0.75)[0], [False, True, False, True])  # 0.5 + 0.3
    np.testing.assert_array_equal(kept(0.9)[0], [False, True, True, True])  # 0.5 + 0.3 + 0.15
    np.testing.assert_array_equal(kept(1.0)[0], [True] * 4)
    np.testing.assert_array_equal(kept(1e-6)[0], [False, True, False, False])  # the top token always stays
    assert kept(0.3)[1].all()  # ties with the last kept token stay
    np.testing.assert_allclose(top_p_filter(logits, 0.75)[0, 1], logits[0, 1])  # kept logits unchanged


def test_top_k_and_vocab_mask():
    logits = jnp.array([[0.0, 3.0, 1.0, 2.0, -1.0]])
    np.testing.assert_array_equal(np.isfinite(top_k_filter(logits, 2))[0], [False, True, False, True, False])
    np.testing.assert_array_equal(top_k_filter(logits, 99), logits)
    np.testing.assert_array_equal(np.isfinite(mask_vocab(logits, 3))[0], [True, True, True, False, False])
    assert default_vocab_limit(50304) == 50257 and default_vocab_limit(50257) == 50257
    assert default_vocab_limit(97) == 97


def test_sample_logits_follows_the_distribution():
    logits = jnp.log(jnp.array([[0.7, 0.2, 0.1]] * 4000))
    ids = np.asarray(sample_logits(logits, jax.random.key(0)))
    assert ids.dtype == np.int32
    np.testing.assert_allclose(np.bincount(ids, minlength=3) / ids.size, [0.7, 0.2, 0.1], atol=0.03)
    np.testing.assert_array_equal(sample_logits(logits[:2], jax.random.key(0), temperature=0), [0, 0])
    cold = np.asarray(sample_logits(logits, jax.random.key(1), temperature=0.05))
    assert (cold == 0).mean() > 0.99  # low temperature sharpens towards the argmax


# ---- padded vocabularies, stop tokens -------------------------------------------------------------


def test_padded_vocab_ids_are_never_sampled(tiny_config):
    config = dataclasses.replace(tiny_config, vocab_size=64, n_layer=1)
    model = GPT(config)
    params = init_params(model, jax.random.key(0))
    # ln_f outputs its bias whatever the input, and the tied head makes logits = bias . wte[v]:
    # rows 50..63 (the padding) get logits of +128, the real tokens 0
    params["ln_f"] = {"scale": jnp.zeros(config.n_embd), "bias": jnp.full(config.n_embd, 4.0)}
    params["wte"] = {"embedding": jnp.zeros((64, config.n_embd)).at[50:].set(1.0)}
    idx = jnp.zeros((4, 3), jnp.int32)
    unmasked = generate(model, params, idx, 10, temperature=5.0, vocab_limit=64)
    assert (unmasked[:, 3:] >= 50).all()  # without the mask the padding wins: the check below can fail
    for out in (generate(model, params, idx, 10, temperature=5.0, vocab_limit=50),
                generate(model, params, idx, 10, temperature=0, vocab_limit=50)):
        assert (out[:, 3:] < 50).all()


def test_stop_token_pads_and_ends_early(model, sharp_params):
    idx = prompt(model.config, 2, 6, seed=5)
    rng = jax.random.key(1)
    free = np.asarray(generate(model, sharp_params, idx, 14, rng=rng))  # shares test_top_k's compiled loop
    stop = int(free[1, 6])  # row 1 stops at once ...
    assert stop in free[0, 7:19]  # ... and row 0 some steps later (true for these seeds)
    out = np.asarray(generate(model, sharp_params, idx, 14, rng=rng, stop_token=stop))
    ends = []
    for row in range(2):
        end = 6 + np.flatnonzero(free[row, 6:] == stop)[0] + 1  # one past this row's first stop_token
        np.testing.assert_array_equal(out[row, :end], free[row, :end])  # the same tokens until it stops
        assert (out[row, end:] == stop).all()  # then padding
        ends.append(end - 6)
    toks = list(stream(model, sharp_params, idx, 14, rng=rng, stop_token=stop))
    assert len(toks) == max(ends) < 14  # stream ends at the step where the last row stops
    np.testing.assert_array_equal(np.stack(toks, axis=1), out[:, 6:6 + len(toks)])


# ---- dtypes, bad input, non-finite logits -------------------------------------------------------


def test_bf16_model_generates_what_bf16_recompute_does(tiny_config, sharp_params):
    """A bfloat16 model's cached generation (its KV cache in bfloat16) takes the tokens a bfloat16 full
    forward picks at every step (greedy, across block_size), as int32 ids."""
    model = GPT(dataclasses.replace(tiny_config, dtype="bfloat16"))
    idx = prompt(tiny_config, 2, 6)
    out = generate(model, sharp_params, idx, 14, temperature=0)  # crosses block_size
    assert out.dtype == jnp.int32 and out.shape == (2, 20)
    np.testing.assert_array_equal(out, recompute(model, sharp_params, idx, 14))


@pytest.mark.parametrize("kwargs, idx, match", [
    ({}, np.zeros((2, 0), np.int32), "prompt is empty"),
    ({}, [[]], "prompt is empty"),
    ({"temperature": -0.5}, None, "temperature=-0.5"),
    ({"max_new_tokens": -1}, None, "max_new_tokens=-1"),
    ({}, np.zeros((1, 3), np.float32), "integer token ids"),
    ({}, np.zeros(3, np.int32), "add a batch axis"),
    ({}, np.full((1, 3), 97), r"\[0, 97\)"),
    ({"top_k": 0}, None, "top_k=0"),
    ({"top_p": 0.0}, None, "top_p=0.0"),
    ({"top_p": 1.5}, None, "top_p=1.5"),
    ({"stop_token": 97}, None, "stop_token=97"),
    ({"vocab_limit": 98}, None, "vocab_limit=98"),
    ({"rng": 0}, None, "rng must be a single key"),
])
def test_bad_input_raises_one_line(model, tiny_params, kwargs, idx, match):
    idx = np.zeros((1, 3), np.int32) if idx is None else idx
    kwargs = {"max_new_tokens": 4, **kwargs}
    for fn in (generate, stream):  # stream checks on the call, not at the first token
        with pytest.raises(ValueError, match=match) as err:
            fn(model, tiny_params, idx, **kwargs)
        assert "\n" not in str(err.value)


def test_nan_params_raise(model, tiny_params):
    params = dict(tiny_params, ln_f={"scale": jnp.full_like(tiny_params["ln_f"]["scale"], jnp.nan),
                                     "bias": tiny_params["ln_f"]["bias"]})
    idx = prompt(model.config, 2, 6)
    with pytest.raises(FloatingPointError, match="non-finite logits"):
        generate(model, params, idx, 14, temperature=0)  # the greedy test's compiled loop
    with pytest.raises(FloatingPointError, match="non-finite logits") as e:
        next(iter(stream(model, params, idx, 4)))
    assert model.config.dtype == "float32" and "instead of" not in str(e.value)  # no "float32 instead of float32"
    half = GPT(dataclasses.replace(model.config, dtype="bfloat16"))
    with pytest.raises(FloatingPointError, match="compute in float32 instead of bfloat16"):
        generate(half, params, idx, 4, temperature=0)
