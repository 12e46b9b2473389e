"""Exact loss over every token, the report, the CLI and training-time tasks (nanogpt.evaluate)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_train_overrides, write_token_data

from nanogpt.checkpoint import load_model, model_payload, save_checkpoint
from nanogpt.cli.eval import run
from nanogpt.config import to_dataclass
from nanogpt.data.loader import open_split
from nanogpt.data.tokenizer import get_tokenizer
from nanogpt.errors import ConfigError
from nanogpt.evaluate import markdown_table, plan_windows, run_task, run_tasks, split_loss, write_report
from nanogpt.evaluate.tasks import TaskOptions
from nanogpt.model import GPT, GPTConfig
from nanogpt.trainer import Trainer


def window_starts(n: int, window: int, stride: int) -> list[int]:
    """Written independently of plan_windows: starts 0, S, 2S, ... and one aligned to the end."""
    if n - 1 <= window:
        return [0]
    starts = list(range(0, n - 1 - window, stride))
    return starts + [n - 1 - window]


@torch.no_grad()
def brute_force_loss(model, tokens, window: int, stride: int) -> float:
    """Each target t on its own, from tokens[s:t] where s is the first window start that reaches t."""
    tokens = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
    starts = window_starts(len(tokens), window, stride)
    losses = []
    for t in range(1, len(tokens)):
        s = min(st for st in starts if st + window >= t)
        logits, _ = model(tokens[s:t][None])
        losses.append(F.cross_entropy(logits[0, -1].float(), tokens[t]).item())
    return sum(losses) / len(losses)


@pytest.mark.parametrize("n,window,stride", [(100, 16, 16), (100, 16, 5), (100, 16, 1), (17, 16, 4),
                                             (5, 16, 16), (2, 1, 1), (1000, 64, 48)])
def test_windows_score_every_target_once(n, window, stride):
    seen = np.zeros(n, dtype=int)
    for i, (start, k) in enumerate(plan_windows(n, window, stride)):
        w = min(window, n - 1)
        assert start + w <= n - 1 and 1 <= k <= w and (i > 0 or k == w)
        seen[start + w - k + 1 : start + w + 1] += 1
        assert w - k >= (w - stride if i else 0)  # each scored target has at least W - S context
    assert seen[0] == 0 and (seen[1:] == 1).all()


@pytest.mark.parametrize("stride", [16, 7, 1])
def test_split_loss_equals_brute_force(tiny_model, stride):
    tokens = np.random.default_rng(0).integers(0, 97, 61).astype(np.uint16)
    result = split_loss(tiny_model, tokens, stride=stride, batch_size=3)
    assert result["tokens"] == 60
    assert result["loss"] == pytest.approx(brute_force_loss(tiny_model, tokens, 16, stride), abs=1e-5)
    assert result["ppl"] == pytest.approx(np.exp(result["loss"]))


def test_stride_and_batch_do_not_matter_when_the_window_covers_everything(tiny_model):
    tokens = torch.randint(0, 97, (17,), generator=torch.Generator().manual_seed(1))
    results = [split_loss(tiny_model, tokens, stride=s, batch_size=b) for s in (16, 5, 1) for b in (1, 8)]
    assert {r["loss"] for r in results} == {results[0]["loss"]} and results[0]["tokens"] == 16
    short = split_loss(tiny_model, tokens[:9], block_size=12, stride=3)  # 8 targets < window 12
    assert short["loss"] == pytest.approx(brute_force_loss(tiny_model, tokens[:9], 12, 12), abs=1e-5)


def test_split_loss_is_deterministic_and_keeps_the_mode(tiny_model, tmp_path):
    tokens = np.random.default_rng(2).integers(0, 97, 300).astype(np.uint16)
    tokens.tofile(tmp_path / "val.bin")
    mm = np.memmap(tmp_path / "val.bin", dtype=np.uint16, mode="r")
    tiny_model.config.dropout = 0.5  # would make a training-mode forward random
    tiny_model.train()
    a = split_loss(tiny_model, mm, stride=8)
    b = split_loss(tiny_model, torch.from_numpy(tokens.astype(np.int64)), stride=8, batch_size=2)
    assert a["loss"] == pytest.approx(b["loss"], abs=1e-6) and a["tokens"] == b["tokens"] == 299
    assert tiny_model.training


def test_bad_window_settings_are_rejected(tiny_model):
    tokens = np.arange(50) % 97
    with pytest.raises(ConfigError, match="stride"):
        split_loss(tiny_model, tokens, stride=17)
    with pytest.raises(ConfigError, match="block_size"):
        split_loss(tiny_model, tokens, block_size=32)


def test_text_task_scores_every_token_of_a_file(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=50257, n_layer=1, n_head=2, n_embd=16)).eval()
    tok = get_tokenizer("gpt2")
    path = tmp_path / "wiki.test.raw"
    path.write_text(" = Robert Boulter = \n\n Robert Boulter is an English film and television actor . " * 4)
    result = run_task("text", model, tok, TaskOptions(text_files=[str(path)], stride=16))["wiki.test"]
    n = len(tok.encode(path.read_text()))
    assert result.count == n  # after <|endoftext|>, so every token of the file is scored
    assert set(result.metrics) == {"wiki.test_loss", "wiki.test_ppl"}


def test_report_has_one_row_per_model(tmp_path):
    records = [{"model": "out-a", "params": 1.5e6, "metrics": {"val_loss": 1.23456, "val_ppl": 3.43}},
               {"model": "gpt2", "params": 124e6, "metrics": {"hellaswag_acc": 0.2859, "hellaswag_acc_norm": 0.2955},
                "samples": [{"prompt": "Hi", "text": " there"}]}]
    json_path, md_path = write_report(records, tmp_path / "sub" / "report")
    assert [r["model"] for r in json.loads(json_path.read_text())] == ["out-a", "gpt2"]
    lines = md_path.read_text().splitlines()
    assert lines[0] == "| model | params | val_loss | val_ppl | hellaswag_acc | hellaswag_acc_norm |"
    assert lines[2] == "| out-a | 1.50M | 1.2346 | 3.43 | - | - |"
    assert lines[3] == "| gpt2 | 124.00M | - | - | 0.2859 | 0.2955 |"
    assert "Hi there" in md_path.read_text() and markdown_table(records) in md_path.read_text()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained for a few steps by the real Trainer, and its data."""
    from conftest import compose

    root = tmp_path_factory.mktemp("trained")
    data, out = write_token_data(root / "data"), root / "out"
    Trainer(to_dataclass(compose("train_shakespeare_char_cpu", tiny_train_overrides(data, out)))).train()
    return data, out


