"""Self-attention's implementations, and the choice between them.

`CausalSelfAttention` (model.py) projects q, k and v and calls `attend` for a whole sequence, or
`attend_cached` for a generation step over the KV cache. This module decides which computation runs
and runs it: the scores and a float32 softmax written out by XLA, cuDNN's fused kernel (GPUs), or
jax's Pallas splash kernel (TPUs; Pallas interpret mode on CPUs, for tests), with the fallbacks to XLA
where a kernel cannot run (dropout in training, a sequence its tiles do not divide) and the log line
that says why. It is apart from the model so the model reads as the architecture: these choices
depend on the devices a step is traced for, not on GPT-2. It takes the config's fields, not a
GPTConfig: model.py imports this module, never the other way round.

Shape letters as in model.py: B batch, T positions, H n_head, K head size.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from absl import logging
from jax.sharding import PartitionSpec as P

from nanogpt_jax import sharding
from nanogpt_jax.errors import ConfigError

Array = jax.Array

ATTENTION_IMPLS = ("xla", "cudnn", "splash", "auto")
SPLASH_BLOCK_SIZES = (512, 256, 128)  # tiles of the splash kernel, largest first; TPU tiles are multiples of 128


class AttentionChoice(NamedTuple):
    """What `attention_impl` decided: `impl` runs ("xla", "cudnn" or "splash"); `reason` says why it
    is not the kernel the config asked for ("" when it is)."""

    impl: str
    reason: str


def context_platform() -> str:
    """The platform ("cpu", "gpu", "tpu") of the devices a step is traced for: those of the mesh in
    context (`sharding.activate`), else the default backend's. An AOT compile on a CPU host for a
    TPU topology thus sees "tpu"."""
    device = jax.sharding.get_abstract_mesh().abstract_device  # None when no mesh is in context
    return device.platform if device is not None else jax.default_backend()


def splash_block_size(seq_len: int) -> int | None:
    """The splash kernel's query/key tile for a sequence of seq_len tokens: the largest of
    SPLASH_BLOCK_SIZES that divides it, or None when none does (the kernel cannot tile it)."""
    return next((b for b in SPLASH_BLOCK_SIZES if seq_len % b == 0), None)


def attention_impl(
    attention: str, dtype: str, dropout: float, platform: str | None = None, *, seq_len: int, train: bool = True
) -> AttentionChoice:
    """The self-attention that runs for a model (without a KV cache; decoding always runs the XLA path).

    Args:
        attention, dtype, dropout: the model's `GPTConfig` fields of those names: the attention asked
            for ("xla", "cudnn", "splash", "auto"), the compute dtype's name, the dropout probability.
        platform: "cpu", "gpu" or "tpu"; default `context_platform()` (the mesh in context).
        seq_len: tokens per sequence T (block_size for the train and eval steps).
        train: dropout is active (the train step); eval and prediction pass False.

    "auto" is splash on TPUs, cudnn on GPUs with bfloat16/float16 (cuDNN's fused attention has no
    float32), xla otherwise. Neither kernel has dropout: with dropout > 0 in training they
    give way to xla; splash also does when seq_len is not a multiple of 128 (its smallest tile).
    "splash" on CPUs runs the kernel in Pallas interpret mode (slow; it exists to test it).

    Returns:
        AttentionChoice(impl, reason): impl is what runs, reason why it differs from a kernel that
        was asked for (explicitly or by "auto"), else "".

    Raises:
        ConfigError: "splash" on GPUs (it is a TPU kernel; cudnn is the GPU's); "cudnn" off a GPU or in
            float32.
    """
    platform = platform or context_platform()
    T = seq_len
    impl = attention
    if impl == "auto":
        if platform == "tpu":
            impl = "splash"
        elif platform == "gpu" and dtype in ("bfloat16", "float16"):
            impl = "cudnn"
        else:
            return AttentionChoice("xla", "")
    if impl == "splash" and platform == "gpu":
        raise ConfigError("model.attention='splash': splash attention is a TPU kernel; on GPUs use 'cudnn' "
                          "(or 'auto')")
    if impl == "cudnn" and (platform != "gpu" or dtype not in ("bfloat16", "float16")):
        where = f"{platform} devices" if platform != "gpu" else f"dtype={dtype}"
        raise ConfigError(f"model.attention='cudnn': cuDNN's fused attention runs on GPUs in bfloat16/float16, not "
                          f"on {where}; use 'auto' (or 'xla')")
    if impl in ("splash", "cudnn") and train and dropout > 0:
        return AttentionChoice("xla", f"{impl} attention has no dropout; training with model.dropout="
                               f"{dropout} uses the XLA attention (set model.dropout=0 to use {impl})")
    if impl == "splash" and splash_block_size(T) is None:
        return AttentionChoice("xla", f"splash attention tiles sequences in blocks of 128 tokens; sequences of {T} "
                               "tokens do not divide into them, so the XLA attention runs (use a multiple of 128)")
    return AttentionChoice(impl, "")


_logged: set[str] = set()


def _log_once(message: str) -> None:
    """Log a message the first time it comes up in this process (traces repeat; the reason does not)."""
    if message not in _logged:
        _logged.add(message)
        logging.warning("%s", message)


def attend(
    q_BTHK: Array, k_BTHK: Array, v_BTHK: Array, attention: str, dtype: str, dropout: float, *, train: bool,
    drop: Callable[[Array], Array] | None = None, log: bool = True,
) -> Array:
    """Causal self-attention of a whole sequence: q, k, v (B, T, H, K) -> (B, T, H, K) in v's dtype, by
    the implementation `attention_impl` picks for the devices in context (`context_platform`).

    Args:
        q_BTHK, k_BTHK, v_BTHK: queries, keys and values, in the compute dtype.
        attention, dtype, dropout: the model's `GPTConfig` fields of those names (see `attention_impl`).
        train: dropout is active (the train step); eval and prediction pass False.
        drop: what the XLA attention applies to its float32 weights (B, H, T, T): the calling module's
            `nn.Dropout` when training with dropout > 0 (the module owns the dropout rng), else None.
        log: log, once per process, why a kernel gave way to XLA and that splash runs interpreted; False
            while flax initialises (its one-token trace is no step a kernel is chosen for).

    Raises:
        ConfigError: from `attention_impl`, for a kernel that cannot run on these devices.
    """
    platform = context_platform()
    impl, reason = attention_impl(attention, dtype, dropout, platform, seq_len=q_BTHK.shape[1], train=train)
    if reason and log:
        _log_once(reason)
    if impl == "cudnn":  # the fused kernel
        return jax.nn.dot_product_attention(q_BTHK, k_BTHK, v_BTHK, is_causal=True, implementation="cudnn")
    if impl == "splash":
        if platform != "tpu" and log:
            _log_once(f"splash attention runs in Pallas interpret mode on {platform} devices (slow: for tests)")
        return splash_attention(q_BTHK, k_BTHK, v_BTHK, interpret=platform != "tpu")
    # XLA: the scores explicitly, the softmax in float32. The same math as
    # jax.nn.dot_product_attention(implementation="xla"), whose vmapped form measured slower on a CPU
    # (run_bench.py, shakespeare_char.py:cpu train step: 51.8 -> 50.1 ms); dropout needs the weights anyway
    scores_BHTT = jnp.einsum("bthk,bshk->bhts", q_BTHK, k_BTHK, preferred_element_type=jnp.float32)
    scores_BHTT = scores_BHTT / math.sqrt(q_BTHK.shape[-1])
    T = q_BTHK.shape[1]
    causal_TT = jnp.tril(jnp.ones((T, T), dtype=bool))
    probs_BHTT = jax.nn.softmax(jnp.where(causal_TT, scores_BHTT, -jnp.inf), axis=-1)
    if drop is not None:
        probs_BHTT = drop(probs_BHTT)
    return jnp.einsum("bhts,bshk->bthk", probs_BHTT.astype(v_BTHK.dtype), v_BTHK)


def attend_cached(
    q_BTHK: Array, k_BTHK: Array, v_BTHK: Array, kv: tuple[Array, Array], pos: Array | int, layer: int | None
) -> tuple[Array, tuple[Array, Array]]:
    """One step of generation: write this step's keys/values (B, T, H, K) into the KV cache at positions
    pos..pos+T-1, and attend from q (B, T, H, K) over every cached position up to each query's own.

    Always the XLA computation (scores written out, float32 softmax): the kernels above attend a whole
    sequence to itself, not T queries at an offset into a longer buffer.

    Args:
        kv: the key and value buffers in the cache dtype: this layer's (B, H, S, K) when layer is None
            (blocks under nn.scan), else every layer's (L, B, H, S, K), of which `layer` is this one's.
        pos: position of the first of the T tokens; the caller keeps pos + T <= S.

    Returns:
        y (B, T, H, K) in the cache dtype, and kv with this step's keys and values written in.
    """
    # the cache is head-major, (B, H, S, K): the two attention matmuls then read it as it lies
    # (a (B, S, H, K) cache was transposed, i.e. copied, by both of them in every layer)
    k_BHTK, v_BHTK = (x.transpose(0, 2, 1, 3).astype(kv[0].dtype) for x in (k_BTHK, v_BTHK))
    if layer is None:  # kv holds this layer's (B, H, S, K) buffers (under nn.scan)
        kv = (jax.lax.dynamic_update_slice(kv[0], k_BHTK, (0, 0, pos, 0)),
              jax.lax.dynamic_update_slice(kv[1], v_BHTK, (0, 0, pos, 0)))
        k_BHSK, v_BHSK = kv
    else:  # kv holds every layer's (L, B, H, S, K) buffers: update in place, read this layer's
        start = (layer, 0, 0, pos, 0)
        kv = (jax.lax.dynamic_update_slice(kv[0], k_BHTK[None], start),
              jax.lax.dynamic_update_slice(kv[1], v_BHTK[None], start))
        k_BHSK, v_BHSK = kv[0][layer], kv[1][layer]
    T, S = q_BTHK.shape[1], k_BHSK.shape[2]
    scores_BHTS = jnp.einsum("bthk,bhsk->bhts", q_BTHK, k_BHSK, preferred_element_type=jnp.float32)
    # query t sits at position pos + t and may see keys at positions <= pos + t
    mask_TS = jnp.arange(S)[None, :] <= (pos + jnp.arange(T))[:, None]
    scores_BHTS = jnp.where(mask_TS, scores_BHTS / math.sqrt(q_BTHK.shape[-1]), -jnp.inf)
    probs_BHTS = jax.nn.softmax(scores_BHTS, axis=-1).astype(v_BHSK.dtype)
    return jnp.einsum("bhts,bhsk->bthk", probs_BHTS, v_BHSK), kv


def splash_attention(q_BTHK: Array, k_BTHK: Array, v_BTHK: Array, *, interpret: bool = False) -> Array:
    """Causal softmax attention of q, k, v (B, T, H, K) -> (B, T, H, K) in q's dtype, by jax's Pallas
    splash (flash) attention kernel: the (T, T) scores are never written out, so the step holds
    no float32 (B, H, T, T) arrays (jax.experimental.pallas.ops.tpu.splash_attention).

    The kernel computes one sequence's (H, T, K) heads: it is vmapped over the batch and run under
    `jax.shard_map` over the mesh in context, the batch split over data x fsdp and the heads over
    tensor. A dimension those axes do not divide is replicated along them instead (each of those
    devices then computes the whole dimension: correct, only redundant), as `sharding` does for
    parameters: heads when n_head % mesh.tensor != 0 (gpt2-xl's 25 heads; the c_attn kernel's
    heads are replicated then too), the batch when it is smaller than data x fsdp, e.g. one prompt.
    T must be a multiple of 128 (`splash_block_size`); `attention_impl` falls back to XLA otherwise.
    The kernel applies no 1/sqrt(K) scale, so q is scaled first (exact for K a power of 4: 1/8 at 64).

    interpret: run the kernel in Pallas interpret mode (CPUs; the TPU compiler is not needed).
    """
    B, T, H, K = q_BTHK.shape
    block = splash_block_size(T)
    if block is None:
        raise ValueError(f"splash attention needs T to be a multiple of 128; got T={T}")
    q_BTHK = q_BTHK * jnp.asarray(1 / math.sqrt(K), q_BTHK.dtype)

    def attend(q_BTHK: Array, k_BTHK: Array, v_BTHK: Array) -> Array:  # one device's share
        from jax.experimental.pallas.ops.tpu import splash_attention as splash

        heads = q_BTHK.shape[2]
        mask = splash.MultiHeadMask([splash.CausalMask((T, T)) for _ in range(heads)])
        blocks = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                                   block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block,
                                   block_kv_dq=block)
        kernel = splash.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1,
                                        interpret=interpret)
        to_BHTK = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731 - the kernel's head-major layout
        return to_BHTK(jax.vmap(kernel)(to_BHTK(q_BTHK), to_BHTK(k_BTHK), to_BHTK(v_BTHK)))

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:  # no mesh in context: one device, or jit's own choice
        return attend(q_BTHK, k_BTHK, v_BTHK)
    batch_axes = tuple(a for a in sharding.BATCH_AXES if a in mesh.axis_names) or None
    heads_axis = "tensor" if "tensor" in mesh.axis_names else None
    spec = sharding.fit_spec(P(batch_axes, None, heads_axis, None), q_BTHK.shape, mesh, "splash attention's q/k/v")
    # check_vma=False: the kernel's pallas_call does not declare how its outputs vary over the mesh axes
    return jax.shard_map(attend, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec, check_vma=False)(
        q_BTHK, k_BTHK, v_BTHK)
