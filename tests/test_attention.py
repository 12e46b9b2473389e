"""nanogpt_jax.attention: which attention runs, and the splash kernel. Splash attention (jax's Pallas TPU
kernel, run here in Pallas interpret mode on the fake CPU devices) must equal the XLA attention; it falls
back to XLA where it cannot run; "auto" picks it for TPU meshes; and a TPU compile of the train step with
it holds less memory than with the XLA attention. (The KV-cache path, `attend_cached`, is checked against
the full forward in test_model.py.)"""

import dataclasses
import importlib.util
import logging
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_run_config
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from nanogpt_jax import attention as attention_lib
from nanogpt_jax import loggers, sharding, targets
from nanogpt_jax.attention import attention_impl
from nanogpt_jax.errors import ConfigError
from nanogpt_jax.model import CausalSelfAttention, GPTConfig
from nanogpt_jax.train import train

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None and not os.environ.get("TPU_LIBRARY_PATH"),
    reason="needs the TPU compiler: `make test` installs libtpu, sets TPU_LIBRARY_PATH")


@pytest.fixture
def fresh_log(monkeypatch, caplog):
    """Each fallback reason is logged once per process: forget earlier ones, capture the log."""
    monkeypatch.setattr(attention_lib, "_logged", set())
    caplog.set_level(logging.WARNING)
    return caplog


def fallback_messages(caplog) -> list[str]:
    """What the attention logged, less the note that the kernel runs in interpret mode here."""
    return [r.getMessage() for r in caplog.records
            if r.pathname.endswith("nanogpt_jax/attention.py") and "interpret mode" not in r.getMessage()]


def attention_and_grads(attention: str, B: int, T: int, H: int, mesh, dropout: float = 0.0, train_: bool = False):
    """One CausalSelfAttention layer (head size 64), float32, jitted under the mesh: its output and
    the gradients of a weighted sum of it with respect to the input and every parameter; and the
    jaxpr, to see which kernel ran."""
    c = GPTConfig(block_size=T, n_head=H, n_embd=64 * H, n_layer=1, dropout=dropout, attention=attention)
    layer = CausalSelfAttention(c)
    kx, kw, kp, kd = jax.random.split(jax.random.key(0), 4)
    x_BTD = jax.random.normal(kx, (B, T, c.n_embd))
    w_BTD = jax.random.normal(kw, (B, T, c.n_embd))
    init = CausalSelfAttention(dataclasses.replace(c, attention="xla")).init  # the same parameters, fast
    params = jax.tree.map(lambda p: p * 5, nn.unbox(init(kp, x_BTD, None, 0, True)["params"]))

    def loss(params, x_BTD):
        y_BTD, _ = layer.apply({"params": params}, x_BTD, None, 0, not train_, rngs={"dropout": kd})
        return (y_BTD * w_BTD).sum(), y_BTD

    with sharding.activate(mesh):
        if B % sharding.batch_divisor(mesh) == 0:  # as the train step holds its activations
            x_BTD = jax.device_put(x_BTD, NamedSharding(mesh, P(sharding.BATCH_AXES)))
        traced = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)).trace(params, x_BTD)
        (_, y_BTD), grads = traced.lower().compile()(params, x_BTD)
    return y_BTD, grads, str(traced.jaxpr)


def assert_same(a, b, tol=1e-5):
    """Equal to a relative tol, and to tol times the array's largest entry: a gradient summed over every
    token cancels to rounding noise (the key bias's is zero in exact arithmetic)."""
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        np.testing.assert_allclose(x, y, rtol=tol, atol=tol * max(1.0, float(np.abs(y).max())))


