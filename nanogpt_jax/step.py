"""The training state and the jitted train and eval steps: pure functions of their arguments.

    state = init_state(model, optimizer, mesh, rng)      # initialised directly in its sharding
    train_step = make_train_step(model, optimizer, mesh, state, grad_accum=A, seed=s)
    state, metrics = train_step(state, x_ABT, y_ABT)     # one optimizer step over A micro-batches
    eval_step = make_eval_step(model, mesh, state.params)
    loss_sum, n_tokens = eval_step(state.params, x_BT, y_BT)

Array names: A micro-steps (gradient_accumulation_steps), B global batch rows, T block_size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from nanogpt_jax import sharding
from nanogpt_jax.model import GPT
from nanogpt_jax.optim import OptimConfig, lr_schedule, make_optimizer


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue exactly: a checkpoint saves this and nothing else.

    step: int32, optimizer steps taken (the next step's index). Batches and dropout keys are
    functions of it, so no data-iterator or RNG state is needed.
    params: float32 parameters. opt_state: the optax state of optim.name's optimizer (float32 moments
    sharded like their parameters: `state_shardings`).
    skipped: int32, consecutive steps skipped for a non-finite loss or gradient norm.
    n_skipped: int32, all skipped steps (the schedule's step is step - n_skipped).
    """

    step: jax.Array
    params: Any
    opt_state: Any
    skipped: jax.Array
    n_skipped: jax.Array


def _init_fn(model: GPT, optimizer: optax.GradientTransformation, params: Any | None) -> Callable:
    def init(rng: jax.Array) -> TrainState:
        p = model.init(rng, jnp.zeros((1, 1), jnp.int32))["params"] if params is None else params
        zero = jnp.zeros((), jnp.int32)
        # the optimizer sees plain arrays: its state's shardings are found by state_shardings, not carried
        # in boxes (optax's masks would put empty nodes inside them, e.g. Muon's partition)
        opt_state = optimizer.init(nn.unbox(p))
        return TrainState(step=zero, params=p, opt_state=opt_state, skipped=zero, n_skipped=zero)

    return init


def _boxed_params(model: GPT) -> Any:
    """`model`'s parameters as ShapeDtypeStructs in their logical-partitioning boxes (no FLOPs)."""
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])


def param_axes(model: GPT) -> Any:
    """The logical axis names of `model`'s parameters: their tree with a PartitionSpec of names per leaf,
    e.g. ("embed", "qkv", "heads", "kv") for c_attn's kernel ("layers" first with scan_layers)."""
    return nn.get_partition_spec(_boxed_params(model))


def param_shardings(model: GPT, mesh: Mesh) -> Any:
    """NamedShardings of `model`'s params on `mesh`, from their logical axis names (replicated on a
    pure data-parallel mesh, split as mesh.fsdp / mesh.tensor say otherwise)."""
    return sharding.logical_shardings(_boxed_params(model), mesh)


def state_shardings(model: GPT, optimizer: optax.GradientTransformation, mesh: Mesh) -> Any:
    """NamedShardings of the TrainState on `mesh`, for any optax optimizer: the parameters' from their
    logical axis names, and every leaf that mirrors a parameter (same path suffix and shape: AdamW's
    moments, Muon's momentum) that parameter's; counts and other leaves replicated
    (`sharding.param_like_shardings`)."""
    boxed = _boxed_params(model)
    shapes = nn.unbox(jax.eval_shape(_init_fn(model, optimizer, None), jax.random.key(0)))
    return sharding.param_like_shardings(shapes, nn.unbox(boxed), sharding.logical_shardings(boxed, mesh), mesh)


def abstract_state(model: GPT, optimizer: optax.GradientTransformation, mesh: Mesh) -> Any:
    """The TrainState as ShapeDtypeStructs carrying this mesh's shardings (what a restore targets)."""
    shapes = nn.unbox(jax.eval_shape(_init_fn(model, optimizer, None), jax.random.key(0)))
    shards = state_shardings(model, optimizer, mesh)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shards)


def init_state(model: GPT, optimizer: optax.GradientTransformation, mesh: Mesh, rng: jax.Array,
               params: Any | None = None) -> TrainState:
    """A fresh TrainState placed in its sharding: eval_shape -> shardings -> jit(init, out_shardings).

    No device ever holds the whole model unless the mesh says so. `params` (e.g. converted GPT-2
    weights, ideally already sharded) replace the random initialisation.
    """
    shards = state_shardings(model, optimizer, mesh)

    def init(rng: jax.Array, params: Any | None) -> TrainState:
        return nn.unbox(_init_fn(model, optimizer, params)(rng))

    with sharding.activate(mesh):
        if params is None:
            return jax.jit(lambda r: init(r, None), out_shardings=shards)(rng)
        return jax.jit(init, in_shardings=(None, shards.params), out_shardings=shards)(rng, params)


