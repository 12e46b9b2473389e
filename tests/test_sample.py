"""run_sample.py: GPT-2-format weights from a local HF folder, a training run's checkpoint, prompts, errors."""

import pytest
from conftest import ROOT, cli_env, one_error_line, run_cli, tiny_run_config

from nanogpt_jax import sample
from nanogpt_jax.errors import CheckpointError, ConfigError, UserError


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("hf") / "tiny-gpt2"
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257)
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


def run_sample(*args, **env):
    return run_cli("run_sample.py", *args, env=cli_env(devices=1, **env))


@pytest.mark.slow
def test_run_sample_on_a_local_hf_folder_streams_text(hf_folder):
    done = run_sample("--config", str(ROOT / "configs/gpt2.py"), f"--config.init_from={hf_folder}",
                      "--config.sample.prompt=Hello, I am", "--config.sample.num_samples=2",
                      "--config.sample.max_new_tokens=12", "--config.sample.seed=3")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("Hello, I am")
    assert done.stdout.count("Hello, I am") == 2 and "---------------" in done.stdout  # both samples


def test_sample_from_a_training_run_uses_the_data_tokenizer(token_data, char_eval_run, tmp_path):
    c = tiny_run_config(token_data, char_eval_run, init_from="resume")  # reads the shared run (conftest), read-only
    c.sample.update(prompt="ABCDE", num_samples=3, max_new_tokens=20, temperature=0.0)

    class Capture:
        text = ""

        def write(self, s):
            Capture.text += s

        def flush(self):
            pass

    texts = sample.sample(c, out=Capture())
    assert len(texts) == 3 and all(len(t) == 20 for t in texts)
    assert texts[0] == texts[1] == texts[2]  # greedy: the same continuation for the same prompt
    assert set(texts[0]) <= {chr(0x41 + i) for i in range(64)}  # the data's own 64-character vocabulary
    assert Capture.text.startswith("ABCDE" + texts[0])  # the first sample streamed as generated
    c.sample.prompt = "FILE:" + str(tmp_path / "prompt.txt")
    (tmp_path / "prompt.txt").write_text("BCD")
    assert len(sample.sample(c, out=Capture())[0]) == 20


def test_sample_errors(token_data, tmp_path):
    c = tiny_run_config(token_data, tmp_path / "empty", init_from="resume")
    with pytest.raises(CheckpointError, match=r"init_from=resume: no latest checkpoint in .*; train first"):
        sample.sample(c)
    with pytest.raises(ConfigError, match="nothing to sample from"):
        sample.sample(tiny_run_config(token_data, tmp_path))
    with pytest.raises(UserError, match="cannot read it"):
        sample.read_prompt("FILE:/nonexistent/prompt.txt")


@pytest.mark.slow
def test_offline_gpt2_without_weights_is_one_line(tmp_path):
    done = run_sample("--config", str(ROOT / "configs/gpt2.py"), HF_HUB_OFFLINE="1",
                      HF_HOME=str(tmp_path / "empty-hf-home"))
    assert "HF_HOME" in one_error_line(done)
