"""The jitted train/eval steps: learning, accumulation, sharding equivalence, NaN skipping, one trace."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nanogpt_jax import sharding
from nanogpt_jax.loss import describe_loss
from nanogpt_jax.model import GPT, GPTConfig
from nanogpt_jax.optim import OptimConfig, lr_schedule, make_optimizer
from nanogpt_jax.step import (
    TrainState,
    accumulate_gradients,
    init_state,
    make_eval_step,
    make_train_step,
    state_shardings,
)

# dropout on: its masks must be the same on every mesh and follow the step (fold_in(key(seed), step))
CONFIG = GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32, dropout=0.1)
ATOL = 1e-5  # float32 round-off in sums whose order differs across shards, after 3 Adam steps of lr 1e-2
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


LOWERING = "/jax/core/compile/jaxpr_to_mlir_module_duration"  # jax.monitoring: one event per compile request


@pytest.fixture(scope="module")
def one_device():
    """3 steps on one device: (state, losses, step), and the names of the functions JAX lowered meanwhile."""
    lowered = []

    def on_event(event: str, duration_secs: float, **kwargs) -> None:
        if event == LOWERING:
            lowered.append(kwargs.get("fun_name"))

    jax.monitoring.register_event_duration_secs_listener(on_event)
    try:
        return (*run(sharding.make_mesh(devices=jax.devices()[:1])), lowered)
    finally:
        jax.monitoring.unregister_event_duration_listener(on_event)


def test_loss_falls(one_device):
    _, losses, _ = run(sharding.make_mesh(devices=jax.devices()[:1]), n_steps=30, A=1)
    assert losses[-1] < 0.5 * losses[0], losses


def test_step_traces_once(one_device):
    state, _, step, lowered = one_device
    assert lowered.count(f"jit({step.jitted.__name__})") == 1, lowered  # three steps, one compilation
    assert int(state.step) == 3


def _loss_fn(model):
    """The train step's loss: dropout on (when the model has it) with the key it is given."""

    def loss_fn(params, x_BT, y_BT, key):
        return model.apply({"params": params}, x_BT, y_BT, deterministic=False, rngs={"dropout": key},
                           method=GPT.losses).mean()

    return loss_fn


def test_accumulation_equals_one_big_batch(tiny_params):
    """Without dropout, 2 micro-batches of 4 give the loss and gradients of one batch of 8."""
    loss_fn = _loss_fn(GPT(dataclasses.replace(CONFIG, vocab_size=97, dropout=0.0)))
    x, y = batches(0, A=1, B=8)
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


def test_accumulation_with_dropout_gives_each_micro_batch_its_own_key(tiny_params):
    """With dropout 0.1, micro-batch i is computed with the key fold_in(key, i): the accumulated loss and
    gradients are the mean of the A direct computations with those keys, and differ from reusing one key."""
    loss_fn = _loss_fn(GPT(dataclasses.replace(CONFIG, vocab_size=97)))
    x, y = batches(0, A=3, B=4)
    key = jax.random.key(0)
    loss, grads = jax.jit(accumulate_gradients, static_argnums=0)(loss_fn, tiny_params, x, y, key)
    direct = [jax.value_and_grad(loss_fn)(tiny_params, x[i], y[i], jax.random.fold_in(key, i)) for i in range(3)]
    np.testing.assert_allclose(loss, np.mean([d[0] for d in direct]), rtol=1e-6)
    mean_grads = jax.tree.map(lambda *g: sum(g) / 3, *[d[1] for d in direct])
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(mean_grads), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    one_key = np.mean([loss_fn(tiny_params, x[i], y[i], key) for i in range(3)])
    assert abs(float(loss) - float(one_key)) > 1e-4  # the masks really differ between micro-batches


def test_dropout_keys_are_the_documented_fold_ins():
    """The train step's loss at step s is the model's with dropout key fold_in(fold_in(key(seed), s), i) for
    micro-batch i (step.py's promise, which makes a resumed run draw the masks it would have drawn): one
    state stepped at step 0 and at step 5 gives two different losses, each equal to its hand computation."""
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    model = GPT(CONFIG)
    x, y = batches(0, A=2, B=4)
    loss_fn = _loss_fn(model)
    seed = 7
    losses = {}
    for s in (0, 5):
        state = init_state(model, make_optimizer(OPTIM), mesh, jax.random.key(0))
        state = dataclasses.replace(state, step=jnp.asarray(s, state.step.dtype))
        params = jax.tree.map(np.asarray, state.params)  # the step donates the state's buffers
        step = make_train_step(model, OPTIM, mesh, state, grad_accum=2, seed=seed)
        _, metrics = step(state, x, y)
        step_key = jax.random.fold_in(jax.random.key(seed), s)
        want = np.mean([loss_fn(params, x[i], y[i], jax.random.fold_in(step_key, i)) for i in range(2)])
        np.testing.assert_allclose(float(metrics["loss"]), want, rtol=1e-6)
        losses[s] = float(metrics["loss"])
    assert abs(losses[0] - losses[5]) > 1e-4, losses  # a key that ignored the step would repeat its masks


