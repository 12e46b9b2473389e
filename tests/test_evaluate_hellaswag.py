"""HellaSwag completion-style scoring (nanogpt.evaluate.hellaswag)."""

import pytest
import torch

from nanogpt.data.tokenizer import CharTokenizer, get_tokenizer
from nanogpt.errors import DataError
from nanogpt.evaluate import hellaswag_eval, load_hellaswag, run_tasks
from nanogpt.evaluate.hellaswag import render, score_endings
from nanogpt.model import GPT, GPTConfig

TOK = CharTokenizer(list(" abcdefghijklmnopqrstuvwxyz"))


class BigramTable(torch.nn.Module):
    """A stand-in model whose next-token probabilities depend only on the current character,
    so the log-probability of every ending is known exactly."""

    def __init__(self, probs: dict[str, dict[str, float]], block_size: int = 64):
        super().__init__()
        V = TOK.vocab_size
        table = torch.full((V, V), 1.0 / V, dtype=torch.float64)
        for a, row in probs.items():
            rest = (1.0 - sum(row.values())) / (V - len(row))  # the others share what is left
            table[TOK.encode(a)[0]] = rest
            for b, p in row.items():
                table[TOK.encode(a)[0], TOK.encode(b)[0]] = p
        self.register_buffer("logp", table.log().float())
        self.config = GPTConfig(block_size=block_size, vocab_size=V, n_layer=1, n_head=1, n_embd=1)
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the model a device

    def forward(self, idx, targets=None):
        return self.logp[idx], None  # logits (B, T, V): log-probabilities are valid logits


def example(ctx, endings, label):
    return {"ctx": ctx, "endings": endings, "label": label}


def test_the_certain_ending_is_picked():
    # after "q " the model is sure of "abc" and nothing else
    model = BigramTable({"q": {" ": 0.99}, " ": {"a": 0.999}, "a": {"b": 0.999}, "b": {"c": 0.999}})
    examples = [example("q", ["xyz", "abc", "def", "ghi"], 1), example("q", ["xyz", "def", "ghi", "abc"], 3),
                example("q", ["abc", "xyz", "def", "ghi"], 2)]  # the label is wrong: the model disagrees
    for batch_size in (1, 2, 8):
        r = hellaswag_eval(model, TOK, examples, batch_size=batch_size)
        assert (r["acc"], r["acc_norm"], r["examples"]) == (pytest.approx(2 / 3), pytest.approx(2 / 3), 3)


def test_acc_and_acc_norm_differ_when_lengths_differ():
    # " b" costs -log 0.2 = 1.61 in one token; " cccc" costs 2.30 + 3 * 0.01 in four: a larger sum
    # (acc prefers "b") but a smaller mean per token (acc_norm prefers "cccc")
    model = BigramTable({"q": {" ": 0.99}, " ": {"b": 0.2, "c": 0.1}, "c": {"c": 0.99}})
    endings = ["b", "cccc", "d", "e"]
    r0 = hellaswag_eval(model, TOK, [example("q", endings, 0)])
    r1 = hellaswag_eval(model, TOK, [example("q", endings, 1)])
    assert (r0["acc"], r0["acc_norm"]) == (1.0, 0.0)
    assert (r1["acc"], r1["acc_norm"]) == (0.0, 1.0)


def test_long_rows_keep_their_ending():
    model = BigramTable({" ": {"a": 0.999}, "a": {"b": 0.999}, "b": {"c": 0.999}}, block_size=6)
    r = hellaswag_eval(model, TOK, [example("q" * 40, ["xyz", "def", "abc", "ghi"], 2)])
    assert r["acc"] == r["acc_norm"] == 1.0


def test_a_char_vocabulary_that_cannot_encode_the_text_is_a_clear_error():
    with pytest.raises(DataError, match="GPT-2 tokenizer"):
        hellaswag_eval(BigramTable({}), TOK, [example("Hello.", ["a", "b", "c", "d"], 0)])


def test_first_real_examples_on_a_tiny_gpt2_vocab_model(tmp_path):
    examples = load_hellaswag(tmp_path, limit=5)  # copied from the data mirror set by conftest
    assert (tmp_path / "hellaswag" / "hellaswag_val.jsonl").stat().st_size == 12246618
    assert len(examples) == 5 and (examples[0]["ind"], examples[0]["label"]) == (24, 3)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=50257, n_layer=1, n_head=2, n_embd=16))
    r = hellaswag_eval(model, get_tokenizer("gpt2"), examples, batch_size=2)
    assert r["examples"] == 5 and r["acc"] * 5 == round(r["acc"] * 5) and 0 <= r["acc_norm"] <= 1
    metrics = run_tasks(model, get_tokenizer("gpt2"), ["hellaswag"], hellaswag_limit=5, cache_dir=str(tmp_path))
    assert metrics == {"eval/hellaswag_acc": r["acc"], "eval/hellaswag_acc_norm": r["acc_norm"]}


@torch.no_grad()
def test_padding_does_not_change_the_scores():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=50257, n_layer=2, n_head=2, n_embd=16)).eval()
    rows, n_end = render(get_tokenizer("gpt2"), example("A man is sitting on a roof. he",
                         ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                          "is holding a rubik's cube.", "starts pulling up roofing on a roof."], 3), 32)
    assert len({len(r) for r in rows}) > 1  # rows of different lengths share the padded batch
    sums, means = score_endings(model, rows, n_end, torch.device("cpu"))
    for i in range(4):
        alone, _ = score_endings(model, [rows[i]], [n_end[i]], torch.device("cpu"))
        assert sums[i].item() == pytest.approx(alone.item(), abs=1e-5)
    assert torch.allclose(means, sums / torch.tensor(n_end, dtype=torch.float64))
