import subprocess
import sys

import pytest
import torch
from conftest import tiny_train_overrides

from nanogpt.cli.sample import run
from nanogpt.config import SampleJob, SystemConfig, to_dataclass
from nanogpt.data.tokenizer import get_tokenizer
from nanogpt.errors import DataError
from nanogpt.inference import encode_prompt, stream_text
from nanogpt.trainer import Trainer


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory, token_data):
    from conftest import compose

    out = tmp_path_factory.mktemp("run")
    Trainer(to_dataclass(compose("train_shakespeare_char_cpu", tiny_train_overrides(token_data, out)))).train()
    return out


def job(out, **kw) -> SampleJob:
    return SampleJob(out_dir=str(out), system=SystemConfig(device="cpu"), **kw)


def test_samples_stream_and_repeat_with_seed(trained_dir, capsys):
    a = run(job(trained_dir, start="ABC", num_samples=2, max_new_tokens=20, seed=3))
    printed = capsys.readouterr().out
    assert len(a) == 2 and all(s.startswith("ABC") and len(s) == 23 for s in a)
    assert a[0] in printed and a[1] in printed  # streamed to stdout
    assert set("".join(a)) <= {chr(0x41 + i) for i in range(64)}  # the data's own characters
    assert run(job(trained_dir, start="ABC", num_samples=2, max_new_tokens=20, seed=3)) == a
    greedy = run(job(trained_dir, start="ABC", num_samples=2, max_new_tokens=10, temperature=0.0))
    assert greedy[0] == greedy[1]


def test_prompt_from_file_and_unknown_characters(trained_dir, tmp_path):
    (tmp_path / "p.txt").write_text("DEF")
    assert run(job(trained_dir, start=f"FILE:{tmp_path / 'p.txt'}", num_samples=1, max_new_tokens=5))[0][:3] == "DEF"
    with pytest.raises(DataError):
        run(job(trained_dir, start="abc?", num_samples=1, max_new_tokens=5))  # not in the vocabulary
    with pytest.raises(DataError, match="does not exist"):
        run(job(trained_dir, start="FILE:/nope.txt"))


def test_stream_text_stops_at_end_of_text():
    from nanogpt.model import GPT, GPTConfig

    tok = get_tokenizer("gpt2")
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=50257, n_layer=1, n_head=2, n_embd=16)).eval()
    with torch.no_grad():  # every final hidden state = the EOT embedding: EOT is always the argmax
        model.transformer.wte.weight[tok.eot_token] = 1.0
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(model.transformer.wte.weight[tok.eot_token])
    pieces: list[str] = []
    text = stream_text(model, tok, encode_prompt(tok, "Hello", "cpu"), 10, pieces.append, temperature=0.0)
    assert text == "" and pieces == []
    text = stream_text(model, tok, encode_prompt(tok, "Hello", "cpu"), 3, pieces.append, stop=False,
                       temperature=0.0)
    assert text == "<|endoftext|>" * 3


def test_sample_cli_runs(trained_dir):
    out = subprocess.run([sys.executable, "-m", "nanogpt.cli.sample", f"out_dir={trained_dir}", "start=AB",
                          "num_samples=1", "max_new_tokens=8", "system.device=cpu"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("AB") and "---------------" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "nanogpt.cli.sample", "out_dir=/nonexistent"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error:")
    assert len(bad.stderr.strip().splitlines()) == 1