@pytest.mark.parametrize("shape", [(8, 1, 1), (1, 8, 1), (1, 4, 2), (2, 2, 2), (1, 1, 8)])
def test_sharded_meshes_equal_one_device(one_device, shape):
    """Data, FSDP and tensor parallel meshes (dropout on, 2 micro-batches) train as one device does: the same
    losses and, after 3 steps, every parameter and every optimizer moment the same up to float32 round-off
    (summation order differs across shards; Adam's step is lr-sized, lr 1e-2, so params agree to ~1e-5)."""
    _, ref_losses, _, _ = one_device
    state, losses, _ = run(sharding.make_mesh(*shape))
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    ref_state = one_device[0]
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(state), jax.tree.leaves(ref_state), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=ATOL,
                                   err_msg=jax.tree_util.keystr(path))


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


def test_cpu_step_copies_no_activation_gradient_into_a_transposed_layout():
    """On CPUs the linear layers and the tied head multiply (B*T, in) rows (`layers.flatten_rows`), so the
    compiled step holds no (4D or V, B*T) array. With (B, T) apart, XLA:CPU copied the MLP's (B, T, 4D)
    and the logits' (B, T, V) gradients into that transposed layout for the weight gradients and ran the
    GELU's and the softmax's backward inside the strided copy (the demo's bias-free step: 71.5 -> 50.5 ms).
    Without biases, as then no bias gradient writes the cotangent out first."""
    B, T = 3, 16
    config = dataclasses.replace(CONFIG, bias=False, dropout=0.0)
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    model = GPT(config)
    state = init_state(model, make_optimizer(OPTIM), mesh, jax.random.key(0))
    step = make_train_step(model, OPTIM, mesh, state, grad_accum=1, seed=0)
    x = jnp.zeros((1, B, T), jnp.int32)
    hlo = step.jitted.lower(state, x, x).compile().as_text()
    transposed = [f"f32[{n},{B * T}]" for n in (4 * config.n_embd, config.vocab_size)] + \
                 [f"f32[{n},{B},{T}]" for n in (4 * config.n_embd, config.vocab_size)]
    found = [line.strip()[:160] for line in hlo.splitlines() if any(f"= {shape}" in line for shape in transposed)]
    assert found == []


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


def test_chunked_loss_step_equals_full_logits_step(one_device):
    """Chunks of 5 positions (not dividing T=16), sharded, train as the whole (B, T, V) logits do: at
    this size the default chunk is all of T, so the one_device run is the plain computation."""
    assert describe_loss(CONFIG.loss, CONFIG.loss_chunk, CONFIG.vocab_size, 8, 16) == "chunked: 1 x 16 positions"
    _, ref_losses, _, _ = one_device
    _, losses, _ = run(sharding.make_mesh(2, 2, 2), config=dataclasses.replace(CONFIG, loss_chunk=5))
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)


@pytest.mark.parametrize("shape", [(1, 8, 1), (2, 2, 2), (1, 1, 8)])
@pytest.mark.parametrize("scan", [False, True])
def test_adamw_state_shardings_are_the_moments_logical_ones(shape, scan):
    """state_shardings finds an optimizer leaf's sharding by the parameter it mirrors (path suffix and shape).
    For AdamW that is exactly what the moments' own logical-axis boxes gave when the optimizer was
    initialised on the boxed parameters (how state_shardings worked before optimizers other than AdamW)."""
    model = GPT(dataclasses.replace(CONFIG, scan_layers=scan))
    optimizer = make_optimizer(OPTIM)
    mesh = sharding.make_mesh(*shape)

    def boxed_init(rng):
        p = model.init(rng, jnp.zeros((1, 1), jnp.int32))["params"]
        zero = jnp.zeros((), jnp.int32)
        return TrainState(step=zero, params=p, opt_state=optimizer.init(p), skipped=zero, n_skipped=zero)

    want = sharding.logical_shardings(jax.eval_shape(boxed_init, jax.random.key(0)), mesh)
    got = state_shardings(model, optimizer, mesh)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), strict=True):
        assert a == b, (jax.tree_util.keystr(path), a, b)


def test_state_shardings_fit_any_optax_state():
    """Optimizers whose state is not AdamW's: Lion's one moment mirrors the parameters and is sharded like
    them; Adafactor's factored second moments (a row and a column per matrix) do not, and are replicated."""
    model = GPT(CONFIG)
    mesh = sharding.make_mesh(1, 4, 2)
    kernel = ("h_0", "mlp", "c_fc", "kernel")
    lion = state_shardings(model, optax.chain(optax.clip_by_global_norm(1.0), optax.lion(1e-3)), mesh)
    param = lion.params
    mu = lion.opt_state[1][0].mu
    for key in kernel:
        param, mu = param[key], mu[key]
    assert mu == param and mu.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    factored = state_shardings(model, optax.adafactor(1e-3, min_dim_size_to_factor=8), mesh).opt_state
    v_row = factored[0].v_row
    for key in kernel:
        v_row = v_row[key]
    assert v_row.spec == jax.sharding.PartitionSpec()
