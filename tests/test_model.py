import math

import pytest
import torch
import torch.nn.functional as F

from nanogpt.model import GPT, GPTConfig, KVCache, lm_loss, sample_next


def test_forward_shapes_and_loss(tiny_model, tiny_config):
    idx = torch.randint(0, tiny_config.vocab_size, (3, 10))
    logits, loss = tiny_model(idx)
    assert logits.shape == (3, 10, tiny_config.vocab_size) and loss is None
    targets = torch.randint(0, tiny_config.vocab_size, (3, 10))
    logits, loss = tiny_model(idx, targets)
    expected = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
    torch.testing.assert_close(loss, expected)
    # a freshly initialised model predicts roughly uniformly
    assert abs(loss.item() - math.log(tiny_config.vocab_size)) < 0.5


def test_loss_ignores_minus_one(tiny_model):
    idx = torch.randint(0, 97, (2, 8))
    targets = torch.randint(0, 97, (2, 8))
    logits, _ = tiny_model(idx)
    masked = targets.clone()
    masked[:, 4:] = -1
    per_tok = lm_loss(logits, targets, reduction="none")
    assert per_tok.shape == (2, 8)
    torch.testing.assert_close(lm_loss(logits, masked), per_tok[:, :4].mean())


def test_predict_modes(tiny_model):
    idx = torch.randint(0, 97, (2, 12))
    full = tiny_model.predict(idx, targets=True)
    last = tiny_model.predict(idx, targets=False)
    assert full.shape == (2, 12, 97) and last.shape == (2, 1, 97)
    torch.testing.assert_close(last, full[:, -1:, :])
    torch.testing.assert_close(full, tiny_model(idx)[0])


def test_causality(tiny_model):
    idx = torch.randint(0, 97, (1, 12))
    changed = idx.clone()
    changed[0, 7:] = (changed[0, 7:] + 1) % 97
    a, b = tiny_model.predict(idx), tiny_model.predict(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_weight_tying_and_init(tiny_config):
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=16, vocab_size=97, n_layer=8, n_head=2, n_embd=256)
    model = GPT(cfg)
    assert model.lm_head.weight is model.transformer.wte.weight
    names = [n for n, _ in model.named_parameters()]
    assert "lm_head.weight" not in names  # counted once, as the token embedding
    proj = model.transformer.h[0].mlp.c_proj.weight
    assert proj.std().item() == pytest.approx(0.02 / math.sqrt(2 * cfg.n_layer), rel=0.1)
    assert model.transformer.h[0].mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert model.transformer.h[0].attn.c_attn.bias.abs().sum() == 0
    # a gradient through lm_head reaches the embedding
    _, loss = model(torch.randint(0, 97, (1, 4)), torch.randint(0, 97, (1, 4)))
    loss.backward()
    assert model.transformer.wte.weight.grad is not None


def test_tanh_gelu(tiny_model):
    mlp = tiny_model.transformer.h[0].mlp
    x = torch.randn(2, 3, 32)
    expected = mlp.c_proj(F.gelu(mlp.c_fc(x), approximate="tanh"))
    torch.testing.assert_close(mlp(x), expected)


@pytest.mark.parametrize(
    "shape", [(12, 12, 768), (24, 16, 1024), (36, 20, 1280), (48, 25, 1600)], ids=["gpt2", "m", "l", "xl"]
)
def test_param_count_matches_transformers(shape):
    transformers = pytest.importorskip("transformers")
    n_layer, n_head, n_embd = shape
    hf_cfg = transformers.GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=1024)
    with torch.device("meta"):
        hf = transformers.GPT2LMHeadModel(hf_cfg)
        ours = GPT(GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd))
    hf_count = sum(p.numel() for p in hf.parameters())
    assert ours.num_params() == hf_count
    expected = {768: 124_439_808, 1024: 354_823_168, 1280: 774_030_080, 1600: 1_557_611_200}
    assert hf_count == expected[n_embd]


def test_kv_cache_logits_match_full(tiny_model):
    idx = torch.randint(0, 97, (2, 10))
    full = tiny_model.predict(idx)
    cache = KVCache(tiny_model.config, 2, idx.device, torch.float32)
    first = tiny_model.lm_head(tiny_model._hidden(idx[:, :6], cache))
    rest = [tiny_model.lm_head(tiny_model._hidden(idx[:, i : i + 1], cache)) for i in range(6, 8)]
    chunk = tiny_model.lm_head(tiny_model._hidden(idx[:, 8:10], cache))  # several tokens at pos > 0
    torch.testing.assert_close(torch.cat([first, *rest, chunk], dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.0, None, None), (1.0, None, None), (0.8, 10, 0.9)])
