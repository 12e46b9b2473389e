import json
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_train_overrides

import nanogpt.model
from nanogpt.checkpoint import BEST, LATEST, load_checkpoint
from nanogpt.config import to_dataclass
from nanogpt.errors import ConfigError
from nanogpt.trainer import Trainer, TrainingError

PRESET = "train_shakespeare_char_cpu"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def make_job(compose_cfg, data, out, **extra):
    return to_dataclass(compose_cfg(PRESET, tiny_train_overrides(data, out, **extra)))


def weights(out_dir: Path, name: str = LATEST) -> dict[str, torch.Tensor]:
    return load_checkpoint(out_dir / name, prefer=name)["model"]


def launch(args: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def train_cmd(data: Path, out: Path, **extra) -> list[str]:
    return ["-m", "nanogpt.cli.train", f"--config-name={PRESET}", *tiny_train_overrides(data, out, **extra)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_loss_decreases_and_outputs_are_written(compose_cfg, token_data, tmp_path):
    summary = Trainer(make_job(compose_cfg, token_data, tmp_path, **{"train.max_iters": 40,
                                                                    "train.eval_interval": 20})).train()
    assert summary["iterations"] == 40
    assert summary["val_loss"] < math.log(64) - 1.0  # well below the uniform guess
    assert summary["best_val_loss"] <= summary["val_loss"]
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    for key in ("iterations", "train_loss", "val_loss", "val_loss_exact", "best_val_loss", "ms_per_iter",
                "tokens_per_sec", "mfu", "wall_seconds"):
        assert on_disk[key] is not None, key
    # the exact loss covers every val token; it agrees with nanogpt.evaluate on the saved weights
    from nanogpt.checkpoint import load_model
    from nanogpt.data.loader import open_split
    from nanogpt.evaluate import split_loss

    again = split_loss(load_model(tmp_path, prefer=LATEST), open_split(token_data, "val"), batch_size=4)
    assert again["loss"] == pytest.approx(summary["val_loss_exact"], abs=1e-6)
    assert again["tokens"] == 4000 - 1
    payload = load_checkpoint(tmp_path, prefer=LATEST)
    assert payload["iter_num"] == 40 and payload["config"]["train"]["max_iters"] == 40
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in payload["model"])
    assert (tmp_path / BEST).is_file()


class FixedBatches:
    def __init__(self, batches):
        self.batches = list(batches)

    def next(self):
        return self.batches.pop(0)


def test_gradient_accumulation_equals_one_big_batch(compose_cfg, token_data, tmp_path):
    torch.manual_seed(0)
    x = torch.randint(0, 64, (4, 32))
    y = torch.roll(x, -1, dims=1)
    small = Trainer(make_job(compose_cfg, token_data, tmp_path / "a", **{"data.batch_size": 2,
                                                                        "train.grad_accum_steps": 2}))
    big = Trainer(make_job(compose_cfg, token_data, tmp_path / "b", **{"data.batch_size": 4}))
    small.train_batches = FixedBatches([(x[:2], y[:2]), (x[2:], y[2:])])
    big.train_batches = FixedBatches([(x, y)])
    loss_small, norm_small = small.train_step()
    loss_big, norm_big = big.train_step()
    torch.testing.assert_close(loss_small, loss_big)  # the mean over micro-steps, not the last one
    torch.testing.assert_close(norm_small, norm_big)
    # Adam's first step is g / |g|: near-zero gradients amplify float noise, hence atol 1e-4
    # (a wrong accumulation would move weights by ~lr = 3e-3)
    for p, q in zip(small.model.parameters(), big.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-4, rtol=0)


def test_nan_loss_never_reaches_the_checkpoint(compose_cfg, token_data, tmp_path, monkeypatch):
    trainer = Trainer(make_job(compose_cfg, token_data, tmp_path, **{"train.max_bad_steps": 3}))
    real_loss = nanogpt.model.lm_loss

    def poisoned(logits, targets, reduction="mean"):
        loss = real_loss(logits, targets, reduction)
        return loss * float("nan") if trainer.iter_num >= 4 and trainer.model.training else loss

    monkeypatch.setattr(nanogpt.model, "lm_loss", poisoned)
    with pytest.raises(TrainingError, match="non-finite for 3 steps"):
        trainer.train()
    payload = load_checkpoint(tmp_path, prefer=LATEST)
    assert payload["iter_num"] == 4  # the evaluation at iter 4 was the last good one
    assert all(torch.isfinite(t).all() for t in payload["model"].values())
    # the skipped steps did not touch the weights either
    for name, p in trainer.model.state_dict().items():
        assert torch.equal(p, payload["model"][name]), name


@pytest.mark.slow
def test_sigterm_saves_a_resumable_checkpoint(token_data, tmp_path):
    proc = launch(train_cmd(token_data, tmp_path, **{"train.max_iters": 100000, "train.eval_interval": 100000}))
    for line in proc.stdout:
        if "iter 20/" in line:
            proc.send_signal(signal.SIGTERM)
            break
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "stopped at iter" in out
    payload = load_checkpoint(tmp_path, prefer=LATEST)
    assert 20 <= payload["iter_num"] < 100000


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_exact(token_data, tmp_path):
    run = {"train.max_iters": 300, "train.eval_interval": 100}
    ref = launch(train_cmd(token_data, tmp_path / "ref", **run))
    ref_out, _ = ref.communicate(timeout=300)
    assert ref.returncode == 0, ref_out

    crash = launch(train_cmd(token_data, tmp_path / "crash", **run))
    for line in crash.stdout:
        if "iter 130/" in line:
            crash.kill()  # SIGKILL: no handler, no cleanup
            break
    crash.communicate(timeout=60)
    assert crash.returncode == -signal.SIGKILL
    assert load_checkpoint(tmp_path / "crash", prefer=LATEST)["iter_num"] in (100, 200)

    resumed = launch(train_cmd(token_data, tmp_path / "crash", init_from="resume", **run))
    res_out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, res_out
    a, b = weights(tmp_path / "ref"), weights(tmp_path / "crash")
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa = json.loads((tmp_path / "ref" / "summary.json").read_text())
    sb = json.loads((tmp_path / "crash" / "summary.json").read_text())
    assert (sa["train_loss"], sa["val_loss"], sa["best_val_loss"]) == \
        (sb["train_loss"], sb["val_loss"], sb["best_val_loss"])
    # the per-step losses logged after the resume are those of the uninterrupted run
    losses = lambda text: [ln.split("| loss")[1].split("|")[0] for ln in text.splitlines()  # noqa: E731
                           if "iter 2" in ln and "| loss" in ln]
    assert losses(res_out)[-50:] == losses(ref_out)[-50:]


def torchrun(nproc: int, args: list[str], extra: list[str] | None = None) -> subprocess.Popen:
    return launch(["-m", "torch.distributed.run", *(extra or ["--standalone"]), f"--nproc_per_node={nproc}",
                   *args])


@pytest.mark.slow
def test_ddp_two_ranks_equal_one_rank_with_two_micro_steps(token_data, tmp_path):
    run = {"train.grad_accum_steps": 2, "train.max_iters": 8}
    single = launch(train_cmd(token_data, tmp_path / "one", **run))
    ddp = torchrun(2, train_cmd(token_data, tmp_path / "two", **run))
    out1, _ = single.communicate(timeout=300)
    out2, _ = ddp.communicate(timeout=300)
    assert single.returncode == 0, out1
    assert ddp.returncode == 0, out2
    s1 = json.loads((tmp_path / "one" / "summary.json").read_text())
    s2 = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert s2["world_size"] == 2
    for key in ("train_loss", "val_loss", "best_val_loss"):
        assert s1[key] == pytest.approx(s2[key], abs=1e-5), key
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert not list((tmp_path / "two").glob("*.tmp")) and not (tmp_path / "two" / "outputs").exists()


@pytest.mark.slow
def test_two_nodes_on_localhost_train_and_resume(token_data, tmp_path):
    def two_nodes(**run):
        port = free_port()
        procs = [torchrun(1, train_cmd(token_data, tmp_path, **run),
                          ["--nnodes=2", f"--node_rank={r}", "--master_addr=127.0.0.1", f"--master_port={port}"])
                 for r in (0, 1)]
        outs = [p.communicate(timeout=300)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outs

    two_nodes(**{"train.max_iters": 8, "train.grad_accum_steps": 2})
    assert load_checkpoint(tmp_path, prefer=LATEST)["iter_num"] == 8
    two_nodes(**{"train.max_iters": 12, "train.grad_accum_steps": 2, "init_from": "resume"})
    payload = load_checkpoint(tmp_path, prefer=LATEST)
    assert payload["iter_num"] == 12 and len(payload["rng"]) == 2


def test_finetune_preset_from_a_local_hf_model(compose_cfg, token_data, tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64))
    hf.save_pretrained(tmp_path / "hf")
    overrides = [f"init_from={tmp_path / 'hf'}", "model.block_size=32", f"data.data_dir={token_data}",
                 f"out_dir={tmp_path / 'out'}", "data.batch_size=2", "train.grad_accum_steps=2",
                 "train.max_iters=3", "train.eval_interval=3", "train.eval_iters=1", "system.device=cpu"]
    trainer = Trainer(to_dataclass(compose_cfg("finetune_shakespeare", overrides)))
    cfg = trainer.model.config
    assert (cfg.n_layer, cfg.n_embd, cfg.vocab_size, cfg.block_size) == (2, 32, 50257, 32)  # cropped from 64
    assert torch.equal(trainer.model.transformer.h[1].mlp.c_fc.weight, hf.transformer.h[1].mlp.c_fc.weight.T)
    summary = trainer.train()
    assert summary["iterations"] == 3 and math.isfinite(summary["val_loss"])
    assert load_checkpoint(tmp_path / "out", prefer=LATEST)["model_config"]["n_embd"] == 32


class Recorder:
    def __init__(self):
        self.rows = []

    def log(self, step, metrics):
        self.rows.append((step, metrics))

    def log_summary(self, summary):
        pass

    def close(self):
        pass


def test_eval_tasks_during_training_reach_the_loggers(compose_cfg, token_data, tmp_path, monkeypatch):
    import nanogpt.trainer

    rec = Recorder()
    monkeypatch.setattr(nanogpt.trainer, "build_loggers", lambda *a, **k: rec)
    job = make_job(compose_cfg, token_data, tmp_path, **{"train.eval_tasks": "[loss]",
                                                         "train.eval_tasks_interval": 8})
    Trainer(job).train()
    steps = [step for step, m in rec.rows if "eval/val_loss" in m]
    assert steps == [0, 8]
    with pytest.raises(ConfigError, match="eval_tasks"):
        make_job(compose_cfg, token_data, tmp_path, **{"train.eval_tasks": "[sample]"})
    with pytest.raises(ConfigError, match="multiple"):
        make_job(compose_cfg, token_data, tmp_path, **{"train.eval_tasks": "[loss]", "train.eval_tasks_interval": 6})


def test_compile_is_switched_off_with_a_log_line_where_it_cannot_work(tiny_model, monkeypatch, caplog):
    import nanogpt.runtime

    monkeypatch.setattr(nanogpt.runtime.shutil, "which", lambda name: None)
    assert nanogpt.runtime.compile_if_possible(tiny_model, torch.device("cpu")) is tiny_model
    assert "C++ compiler" in caplog.text
    assert nanogpt.runtime.compile_if_possible(tiny_model, torch.device("mps")) is tiny_model
