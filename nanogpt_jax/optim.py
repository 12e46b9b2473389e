"""The optimizer: nanoGPT's learning-rate schedule, AdamW or Muon, and global-norm clipping (optax).

This is the one place that builds the optimizer; the train step calls `update` once per step
(gradient accumulation happens before it, never through `optax.MultiSteps`/`apply_every`).

optim.name picks it: "adamw" (nanoGPT's) or "muon", where Muon (optax.contrib.muon) updates the
hidden matrices of every block and the same AdamW updates everything else. Which parameters are
hidden matrices is read from their logical axis names (`hidden_matrix_dims`), not from module names.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec
from ml_collections import ConfigDict

from nanogpt_jax import config as config_lib
from nanogpt_jax import sharding
from nanogpt_jax.errors import ConfigError

OPTIMIZERS = ("adamw", "muon")  # optim.name's choices

# Logical axis names (model.py) that tell the hidden matrices apart: a kernel that reads or writes the
# residual stream ("embed") through hidden units ("heads" of attention, "mlp" units). "layers" is the
# leading axis nn.scan stacks the blocks' parameters on (scan_layers).
RESIDUAL_AXIS = "embed"
HIDDEN_AXES = ("heads", "mlp")
LAYER_AXIS = "layers"
ADAMW_EPS = 1e-8  # torch.optim.AdamW's default, which nanoGPT uses; also Muon's (optax's default)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """The optim section of a config (see configs/default.py for units)."""

    learning_rate: float = 6e-4
    min_lr: float = 6e-5
    warmup_iters: int = 2000
    lr_decay_iters: int = 600_000
    decay_lr: bool = True
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    name: str = "adamw"  # one of OPTIMIZERS
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    muon_ns_steps: int = 5
    muon_weight_decay: float = 0.0

    @classmethod
    def from_section(cls, optim: Mapping[str, Any]) -> OptimConfig:
        """From a config's optim section (a ConfigDict or dict holding at least these fields)."""
        return cls(**{k: optim[k] for k in cls.__dataclass_fields__})


def lr_schedule(c: OptimConfig) -> optax.Schedule:
    """Learning rate at optimizer step `it` (0-based), nanoGPT's `get_lr`:

    - warmup: learning_rate * (it + 1) / (warmup_iters + 1), never 0 at step 0;
    - then a cosine from learning_rate down to min_lr at lr_decay_iters;
    - then min_lr. With decay_lr=False, learning_rate throughout.
    (Loshchilov & Hutter 2017, SGDR; linear warmup per Goyal et al. 2017.)
    """
    if not c.decay_lr:
        return optax.constant_schedule(c.learning_rate)

    def schedule(it: jax.Array) -> jax.Array:
        it = jnp.asarray(it, jnp.float32)
        warm = c.learning_rate * (it + 1) / (c.warmup_iters + 1)
        span = max(c.lr_decay_iters - c.warmup_iters, 1)
        ratio = jnp.clip((it - c.warmup_iters) / span, 0.0, 1.0)
        cosine = c.min_lr + 0.5 * (1.0 + jnp.cos(math.pi * ratio)) * (c.learning_rate - c.min_lr)
        return jnp.where(it < c.warmup_iters, warm, cosine)

    return schedule


