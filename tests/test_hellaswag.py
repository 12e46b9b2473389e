"""HellaSwag: the file, rendering, padded batches, and acc / acc_norm_token / acc_norm_char as defined."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from nanogpt_jax import hellaswag, rows, sharding, step, tokenizer
from nanogpt_jax.errors import DataError
from nanogpt_jax.model import GPT, GPTConfig, init_params
from nanogpt_jax.scoring import Scorer, hellaswag_accuracy


class PieceTokenizer:
    """Greedy longest match over a fixed list of pieces, so a test decides how each ending splits into tokens."""

    name = "pieces"
    eot_token = None

    def __init__(self, pieces):
        self.pieces = list(pieces)
        self.n_vocab = len(self.pieces)

    def encode(self, text):
        ids, i = [], 0
        while i < len(text):
            matches = [p for p in self.pieces if text.startswith(p, i)]
            if not matches:
                raise DataError(f"no piece for {text[i:]!r}")
            best = max(matches, key=len)
            ids.append(self.pieces.index(best))
            i += len(best)
        return ids


def bigram(tok, probs):
    """A stand-in model: the next-token log-probabilities depend only on the current token (a table
    (V, V)); rows not given are uniform, a given row's unnamed tokens share what is left."""
    V = tok.n_vocab
    table = np.full((V, V), 1.0 / V)
    for a, row in probs.items():
        i = tok.pieces.index(a)
        table[i] = (1.0 - sum(row.values())) / (V - len(row))
        for b, p in row.items():
            table[i, tok.pieces.index(b)] = p
    return np.log(table).astype(np.float32)


def stub_accuracy(tok, table, examples, batch_size, mesh, block_size=16):
    scorer = Scorer(lambda t, x: t[x], mesh)  # log-probabilities are valid logits
    params = jax.device_put(jnp.asarray(table), NamedSharding(mesh, P()))
    rendered = [hellaswag.render(tok, ex, block_size) for ex in examples]
    return hellaswag_accuracy(scorer, params, rendered, batch_size=batch_size, block_size=block_size)


def example(ctx, endings, label):
    return {"ctx": ctx, "endings": endings, "label": label}