def test_trained_model_val_loss_matches_per_token_computation(trained):
    data, out = trained
    model = load_model(out)
    val = open_split(data, "val")
    result = split_loss(model, val)
    assert result["tokens"] == len(val) - 1
    sub = split_loss(model, val[:400])  # the brute force is slow: check the arithmetic on a prefix
    assert sub["loss"] == pytest.approx(brute_force_loss(model, val[:400], 32, 32), abs=1e-5)
    assert result["loss"] < np.log(64)  # it learned something


def test_cli_reports_what_split_loss_computes(trained, compose_cfg, capsys):
    data, out = trained
    overrides = [f"models=[{out}]", "tasks=[loss,sample]", "prompts=[ABC,xyz]", "max_new_tokens=8"]
    job = to_dataclass(compose_cfg("eval", overrides), "eval_schema")
    [record] = run(job)
    expected = split_loss(load_model(out), open_split(data, "val"))  # data_dir: recorded in the checkpoint
    assert record["metrics"]["val_loss"] == pytest.approx(expected["loss"], abs=1e-6)
    assert record["tasks"]["loss"]["tokens"] == expected["tokens"]
    assert len(record["samples"]) == 2 and record["tasks"]["sample"]["samples"] == 2
    saved = json.loads((out / "eval.json").read_text())
    assert saved[0]["metrics"] == record["metrics"]
    assert f"| {out} |" in (out / "eval.md").read_text()
    assert "val_loss" in capsys.readouterr().out


def test_run_tasks_gives_flat_metrics_for_the_loggers(trained):
    data, out = trained
    model = load_model(out).train()
    metrics = run_tasks(model, get_tokenizer("char", [chr(0x41 + i) for i in range(64)]), ["loss", "sample"],
                        data_dir=str(data), prompts=["AB"], max_new_tokens=4)
    assert set(metrics) == {"eval/val_loss", "eval/val_ppl"} and model.training


def test_eval_config_validates(compose_cfg):
    job = to_dataclass(compose_cfg("eval", ["models=[gpt2]", "tasks=[hellaswag,wikitext]"]), "eval_schema")
    assert job.tasks == ["hellaswag", "wikitext"] and job.hellaswag_limit is None and job.stride is None
    for overrides, message in ((["models=[]"], "models"), (["models=[a]", "tasks=[mmlu]"], "tasks"),
                               (["models=[a]", "tasks=[text]"], "text_files"),
                               (["models=[a]", "stride=0"], "stride")):
        with pytest.raises(ConfigError, match=message):
            to_dataclass(compose_cfg("eval", overrides), "eval_schema")
    with pytest.raises(ConfigError, match="neither"):
        run(to_dataclass(compose_cfg("eval", ["models=[no-such-dir]"]), "eval_schema"))


@pytest.mark.slow
def test_torchrun_two_ranks_report_the_same_numbers(token_data, tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=48, vocab_size=50257, n_layer=1, n_head=2, n_embd=16))
    ckpt = save_checkpoint(model_payload(model), tmp_path / "tiny.pt")
    args = ["-m", "nanogpt.cli.eval", f"models=[{ckpt}]", "tasks=[loss,hellaswag]", f"data_dir={token_data}",
            "hellaswag_limit=7", f"cache_dir={tmp_path}", "system.device=cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name, launcher in (("one", []), ("two", ["-m", "torch.distributed.run", "--standalone",
                                                 "--nproc_per_node=2"])):
        proc = subprocess.run([sys.executable, *launcher, *args, f"out={tmp_path / name}"], env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    one, two = (json.loads((tmp_path / f"{n}.json").read_text())[0] for n in ("one", "two"))
    assert one["metrics"]["val_loss"] == pytest.approx(two["metrics"]["val_loss"], abs=1e-6)
    assert one["metrics"]["hellaswag_acc_norm"] == two["metrics"]["hellaswag_acc_norm"]
    assert one["tasks"]["hellaswag"]["examples"] == two["tasks"]["hellaswag"]["examples"] == 7
    assert one["tasks"]["loss"]["tokens"] == two["tasks"]["loss"]["tokens"] == 3999