def test_generate_cache_equals_recompute_past_block_size(tiny_model, temperature, top_k, top_p):
    idx = torch.randint(0, 97, (2, 5))
    n = 30  # block_size is 16: the last 19 steps slide the window
    outs = []
    for use_cache in (True, False):
        g = torch.Generator().manual_seed(123)
        outs.append(tiny_model.generate(idx, n, temperature, top_k, top_p, generator=g, use_cache=use_cache))
    assert outs[0].shape == (2, 5 + n)
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(outs[0][:, :5], idx)


def test_generate_crops_long_prompt(tiny_model):
    idx = torch.randint(0, 97, (1, 40))  # longer than block_size 16
    out = tiny_model.generate(idx, 3, temperature=0)
    ref = tiny_model.generate(idx[:, -16:], 3, temperature=0)
    assert out.shape == (1, 43) and torch.equal(out[:, -3:], ref[:, -3:])


def test_greedy_is_argmax_and_seeded_sampling_repeats(tiny_model):
    idx = torch.randint(0, 97, (1, 4))
    out = tiny_model.generate(idx, 1, temperature=0)
    assert out[0, -1] == tiny_model.predict(idx, targets=False)[0, -1].argmax()
    a = tiny_model.generate(idx, 8, generator=torch.Generator().manual_seed(7))
    b = tiny_model.generate(idx, 8, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_top_k_and_top_p_filtering():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        assert sample_next(logits, 1.0, top_k=2, generator=g).item() in (0, 1)
        assert sample_next(logits, 1.0, top_k=1, generator=g).item() == 0
        assert sample_next(logits, 1.0, top_p=0.01, generator=g).item() == 0
    probs = logits.softmax(-1)[0]  # 0.64, 0.24, 0.09, ...: top_p=0.8 keeps the first two
    assert probs[0] < 0.8 < probs[0] + probs[1]
    seen = {sample_next(logits, 1.0, top_p=0.8, generator=torch.Generator().manual_seed(s)).item()
            for s in range(200)}
    assert seen == {0, 1}


def test_stop_token_and_streaming_callback(tiny_model):
    idx = torch.randint(0, 97, (1, 3))
    first = tiny_model.generate(idx, 1, temperature=0)[0, -1].item()
    streamed = []
    out = tiny_model.generate(idx, 10, temperature=0, stop_token=first, callback=streamed.append)
    assert out.shape == (1, 4) and out[0, -1].item() == first
    assert [t.item() for t in streamed] == [first]
    # in a batch, finished rows are padded with the stop token until all rows stop
    batch = torch.randint(0, 97, (3, 3))
    full = tiny_model.generate(batch, 6, temperature=0)
    stop = full[0, 4].item()  # row 0 stops at its 2nd new token
    out = tiny_model.generate(batch, 6, temperature=0, stop_token=stop)
    assert torch.equal(out[0, :5], full[0, :5]) and (out[0, 5:] == stop).all()


def test_stream_yields_tokens(tiny_model):
    idx = torch.randint(0, 97, (2, 3))
    toks = list(tiny_model.stream(idx, 5, temperature=0))
    assert len(toks) == 5 and all(t.shape == (2, 1) for t in toks)
    assert torch.equal(torch.cat([idx, *toks], 1), tiny_model.generate(idx, 5, temperature=0))


def test_crop_block_size(tiny_model):
    tiny_model.crop_block_size(8)
    assert tiny_model.config.block_size == 8 and tiny_model.transformer.wpe.weight.shape[0] == 8
    assert tiny_model.predict(torch.randint(0, 97, (1, 8))).shape == (1, 8, 97)
    with pytest.raises(ValueError, match="exceeds block_size"):
        tiny_model.predict(torch.randint(0, 97, (1, 9)))
    with pytest.raises(ValueError, match="cannot grow"):
        tiny_model.crop_block_size(32)


def test_flops_per_token(tiny_model, tiny_config):
    n = tiny_model.num_params(non_embedding=True)
    assert n == tiny_model.num_params() - tiny_config.block_size * tiny_config.n_embd
    assert tiny_model.flops_per_token() == 6 * n + 12 * 2 * 32 * 16
    assert tiny_model.flops_per_token(seq_len=8) == 6 * n + 12 * 2 * 32 * 8


def test_bad_shape_rejected():
    with pytest.raises(ValueError, match="divisible"):
        GPT(GPTConfig(n_embd=30, n_head=4))