def decay_mask(params: Any) -> Any:
    """True for the parameters that get weight decay: matrices and embeddings, not biases or
    LayerNorm scales. In HF GPT-2's layout that is nanoGPT's rule, "every parameter of rank >= 2";
    we decide by name because our attention kernels and biases carry extra head axes."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) in ("kernel", "embedding"), params)


def muon_lr_schedule(c: OptimConfig) -> optax.Schedule:
    """Muon's learning rate at optimizer step `it`: `lr_schedule(c)` scaled by muon_lr / learning_rate,
    so it has the same warmup and cosine shape and peaks at muon_lr (and its floor is
    min_lr x muon_lr / learning_rate)."""
    schedule, ratio = lr_schedule(c), c.muon_lr / c.learning_rate
    return lambda it: schedule(it) * ratio


def _matrix_dims(names: tuple[str | None, ...]) -> optax.contrib.MuonDimensionNumbers | None:
    """How Muon sees one parameter with these logical axis names, or None when it is no hidden matrix.

    Kernels are laid out (inputs..., outputs...) (layers.Projection): a block's kernel that
    reads the residual stream has "embed" first (c_attn (D, 3, H, K), c_fc (D, 4D)), one that writes it
    has "embed" last (attn.c_proj (H, K, D), mlp.c_proj (4D, D)). The stream's side is one axis of the
    matrix, every other axis but "layers" is the other side (flattened by optax); "layers" is in neither,
    which optax treats as a batch axis: each layer's matrix is orthogonalised on its own (a vmap).
    Embeddings ("vocab"/positions x "embed"), biases and LayerNorm gains have no hidden axis: None.
    """
    axes = [i for i, n in enumerate(names) if n != LAYER_AXIS]
    inner = [names[i] for i in axes]
    if RESIDUAL_AXIS not in inner or not set(inner) & set(HIDDEN_AXES):
        return None
    if inner[0] == RESIDUAL_AXIS:  # reads the stream: x_D @ W -> hidden
        return optax.contrib.MuonDimensionNumbers(reduction_axis=(axes[0],), output_axis=tuple(axes[1:]))
    if inner[-1] == RESIDUAL_AXIS:  # writes the stream: hidden @ W -> y_D
        return optax.contrib.MuonDimensionNumbers(reduction_axis=tuple(axes[:-1]), output_axis=(axes[-1],))
    raise ValueError(f"logical axes {names}: {RESIDUAL_AXIS!r} is neither the first nor the last axis of the "
                     "kernel, so its input and output axes cannot be told apart")


def hidden_matrix_dims(param_axes: Any) -> Any:
    """For each parameter, the `optax.contrib.MuonDimensionNumbers` Muon uses on it, or None for the
    parameters AdamW keeps (embeddings, biases, LayerNorm gains); see `_matrix_dims` for the rule.

    `param_axes`: the parameters' tree with each leaf's logical axis names, as a PartitionSpec
    (`nn.get_partition_spec` of the boxed parameters; `step.param_axes(model)`) or a tuple.
    Returns a tree of the parameters' structure.
    Raises ValueError for a kernel whose "embed" axis is neither first nor last.
    """
    return jax.tree.map(lambda names: _matrix_dims(tuple(names)), param_axes,
                        is_leaf=lambda x: isinstance(x, (PartitionSpec, tuple)))


def _is_dims(x: Any) -> bool:
    return x is None or isinstance(x, optax.contrib.MuonDimensionNumbers)


def scale_by_width(dims: Any) -> optax.GradientTransformation:
    """Each Muon update times sqrt(max(1, fan_out / fan_in)) of its matrix (`dims` as in
    `whole_matrices`): the width scaling of Keller Jordan's Muon (github.com/KellerJordan/Muon), which
    optax.contrib.muon applies the same way (its private scale_by_shape). Stateless."""

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        del params

        def scale(u: jax.Array, d: optax.contrib.MuonDimensionNumbers) -> jax.Array:
            fan_in = math.prod(u.shape[a] for a in _axes(d.reduction_axis, u.ndim))
            fan_out = math.prod(u.shape[a] for a in _axes(d.output_axis, u.ndim))
            return jnp.sqrt(jnp.maximum(1, fan_out / fan_in)) * u

        return jax.tree.map(scale, updates, dims, is_leaf=_is_dims), state

    return optax.GradientTransformation(optax.init_empty_state, update)


def _axes(axes: int | tuple[int, ...], ndim: int) -> tuple[int, ...]:
    return tuple(a % ndim for a in ((axes,) if isinstance(axes, int) else axes))


def _spread_spec(shape: tuple[int, ...], d: optax.contrib.MuonDimensionNumbers, home: PartitionSpec,
                 mesh: Any) -> PartitionSpec:
    """Where `whole_matrices` puts one Muon leaf: its matrices whole on each device, and when the leaf's
    own sharding (`home`) splits it over a single mesh axis and it has a batch axis that axis divides
    (the "layers" of scanned blocks), the batch axis split over that mesh axis instead, so that each
    device orthogonalises only its share of the layers (one all-to-all each way). Over two mesh axes
    XLA could not make that move and replicated the whole stack on the way (an "Involuntary full
    rematerialization" warning, CPU mesh 2x2x2): such leaves are gathered whole instead."""
    used = [a for axes in home if axes is not None for a in ((axes,) if isinstance(axes, str) else axes)
            if mesh.shape[a] > 1]
    if len(used) != 1:
        return PartitionSpec()  # whole everywhere
    matrix = _axes(d.reduction_axis, len(shape)) + _axes(d.output_axis, len(shape))
    for i, size in enumerate(shape):
        if i not in matrix and size % mesh.shape[used[0]] == 0:
            return PartitionSpec(*(used[0] if j == i else None for j in range(len(shape))))
    return PartitionSpec()


def whole_matrices(tx: optax.GradientTransformation, dims: Any, names: Any) -> optax.GradientTransformation:
    """`tx` (Muon's momentum and Newton-Schulz, optax.contrib.scale_by_muon) on whole matrices.

    Under a mesh whose axes split the matrices (fsdp, tensor), XLA would run each Newton-Schulz
    iteration on the shards and all-gather inside every iteration (the compiled step of GPT-2 124M on
    v5e-8 with fsdp=8 held 268 all-gathers against AdamW's 76; 172 = 76 + 2 x 48 matrices with this,
    docs/training.md). Here a `jax.shard_map` gathers each
    gradient and momentum once, runs `tx` on whole matrices, and hands back whole updates and momenta
    that the rest of the step slices back to their shardings without communication. A leaf with a batch
    axis (scanned blocks' "layers") is split over the mesh along that axis instead (`_spread_spec`), so
    each device orthogonalises only its share of the layers. The arithmetic is `tx`'s own, unchanged.

    Without an active mesh (`jax.set_mesh`, as `sharding.activate` sets it) this is `tx` itself.
    `dims`: the Muon dimension numbers of `tx`'s leaves (MaskedNode where optax.partition masks one);
    `names`: their logical axis names (PartitionSpecs, MaskedNode likewise), which with `sharding.RULES`
    give the shardings the whole updates and momenta are sliced back to.
    """

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        del params  # scale_by_muon does not read them
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty or mesh.size == 1:
            return tx.update(updates, state)
        # each leaf's sharding outside: the parameter's (from its logical axis names and sharding.RULES)
        home = jax.tree.map(lambda u, n: sharding.fit_spec(nn.logical_to_mesh_axes(tuple(n), sharding.RULES),
                                                           u.shape, mesh, "muon"),
                            updates, names, is_leaf=lambda x: isinstance(x, PartitionSpec))
        place = functools.partial(jax.tree.map, jax.lax.with_sharding_constraint)
        # inside: whole matrices (a batch axis spread over the mesh)
        specs = jax.tree.map(lambda u, d, h: _spread_spec(u.shape, d, h, mesh), updates, dims, home,
                             is_leaf=_is_dims)
        state_specs = jax.tree.map(lambda _: PartitionSpec(), state)._replace(mu=specs)
        run = jax.shard_map(lambda u, s: tx.update(u, s), mesh=mesh, in_specs=(specs, state_specs),
                            out_specs=(specs, state_specs), check_vma=False)
        # Pinned at home on both sides, so that each gradient and momentum is gathered once, here. Left to
        # XLA, it pulled the gathers back through clipping's select (gathering both of its operands) and
        # forward through the step's finite-check select (gathering the old parameters and momenta).
        updates, state = run(place(updates, home), state)
        return place(updates, home), state._replace(mu=place(state.mu, home))

    return optax.GradientTransformation(tx.init, update)


def make_optimizer(c: OptimConfig, param_axes: Any = None) -> optax.GradientTransformation:
    """clip_by_global_norm(grad_clip) (if > 0), then the optimizer c.name names.

    adamw: AdamW (decoupled weight decay on `decay_mask`) on every parameter. Epsilon 1e-8 as
    torch.optim.AdamW (nanoGPT).
    muon: `optax.partition` of the parameters: Muon (optax.contrib.muon, Jordan 2024, "Muon: An optimizer
    for hidden layers in neural networks", kellerjordan.github.io/posts/muon, and modded-nanogpt) on the
    hidden matrices that `hidden_matrix_dims(param_axes)` finds, with muon_lr_schedule, muon_momentum
    (Nesterov), muon_ns_steps quintic Newton-Schulz steps with the default coefficients
    (3.4445, -4.7750, 2.0315), optax's width scaling sqrt(max(1, fan_out / fan_in)) and muon_weight_decay
    (multiplied by the learning rate, like AdamW's); the very same AdamW as "adamw" on the rest.
    optax.contrib.muon's own AdamW (Nesterov, no decay mask) updates no parameter here: its state is
    a step count. Clipping sees every gradient, before either optimizer.

    `param_axes`: the parameters' logical axis names (see `hidden_matrix_dims`); needed for muon only.
    `optax.inject_hyperparams` is not used: the learning rate of step t is recomputed from the
    schedule for logging.
    Raises ValueError for an unknown c.name, or muon without param_axes.
    """
    adamw = optax.adamw(lr_schedule(c), b1=c.beta1, b2=c.beta2, eps=ADAMW_EPS, weight_decay=c.weight_decay,
                        mask=decay_mask)
    if c.name == "adamw":
        tx = adamw
    elif c.name == "muon":
        if param_axes is None:
            raise ValueError("make_optimizer: optim.name='muon' needs param_axes, the parameters' logical axis "
                             "names (step.param_axes(model))")
        dims = hidden_matrix_dims(param_axes)
        labels = jax.tree.map(lambda d: "adamw" if d is None else "muon", dims, is_leaf=_is_dims)
        # the dimension numbers as optax.partition hands Muon its leaves: the others are MaskedNodes
        muon_dims = jax.tree.map(lambda d: optax.MaskedNode() if d is None else d, dims, is_leaf=_is_dims)
        muon_names = jax.tree.map(lambda d, n: optax.MaskedNode() if d is None else PartitionSpec(*n), dims,
                                  param_axes, is_leaf=_is_dims)
        # optax.contrib.muon's own chain, less its unused AdamW, with the Newton-Schulz part on whole matrices
        muon = optax.chain(
            whole_matrices(optax.contrib.scale_by_muon(ns_steps=c.muon_ns_steps, beta=c.muon_momentum,
                                                       eps=ADAMW_EPS, nesterov=True,
                                                       weight_dimension_numbers=muon_dims), muon_dims, muon_names),
            scale_by_width(muon_dims),
            optax.add_decayed_weights(c.muon_weight_decay),
            optax.scale_by_learning_rate(muon_lr_schedule(c)))
        tx = optax.partition({"muon": muon, "adamw": adamw}, labels)
    else:
        raise ValueError(f"optim.name={c.name!r}: choose one of {', '.join(OPTIMIZERS)}")
    return optax.chain(optax.clip_by_global_norm(c.grad_clip), tx) if c.grad_clip > 0 else tx


def check_config(config: ConfigDict) -> None:
    """The optim section's optimizer choice and Muon keys (registered in config.EXTRA_CHECKS)."""
    if "optim" not in config or "name" not in config.optim:
        return
    o = config.optim
    if o.name not in OPTIMIZERS:
        raise ConfigError(f"optim.name={o.name!r}: choose one of {', '.join(OPTIMIZERS)}")
    if not o.muon_lr > 0:
        raise ConfigError(f"optim.muon_lr={o.muon_lr!r}: must be > 0")
    if not 0.0 <= o.muon_momentum < 1.0:
        raise ConfigError(f"optim.muon_momentum={o.muon_momentum!r}: must be in [0, 1)")
    if not o.muon_ns_steps >= 1:
        raise ConfigError(f"optim.muon_ns_steps={o.muon_ns_steps!r}: must be >= 1")
    if not o.muon_weight_decay >= 0:
        raise ConfigError(f"optim.muon_weight_decay={o.muon_weight_decay!r}: must be >= 0")


config_lib.EXTRA_CHECKS.append(check_config)