def accumulate_gradients(loss_fn: Callable, params: Any, x_ABT: jax.Array, y_ABT: jax.Array, key: jax.Array,
                         param_shards: Any = None) -> tuple[jax.Array, Any]:
    """Mean loss and mean float32 gradients over the A micro-batches of (A, B, T) inputs.

    A `lax.scan` sums each micro-batch's gradients into one float32 accumulator (constrained to
    the parameters' sharding when given), so memory holds one gradient, not A. Micro-batch i
    gets the dropout key fold_in(key, i). `loss_fn(params, x_BT, y_BT, key)` -> scalar mean loss.
    """

    def micro(grads_acc: Any, inputs: tuple) -> tuple[Any, jax.Array]:
        x_BT, y_BT, i = inputs
        loss, grads = jax.value_and_grad(loss_fn)(params, x_BT, y_BT, jax.random.fold_in(key, i))
        grads_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grads_acc, grads)
        if param_shards is not None:
            grads_acc = jax.lax.with_sharding_constraint(grads_acc, param_shards)
        return grads_acc, loss

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    if param_shards is not None:
        zeros = jax.lax.with_sharding_constraint(zeros, param_shards)
    A = x_ABT.shape[0]
    grads, losses_A = jax.lax.scan(micro, zeros, (x_ABT, y_ABT, jnp.arange(A)))
    # every micro-batch has B x T tokens, so the mean of their means is the mean over all tokens
    return losses_A.mean(), jax.tree.map(lambda g: g / A, grads)


def make_train_step(model: GPT, optimizer_config: OptimConfig, mesh: Mesh, state: TrainState, *,
                    grad_accum: int, seed: int) -> Callable:
    """The jitted step: (state, x (A, B, T), y (A, B, T)) -> (state, metrics).

    Gradients of the A micro-batches are summed by a `lax.scan` into a float32 accumulator with
    the parameters' sharding, so accumulation costs one gradient's memory, not A. The loss is the
    mean over every token of the step (micro-batches have equal token counts, so the mean of the
    micro-batch means). A non-finite loss or gradient norm leaves params and optimizer state
    unchanged (`skipped` counts it). Dropout keys are fold_in(fold_in(key(seed), step), micro-step).
    The state is donated: its buffers are reused for the new state.
    """
    optimizer = make_optimizer(optimizer_config, param_axes(model))
    schedule = lr_schedule(optimizer_config)
    shards = jax.tree.map(lambda x: x.sharding, state)
    param_shards = shards.params
    batch_shard = sharding.batch_sharding(mesh, 3)

    def loss_fn(params: Any, x_BT: jax.Array, y_BT: jax.Array, key: jax.Array) -> jax.Array:
        # `GPT.losses`: the mean of this is lm_loss(logits, y), without (B, T, V) logits (model.loss)
        losses_BT = model.apply({"params": params}, x_BT, y_BT, deterministic=False, rngs={"dropout": key},
                                method=GPT.losses)
        return losses_BT.mean()

    def step(state: TrainState, x_ABT: jax.Array, y_ABT: jax.Array) -> tuple[TrainState, dict]:
        step_key = jax.random.fold_in(jax.random.key(seed), state.step)
        loss, grads = accumulate_gradients(loss_fn, state.params, x_ABT, y_ABT, step_key, param_shards)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        lr = schedule(state.step - state.n_skipped)
        new_state = TrainState(
            step=state.step + 1,
            params=keep(new_params, state.params),
            opt_state=keep(new_opt_state, state.opt_state),
            skipped=jnp.where(finite, 0, state.skipped + 1),
            n_skipped=state.n_skipped + jnp.where(finite, 0, 1),
        )
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr, "skipped": new_state.skipped,
                   "n_skipped": new_state.n_skipped}
        return new_state, metrics

    jitted = jax.jit(step, in_shardings=(shards, batch_shard, batch_shard),
                     out_shardings=(shards, NamedSharding(mesh, P())), donate_argnums=0)

    def run(state: TrainState, x_ABT: jax.Array, y_ABT: jax.Array) -> tuple[TrainState, dict]:
        with sharding.activate(mesh):
            return jitted(state, x_ABT, y_ABT)

    run.jitted = jitted  # for AOT lowering (memory analysis, TPU compile checks) and trace counts
    return run


def make_eval_step(model: GPT, mesh: Mesh, params: Any) -> Callable:
    """The jitted eval: (params, x (B, T), y (B, T), mask (B, T) or None) -> (sum of token losses,
    number of tokens), float32 scalars. Summing (not averaging) lets callers combine batches
    exactly, e.g. padded final batches in exact evaluation."""
    param_shards = jax.tree.map(lambda x: x.sharding, params)
    batch_shard = sharding.batch_sharding(mesh, 2)

    def evaluate(params: Any, x_BT: jax.Array, y_BT: jax.Array, mask_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
        losses_BT = model.apply({"params": params}, x_BT, y_BT, method=GPT.losses)
        mask_BT = mask_BT.astype(jnp.float32)
        return (losses_BT * mask_BT).sum(), mask_BT.sum()

    jitted = jax.jit(evaluate, in_shardings=(param_shards, batch_shard, batch_shard, batch_shard),
                     out_shardings=NamedSharding(mesh, P()))

    def run(params: Any, x_BT: jax.Array, y_BT: jax.Array, mask_BT: jax.Array | None = None):
        if mask_BT is None:
            mask_BT = jnp.ones(x_BT.shape, jnp.int8)
        with sharding.activate(mesh):
            return jitted(params, x_BT, y_BT, mask_BT)

    run.jitted = jitted
    return run
