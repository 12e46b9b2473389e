"""GPT-2 in Flax linen, readable top to bottom.

The architecture is exactly OpenAI's GPT-2, so Hugging Face's weights give the same logits:
learned token and position embeddings, pre-LayerNorm blocks (epsilon 1e-5), causal self-attention
with a fused q/k/v projection, a 4x MLP with the tanh GELU, a final LayerNorm, and an output head
tied to the token embedding. Module names are HF GPT-2's (wte, wpe, h, ln_1, attn/c_attn, ...), so
converting weights is a rename plus a reshape of the attention matrices (never a transpose).

Shape legend for array names (`x_BTD`) and einsum strings:
    B batch            T query positions     S key/value positions (the KV cache length)
    D n_embd           H n_head              K head size, D // H
    F MLP hidden, 4D   V vocab_size          L n_layer

Parameters are float32; activations run in `config.dtype` (bfloat16 on accelerators); the
attention softmax, the logits and the loss are float32. Every parameter carries logical axis names
(`nn.with_logical_partitioning`); `nanogpt_jax.sharding` maps them onto the (data, fsdp, tensor)
mesh, so the same module runs data-parallel, fully sharded or tensor-parallel.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from absl import logging
from jax.sharding import PartitionSpec as P

from nanogpt_jax import sharding
from nanogpt_jax.errors import ConfigError

Array = jax.Array

# (n_layer, n_head, n_embd) of OpenAI's four GPT-2 sizes; all have block_size 1024, vocab 50257.
GPT2_SIZES: dict[str, tuple[int, int, int]] = {
    "gpt2": (12, 12, 768),  # 124M
    "gpt2-medium": (24, 16, 1024),  # 350M
    "gpt2-large": (36, 20, 1280),  # 774M
    "gpt2-xl": (48, 25, 1600),  # 1558M
}
GPT2_VOCAB_SIZE = 50257  # 50,000 BPE merges + 256 byte tokens + <|endoftext|>
PADDED_VOCAB_SIZE = 50304  # nanoGPT's padding of 50257 up to a multiple of 64: faster matmuls

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
ATTENTION_IMPLS = ("xla", "cudnn", "splash", "auto")
LOSS_IMPLS = ("chunked", "full")
# Float32 logits per device in one chunk of the chunked loss, when loss_chunk=0 picks the chunk: big
# enough that each chunk's matmul fills an accelerator (>= 1k tokens of GPT-2's 50k vocabulary), small
# beside the activations of a long sequence.
LOSS_CHUNK_BYTES = 256 * 2**20
REMAT_POLICIES = ("none", "full") + tuple(
    n for n in dir(jax.checkpoint_policies) if not n.startswith("_") and n not in ("everything_saveable",)
)


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """The shape and the compute choices of a GPT. Defaults are GPT-2 small (124M).

    Attributes:
        block_size: longest context in tokens (the position embedding's length).
        vocab_size: rows of the token embedding; 50257 for GPT-2's BPE, 50304 when padded.
        n_layer, n_head, n_embd: depth, attention heads, width. n_embd % n_head must be 0.
        dropout: probability, on the embeddings, the attention weights and each residual branch.
        bias: biases in the linear layers and LayerNorms, as GPT-2 has them.
        dtype: compute dtype name: "float32", "bfloat16" or "float16". Parameters stay float32.
        scan_layers: run the blocks under `nn.scan` (one traced block: compile time independent of
            depth); parameters of `h` then carry a leading layer axis (L, ...).
        remat: activation checkpointing of each block: "none", "full" (save nothing), or the name of
            a `jax.checkpoint_policies` policy, e.g. "dots_with_no_batch_dims_saveable".
        attention: "xla" (the scores and a float32 softmax written out, compiled by XLA), "cudnn"
            (`jax.nn.dot_product_attention`'s fused cuDNN kernel, GPU only), "splash" (jax's Pallas
            splash attention kernel for TPUs; Pallas interpret mode on CPUs, for tests), or "auto"
            (splash on TPUs, cudnn on a GPU with bf16/fp16, xla elsewhere). See `attention_impl`.
        loss: how the output head and the cross-entropy run in `GPT.losses` (training and eval):
            "chunked" (chunks of positions through a rematerialised scan: no float32 (B, T, V) logits
            live in the step, forward or backward) or "full" (the whole logits at once).
        loss_chunk: positions per chunk of the chunked loss; 0 picks it from the shapes (about
            LOSS_CHUNK_BYTES of float32 logits per device, the whole sequence when that fits).

    Raises:
        ValueError: naming the field, for an impossible value.
    """

    block_size: int = 1024
    vocab_size: int = GPT2_VOCAB_SIZE
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    dtype: str = "float32"
    scan_layers: bool = False
    remat: str = "none"
    attention: str = "xla"
    loss: str = "chunked"
    loss_chunk: int = 0

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be a positive integer")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} must be one of {', '.join(DTYPES)}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r} must be 'none', 'full' or a jax.checkpoint_policies name")
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(f"attention={self.attention!r} must be one of {', '.join(ATTENTION_IMPLS)}")
        if self.loss not in LOSS_IMPLS:
            raise ValueError(f"loss={self.loss!r} must be one of {', '.join(LOSS_IMPLS)}")
        if not isinstance(self.loss_chunk, int) or self.loss_chunk < 0:
            raise ValueError(f"loss_chunk={self.loss_chunk!r} must be 0 (from the shapes) or a positive integer")

    @classmethod
    def gpt2(cls, name: str = "gpt2", **overrides: Any) -> GPTConfig:
        """The config of one of OpenAI's GPT-2 sizes ("gpt2" ... "gpt2-xl"), with overrides."""
        if name not in GPT2_SIZES:
            raise ValueError(f"unknown GPT-2 size {name!r}; choose one of {', '.join(GPT2_SIZES)}")
        n_layer, n_head, n_embd = GPT2_SIZES[name]
        return cls(**{"n_layer": n_layer, "n_head": n_head, "n_embd": n_embd, **overrides})

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def compute_dtype(self) -> jnp.dtype:
        return DTYPES[self.dtype]

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (the tied head counted once), by formula; equals `GPT.num_params()`.

        non_embedding drops the position embedding (nanoGPT's convention: the token embedding
        stays, because as the tied output head it does real matmul work).
        """
        D, L, V, T, b = self.n_embd, self.n_layer, self.vocab_size, self.block_size, int(self.bias)
        ln = D * (1 + b)  # scale (+ bias)
        block = 2 * ln + (D * 3 * D + b * 3 * D) + (D * D + b * D) + (D * 4 * D + b * 4 * D) + (4 * D * D + b * D)
        total = V * D + T * D + L * block + ln
        return total - T * D if non_embedding else total

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token, forward and backward: 6N + 12·L·D·T.

        6N counts the matmuls with weights (2 forward, 4 backward per weight; N excludes the
        position embedding, which is a lookup). 12·L·D·T counts attention's QK^T and AV over the
        full T x T square (PaLM, Chowdhery et al. 2022, appendix B; nanoGPT's estimate_mfu).
        MaxText halves the attention term for the causal mask; we keep nanoGPT's convention.
        """
        T = seq_len or self.block_size
        return 6 * self.num_params(non_embedding=True) + 12 * self.n_layer * self.n_embd * T


# ---- the one loss ----------------------------------------------------------------------------


def token_losses(logits_BTV: Array, targets_BT: Array) -> Array:
    """Cross-entropy of each target token in nats: logits (B, T, V) any float, targets (B, T) int
    -> (B, T) float32. The log-softmax runs in float32 whatever the logits' dtype."""
    return optax.softmax_cross_entropy_with_integer_labels(logits_BTV.astype(jnp.float32), targets_BT)


def lm_loss(logits_BTV: Array, targets_BT: Array) -> Array:
    """The language-modelling loss: mean cross-entropy over every token, float32 scalar (nats)."""
    return token_losses(logits_BTV, targets_BT).mean()


def head_logits(h_BTD: Array, wte_VD: Array, dtype: jnp.dtype) -> Array:
    """The output head tied to the token embedding: hidden (B, T, D) -> float32 logits (B, T, V).

    The matmul runs in `dtype` with a float32 result (`Embed.attend` would return the compute
    dtype, too coarse for a 50k-way softmax in bfloat16).
    """
    return jnp.einsum("btd,vd->btv", h_BTD.astype(dtype), wte_VD.astype(dtype), preferred_element_type=jnp.float32)


def chunked_token_losses(h_BTD: Array, wte_VD: Array, targets_BT: Array, dtype: jnp.dtype, chunk: int) -> Array:
    """`token_losses(head_logits(h, wte), targets)` without ever holding the (B, T, V) logits: (B, T) float32.

    The positions are cut into chunks of `chunk` (the last one padded) and a `lax.scan` runs the head
    and the cross-entropy chunk by chunk under `jax.checkpoint`, so the backward pass recomputes each
    chunk's logits instead of keeping them: float32 logits of B x chunk tokens live at a time. Chunks
    run along T, not the batch, so each keeps the batch's sharding. wte enters the scan in float32 and
    is cast inside, so its gradient is summed over the chunks in float32.
    """
    B, T, D = h_BTD.shape
    if chunk >= T:
        return token_losses(head_logits(h_BTD, wte_VD, dtype), targets_BT)
    n = -(-T // chunk)
    pad = n * chunk - T  # padded positions get target 0 and are cut off below: no gradient
    h_BTD = jnp.pad(h_BTD, ((0, 0), (0, pad), (0, 0)))
    targets_BT = jnp.pad(targets_BT, ((0, 0), (0, pad)))
    h_NBCD = h_BTD.reshape(B, n, chunk, D).swapaxes(0, 1)
    y_NBC = targets_BT.reshape(B, n, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def chunk_losses(h_BCD: Array, y_BC: Array) -> Array:
        return token_losses(head_logits(h_BCD, wte_VD, dtype), y_BC)

    _, losses_NBC = jax.lax.scan(lambda carry, xs: (carry, chunk_losses(*xs)), None, (h_NBCD, y_NBC))
    return losses_NBC.swapaxes(0, 1).reshape(B, n * chunk)[:, :T]


def loss_chunk_len(config: GPTConfig, rows: int, T: int) -> int:
    """Positions per chunk of the chunked loss for `rows` sequences of T tokens on one device: the
    config's loss_chunk, or the largest divisor of T whose float32 logits (rows x chunk x V x 4
    bytes) fit LOSS_CHUNK_BYTES (at least 1; a padded chunk when T's divisors are all much smaller).
    T itself means one chunk: the plain computation."""
    if config.loss == "full":
        return T
    if config.loss_chunk:
        return min(config.loss_chunk, T)
    most = max(1, LOSS_CHUNK_BYTES // (4 * config.vocab_size * max(rows, 1)))
    if most >= T:
        return T
    divisor = max(c for c in range(1, most + 1) if T % c == 0)
    return divisor if 2 * divisor >= most else most  # else pad the last chunk rather than run tiny ones


def implementations(config: GPTConfig, platform: str, rows: int, T: int | None = None) -> dict[str, str]:
    """What a train or eval step of `config` runs on `platform` ("cpu", "gpu", "tpu") with `rows`
    sequences of T tokens (default block_size) per device, as run_bench, summary.json and the aot
    tool name it: {"attention": "splash" / "cudnn" / "xla" (or "xla: <why>" for a fallback),
    "loss": `describe_loss`}."""
    T = T or config.block_size
    choice = attention_impl(config, platform, seq_len=T)
    attention = f"{choice.impl}: {choice.reason}" if choice.reason else choice.impl
    return {"attention": attention, "loss": describe_loss(config, rows, T)}


def describe_loss(config: GPTConfig, rows: int, T: int) -> str:
    """How the loss runs for `rows` sequences of T tokens per device, as reports name it: "full"
    (whole (B, T, V) logits) or e.g. "chunked: 8 x 128 positions"."""
    if config.loss == "full":
        return "full"
    chunk = loss_chunk_len(config, rows, T)
    return f"chunked: {-(-T // chunk)} x {chunk} positions"  # 1 x T: the whole logits fit one chunk


# ---- the key/value cache for generation ------------------------------------------------------


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer for positions 0..S-1, in fixed-size buffers.

    k_LBHSK, v_LBHSK: (n_layer, B, n_head, S, head_size) in the compute dtype. Which positions
    are filled is tracked by the caller (`pos` in `GPT.decode`); unfilled slots are masked out.
    """

    k_LBHSK: Array
    v_LBHSK: Array

    @classmethod
    def zeros(cls, config: GPTConfig, batch_size: int, length: int | None = None) -> KVCache:
        """An empty cache for `batch_size` rows and `length` positions (default block_size)."""
        shape = (config.n_layer, batch_size, config.n_head, length or config.block_size, config.head_size)
        return cls(jnp.zeros(shape, config.compute_dtype), jnp.zeros(shape, config.compute_dtype))


# ---- which attention runs --------------------------------------------------------------------

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
    config: GPTConfig, platform: str | None = None, *, seq_len: int | None = None, train: bool = True
) -> AttentionChoice:
    """The self-attention that runs for `config` (without a KV cache; decoding always runs the XLA path).

    Args:
        config: its `attention` ("xla", "cudnn", "splash", "auto"), dtype and dropout decide.
        platform: "cpu", "gpu" or "tpu"; default `context_platform()` (the mesh in context).
        seq_len: tokens per sequence T; default config.block_size (what the train and eval steps run).
        train: dropout is active (the train step); eval and prediction pass False.

    "auto" is splash on TPUs, cudnn on GPUs with bfloat16/float16 (cuDNN's fused attention has no
    float32), xla otherwise. Neither kernel has dropout: with config.dropout > 0 in training they
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
    T = seq_len or config.block_size
    impl = config.attention
    if impl == "auto":
        if platform == "tpu":
            impl = "splash"
        elif platform == "gpu" and config.dtype in ("bfloat16", "float16"):
            impl = "cudnn"
        else:
            return AttentionChoice("xla", "")
    if impl == "splash" and platform == "gpu":
        raise ConfigError("model.attention='splash': splash attention is a TPU kernel; on GPUs use 'cudnn' "
                          "(or 'auto')")
    if impl == "cudnn" and (platform != "gpu" or config.dtype not in ("bfloat16", "float16")):
        where = f"{platform} devices" if platform != "gpu" else f"dtype={config.dtype}"
        raise ConfigError(f"model.attention='cudnn': cuDNN's fused attention runs on GPUs in bfloat16/float16, not "
                          f"on {where}; use 'auto' (or 'xla')")
    if impl in ("splash", "cudnn") and train and config.dropout > 0:
        return AttentionChoice("xla", f"{impl} attention has no dropout; training with model.dropout="
                               f"{config.dropout} uses the XLA attention (set model.dropout=0 to use {impl})")
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


# ---- the modules ----------------------------------------------------------------------------


def _dense_init(std: float, names: tuple[str | None, ...]):
    return nn.with_logical_partitioning(nn.initializers.normal(stddev=std), names)


def _zeros_init(names: tuple[str | None, ...]):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


def recompute_elementwise() -> bool:
    """Whether the backward pass recomputes LayerNorms and GELUs from their inputs (see
    `_layer_norm` and `Projection.activation`): on accelerators, whose memory bounds the batch, yes;
    on CPUs, where memory is plentiful and elementwise work is a large share of a small model's step
    (the demo ran 8% slower with it), no. Decided from the devices the step is traced for."""
    return context_platform() != "cpu"


def _layer_norm(config: GPTConfig, name: str) -> nn.LayerNorm:
    # GPT-2's epsilon is 1e-5 (Flax's default, 1e-6, shifts the logits of pretrained weights).
    # nn.remat on accelerators: the backward pass recomputes the normalisation from the input, which the
    # residual stream keeps anyway; XLA would otherwise keep its float32 intermediates, (B, T, D) each
    return (nn.remat(nn.LayerNorm) if recompute_elementwise() else nn.LayerNorm)(
        epsilon=1e-5, use_bias=config.bias, dtype=config.compute_dtype, name=name,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
        bias_init=_zeros_init(("norm",)),
    )


class Projection(nn.Module):
    """A linear layer whose kernel keeps several input or output axes: x (..., *in) -> (..., *out).

    `nn.DenseGeneral` would create its kernel flat and reshape it, which loses the per-axis
    logical names that let tensor parallelism split the heads.

    `activation`, when given, is applied to x first, and on accelerators (`recompute_elementwise`)
    it and the matmul run under one `jax.checkpoint`: the backward pass recomputes the activation
    from x (elementwise, cheap)
    instead of keeping its output for the matmul's weight gradient. For GPT-2's GELU before
    mlp.c_proj that saves a (B, T, 4D) array per layer, the largest activation of the step.
    """

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    names: tuple[str | None, ...]  # logical axis names of the kernel, in_shape + out_shape
    std: float
    config: GPTConfig
    activation: Callable[[Array], Array] | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c, n_in = self.config, len(self.in_shape)
        kernel = self.param("kernel", _dense_init(self.std, self.names), self.in_shape + self.out_shape)
        contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))

        def project(x: Array, kernel: Array) -> Array:
            x = x.astype(c.compute_dtype)
            if self.activation is not None:
                x = self.activation(x)
            return jax.lax.dot_general(x, kernel.astype(c.compute_dtype), (contract, ((), ())))

        recompute = self.activation is not None and recompute_elementwise()
        y = (jax.checkpoint(project) if recompute else project)(x, kernel)
        if c.bias:
            y = y + self.param("bias", _zeros_init(self.names[n_in:]), self.out_shape).astype(c.compute_dtype)
        return y


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with a fused q/k/v projection.

    c_attn's kernel is (D, 3, H, K) and c_proj's is (H, K, D): HF's (D, 3D) and (D, D) matrices
    reshaped, so the heads are an axis that tensor parallelism can split (Megatron: c_attn by
    columns, c_proj by rows).
    """

    config: GPTConfig
    layer: int | None = None  # set: kv in decoding holds every layer's cache, this is its index

    @nn.compact
    def __call__(
        self, x_BTD: Array, kv: tuple[Array, Array] | None, pos: Array | int, deterministic: bool
    ) -> tuple[Array, tuple[Array, Array] | None]:
        c = self.config
        std = 0.02
        qkv_BT3HK = Projection(
            (c.n_embd,), (3, c.n_head, c.head_size), ("embed", "qkv", "heads", "kv"), std, c, name="c_attn",
        )(x_BTD)
        q_BTHK, k_BTHK, v_BTHK = (qkv_BT3HK[:, :, i] for i in range(3))

        if kv is None:  # training and plain prediction: the whole sequence at once
            y_BTHK = self._attend(q_BTHK, k_BTHK, v_BTHK, deterministic)
        else:  # generation: write this step's keys/values at `pos`, attend over the whole buffer
            # the cache is head-major, (B, H, S, K): the two attention matmuls then read it as it lies
            # (a (B, S, H, K) cache was transposed, i.e. copied, by both of them in every layer)
            k_BHTK, v_BHTK = (x.transpose(0, 2, 1, 3).astype(kv[0].dtype) for x in (k_BTHK, v_BTHK))
            if self.layer is None:  # kv holds this layer's (B, H, S, K) buffers (under nn.scan)
                kv = (jax.lax.dynamic_update_slice(kv[0], k_BHTK, (0, 0, pos, 0)),
                      jax.lax.dynamic_update_slice(kv[1], v_BHTK, (0, 0, pos, 0)))
                k_BHSK, v_BHSK = kv
            else:  # kv holds every layer's (L, B, H, S, K) buffers: update in place, read this layer's
                start = (self.layer, 0, 0, pos, 0)
                kv = (jax.lax.dynamic_update_slice(kv[0], k_BHTK[None], start),
                      jax.lax.dynamic_update_slice(kv[1], v_BHTK[None], start))
                k_BHSK, v_BHSK = kv[0][self.layer], kv[1][self.layer]
            T, S = q_BTHK.shape[1], k_BHSK.shape[2]
            scores_BHTS = jnp.einsum("bthk,bhsk->bhts", q_BTHK, k_BHSK, preferred_element_type=jnp.float32)
            # query t sits at position pos + t and may see keys at positions <= pos + t
            mask_TS = jnp.arange(S)[None, :] <= (pos + jnp.arange(T))[:, None]
            scores_BHTS = jnp.where(mask_TS, scores_BHTS / math.sqrt(c.head_size), -jnp.inf)
            probs_BHTS = jax.nn.softmax(scores_BHTS, axis=-1).astype(v_BHSK.dtype)
            y_BTHK = jnp.einsum("bhts,bhsk->bthk", probs_BHTS, v_BHSK)

        # the residual projection: scaled init so the stream's variance does not grow with depth
        # (GPT-2 paper, section 2.3: weights of residual layers scaled by 1/sqrt(N), N = 2 per block)
        y_BTD = Projection(
            (c.n_head, c.head_size), (c.n_embd,), ("heads", "kv", "embed"), std / math.sqrt(2 * c.n_layer), c,
            name="c_proj",
        )(y_BTHK)
        return nn.Dropout(c.dropout)(y_BTD, deterministic=deterministic), kv

    def _attend(self, q_BTHK: Array, k_BTHK: Array, v_BTHK: Array, deterministic: bool) -> Array:
        c = self.config
        platform = context_platform()
        impl, reason = attention_impl(c, platform, seq_len=q_BTHK.shape[1], train=not deterministic)
        if reason and not self.is_initializing():  # init traces one token, which no kernel is chosen for
            _log_once(reason)
        if impl == "cudnn":  # the fused kernel
            return jax.nn.dot_product_attention(q_BTHK, k_BTHK, v_BTHK, is_causal=True, implementation="cudnn")
        if impl == "splash":
            if platform != "tpu" and not self.is_initializing():
                _log_once(f"splash attention runs in Pallas interpret mode on {platform} devices (slow: for tests)")
            return splash_attention(q_BTHK, k_BTHK, v_BTHK, interpret=platform != "tpu")
        # XLA: the scores explicitly, the softmax in float32. The same math as
        # jax.nn.dot_product_attention(implementation="xla"), whose vmapped form measured slower on a CPU
        # (run_bench.py, shakespeare_char.py:cpu train step: 51.8 -> 50.1 ms); dropout needs the weights anyway
        scores_BHTT = jnp.einsum("bthk,bshk->bhts", q_BTHK, k_BTHK, preferred_element_type=jnp.float32)
        scores_BHTT = scores_BHTT / math.sqrt(c.head_size)
        T = q_BTHK.shape[1]
        causal_TT = jnp.tril(jnp.ones((T, T), dtype=bool))
        probs_BHTT = jax.nn.softmax(jnp.where(causal_TT, scores_BHTT, -jnp.inf), axis=-1)
        if not deterministic and c.dropout > 0.0:
            probs_BHTT = nn.Dropout(c.dropout)(probs_BHTT, deterministic=False)
        return jnp.einsum("bhts,bshk->bthk", probs_BHTT.astype(v_BTHK.dtype), v_BTHK)


class MLP(nn.Module):
    """The position-wise 4x feed-forward layer with GPT-2's tanh-approximated GELU."""

    config: GPTConfig

    @nn.compact
    def __call__(self, x_BTD: Array, deterministic: bool) -> Array:
        c = self.config
        h_BTF = nn.Dense(
            4 * c.n_embd, use_bias=c.bias, dtype=c.compute_dtype, name="c_fc",
            kernel_init=_dense_init(0.02, ("embed", "mlp")), bias_init=_zeros_init(("mlp",)),
        )(x_BTD)
        h_BTF = nn.with_logical_constraint(h_BTF, ("batch", "length", "mlp"))
        # GPT-2 was trained with the tanh approximation of the GELU. It runs inside c_proj's checkpoint
        # (Projection.activation): the backward pass recomputes it rather than keep its (B, T, 4D) output
        # and the tanh formula's intermediates, the largest activations of the step
        y_BTD = Projection(
            (4 * c.n_embd,), (c.n_embd,), ("mlp", "embed"), 0.02 / math.sqrt(2 * c.n_layer), c,
            activation=functools.partial(nn.gelu, approximate=True), name="c_proj",
        )(h_BTF)
        return nn.Dropout(c.dropout)(y_BTD, deterministic=deterministic)


class Block(nn.Module):
    """One transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x)) (pre-LayerNorm).

    The signature is scan-shaped, (carry, per-layer input) -> (carry, per-layer output), so the
    same module runs under `nn.scan`: the residual stream is the carry, the layer's KV cache the
    per-layer input and output.
    """

    config: GPTConfig
    layer: int | None = None  # see CausalSelfAttention.layer

    @nn.compact
    def __call__(
        self, x_BTD: Array, kv: tuple[Array, Array] | None, pos: Array | int, deterministic: bool
    ) -> tuple[Array, tuple[Array, Array] | None]:
        c = self.config
        attn = CausalSelfAttention(c, self.layer, name="attn")
        y_BTD, kv = attn(_layer_norm(c, "ln_1")(x_BTD), kv, pos, deterministic)
        x_BTD = x_BTD + y_BTD
        x_BTD = x_BTD + MLP(c, name="mlp")(_layer_norm(c, "ln_2")(x_BTD), deterministic)
        x_BTD = nn.with_logical_constraint(x_BTD, ("batch", "length", "embed_act"))
        return x_BTD, kv


def _block_class(config: GPTConfig) -> type[nn.Module]:
    """Block, wrapped in `nn.remat` with the configured checkpoint policy (or not at all)."""
    if config.remat == "none":
        return Block
    policy = None if config.remat == "full" else getattr(jax.checkpoint_policies, config.remat)
    # pos and deterministic (arguments 3 and 4, counting self) are Python values: static
    return nn.remat(Block, policy=policy, prevent_cse=not config.scan_layers, static_argnums=(4,))


class GPT(nn.Module):
    """GPT-2 as a Flax module. Bind parameters to use the prediction API:

        model = GPT(GPTConfig.gpt2("gpt2"))
        params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
        lm = model.bind({"params": params})
        lm.predict(idx_BT)                  # int32 (B, T) -> float32 logits (B, T, V)
        lm.predict(idx_BT, targets=False)   # only the last position: (B, 1, V)
        lm.generate(idx_BT, max_new_tokens=50, rng=jax.random.key(0))  # int32 (B, T + 50)

    `model.apply({"params": p}, idx_BT, deterministic=False, rngs={"dropout": key})` is the
    training forward pass; see `lm_loss` for the loss.
    """

    config: GPTConfig

    def setup(self):
        c = self.config
        self.wte = nn.Embed(c.vocab_size, c.n_embd, dtype=c.compute_dtype,
                            embedding_init=_dense_init(0.02, ("vocab", "embed")))
        self.wpe = nn.Embed(c.block_size, c.n_embd, dtype=c.compute_dtype,
                            embedding_init=_dense_init(0.02, (None, "embed")))
        self.drop = nn.Dropout(c.dropout)
        block = _block_class(c)
        if c.scan_layers:
            self.h = nn.scan(
                block, length=c.n_layer,
                variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                in_axes=(0, nn.broadcast, nn.broadcast),  # kv per layer; pos, deterministic shared
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(c)
        else:
            self.h = [block(c, i) for i in range(c.n_layer)]
        self.ln_f = _layer_norm(c, "ln_f")

    # ---- the forward passes -----------------------------------------------------------------

    def __call__(self, idx_BT: Array, deterministic: bool = True) -> Array:
        """Token ids int (B, T), T <= block_size -> logits float32 (B, T, V)."""
        h_BTD, _ = self.hidden(idx_BT, deterministic=deterministic)
        return self.logits(h_BTD)

    def hidden(
        self, idx_BT: Array, cache: KVCache | None = None, pos: Array | int = 0, deterministic: bool = True
    ) -> tuple[Array, KVCache | None]:
        """Token ids (B, T) at positions pos..pos+T-1 -> final hidden states (B, T, D) and the cache.

        With a cache, this step's keys/values are written at `pos` and attention covers every
        filled position; the caller keeps pos + T <= block_size.
        """
        T = idx_BT.shape[1]
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens exceeds block_size={self.config.block_size}")
        pos_T = pos + jnp.arange(T)
        x_BTD = self.drop(self.wte(idx_BT) + self.wpe(pos_T)[None], deterministic=deterministic)
        x_BTD = nn.with_logical_constraint(x_BTD, ("batch", "length", "embed_act"))
        if self.config.scan_layers:
            kv = None if cache is None else (cache.k_LBHSK, cache.v_LBHSK)
            x_BTD, kv = self.h(x_BTD, kv, pos, deterministic)
            cache = None if cache is None else KVCache(*kv)
        else:
            # each block writes its keys/values into the whole cache in place (block.layer says where):
            # slicing a layer out and setting it back made XLA copy the full cache once per layer
            kv = None if cache is None else (cache.k_LBHSK, cache.v_LBHSK)
            for block in self.h:
                x_BTD, kv = block(x_BTD, kv, pos, deterministic)
            cache = None if cache is None else KVCache(*kv)
        return self.ln_f(x_BTD), cache

    def logits(self, h_BTD: Array) -> Array:
        """Hidden states (B, T, D) -> float32 logits (B, T, V) through the head tied to wte (`head_logits`)."""
        return head_logits(h_BTD, self.wte.embedding, self.config.compute_dtype)

    def losses(self, idx_BT: Array, targets_BT: Array, deterministic: bool = True) -> Array:
        """Cross-entropy of each target in nats, float32 (B, T): `token_losses(self(idx), targets)`.

        The train and eval steps call this: with loss="chunked" the head and the loss run in chunks
        of positions (`chunked_token_losses`), so no float32 (B, T, V) logits live in the step. The
        chunk is picked for the rows one device holds: B over the mesh axes of the "batch" axis.
        """
        h_BTD, _ = self.hidden(idx_BT, deterministic=deterministic)
        B, T = targets_BT.shape
        chunk = loss_chunk_len(self.config, B // _batch_shards(B), T)
        return chunked_token_losses(h_BTD, self.wte.embedding, targets_BT, self.config.compute_dtype, chunk)

    def predict(self, idx_BT: Array, targets: bool = True) -> Array:
        """Logits for every position, float32 (B, T, V); with targets=False only the last, (B, 1, V).

        targets=False skips the output head for all but the last position: what next-token
        sampling needs, and much cheaper with a 50k vocabulary. Deterministic (no dropout).
        """
        h_BTD, _ = self.hidden(idx_BT)
        return self.logits(h_BTD if targets else h_BTD[:, -1:])

    def decode(self, idx_BT: Array, cache: KVCache, pos: Array | int) -> tuple[Array, KVCache]:
        """One cached step: tokens (B, T) at positions pos..pos+T-1 -> last logits (B, V), new cache.

        T is the prompt length for the prefill and 1 for each decode step.
        """
        h_BTD, cache = self.hidden(idx_BT, cache=cache, pos=pos)
        return self.logits(h_BTD[:, -1:])[:, 0], cache

    def generate(self, idx_BT: Array, max_new_tokens: int, **kwargs: Any) -> Array:
        """Continue prompts int32 (B, T) by max_new_tokens -> int32 (B, T + max_new_tokens).

        A KV cache, one prefill and a jitted decode loop; see `nanogpt_jax.generate.generate`
        for the arguments (temperature, top_k, top_p, rng, stop_token). Needs a bound module.
        """
        from nanogpt_jax.generate import generate  # keeps this file about the model

        module, variables = self._bound_parts()
        return generate(module, variables["params"], idx_BT, max_new_tokens, **kwargs)

    def stream(self, idx_BT: Array, max_new_tokens: int, **kwargs: Any):
        """Like generate, but yields each new token int32 (B,) as soon as it is sampled."""
        from nanogpt_jax.generate import stream

        module, variables = self._bound_parts()
        return stream(module, variables["params"], idx_BT, max_new_tokens, **kwargs)

    def _bound_parts(self) -> tuple[GPT, dict]:
        if self.scope is None:
            raise ValueError("bind parameters first: lm = model.bind({'params': params})")
        return self.unbind()

    # ---- sizes --------------------------------------------------------------------------------

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters of this module counted from `jax.eval_shape` of its init (no memory used)."""
        shapes = jax.eval_shape(functools.partial(self.clone(parent=None).init, jax.random.key(0)),
                                jnp.zeros((1, 1), jnp.int32))
        n = sum(math.prod(x.shape) for x in jax.tree.leaves(nn.unbox(shapes["params"])))
        return n - self.config.block_size * self.config.n_embd if non_embedding else n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """See `GPTConfig.flops_per_token`."""
        return self.config.flops_per_token(seq_len)


def _batch_shards(B: int) -> int:
    """Devices the batch axis of B rows is split over in the current mesh and logical-axis rules
    (1 outside a mesh, or when the mesh does not divide B)."""
    mesh = jax.sharding.get_abstract_mesh()
    axes = nn.logical_to_mesh_axes(("batch",))[0] if not mesh.empty else None
    if axes is None:
        return 1
    n = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))
    return n if B % n == 0 else 1


def init_params(model: GPT, rng: Array) -> dict:
    """Fresh float32 parameters for `model` (unsharded, logical-axis boxes removed)."""
    return nn.unbox(model.init(rng, jnp.zeros((1, 1), jnp.int32))["params"])


def crop_block_size(model: GPT, params: dict, block_size: int) -> tuple[GPT, dict]:
    """A model with a shorter context and its parameters (wpe cut to the first block_size rows).

    E.g. finetune GPT-2 with 256 tokens instead of 1024. Raises ValueError when growing.
    """
    if block_size > model.config.block_size:
        raise ValueError(f"cannot grow block_size from {model.config.block_size} to {block_size}")
    params = dict(params)
    params["wpe"] = {"embedding": params["wpe"]["embedding"][:block_size]}
    return model.clone(config=dataclasses.replace(model.config, block_size=block_size)), params
