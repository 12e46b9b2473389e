"""The jitted train/eval steps: learning, accumulation, sharding equivalence, NaN skipping, one trace."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanogpt_jax import sharding
from nanogpt_jax.model import GPT, GPTConfig, describe_loss, lm_loss
from nanogpt_jax.optim import OptimConfig, decay_mask, lr_schedule, make_optimizer
from nanogpt_jax.step import accumulate_gradients, init_state, make_eval_step, make_train_step

CONFIG = GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32)
OPTIM = OptimConfig(learning_rate=1e-2, min_lr=1e-3, warmup_iters=2, lr_decay_iters=50)


def batches(step, A=2, B=8, T=16, vocab=64):
    """A learnable stream: each row counts up by 1 from a random start (mod vocab)."""
    rng = np.random.default_rng(step)
    start = rng.integers(0, vocab, size=(A, B, 1))
    seq = (start + np.arange(T + 1)) % vocab
    return jnp.asarray(seq[..., :-1], jnp.int32), jnp.asarray(seq[..., 1:], jnp.int32)


def run(mesh, n_steps=3, A=2, B=8, config=CONFIG, optim=OPTIM, data=batches):
    model = GPT(config)
    state = init_state(model, make_optimizer(optim), mesh, jax.random.key(0))
    step = make_train_step(model, optim, mesh, state, grad_accum=A, seed=0)
    losses = []
    for s in range(n_steps):
        state, metrics = step(state, *data(s, A=A, B=B))
        losses.append(float(metrics["loss"]))
    return state, losses, step


@pytest.fixture(scope="module")
def one_device():
    return run(sharding.make_mesh(devices=jax.devices()[:1]))


def test_loss_falls(one_device):
    _, losses, _ = run(sharding.make_mesh(devices=jax.devices()[:1]), n_steps=30, A=1)
    assert losses[-1] < 0.5 * losses[0], losses


def test_step_traces_once(one_device):
    state, _, step = one_device
    assert step.jitted._cache_size() == 1  # three steps, one compilation
    assert int(state.step) == 3


def test_accumulation_equals_one_big_batch(tiny_params):
    model = GPT(dataclasses.replace(CONFIG, vocab_size=97))
    x, y = batches(0, A=1, B=8)

    def loss_fn(params, x_BT, y_BT, key):
        return lm_loss(model.apply({"params": params}, x_BT), y_BT)

    key = jax.random.key(0)
    big_loss, big_grads = jax.jit(accumulate_gradients, static_argnums=0)(loss_fn, tiny_params, x, y, key)
    loss, grads = jax.jit(accumulate_gradients, static_argnums=0)(
        loss_fn, tiny_params, x.reshape(2, 4, 16), y.reshape(2, 4, 16), key)
    np.testing.assert_allclose(loss, big_loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(big_grads), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    direct = jax.grad(lambda p: loss_fn(p, x[0], y[0], key))(tiny_params)  # no scan at all
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(direct), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("shape", [(8, 1, 1), (1, 8, 1), (1, 4, 2), (2, 2, 2), (1, 1, 8)])
def test_sharded_meshes_equal_one_device(one_device, shape):
    _, ref_losses, _ = one_device
    state, losses, _ = run(sharding.make_mesh(*shape))
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    ref_state = one_device[0]
    np.testing.assert_allclose(state.params["h_1"]["mlp"]["c_fc"]["kernel"],
                               ref_state.params["h_1"]["mlp"]["c_fc"]["kernel"], atol=1e-4)  # Adam, lr 1e-2


def test_fsdp_shards_parameters_and_optimizer_state():
    mesh = sharding.make_mesh(1, 8, 1)
    state = init_state(GPT(CONFIG), make_optimizer(OPTIM), mesh, jax.random.key(0))
    kernel = state.params["h_0"]["mlp"]["c_fc"]["kernel"]  # (32, 128): embed over fsdp
    assert kernel.sharding.spec[0] == "fsdp"
    assert kernel.addressable_shards[0].data.shape == (4, 128)
    mu = state.opt_state[1][0].mu["h_0"]["mlp"]["c_fc"]["kernel"]
    assert mu.addressable_shards[0].data.shape == (4, 128)


def test_non_finite_step_is_skipped():
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    model = GPT(CONFIG)
    state = init_state(model, make_optimizer(OPTIM), mesh, jax.random.key(0))
    step = make_train_step(model, OPTIM, mesh, state, grad_accum=1, seed=0)
    before = jax.tree.map(np.asarray, state.params)
    x, y = batches(0, A=1)
    bad_x = x.at[0, 0, 3].set(CONFIG.vocab_size + 5)  # an id past the embedding: NaN activations
    state, metrics = step(state, bad_x, y)
    assert not np.isfinite(float(metrics["loss"])) and int(metrics["skipped"]) == 1
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_array_equal(a, b)  # nothing moved
    state, metrics = step(state, x, y)
    assert np.isfinite(float(metrics["loss"])) and int(metrics["skipped"]) == 0 and int(metrics["n_skipped"]) == 1
    assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(state.params))


def test_eval_step_sums_token_losses(one_device):
    state = one_device[0]
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    evaluate = make_eval_step(GPT(CONFIG), mesh, state.params)
    x, y = batches(7, A=1)
    total, n = evaluate(state.params, x[0], y[0])
    mask = jnp.zeros_like(x[0]).at[:, :5].set(1)
    part, n_part = evaluate(state.params, x[0], y[0], mask)
    assert float(n) == 8 * 16 and float(n_part) == 8 * 5
    assert 0 < float(part) < float(total)


def test_schedule_is_nanogpts():
    c = OptimConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=10, lr_decay_iters=110)
    lr = lr_schedule(c)
    assert float(lr(0)) == pytest.approx(1 / 11)  # never 0 at step 0
    assert float(lr(9)) == pytest.approx(10 / 11)
    assert float(lr(10)) == pytest.approx(1.0)
    assert float(lr(60)) == pytest.approx(0.55)  # halfway down the cosine
    assert float(lr(110)) == pytest.approx(0.1) and float(lr(1000)) == pytest.approx(0.1)
    assert float(lr_schedule(dataclasses.replace(c, decay_lr=False))(500)) == 1.0


def test_weight_decay_only_on_matrices_and_embeddings(tiny_params):
    mask = decay_mask(tiny_params)
    assert mask["wte"]["embedding"] and mask["h_0"]["attn"]["c_attn"]["kernel"]
    assert not mask["h_0"]["attn"]["c_attn"]["bias"]  # rank 3 here, rank 1 in HF's layout
    assert not mask["h_0"]["ln_1"]["scale"] and not mask["ln_f"]["bias"]


def test_chunked_loss_step_equals_full_logits_step(one_device):
    """Chunks of 5 positions (not dividing T=16), sharded, train as the whole (B, T, V) logits do: at
    this size the default chunk is all of T, so the one_device run is the plain computation."""
    assert describe_loss(CONFIG, 8, 16) == "chunked: 1 x 16 positions"
    _, ref_losses, _ = one_device
    _, losses, _ = run(sharding.make_mesh(2, 2, 2), config=dataclasses.replace(CONFIG, loss_chunk=5))
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
