"""The chunked loss: the same cross-entropy and gradients as the whole (B, T, V) logits, never holding them."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanogpt_jax import sharding
from nanogpt_jax.loss import (
    batch_shards,
    chunked_token_losses,
    describe_loss,
    head_logits,
    lm_loss,
    loss_chunk_len,
    token_losses,
)
from nanogpt_jax.model import GPT, GPTConfig, init_params

B, T, D, V = 4, 12, 16, 37


def _inputs():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    h = jax.random.normal(k1, (B, T, D), jnp.float32)
    wte = 0.3 * jax.random.normal(k2, (V, D), jnp.float32)
    y = jax.random.randint(k3, (B, T), 0, V)
    return h, wte, y


@pytest.mark.parametrize("chunk", [1, 3, 4, 5, 7, 12, 50])  # divides T, does not, one chunk, more than T
def test_chunked_equals_plain_loss_and_gradients(chunk):
    h, wte, y = _inputs()
    w = jax.random.uniform(jax.random.key(1), (B, T))  # a weighting, so every position's gradient is checked

    def plain(h, wte):
        return (token_losses(head_logits(h, wte, jnp.float32), y) * w).sum()

    def chunked(h, wte):
        return (chunked_token_losses(h, wte, y, jnp.float32, chunk) * w).sum()

    np.testing.assert_allclose(chunked_token_losses(h, wte, y, jnp.float32, chunk),
                               token_losses(head_logits(h, wte, jnp.float32), y), rtol=1e-6, atol=1e-6)
    for a, b in zip(jax.jit(jax.grad(chunked, argnums=(0, 1)))(h, wte), jax.grad(plain, argnums=(0, 1))(h, wte),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_chunked_loss_never_holds_the_logits():
    """Compiled for the CPU, the chunked loss's forward + backward keeps less than one copy of the
    float32 logits in temporaries, where the plain one keeps several."""
    Bb, Tb, Db, Vb = 8, 256, 64, 4096
    h = jax.ShapeDtypeStruct((Bb, Tb, Db), jnp.float32)
    wte = jax.ShapeDtypeStruct((Vb, Db), jnp.float32)
    y = jax.ShapeDtypeStruct((Bb, Tb), jnp.int32)
    logits_bytes = Bb * Tb * Vb * 4

    def temp(chunk):
        f = jax.grad(lambda h, w, y: chunked_token_losses(h, w, y, jnp.float32, chunk).mean(), argnums=(0, 1))
        return jax.jit(f).lower(h, wte, y).compile().memory_analysis().temp_size_in_bytes

    assert temp(Tb) > logits_bytes
    assert temp(16) < logits_bytes / 4


def test_model_losses_equal_lm_loss_of_the_logits(tiny_params, tiny_config):
    x = jax.random.randint(jax.random.key(2), (4, 16), 0, tiny_config.vocab_size)
    y = jnp.roll(x, -1, axis=1)
    ref = lm_loss(GPT(tiny_config).apply({"params": tiny_params}, x), y)
    for chunk in (0, 5, 16):
        model = GPT(dataclasses.replace(tiny_config, loss_chunk=chunk))
        losses = model.apply({"params": tiny_params}, x, y, method=GPT.losses)
        np.testing.assert_allclose(losses.mean(), ref, rtol=1e-6)


def test_chunk_length_from_the_shapes():
    V = 50304  # GPT-2's padded vocabulary; GPTConfig's defaults: loss="chunked", loss_chunk=0
    assert loss_chunk_len("chunked", 0, V, rows=32, T=1024) == 32  # 32 x 32 x 50304 x 4 bytes = 197 MiB <= 256 MiB
    assert loss_chunk_len("chunked", 0, V, rows=1, T=1024) == 1024  # the whole logits fit: one chunk
    assert loss_chunk_len("chunked", 0, V, rows=32, T=1021) == 41  # a prime T: padded chunks, not chunks of 1
    assert loss_chunk_len("full", 0, V, rows=32, T=1024) == 1024
    assert loss_chunk_len("chunked", 100, V, rows=32, T=1024) == 100
    assert describe_loss("chunked", 0, V, 32, 1024) == "chunked: 32 x 32 positions"
    assert describe_loss("full", 0, V, 32, 1024) == "full"
    with pytest.raises(ValueError, match="loss='fused'"):
        GPTConfig(loss="fused")


def test_chunk_follows_the_rows_each_device_holds(tiny_config):
    """Under a mesh, the chunk is picked for B / (data x fsdp) rows, and the sharded chunked loss equals
    the unsharded plain one."""
    config = dataclasses.replace(tiny_config, vocab_size=97)
    params = init_params(GPT(config), jax.random.key(0))
    x = jax.random.randint(jax.random.key(3), (8, 16), 0, 97)
    y = jnp.roll(x, -1, axis=1)
    ref = GPT(dataclasses.replace(config, loss="full")).apply({"params": params}, x, y, method=GPT.losses)
    model = GPT(dataclasses.replace(config, loss_chunk=3))
    mesh = sharding.make_mesh(4, 2, 1)
    with sharding.activate(mesh):
        out = jax.jit(lambda p, x, y: model.apply({"params": p}, x, y, method=GPT.losses))(params, x, y)
        assert batch_shards(8) == 8 and batch_shards(4) == 1
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
