"""The Flax building blocks under the GPT that are not GPT-2's own design: parameter initialisers with logical
axis names, the LayerNorm with GPT-2's epsilon, and `Projection`, a linear layer whose kernel keeps several
axes (so tensor parallelism can split the heads). model.py assembles GPT-2 from them.

Every parameter carries logical axis names (`nn.with_logical_partitioning`); `nanogpt_jax.sharding` maps
them onto the mesh. On accelerators the backward pass recomputes the elementwise work (the LayerNorms and
GPT-2's GELU) from its inputs rather than keep its outputs: `recompute_elementwise`.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from nanogpt_jax.attention import context_platform

Array = jax.Array


def dense_init(std: float, names: tuple[str | None, ...]):
    return nn.with_logical_partitioning(nn.initializers.normal(stddev=std), names)


def zeros_init(names: tuple[str | None, ...]):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


def recompute_elementwise() -> bool:
    """Whether the backward pass recomputes LayerNorms and GELUs from their inputs (see
    `layer_norm` and `Projection.activation`): on accelerators, whose memory bounds the batch, yes;
    on CPUs, where memory is plentiful and elementwise work is a large share of a small model's step
    (the demo ran 8% slower with it), no. Decided from the devices the step is traced for."""
    return context_platform() != "cpu"


def flatten_rows() -> bool:
    """Whether `Projection` multiplies a (B*T, in) matrix rather than the (B, T, in) array: on CPUs, yes.

    With (B, T) kept apart the weight gradient contracts two axes, and XLA:CPU then copies the
    (B, T, out) cotangent into a transposed layout for that dot, fusing the elementwise work that makes
    it (the GELU's backward, where no bias gradient has already written it out) into the strided copy:
    the demo's shape without biases ran 40% slower (71.5 -> 50.5 ms per step). On TPUs the flat form
    costs memory instead (v5e-8 AOT, GPT-2 124M scanned, 32 x 1024 per chip: temporaries +0.56 GiB),
    so accelerators keep the (B, T) axes. Decided from the devices the step is traced for."""
    return context_platform() == "cpu"


def layer_norm(use_bias: bool, dtype: jnp.dtype, name: str) -> nn.LayerNorm:
    """GPT-2's LayerNorm over the last axis (parameters float32, "norm" logical axis), named `name`."""
    # GPT-2's epsilon is 1e-5 (Flax's default, 1e-6, shifts the logits of pretrained weights).
    # nn.remat on accelerators: the backward pass recomputes the normalisation from the input, which the
    # residual stream keeps anyway; XLA would otherwise keep its float32 intermediates, (B, T, D) each
    return (nn.remat(nn.LayerNorm) if recompute_elementwise() else nn.LayerNorm)(
        epsilon=1e-5, use_bias=use_bias, dtype=dtype, name=name,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
        bias_init=zeros_init(("norm",)),
    )


class Projection(nn.Module):
    """A linear layer whose kernel keeps several input or output axes: x (..., *in) -> (..., *out).

    `nn.DenseGeneral` would create its kernel flat and reshape it, which loses the per-axis
    logical names that let tensor parallelism split the heads.

    `activation`, when given, is applied to x first, and on accelerators (`recompute_elementwise`)
    it and the matmul run under one `jax.checkpoint`: the backward pass recomputes the activation
    from x (elementwise, cheap) instead of keeping its output for the matmul's weight gradient. For GPT-2's GELU before
    mlp.c_proj that saves a (B, T, 4D) array per layer, the largest activation of the step.

    On CPUs the leading axes are multiplied as one row axis (`flatten_rows`); the result has x's
    leading shape either way. Every linear layer of the GPT is one of these (c_fc included).
    """

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    names: tuple[str | None, ...]  # logical axis names of the kernel, in_shape + out_shape
    std: float  # of the kernel's normal init
    dtype: jnp.dtype  # of the computation; the parameters stay float32
    use_bias: bool
    activation: Callable[[Array], Array] | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        n_in = len(self.in_shape)
        kernel = self.param("kernel", dense_init(self.std, self.names), self.in_shape + self.out_shape)
        flat = flatten_rows()

        def project(x: Array, kernel: Array) -> Array:
            x = x.astype(self.dtype)
            if self.activation is not None:
                x = self.activation(x)
            rows = x.shape[: x.ndim - n_in]  # (B, T) in the model
            if flat:
                x = x.reshape((-1, *self.in_shape))
            contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
            y = jax.lax.dot_general(x, kernel.astype(self.dtype), (contract, ((), ())))
            return y.reshape(rows + self.out_shape)

        recompute = self.activation is not None and recompute_elementwise()
        y = (jax.checkpoint(project) if recompute else project)(x, kernel)
        if self.use_bias:
            y = y + self.param("bias", zeros_init(self.names[n_in:]), self.out_shape).astype(self.dtype)
        return y