@pytest.fixture(scope="module")
def mesh1():
    return sharding.make_mesh(devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def mesh8():
    return sharding.make_mesh()


def test_the_ending_the_model_is_certain_of_is_picked(mesh1, mesh8):
    tok = PieceTokenizer(list(" qabcdefghixyz"))
    # after "q " the model is sure of "abc" and of nothing else
    table = bigram(tok, {"q": {" ": 0.99}, " ": {"a": 0.999}, "a": {"b": 0.999}, "b": {"c": 0.999}})
    examples = [example("q", ["xyz", "abc", "def", "ghi"], 1), example("q", ["xyz", "def", "ghi", "abc"], 3),
                example("q", ["abc", "xyz", "def", "ghi"], 2),  # labelled wrong: the model disagrees
                example("q" * 20, ["xyz", "defgh", "abc", "x"], 2)]  # longer rows: another length bucket
    for batch_size, mesh in ((1, mesh1), (3, mesh1), (8, mesh8)):
        r = stub_accuracy(tok, table, examples, batch_size, mesh, block_size=32)
        assert r["examples"] == 4 and r["row_lengths"] == ([16, 32] if batch_size < 4 else [32])
        for m in hellaswag.METRICS:
            assert r[m] == pytest.approx(3 / 4), (m, batch_size)


def test_acc_and_both_normalisations_score_as_defined(mesh1):
    tok = PieceTokenizer(["q", "r", " aaaa", " b", " c", " d"])
    table = bigram(tok, {"q": {" aaaa": 0.1, " b": 0.3, " c": 0.01, " d": 0.01}, " b": {" b": 0.3},
                         "r": {" aaaa": 0.05, " b": 0.06, " c": 0.01, " d": 0.01}})
    # after q: " aaaa" costs -ln 0.1 = 2.30 nats in 1 token / 4 characters; " b b" costs 2 x -ln 0.3 = 2.41 in
    # 2 tokens / 3 characters. acc picks " aaaa" (larger sum), acc_norm_token " b b" (1.20 < 2.30 per token),
    # acc_norm_char " aaaa" (0.58 < 0.80 per character).
    # after r: " aaaa" costs 3.00 (0.75 per character), " b" 2.81 in 1 token / 1 character: acc and
    # acc_norm_token pick " b", acc_norm_char " aaaa".
    cases = [(example("q", ["aaaa", "b b", "c", "d"], 0), [1, 0, 1]),
             (example("q", ["aaaa", "b b", "c", "d"], 1), [0, 1, 0]),
             (example("r", ["aaaa", "b", "c", "d"], 0), [0, 0, 1]),
             (example("r", ["aaaa", "b", "c", "d"], 1), [1, 1, 0])]
    for ex, expected in cases:
        r = stub_accuracy(tok, table, [ex], 1, mesh1)
        assert [r[m] for m in hellaswag.METRICS] == expected, ex


def test_rendering_scores_only_the_ending_and_keeps_it_when_cut():
    tok = PieceTokenizer(list(" abcdq"))
    r = hellaswag.render(tok, example("qq", ["ab", "abc", "d", "dd"], 2), block_size=16)
    assert r.rows[1] == tuple(tok.encode("qq abc")) and r.n_scored == (3, 4, 2, 3) and r.n_chars == (2, 3, 1, 2)
    cut = hellaswag.render(tok, example("q" * 40, ["abcd", "a", "b", "c"], 0), block_size=6)
    assert cut.rows[0] == tuple(tok.encode("qq abcd")) and cut.n_scored[0] == 5 and cut.length == 6
    x, y, mask, ids = next(rows.batches(r.rows, r.n_scored, 8, 16))
    assert x.shape == (8, 1, 16) and ids.tolist() == [2, 0, 3, 1, -1, -1, -1, -1]  # shortest rows first
    np.testing.assert_array_equal(mask[3, 0, :7], [0, 1, 1, 1, 1, 0, 0])  # y = "q abc": its last 4 are scored
    np.testing.assert_array_equal(y[3, 0, 1:5], tok.encode(" abc"))
    np.testing.assert_array_equal(x[3, 0, :5], tok.encode("qq ab"))
    assert rows.buckets(1024) == [16, 32, 64, 128, 256, 512, 1024] and rows.buckets(100)[-1] == 100


def test_a_tokenizer_that_cannot_encode_the_text_is_a_clear_error():
    with pytest.raises(DataError, match="use a GPT-2 model"):
        hellaswag.render(tokenizer.CharTokenizer(list("abc")), example("Hello.", ["a", "b", "c", "d"], 0), 16)


# ---- the real file and a real (tiny, random) GPT-2-vocabulary model -----------------------------


@pytest.fixture(scope="module")
def real_examples(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    examples = hellaswag.load(cache, limit=6)  # copied from the data mirror that conftest sets
    assert (cache / hellaswag.MIRROR_PATH).stat().st_size == 12_246_618
    assert len(examples) == 6 and (examples[0]["ind"], examples[0]["label"]) == (24, 3)
    return examples


@pytest.fixture(scope="module")
def gpt2_tiny():
    model = GPT(GPTConfig(block_size=16, vocab_size=50257, n_layer=1, n_head=2, n_embd=16))
    return model, init_params(model, jax.random.key(0))


def test_real_examples_give_the_same_result_on_1_and_8_devices_and_a_sharded_mesh(real_examples, gpt2_tiny):
    model, params = gpt2_tiny
    rendered = [hellaswag.render(tokenizer.gpt2(), ex, 16) for ex in real_examples]
    results = []
    for mesh, batch_size in ((sharding.make_mesh(devices=jax.devices()[:1]), 2), (sharding.make_mesh(), 8),
                             (sharding.make_mesh(2, 2, 2), 4)):
        placed = jax.device_put(params, step.param_shardings(model, mesh))
        scorer = Scorer(lambda p, x: model.apply({"params": p}, x), mesh)
        r = hellaswag_accuracy(scorer, placed, rendered, batch_size=batch_size, block_size=16)
        assert r["examples"] == 6 and r["row_lengths"] == [16]
        results.append({m: r[m] for m in hellaswag.METRICS})
    assert results[0] == results[1] == results[2]
    assert all(6 * v == round(6 * v) for v in results[0].values())


def test_padding_does_not_change_an_endings_score(real_examples):
    model = GPT(GPTConfig(block_size=64, vocab_size=50257, n_layer=1, n_head=2, n_embd=16))
    params = init_params(model, jax.random.key(1))
    r = hellaswag.render(tokenizer.gpt2(), real_examples[1], 64)
    scorer = Scorer(lambda p, x: model.apply({"params": p}, x), sharding.make_mesh(devices=jax.devices()[:1]))
    x, y, mask, _ = next(rows.batches(r.rows, r.n_scored, 4, 64))
    T = x.shape[-1]
    assert T < 64  # a shorter bucket than the block
    padded = [np.pad(a, ((0, 0), (0, 0), (0, 64 - T))) for a in (x, y, mask)]
    np.testing.assert_allclose(np.asarray(scorer(params, x, y, mask)), np.asarray(scorer(params, *padded)),
                               rtol=1e-5)
