"""Meshes and shardings: where every array of a training run lives.

One mesh with three axes, sized from the config's `mesh` section:
    data    replicas: each holds all parameters and a slice of the batch
    fsdp    fully sharded data parallel (ZeRO-3): a slice of the batch *and* of every parameter,
            gradient and optimizer moment; a layer's parameters are all-gathered when it runs
    tensor  tensor parallel (Megatron-LM): attention heads and MLP hidden units split, so one
            layer's matmuls run on several devices

The model names the axes of its parameters and activations logically (`vocab`, `embed`, `heads`,
`mlp`, `batch`, ...); `RULES` is the one table that maps those names onto mesh axes. The batch
dimension is split over data x fsdp.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from nanogpt_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical axis name -> mesh axes. Names not listed (qkv, kv, norm, layers, length, embed_act)
# are replicated: splitting them would buy nothing but communication.
RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),  # parameters: split along the model width over fsdp
    ("vocab", "tensor"),
    ("heads", "tensor"),  # Megatron: c_attn by columns (heads), attn.c_proj by rows
    ("mlp", "tensor"),  # Megatron: c_fc by columns, mlp.c_proj by rows
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: list | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all); one size may be -1 (the rest).

    Axis types are Auto: the model uses Flax linen's logical sharding constraints, which
    `jax.make_mesh`'s default (Explicit axes) does not support.

    Raises:
        ConfigError: naming the mesh keys, when the sizes do not multiply to the device count.
    """
    devices = list(devices if devices is not None else jax.devices())
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    fixed = math.prod(v for v in sizes.values() if v != -1)
    n = len(devices)
    for name, v in sizes.items():
        if v == -1:
            if n % fixed:
                raise ConfigError(f"mesh.{name}=-1: {n} devices cannot be split into mesh.data x mesh.fsdp x "
                                  f"mesh.tensor with the other axes using {fixed}; choose sizes dividing {n}")
            sizes[name] = n // fixed
    if math.prod(sizes.values()) != n:
        raise ConfigError(f"mesh: data={sizes['data']} x fsdp={sizes['fsdp']} x tensor={sizes['tensor']} = "
                          f"{math.prod(sizes.values())} devices, but there are {n}; make the product {n} "
                          "(or set one axis to -1)")
    shape = tuple(sizes[a] for a in MESH_AXES)
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    if devices == jax.devices():  # topology-aware placement (ICI rings on TPUs)
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types)
    return Mesh(np.array(devices).reshape(shape), MESH_AXES, axis_types=axis_types)


def batch_divisor(mesh: Mesh) -> int:
    """How many ways the batch dimension is split (data x fsdp)."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def check_batch_size(batch_size: int, divisor: int, name: str = "train.batch_size") -> None:
    """Raise ConfigError unless `batch_size` rows split evenly over `divisor` = mesh.data x mesh.fsdp
    devices (each holds an equal share of every batch); the message names the nearest fixes."""
    if batch_size % divisor:
        down, up = batch_size // divisor * divisor, -(-batch_size // divisor) * divisor
        fixes = " or ".join(str(v) for v in (down, up) if v > 0)
        raise ConfigError(f"{name}={batch_size}: must be divisible by mesh.data x mesh.fsdp = {divisor} (each of "
                          f"those devices holds an equal share of the batch); set it to {fixes} (raise "
                          "gradient_accumulation_steps to keep the tokens per step), or change mesh.*")


def batch_sharding(mesh: Mesh, ndim: int = 3) -> NamedSharding:
    """Sharding of a token batch: (A, B, T) micro-steps x rows x positions, or (B, T) with ndim=2."""
    spec = P(None, BATCH_AXES, None) if ndim == 3 else P(BATCH_AXES, None)
    return NamedSharding(mesh, spec)


@contextlib.contextmanager
def activate(mesh: Mesh) -> Iterator[None]:
    """Enter the mesh and the logical-axis rules. Trace and call jitted steps only inside this:
    Flax resolves its logical constraints at trace time, and jit's cache does not see the rules."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        yield


