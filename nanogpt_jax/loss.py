"""The language-modelling loss: the output head tied to the token embedding, the cross-entropy, and
the chunked form of the two that training and evaluation run.

One loss (`token_losses`, `lm_loss`): the log-softmax in float32 whatever the logits' dtype. With
model.loss="chunked" (`chunked_token_losses`) the head and the loss run over chunks of positions, so
no float32 (B, T, V) logits live in a step; `loss_chunk_len` picks the chunk from the shapes. It is
apart from the model, which calls it from `GPT.losses`, because evaluation and scoring use it on
logits of their own. It takes the config's fields, not a GPTConfig: model.py imports this module,
never the other way round.

Shape letters as in model.py: B batch, T positions, D n_embd, V vocab_size; N chunks of C positions.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from nanogpt_jax.layers import flatten_rows

Array = jax.Array

LOSS_IMPLS = ("chunked", "full")
# Float32 logits per device in one chunk of the chunked loss, when loss_chunk=0 picks the chunk: big
# enough that each chunk's matmul fills an accelerator (>= 1k tokens of GPT-2's 50k vocabulary), small
# beside the activations of a long sequence.
LOSS_CHUNK_BYTES = 256 * 2**20


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
    dtype, too coarse for a 50k-way softmax in bfloat16). On CPUs it multiplies (B*T, D) rows
    (`layers.flatten_rows`): with (B, T) apart, XLA:CPU copied the whole (B, T, V) logits' gradient
    into a transposed layout for wte's gradient, the softmax's backward fused into that strided copy.
    """
    h_RD = h_BTD.reshape(-1, h_BTD.shape[-1]) if flatten_rows() else h_BTD  # R: the B*T rows
    logits = jnp.einsum("...d,vd->...v", h_RD.astype(dtype), wte_VD.astype(dtype), preferred_element_type=jnp.float32)
    return logits.reshape(*h_BTD.shape[:-1], wte_VD.shape[0])


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


def loss_chunk_len(loss: str, loss_chunk: int, vocab_size: int, rows: int, T: int) -> int:
    """Positions per chunk of the chunked loss for `rows` sequences of T tokens on one device.

    loss, loss_chunk, vocab_size are the model's `GPTConfig` fields of those names. The chunk is
    loss_chunk when set, else the largest divisor of T whose float32 logits (rows x chunk x V x 4
    bytes) fit LOSS_CHUNK_BYTES (at least 1; a padded chunk when T's divisors are all much smaller).
    T itself means one chunk: the plain computation (always, for loss="full")."""
    if loss == "full":
        return T
    if loss_chunk:
        return min(loss_chunk, T)
    most = max(1, LOSS_CHUNK_BYTES // (4 * vocab_size * max(rows, 1)))
    if most >= T:
        return T
    divisor = max(c for c in range(1, most + 1) if T % c == 0)
    return divisor if 2 * divisor >= most else most  # else pad the last chunk rather than run tiny ones


def batch_shards(B: int) -> int:
    """Devices the batch axis of B rows is split over in the current mesh and logical-axis rules
    (1 outside a mesh, or when the mesh does not divide B): `GPT.losses` picks the loss chunk for
    the B // batch_shards(B) rows one device holds."""
    mesh = jax.sharding.get_abstract_mesh()
    axes = nn.logical_to_mesh_axes(("batch",))[0] if not mesh.empty else None
    if axes is None:
        return 1
    n = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))
    return n if B % n == 0 else 1


def describe_loss(loss: str, loss_chunk: int, vocab_size: int, rows: int, T: int) -> str:
    """How the loss runs for `rows` sequences of T tokens per device, as reports name it: "full"
    (whole (B, T, V) logits) or e.g. "chunked: 8 x 128 positions". Arguments as `loss_chunk_len`'s."""
    if loss == "full":
        return "full"
    chunk = loss_chunk_len(loss, loss_chunk, vocab_size, rows, T)
    return f"chunked: {-(-T // chunk)} x {chunk} positions"  # 1 x T: the whole logits fit one chunk
