"""The Flax GPT-2: sizes, causality, prediction API, dtypes, scan/remat equivalence, the KV cache."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanogpt_jax.loss import lm_loss
from nanogpt_jax.model import GPT, GPT2_SIZES, GPTConfig, KVCache, crop_block_size, init_params

GPT2_PARAM_COUNTS = {"gpt2": 124_439_808, "gpt2-medium": 354_823_168, "gpt2-large": 774_030_080,
                     "gpt2-xl": 1_557_611_200}


@pytest.mark.parametrize("name", list(GPT2_SIZES))
@pytest.mark.parametrize("scan", [False, True])
def test_param_counts_equal_gpt2(name, scan):
    config = GPTConfig.gpt2(name, scan_layers=scan)
    assert GPT(config).num_params() == GPT2_PARAM_COUNTS[name]  # from jax.eval_shape of init
    assert config.num_params() == GPT2_PARAM_COUNTS[name]  # the formula MFU uses


def test_flops_per_token_is_nanogpts_formula():
    c = GPTConfig.gpt2("gpt2")
    n = 124_439_808 - 1024 * 768  # without position embeddings
    assert c.flops_per_token() == 6 * n + 12 * 12 * 768 * 1024


def test_param_tree_uses_hf_names(tiny_params, tiny_config):
    assert set(tiny_params) == {"wte", "wpe", "ln_f"} | {f"h_{i}" for i in range(tiny_config.n_layer)}
    block = tiny_params["h_0"]
    assert set(block) == {"ln_1", "attn", "ln_2", "mlp"}
    assert set(block["attn"]) == {"c_attn", "c_proj"} and set(block["mlp"]) == {"c_fc", "c_proj"}
    D, H = tiny_config.n_embd, tiny_config.n_head
    assert block["attn"]["c_attn"]["kernel"].shape == (D, 3, H, D // H)
    assert block["attn"]["c_proj"]["kernel"].shape == (H, D // H, D)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(tiny_params))


def test_init_follows_nanogpt(tiny_config):
    c = dataclasses.replace(tiny_config, n_embd=256, n_head=4, n_layer=8)
    p = init_params(GPT(c), jax.random.key(0))
    assert np.std(p["h_0"]["mlp"]["c_fc"]["kernel"]) == pytest.approx(0.02, rel=0.05)
    assert np.std(p["h_0"]["mlp"]["c_proj"]["kernel"]) == pytest.approx(0.02 / np.sqrt(2 * 8), rel=0.05)
    assert np.std(p["h_0"]["attn"]["c_proj"]["kernel"]) == pytest.approx(0.02 / np.sqrt(2 * 8), rel=0.05)
    assert np.std(p["wte"]["embedding"]) == pytest.approx(0.02, rel=0.05)
    assert not np.any(p["h_0"]["attn"]["c_attn"]["bias"]) and np.all(p["ln_f"]["scale"] == 1)


def test_causal(tiny_config, tiny_params):
    lm = GPT(tiny_config).bind({"params": tiny_params})
    idx = jax.random.randint(jax.random.key(1), (2, 12), 0, tiny_config.vocab_size)
    changed = idx.at[:, 7].set((idx[:, 7] + 1) % tiny_config.vocab_size)
    a, b = lm.predict(idx), lm.predict(changed)
    np.testing.assert_array_equal(a[:, :7], b[:, :7])  # the past never sees the future
    assert not np.allclose(a[:, 7:], b[:, 7:])


def test_predict_last_equals_full_last_row(tiny_config, tiny_params):
    lm = GPT(tiny_config).bind({"params": tiny_params})
    idx = jax.random.randint(jax.random.key(2), (3, 9), 0, tiny_config.vocab_size)
    full, last = lm.predict(idx), lm.predict(idx, targets=False)
    assert full.shape == (3, 9, tiny_config.vocab_size) and last.shape == (3, 1, tiny_config.vocab_size)
    np.testing.assert_allclose(last, full[:, -1:], atol=1e-6)


def test_bf16_compute_returns_fp32_logits(tiny_config, tiny_params):
    lm = GPT(dataclasses.replace(tiny_config, dtype="bfloat16")).bind({"params": tiny_params})
    idx = jnp.arange(8)[None] % tiny_config.vocab_size
    logits = lm.predict(idx)
    assert logits.dtype == jnp.float32
    ref = GPT(tiny_config).bind({"params": tiny_params}).predict(idx)
    # bf16 keeps 8 significant bits (relative rounding 2**-8): its logits are float32's up to a few
    # roundings of the logits' scale (measured: max 0.0018 on logits of std 0.12), and not exactly equal
    error = float(np.abs(np.asarray(logits) - np.asarray(ref)).max())
    assert 0 < error < 8 * 2**-8 * float(np.std(ref)), (error, float(np.std(ref)))


def stack_layers(params, n_layer):
    """Non-scanned params -> the scanned layout (a leading layer axis under h)."""
    out = {k: v for k, v in params.items() if not k.startswith("h_")}
    out["h"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[params[f"h_{i}"] for i in range(n_layer)])
    return out


@pytest.mark.parametrize("remat", ["none", "full", "dots_with_no_batch_dims_saveable"])
def test_scan_and_remat_give_the_same_function(tiny_config, tiny_params, remat):
    idx = jax.random.randint(jax.random.key(3), (2, 16), 0, tiny_config.vocab_size)
    ref_model = GPT(tiny_config)

    def loss(model, params):
        return lm_loss(model.apply({"params": params}, idx[:, :-1]), idx[:, 1:])

    ref_loss, ref_grads = jax.value_and_grad(lambda p: loss(ref_model, p))(tiny_params)
    scanned = GPT(dataclasses.replace(tiny_config, scan_layers=True, remat=remat))
    s_loss, s_grads = jax.value_and_grad(lambda p: loss(scanned, p))(stack_layers(tiny_params, 2))
    np.testing.assert_allclose(s_loss, ref_loss, rtol=1e-6)
    np.testing.assert_allclose(s_grads["h"]["mlp"]["c_fc"]["kernel"][1],
                               ref_grads["h_1"]["mlp"]["c_fc"]["kernel"], atol=1e-6)
    rematted = GPT(dataclasses.replace(tiny_config, remat=remat))
    np.testing.assert_allclose(loss(rematted, tiny_params), ref_loss, rtol=1e-6)


@pytest.mark.parametrize("scan", [False, True])
def test_recomputing_layer_norms_and_gelus_changes_no_value(tiny_config, tiny_params, monkeypatch, scan):
    """On accelerators the backward pass recomputes LayerNorms and GELUs (`recompute_elementwise`);
    forced on here, the loss and every gradient are those of the plain CPU path."""
    from nanogpt_jax import layers

    idx = jax.random.randint(jax.random.key(4), (2, 16), 0, tiny_config.vocab_size)
    model = GPT(dataclasses.replace(tiny_config, scan_layers=scan))
    params = stack_layers(tiny_params, 2) if scan else tiny_params

    def loss(p):
        return model.apply({"params": p}, idx[:, :-1], idx[:, 1:], method=GPT.losses).mean()

    ref_loss, ref_grads = jax.value_and_grad(loss)(params)
    # jax.checkpoint's primitive is remat2; fresh lambdas, since make_jaxpr caches traces per function
    assert "remat" not in str(jax.make_jaxpr(lambda p: loss(p))(params))
    monkeypatch.setattr(layers, "recompute_elementwise", lambda: True)
    assert str(jax.make_jaxpr(lambda p: loss(p))(params)).count("remat") >= 4  # ln_1, ln_2, mlp.c_proj, ln_f
    out_loss, out_grads = jax.value_and_grad(lambda p: loss(p))(params)
    np.testing.assert_allclose(out_loss, ref_loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(out_grads), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scan", [False, True])
def test_kv_cache_decode_equals_full_forward(tiny_config, tiny_params, scan):
    config = dataclasses.replace(tiny_config, scan_layers=scan)
    params = stack_layers(tiny_params, 2) if scan else tiny_params
    lm = GPT(config).bind({"params": params})
    idx = jax.random.randint(jax.random.key(4), (2, 16), 0, config.vocab_size)
    full = lm.predict(idx)
    logits, cache = lm.decode(idx[:, :5], KVCache.zeros(config, 2), 0)  # prefill 5 tokens
    np.testing.assert_allclose(logits, full[:, 4], atol=1e-5)
    for t in range(5, 16):  # then one token at a time, up to the full block
        logits, cache = lm.decode(idx[:, t:t + 1], cache, t)
        np.testing.assert_allclose(logits, full[:, t], atol=1e-5)


def test_dropout_is_active_only_when_training(tiny_config, tiny_params):
    config = dataclasses.replace(tiny_config, dropout=0.5)
    model = GPT(config)
    idx = jnp.arange(10)[None]
    a = model.apply({"params": tiny_params}, idx, deterministic=False, rngs={"dropout": jax.random.key(0)})
    b = model.apply({"params": tiny_params}, idx, deterministic=False, rngs={"dropout": jax.random.key(1)})
    assert not np.allclose(a, b)
    np.testing.assert_allclose(model.apply({"params": tiny_params}, idx),
                               GPT(tiny_config).apply({"params": tiny_params}, idx), atol=1e-6)


def test_crop_block_size(tiny_config, tiny_params):
    model, params = crop_block_size(GPT(tiny_config), tiny_params, 8)
    assert model.config.block_size == 8 and params["wpe"]["embedding"].shape == (8, tiny_config.n_embd)
    idx = jnp.arange(8)[None]
    np.testing.assert_allclose(model.apply({"params": params}, idx),
                               GPT(tiny_config).apply({"params": tiny_params}, idx), atol=1e-6)
    with pytest.raises(ValueError, match="cannot grow"):
        crop_block_size(GPT(tiny_config), tiny_params, 32)


def test_too_long_input_and_bad_config_raise(tiny_config, tiny_params):
    with pytest.raises(ValueError, match="exceeds block_size"):
        GPT(tiny_config).apply({"params": tiny_params}, jnp.zeros((1, 17), jnp.int32))
    with pytest.raises(ValueError, match="n_embd=30 must be divisible by n_head=4"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="dtype"):
        GPTConfig(dtype="int8")