def fit_spec(spec: P, shape: tuple[int, ...], mesh: Mesh | jax.sharding.AbstractMesh, name: str) -> P:
    """`spec` for an array of `shape`, less the mesh axes that do not divide their dimension evenly
    (replicated along those instead; logged at info level, `name` saying which array)."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=False):
        if axes is None:
            out.append(None)
            continue
        axes_t = axes if isinstance(axes, tuple) else (axes,)
        size = math.prod(mesh.shape[a] for a in axes_t)
        if dim % size:
            logging.info("sharding: %s dimension %d is not divisible by %s=%d; replicated along it",
                         name, dim, "x".join(axes_t), size)
            out.append(None)
        else:
            out.append(axes)
    return P(*out)


def logical_shardings(abstract_boxed: Any, mesh: Mesh) -> Any:
    """Shardings for a pytree whose leaves carry Flax logical-partitioning boxes (from eval_shape).

    Returns a tree of NamedSharding with the structure of the *unboxed* tree. Unannotated leaves
    (e.g. optimizer step counts) are replicated; dimensions that a mesh axis does not divide
    (e.g. GPT-2's 50257-row embedding over tensor=2) are replicated along that axis.
    """
    specs = nn.get_partition_spec(abstract_boxed)
    mesh_specs = nn.logical_to_mesh(specs, RULES)
    shapes = nn.unbox(abstract_boxed)
    paths = jax.tree_util.tree_flatten_with_path(shapes)[0]
    flat_specs = jax.tree.leaves(mesh_specs, is_leaf=lambda x: isinstance(x, P) or x is None)
    assert len(paths) == len(flat_specs), "spec tree does not match the state tree"
    shardings = [
        NamedSharding(mesh, fit_spec(spec if spec is not None else P(), leaf.shape, mesh, jax.tree_util.keystr(path)))
        for (path, leaf), spec in zip(paths, flat_specs, strict=True)
    ]
    return jax.tree.unflatten(jax.tree.structure(shapes), shardings)


def param_like_shardings(tree: Any, params: Any, param_shards: Any, mesh: Mesh) -> Any:
    """Shardings for a pytree that holds parameters and state beside them (a TrainState, any optax state).

    A leaf whose key path ends with a parameter's key path and whose shape is that parameter's gets the
    parameter's sharding (the longest such path wins): the parameters themselves, AdamW's two moments,
    Muon's momentum, whatever optax nests them in (chains, partitions, masks). Every other leaf (step
    counts, Muon's Newton-Schulz coefficients, a factored moment whose shape differs) is replicated.

    Args:
        tree: the pytree, leaves with a `.shape` (arrays or ShapeDtypeStructs), no logical boxes.
        params: the parameters (shapes suffice), unboxed. param_shards: their NamedShardings, same tree.
    Returns the tree of NamedShardings with `tree`'s structure.
    """
    by_path = {tuple(path): (p.shape, s) for (path, p), s in zip(
        jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(param_shards), strict=True)}
    longest = max((len(k) for k in by_path), default=0)
    replicated = NamedSharding(mesh, P())

    def pick(path: tuple, leaf: Any) -> NamedSharding:
        for n in range(min(longest, len(path)), 0, -1):
            found = by_path.get(tuple(path[-n:]))
            if found is not None and found[0] == leaf.shape:
                return found[1]
        return replicated

    return jax.tree_util.tree_map_with_path(pick, tree)


def bytes_per_device(tree: Any) -> dict[str, int]:
    """Bytes each device holds of a pytree of jax Arrays: {device id as str: bytes}."""
    out: dict[str, int] = {}
    for x in jax.tree.leaves(tree):
        for shard in x.addressable_shards:
            key = str(shard.device.id)
            out[key] = out.get(key, 0) + shard.data.nbytes
    return out
