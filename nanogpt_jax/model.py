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

How attention is computed (XLA, cuDNN's or the splash kernel, and the fallbacks) is in attention.py;
the output head and the loss, whole or in chunks of positions, in loss.py; the generic layers (the
multi-axis Projection, initialisers, LayerNorm) in layers.py. This file is GPT-2 itself.

The one import circle of the package (tests/test_imports.py): `GPT.generate` and `GPT.stream`, the
promised `lm.generate(...)` API, import generate.py when called, and generate.py imports this file for
GPT, KVCache and the vocabulary sizes. The other shapes are worse: the sampler moved in here would
double this file; the methods dropped would break the API; generate.py without this import would need
KVCache and the constants moved away from the model they describe and untyped model arguments.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from nanogpt_jax.attention import ATTENTION_IMPLS, attend, attend_cached, attention_impl
from nanogpt_jax.layers import Projection, dense_init, layer_norm
from nanogpt_jax.loss import LOSS_IMPLS, batch_shards, chunked_token_losses, describe_loss, head_logits, loss_chunk_len

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
            (cuDNN's fused kernel, GPU only), "splash" (jax's Pallas kernel for TPUs; Pallas interpret
            mode on CPUs, for tests), or "auto" (splash on TPUs, cudnn on a GPU with bf16/fp16, xla
            elsewhere). See `attention.attention_impl`.
        loss: how the output head and the cross-entropy run in `GPT.losses` (training and eval):
            "chunked" (chunks of positions through a rematerialised scan: no float32 (B, T, V) logits
            live in the step, forward or backward) or "full" (the whole logits at once). See loss.py.
        loss_chunk: positions per chunk of the chunked loss; 0 picks it from the shapes
            (`loss.loss_chunk_len`: the whole sequence when its float32 logits fit LOSS_CHUNK_BYTES).

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


# ---- the modules ----------------------------------------------------------------------------


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
            (c.n_embd,), (3, c.n_head, c.head_size), ("embed", "qkv", "heads", "kv"), std, c.compute_dtype, c.bias,
            name="c_attn",
        )(x_BTD)
        q_BTHK, k_BTHK, v_BTHK = (qkv_BT3HK[:, :, i] for i in range(3))

        if kv is None:  # training and plain prediction: the whole sequence at once, by attention.py's choice
            # the dropout of the attention weights is a submodule here: this module's dropout rng drives it
            drop = None if deterministic or c.dropout == 0.0 else nn.Dropout(c.dropout, deterministic=False)
            y_BTHK = attend(q_BTHK, k_BTHK, v_BTHK, c.attention, c.dtype, c.dropout, train=not deterministic,
                            drop=drop, log=not self.is_initializing())  # init's one-token trace is no step
        else:  # generation: this step's keys/values written into the cache at `pos`, attention over all of it
            y_BTHK, kv = attend_cached(q_BTHK, k_BTHK, v_BTHK, kv, pos, self.layer)

        # the residual projection: scaled init so the stream's variance does not grow with depth
        # (GPT-2 paper, section 2.3: weights of residual layers scaled by 1/sqrt(N), N = 2 per block)
        y_BTD = Projection(
            (c.n_head, c.head_size), (c.n_embd,), ("heads", "kv", "embed"), std / math.sqrt(2 * c.n_layer),
            c.compute_dtype, c.bias, name="c_proj",
        )(y_BTHK)
        return nn.Dropout(c.dropout)(y_BTD, deterministic=deterministic), kv


class MLP(nn.Module):
    """The position-wise 4x feed-forward layer with GPT-2's tanh-approximated GELU."""

    config: GPTConfig

    @nn.compact
    def __call__(self, x_BTD: Array, deterministic: bool) -> Array:
        c = self.config
        h_BTF = Projection(
            (c.n_embd,), (4 * c.n_embd,), ("embed", "mlp"), 0.02, c.compute_dtype, c.bias, name="c_fc",
        )(x_BTD)
        h_BTF = nn.with_logical_constraint(h_BTF, ("batch", "length", "mlp"))
        # GPT-2 was trained with the tanh approximation of the GELU. It runs inside c_proj's checkpoint
        # (Projection.activation): the backward pass recomputes it rather than keep its (B, T, 4D) output
        # and the tanh formula's intermediates, the largest activations of the step
        y_BTD = Projection(
            (4 * c.n_embd,), (c.n_embd,), ("mlp", "embed"), 0.02 / math.sqrt(2 * c.n_layer), c.compute_dtype, c.bias,
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
        y_BTD, kv = attn(layer_norm(c.bias, c.compute_dtype, "ln_1")(x_BTD), kv, pos, deterministic)
        x_BTD = x_BTD + y_BTD
        x_BTD = x_BTD + MLP(c, name="mlp")(layer_norm(c.bias, c.compute_dtype, "ln_2")(x_BTD), deterministic)
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
    training forward pass; `GPT.losses` the loss (loss.py).
    """

    config: GPTConfig

    def setup(self):
        c = self.config
        self.wte = nn.Embed(c.vocab_size, c.n_embd, dtype=c.compute_dtype,
                            embedding_init=dense_init(0.02, ("vocab", "embed")))
        self.wpe = nn.Embed(c.block_size, c.n_embd, dtype=c.compute_dtype,
                            embedding_init=dense_init(0.02, (None, "embed")))
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
        self.ln_f = layer_norm(c.bias, c.compute_dtype, "ln_f")

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
        kv = None if cache is None else (cache.k_LBHSK, cache.v_LBHSK)
        if self.config.scan_layers:
            x_BTD, kv = self.h(x_BTD, kv, pos, deterministic)
        else:
            # each block writes its keys/values into the whole cache in place (block.layer says where):
            # slicing a layer out and setting it back made XLA copy the full cache once per layer
            for block in self.h:
                x_BTD, kv = block(x_BTD, kv, pos, deterministic)
        return self.ln_f(x_BTD), None if cache is None else KVCache(*kv)

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
        c = self.config
        chunk = loss_chunk_len(c.loss, c.loss_chunk, c.vocab_size, B // batch_shards(B), T)
        return chunked_token_losses(h_BTD, self.wte.embedding, targets_BT, c.compute_dtype, chunk)

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


def implementations(config: GPTConfig, platform: str, rows: int, T: int | None = None) -> dict[str, str]:
    """What a train or eval step of `config` runs on `platform` ("cpu", "gpu", "tpu") with `rows`
    sequences of T tokens (default block_size) per device, as run_bench, summary.json and the aot
    tool name it: {"attention": "splash" / "cudnn" / "xla" (or "xla: <why>" for a fallback),
    "loss": `describe_loss`}."""
    T = T or config.block_size
    choice = attention_impl(config.attention, config.dtype, config.dropout, platform, seq_len=T)
    attention = f"{choice.impl}: {choice.reason}" if choice.reason else choice.impl
    return {"attention": attention, "loss": describe_loss(config.loss, config.loss_chunk, config.vocab_size, rows, T)}