@pytest.mark.parametrize("T,H,B,mesh_shape", [
    (256, 2, 4, {"data": 4, "tensor": 2}),  # 1 head per tensor shard, one tile of 256
    (384, 4, 4, {"data": 4, "tensor": 2}),  # 2 heads per tensor shard, 3 x 3 tiles of 128
    (128, 3, 2, {"data": 4, "tensor": 2}),  # neither the batch nor the heads divide: replicated, still exact
])
def test_splash_equals_xla_forward_and_gradients(T, H, B, mesh_shape):
    mesh = sharding.make_mesh(**mesh_shape)
    y_xla, g_xla, jaxpr_xla = attention_and_grads("xla", B, T, H, mesh)
    y_splash, g_splash, jaxpr_splash = attention_and_grads("splash", B, T, H, mesh)
    assert "pallas_call" in jaxpr_splash and "shard_map" in jaxpr_splash and "pallas_call" not in jaxpr_xla
    assert float(jnp.abs(y_xla).max()) > 0.1  # weights scaled up: peaked attention, outputs of order 1
    assert_same(y_splash, y_xla)
    assert_same(g_splash, g_xla)


def test_splash_without_a_mesh_in_context_runs_the_kernel_unsharded():
    q, k, v = (jax.random.normal(key, (2, 128, 2, 64)) for key in jax.random.split(jax.random.key(1), 3))
    scores = jnp.einsum("bthk,bshk->bhts", q, k) / 8.0
    probs = jax.nn.softmax(jnp.where(jnp.tril(jnp.ones((128, 128), bool)), scores, -jnp.inf), axis=-1)
    expected = jnp.einsum("bhts,bshk->bthk", probs, v)
    assert_same(jax.jit(lambda *a: attention_lib.splash_attention(*a, interpret=True))(q, k, v), expected)
    # no mesh in context: the platform is jax.default_backend()'s
    assert attention_impl("splash", "float32", 0.0, seq_len=128) == ("splash", "")


@pytest.mark.parametrize("T,dropout,why", [
    (200, 0.0, "sequences of 200 tokens do not divide into them"),
    (256, 0.25, "splash attention has no dropout; training with model.dropout=0.25"),
])
def test_where_splash_cannot_run_the_xla_attention_runs_and_the_log_says_why(fresh_log, T, dropout, why):
    mesh = sharding.make_mesh(data=4, tensor=2)
    y_xla, g_xla, _ = attention_and_grads("xla", 4, T, 2, mesh, dropout=dropout, train_=True)
    assert not fallback_messages(fresh_log)
    y_splash, g_splash, jaxpr = attention_and_grads("splash", 4, T, 2, mesh, dropout=dropout, train_=True)
    assert "pallas_call" not in jaxpr
    assert_same(y_splash, y_xla, tol=0)  # the same computation, dropout masks included
    assert_same(g_splash, g_xla, tol=0)
    messages = fallback_messages(fresh_log)
    assert len(messages) == 1 and why in messages[0], messages  # once, though traced for value and grad


def test_attention_impl_decides_from_the_platform():
    T = 1024  # attention_impl(attention, dtype, dropout, platform, seq_len=T, train=True)
    assert attention_impl("auto", "bfloat16", 0.0, "tpu", seq_len=T) == ("splash", "")
    assert attention_impl("auto", "bfloat16", 0.0, "gpu", seq_len=T) == ("cudnn", "")
    assert attention_impl("auto", "float32", 0.0, "gpu", seq_len=T) == ("xla", "")  # cuDNN's kernel has no float32
    assert attention_impl("auto", "bfloat16", 0.0, "cpu", seq_len=T) == ("xla", "")
    # the kernel it would have picked cannot run: the XLA attention, and why
    impl, reason = attention_impl("auto", "float32", 0.0, "tpu", seq_len=1000)
    assert impl == "xla" and "1000 tokens" in reason
    impl, reason = attention_impl("auto", "bfloat16", 0.1, "gpu", seq_len=T)
    assert impl == "xla" and "cudnn attention has no dropout" in reason
    assert attention_impl("splash", "float32", 0.1, "tpu", seq_len=T, train=False) == ("splash", "")
    assert attention_impl("splash", "float32", 0.0, "tpu", seq_len=512) == ("splash", "")
    with pytest.raises(ConfigError, match=r"^model.attention='splash': splash attention is a TPU kernel; on GPUs"):
        attention_impl("splash", "float32", 0.0, "gpu", seq_len=T)
    for platform, dtype, where in (("cpu", "bfloat16", "cpu devices"), ("tpu", "bfloat16", "tpu devices"),
                                   ("gpu", "float32", "dtype=float32")):
        with pytest.raises(ConfigError, match=rf"^model.attention='cudnn': .* not on {where}; use 'auto'"):
            attention_impl("cudnn", dtype, 0.0, platform, seq_len=T)
    with pytest.raises(ValueError, match="attention='flash' must be one of xla, cudnn, splash, auto"):
        GPTConfig(attention="flash")


