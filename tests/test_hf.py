"""Hugging Face interop, read back with transformers itself: load HF GPT-2 folders, export ours."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel

from nanogpt.checkpoint import model_payload, save_checkpoint
from nanogpt.config import to_dataclass
from nanogpt.errors import CheckpointError, ConfigError
from nanogpt.hf import PRETRAINED, export_hf, load_pretrained, pretrained_config
from nanogpt.model import GPT, GPTConfig

TINY = dict(n_layer=2, n_head=2, n_embd=32, n_positions=16, vocab_size=97)


def hf_model(seed: int = 0, **kw) -> GPT2LMHeadModel:
    """A random HF GPT-2; every parameter (LayerNorms and biases too) is random, so nothing hides."""
    torch.manual_seed(seed)
    cfg = GPT2Config(**{**TINY, **kw}, bos_token_id=None, eos_token_id=None)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    return model


def hf_logits(model: GPT2LMHeadModel, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(idx).logits


def ours(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(idx)[0]


def save_hub_style(hf: GPT2LMHeadModel, folder: Path) -> Path:
    """The layout of the real Hub checkpoints: no `transformer.` prefix, mask buffers, lm_head kept."""
    folder.mkdir()
    hf.config.to_json_file(folder / "config.json")
    n = hf.config.n_positions
    state = {k.removeprefix("transformer."): v.clone() for k, v in hf.state_dict().items()}
    for i in range(hf.config.n_layer):
        state[f"h.{i}.attn.bias"] = torch.ones(1, 1, n, n).tril()
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(state, str(folder / "model.safetensors"))
    return folder


# ---- import ------------------------------------------------------------------------------------


def test_load_save_pretrained_folder_matches_transformers(tmp_path):
    hf = hf_model()
    hf.save_pretrained(tmp_path)
    model = GPT.from_pretrained(str(tmp_path))
    idx = torch.randint(0, 97, (2, 16))
    torch.testing.assert_close(ours(model, idx), hf_logits(hf, idx), atol=1e-5, rtol=0)
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied after loading
    assert all(p.requires_grad and p.is_contiguous() for p in model.parameters())  # ready to finetune
    assert not model.training and model.transformer.wte.weight.device.type == "cpu"


def test_load_hub_layout_with_mask_buffers(tmp_path):
    hf = hf_model(seed=1)
    model = load_pretrained(save_hub_style(hf, tmp_path / "hub"))
    idx = torch.randint(0, 97, (1, 12))
    torch.testing.assert_close(ours(model, idx), hf_logits(hf, idx), atol=1e-5, rtol=0)


def test_load_sharded_folder(tmp_path):
    hf = hf_model(seed=2)
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    idx = torch.randint(0, 97, (1, 16))
    torch.testing.assert_close(ours(load_pretrained(tmp_path), idx), hf_logits(hf, idx), atol=1e-5, rtol=0)


def test_load_bf16(tmp_path):
    hf_model().save_pretrained(tmp_path)
    model = load_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.mark.slow
def test_real_gpt2_shape_by_name_from_offline_cache(tmp_path, monkeypatch):
    """gpt2 (124M) in a Hub cache under HF_HOME, loaded by name with HF_HUB_OFFLINE=1."""
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config()).eval()  # GPT2Config() is gpt2's shape
    repo = tmp_path / "hub" / "models--openai-community--gpt2"
    commit = "0123456789abcdef0123456789abcdef01234567"
    hf.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = load_pretrained("gpt2")
    assert model.config == pretrained_config("gpt2") and model.num_params() == 124_439_808
    idx = torch.randint(0, 50257, (1, 64))
    torch.testing.assert_close(ours(model, idx), hf_logits(hf, idx), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "name,shape,params",
    [("gpt2", (12, 12, 768), 124_439_808), ("gpt2-medium", (24, 16, 1024), 354_823_168),
     ("gpt2-large", (36, 20, 1280), 774_030_080), ("gpt2-xl", (48, 25, 1600), 1_557_611_200)],
)
def test_names_map_to_shapes(name, shape, params):
    cfg = pretrained_config(name)
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.vocab_size) == (*shape, 1024, 50257)
    with torch.device("meta"):  # parameter counts of OpenAI's checkpoints, without any download
        assert GPT(cfg).num_params() == params


def test_name_downloads_from_openai_community(monkeypatch):
    from huggingface_hub.errors import LocalEntryNotFoundError

    asked = []

    def fake_download(repo_id, filename, **kwargs):
        asked.append((repo_id, filename, kwargs["local_files_only"]))
        raise LocalEntryNotFoundError("connection refused")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", fake_download)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with pytest.raises(CheckpointError, match="Hub is unreachable.*local HF folder"):
        load_pretrained("gpt2-xl")
    assert asked == [("openai-community/gpt2-xl", "config.json", False)]


def test_offline_without_cache_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError) as e:
        load_pretrained("gpt2-medium")
    msg = str(e.value)
    assert "\n" not in msg and "HF_HUB_OFFLINE is set" in msg and str(tmp_path / "empty") in msg
    assert "hf download openai-community/gpt2-medium" in msg and "local HF folder" in msg


@pytest.mark.parametrize("name", ["gpt3", "GPT2", "openai-community/gpt2", "./no-such-folder"])
def test_unknown_name_lists_the_four(name):
    with pytest.raises(CheckpointError) as e:
        load_pretrained(name)
    assert "gpt2, gpt2-medium, gpt2-large, gpt2-xl" in str(e.value) and "folder" in str(e.value)


def test_missing_tensor_is_named(tmp_path):
    hf_model().save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["transformer.h.1.mlp.c_fc.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"tensor h\.1\.mlp\.c_fc\.weight is missing; .*re-download"):
        load_pretrained(tmp_path)


def test_misshaped_tensor_is_named_with_shapes(tmp_path):
    hf_model().save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["transformer.h.0.attn.c_attn.weight"] = torch.zeros(96, 32)  # Linear layout, not Conv1D's
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"h\.0\.attn\.c_attn\.weight has shape \(96, 32\).*\(32, 96\)"):
        load_pretrained(tmp_path)


def test_folder_without_weights_or_config(tmp_path):
    hf_model().save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_pretrained(tmp_path)


def test_untied_or_foreign_checkpoints_are_refused(tmp_path):
    hf = hf_model()
    hf.config.activation_function = "relu"
    hf.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="activation_function='relu'"):
        load_pretrained(tmp_path)
    folder = save_hub_style(hf_model(), tmp_path / "untied")
    state = load_file(folder / "model.safetensors")
    state["lm_head.weight"] = torch.zeros_like(state["lm_head.weight"])
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="ties them"):
        load_pretrained(folder)


def test_overrides_dropout_and_smaller_block_only(tmp_path):
    hf = hf_model()
    hf.save_pretrained(tmp_path)
    model = load_pretrained(tmp_path, dropout=0.1, block_size=8)  # what the trainer passes
    assert (model.config.dropout, model.config.block_size) == (0.1, 8)
    assert model.transformer.wpe.weight.shape == (8, 32)
    idx = torch.randint(0, 97, (1, 8))
    torch.testing.assert_close(ours(model.eval(), idx), hf_logits(hf, idx), atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="block_size=16 but 32"):
        load_pretrained(tmp_path, block_size=32)
    with pytest.raises(ConfigError, match="n_layer=2 but 12.*set model.n_layer=2"):
        load_pretrained(tmp_path, n_layer=12)
    with pytest.raises(ConfigError, match="unknown model setting 'depth'"):
        load_pretrained(tmp_path, depth=3)
    load_pretrained(tmp_path, vocab_size=97, bias=True)  # equal values are fine


# ---- export ------------------------------------------------------------------------------------


def tiny_gpt(seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**dict(block_size=16, vocab_size=97, n_layer=2, n_head=2, n_embd=32), **kw}))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    return model.eval()


@pytest.mark.parametrize("bias", [True, False])
def test_export_round_trip_char_vocab(tmp_path, bias):
    model = tiny_gpt(bias=bias)
    out = export_hf(model, tmp_path / "hf")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]  # no tokenizer
    hf = GPT2LMHeadModel.from_pretrained(out).eval()
    idx = torch.randint(0, 97, (2, 16))
    torch.testing.assert_close(hf_logits(hf, idx), ours(model, idx), atol=1e-5, rtol=0)
    back = load_pretrained(out)  # and back into ours (zero biases stand in for bias=False)
    torch.testing.assert_close(ours(back, idx), ours(model, idx), atol=1e-6, rtol=0)


def test_export_padded_gpt2_vocab_runs_in_a_pipeline(tmp_path):
    from transformers import AutoTokenizer, pipeline

    model = tiny_gpt(vocab_size=50304, block_size=32)
    out = export_hf(model, tmp_path / "hf")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["GPT2LMHeadModel"] and cfg["vocab_size"] == 50257
    assert {"vocab.json", "merges.txt", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    hf = GPT2LMHeadModel.from_pretrained(out).eval()
    idx = torch.randint(0, 50257, (1, 32))
    torch.testing.assert_close(hf_logits(hf, idx), ours(model, idx)[..., :50257], atol=1e-5, rtol=0)
    assert AutoTokenizer.from_pretrained(out).encode("hello world") == [31373, 995]
    gen = pipeline("text-generation", model=str(out), device="cpu")
    text = gen("Hello, my name is", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert text.startswith("Hello, my name is") and len(text) > len("Hello, my name is")


def test_export_checkpoint_file_uses_its_data_meta(tmp_path):
    model = tiny_gpt(vocab_size=65)
    meta = {"tokenizer": "char", "vocab_size": 65}
    save_checkpoint(model_payload(model, data_meta=meta), tmp_path / "best.pt")
    out = export_hf(tmp_path, tmp_path / "hf", dtype=torch.bfloat16)
    assert not (out / "vocab.json").exists()
    hf = GPT2LMHeadModel.from_pretrained(out, dtype=torch.float32).eval()
    idx = torch.randint(0, 65, (1, 16))
    torch.testing.assert_close(hf_logits(hf, idx), ours(model, idx), atol=0.1, rtol=0.05)  # bf16 weights


def test_export_cli(tmp_path, compose_cfg, capsys):
    from nanogpt.cli.export import run

    model = tiny_gpt()
    save_checkpoint(model_payload(model), tmp_path / "run" / "ckpt.pt")
    cfg = compose_cfg("export", [f"checkpoint={tmp_path / 'run'}", "prefer=latest"])
    out = run(to_dataclass(cfg, "export_schema"))
    assert out == tmp_path / "run" / "hf" and "from_pretrained" in capsys.readouterr().out
    idx = torch.randint(0, 97, (1, 16))
    hf = GPT2LMHeadModel.from_pretrained(out).eval()
    torch.testing.assert_close(hf_logits(hf, idx), ours(model, idx), atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="dtype"):
        to_dataclass(compose_cfg("export", ["dtype=int8"]), "export_schema")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        run(to_dataclass(compose_cfg("export", [f"checkpoint={tmp_path}"]), "export_schema"))


def test_export_console_script_error_is_one_line(tmp_path):
    script = Path(sys.executable).with_name("nanogpt-export")
    r = subprocess.run([str(script), f"checkpoint={tmp_path / 'nope'}"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "does not exist" in r.stderr


def test_pretrained_table_is_the_model_yaml(compose_cfg):
    for name in PRETRAINED:
        m = to_dataclass(compose_cfg("finetune_shakespeare", [f"model={name}"])).model
        assert m == pretrained_config(name)