@needs_libtpu
def test_auto_is_splash_for_a_tpu_mesh_and_xla_for_a_cpu_mesh():
    auto = dict(attention="auto", dtype="float32", dropout=0.0, seq_len=1024)  # GPTConfig(attention="auto")'s
    tpu_mesh = sharding.make_mesh(data=4, devices=targets.topology("v5e:2x2").devices)
    with sharding.activate(tpu_mesh):  # an AOT compile on this CPU host targets these TPU devices
        assert attention_lib.context_platform() == "tpu" and attention_impl(**auto) == ("splash", "")
    with sharding.activate(sharding.make_mesh(data=8)):
        assert attention_lib.context_platform() == "cpu" and attention_impl(**auto) == ("xla", "")
    assert attention_impl(**auto) == ("xla", "")  # no mesh: jax.default_backend(), a CPU here


def test_training_with_splash_matches_xla(token_data, tmp_path, fresh_log):
    """The tiny config at block 128 (one splash tile), blocks under nn.scan and nn.remat: the losses
    of every step and of the evaluations agree."""
    losses = {}
    for attention in ("xla", "splash"):
        out = tmp_path / attention
        train(tiny_run_config(token_data, out, **{
            "model.attention": attention, "model.block_size": 128, "model.scan_layers": True,
            "model.remat": "full", "train.max_iters": 4, "train.eval_interval": 4, "train.log_interval": 1,
            "train.eval_iters": 1}))
        m = loggers.read_metrics(out)
        losses[attention] = {k: [v for v in m[k] if v is not None] for k in ("train/loss", "val/loss")}
    assert len(losses["xla"]["train/loss"]) == 4 and len(losses["xla"]["val/loss"]) == 2
    # the kernel ran (in interpret mode) and nothing fell back to XLA, not even the init's one-token trace
    assert any("interpret mode" in r.getMessage() for r in fresh_log.records) and not fallback_messages(fresh_log)
    for key in ("train/loss", "val/loss"):
        np.testing.assert_allclose(losses["splash"][key], losses["xla"][key], atol=1e-4, rtol=0)


@needs_libtpu
@pytest.mark.slow
def test_tpu_compile_with_splash_and_the_chunked_loss_holds_less_than_xla_attention_and_full_logits():
    """The tiny config widened to block 1024 and head size 64, compiled for a v5e-4 (data=4, 4 sequences
    per chip), with the step as it was (XLA attention, whole logits) and as it is (splash attention, the
    chunked loss in chunks of 128 positions): the new step's temporaries are smaller by at least the bf16
    (B, H, T, T) attention weights the XLA step keeps for each layer's backward pass plus one float32
    copy of the (B, T, V) logits."""
    from configs import tiny
    from nanogpt_jax import aot

    temps, reports = {}, {}
    for name, attention, loss in (("old", "xla", "full"), ("new", "splash", "chunked")):
        c = tiny.get_config()
        c.model.update(n_layer=2, n_head=4, n_embd=256, block_size=1024, vocab_size=2048, dtype="bfloat16",
                       scan_layers=True, attention=attention, loss=loss, loss_chunk=128)
        c.train.batch_size, c.mesh.data = 16, 4
        reports[name] = report = aot.compile_train_step(c, "v5e:2x2")
        assert report.error is None and report.fits
        temps[name] = report.memory["temp_size_in_bytes"]
    assert reports["old"].implementations == {"attention": "xla", "loss": "full"}
    assert reports["new"].implementations == {"attention": "splash", "loss": "chunked: 8 x 128 positions"}
    L, B_chip, H, T, V = 2, 4, 4, 1024, 2048
    assert temps["new"] < temps["old"] - L * B_chip * H * T * T * 2 - B_chip * T * V * 4, temps
