"""FSDP (system.strategy=fsdp), activation checkpointing, sharded checkpoints and memory figures.

The multi-process tests launch real torchrun processes with gloo on the CPU, like test_trainer.
"""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch
from conftest import tiny_train_overrides

from nanogpt import distributed, fsdp
from nanogpt.checkpoint import LATEST, find_checkpoint, load_checkpoint, load_model
from nanogpt.config import to_dataclass
from nanogpt.errors import CheckpointError, ConfigError
from nanogpt.fsdp.__main__ import main as fsdp_main
from nanogpt.fsdp.__main__ import model_config
from nanogpt.model import GPT
from nanogpt.trainer import Trainer

PRESET = "train_shakespeare_char_cpu"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
# 4 micro-steps per step (2 per rank on 2 ranks); eval_iters=3 does not divide among 2 ranks
RUN = {"train.max_iters": 12, "train.eval_interval": 4, "train.eval_iters": 3, "train.grad_accum_steps": 4,
       "logger": "[console,csv]"}
FSDP = {"system.strategy": "fsdp", "system.activation_checkpointing": "true"}


def train_cmd(data: Path, out: Path, **extra) -> list[str]:
    return ["-m", "nanogpt.cli.train", f"--config-name={PRESET}", *tiny_train_overrides(data, out, **extra)]


def launch(args: list[str], nproc: int = 2) -> subprocess.Popen:
    """torchrun with nproc ranks (nproc=0: a plain single process)."""
    run = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc else []
    return subprocess.Popen([sys.executable, *run, *args], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def kill_all(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and every rank at once (torchrun starts each rank in its own session,
    so killing its process group would leave the ranks running)."""
    parent = psutil.Process(proc.pid)
    for p in [*parent.children(recursive=True), parent]:
        p.send_signal(signal.SIGKILL)


def finish(*procs: subprocess.Popen) -> None:
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out


def losses(out_dir: Path) -> dict[int, tuple[str, str]]:
    """step -> (train/loss, val/loss) as written in metrics.csv."""
    with open(out_dir / "metrics.csv") as f:
        return {int(r["step"]): (r["train/loss"], r["val/loss"]) for r in csv.DictReader(f)}


def summary(out_dir: Path) -> dict:
    return json.loads((out_dir / "summary.json").read_text())


def make_job(compose_cfg, data, out, **extra):
    return to_dataclass(compose_cfg(PRESET, tiny_train_overrides(data, out, **extra)))


# ---- in one process ------------------------------------------------------------------------


def test_config_keys_are_validated(compose_cfg, token_data, tmp_path):
    with pytest.raises(ConfigError, match="system.strategy='zero3'"):
        make_job(compose_cfg, token_data, tmp_path, **{"system.strategy": "zero3"})
    with pytest.raises(ConfigError, match="cpu_offload=true needs system.strategy=fsdp"):
        make_job(compose_cfg, token_data, tmp_path, **{"system.cpu_offload": "true"})
    job = make_job(compose_cfg, token_data, tmp_path, **{"system.strategy": "fsdp", "system.cpu_offload": "true"})
    assert job.system.strategy == "fsdp" and job.system.cpu_offload
    assert make_job(compose_cfg, token_data, tmp_path).system.strategy == "auto"


class FixedBatches:
    def __init__(self, batches):
        self.batches = list(batches)

    def next(self):
        return self.batches.pop(0)


def test_activation_checkpointing_gives_the_same_loss_and_gradients(compose_cfg, token_data, tmp_path):
    torch.manual_seed(0)
    x = torch.randint(0, 64, (4, 32))
    y = torch.roll(x, -1, dims=1)
    run = {"model.dropout": 0.1}  # the recomputation must replay the same dropout masks
    plain = Trainer(make_job(compose_cfg, token_data, tmp_path / "a", **run))
    ac_run = {**run, "system.activation_checkpointing": "true"}
    ac = Trainer(make_job(compose_cfg, token_data, tmp_path / "b", **ac_run))
    assert any("checkpoint" in type(m).__name__.lower() for m in ac.model.modules())
    for trainer in (plain, ac):
        torch.manual_seed(1)
        trainer.train_batches = FixedBatches([(x, y), (x, y)])
        trainer.results = [trainer.train_step() for _ in range(2)]
    for (loss_a, norm_a), (loss_b, norm_b) in zip(plain.results, ac.results, strict=True):
        assert loss_a.item() == loss_b.item() and norm_a.item() == norm_b.item()
    # the checkpoint format does not change: same keys, and it loads into a plain GPT
    a, b = plain.model.state_dict(), ac.model.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    GPT(plain.model.config).load_state_dict(b)


def test_sharded_checkpoint_in_one_process_survives_a_crash_mid_rename(compose_cfg, token_data, tmp_path):
    """A single process shards over a group of one; a crash between the two renames of a save
    leaves .ckpt.dcp.old, which resume falls back to; a half-written .tmp is ignored."""
    try:
        run = {"system.strategy": "fsdp", "train.final_eval": "false"}
        Trainer(make_job(compose_cfg, token_data, tmp_path, **run, **{"train.max_iters": 4})).train()
        with pytest.raises(CheckpointError, match="python -m nanogpt.fsdp convert"):
            find_checkpoint(tmp_path)
        os.replace(tmp_path / "ckpt.dcp", tmp_path / ".ckpt.dcp.old")
        (tmp_path / ".ckpt.dcp.tmp").mkdir()
        job = make_job(compose_cfg, token_data, tmp_path, **run, **{"train.max_iters": 8, "init_from": "resume"})
        trainer = Trainer(job)
        assert trainer.iter_num == 4
        assert trainer.train()["iterations"] == 8
        assert (tmp_path / "ckpt.dcp" / "trainer.pt").is_file()
        assert not (tmp_path / ".ckpt.dcp.old").exists() and not (tmp_path / ".ckpt.dcp.tmp").exists()
    finally:
        distributed.teardown()  # the group of one; later tests run without a process group


def test_memory_estimate(capsys):
    xl = model_config("gpt2-xl")
    ddp = fsdp.estimate_memory(xl, "ddp", 1)
    # 16 bytes per parameter: fp32 weights + grads + AdamW's two moments
    assert ddp["weights"] + ddp["grads"] + ddp["optimizer"] == pytest.approx(16 * 1_557_611_200 / 1e9)
    assert ddp["buffers"] == 0 and fsdp.estimate_memory(xl, "ddp", 8)["buffers"] == pytest.approx(ddp["weights"])
    sharded = fsdp.estimate_memory(xl, "fsdp", 8)
    assert sharded["optimizer"] == pytest.approx(ddp["optimizer"] / 8)
    ac = fsdp.estimate_memory(xl, "fsdp", 8, activation_checkpointing=True)
    assert ac["activations"] < sharded["activations"] / 3
    offload = fsdp.estimate_memory(xl, "fsdp", 1, "bfloat16", cpu_offload=True)
    assert offload["cpu_offloaded"] == pytest.approx(ddp["weights"] * 4) and offload["total"] < 5
    fsdp_main(["estimate", "--model", "gpt2-xl", "--strategy", "fsdp", "--world-size", "8"])
    assert "GB per rank" in capsys.readouterr().out
    fsdp_main(["estimate", "--table"])
    assert capsys.readouterr().out.count("| gpt2") == 4


# ---- real torchrun processes ---------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(token_data, tmp_path_factory) -> Path:
    """Two 2-rank runs of the same job side by side: DDP, and FSDP with activation checkpointing."""
    root = tmp_path_factory.mktemp("fsdp")
    finish(launch(train_cmd(token_data, root / "ddp", **RUN)),
           launch(train_cmd(token_data, root / "fsdp", **RUN, **FSDP)))
    return root


@pytest.mark.slow
def test_fsdp_matches_ddp(runs):
    ddp, sharded = losses(runs / "ddp"), losses(runs / "fsdp")
    assert list(ddp) == list(range(13))
    for step, (train, val) in ddp.items():
        for a, b in ((train, sharded[step][0]), (val, sharded[step][1])):
            assert (a == b == "") or float(a) == pytest.approx(float(b), abs=1e-4), step
    s = summary(runs / "fsdp")
    assert s["strategy"] == "fsdp" and s["world_size"] == 2 and len(s["peak_mem_gb_per_rank"]) == 2
    assert s["val_loss_exact"] == pytest.approx(summary(runs / "ddp")["val_loss_exact"], abs=1e-4)
    assert sorted(p.name for p in (runs / "fsdp").glob("*.dcp")) == ["best.dcp", "ckpt.dcp"]
    assert not list((runs / "fsdp").glob(".*.tmp")) and not (runs / "fsdp" / LATEST).exists()


@pytest.mark.slow
def test_sigkill_resume_is_exact_and_resumes_on_one_rank(runs, token_data, tmp_path):
    crash = launch(train_cmd(token_data, tmp_path / "crash", **RUN, **FSDP))
    for line in crash.stdout:
        if "iter 6/" in line:
            kill_all(crash)  # no handler, no cleanup: a node dying
            break
    crash.communicate(timeout=60)
    at = fsdp.load_run_state(tmp_path / "crash")["iter_num"]
    assert at in (4, 8)
    shutil.copytree(tmp_path / "crash", tmp_path / "one")
    resume = {**RUN, **FSDP, "init_from": "resume"}
    finish(launch(train_cmd(token_data, tmp_path / "crash", **resume)),
           launch(train_cmd(token_data, tmp_path / "one", **resume, **{"system.cpu_offload": "true"}), nproc=0))
    # two ranks again: bit-exact weights and the same losses at every step
    ref = load_checkpoint(fsdp.convert(runs / "fsdp" / "ckpt.dcp", tmp_path / "ref.pt"))
    got = load_checkpoint(fsdp.convert(tmp_path / "crash" / "ckpt.dcp", tmp_path / "got.pt"))
    assert got["iter_num"] == 12 and all(torch.equal(ref["model"][k], got["model"][k]) for k in ref["model"])
    assert losses(tmp_path / "crash") == losses(runs / "fsdp")
    # one process (2 ranks' shards, offloaded to CPU memory): the same run up to float noise
    one, expected = losses(tmp_path / "one"), losses(runs / "fsdp")
    for step in range(at + 1, 13):
        assert float(one[step][0]) == pytest.approx(float(expected[step][0]), abs=1e-4), step
    assert summary(tmp_path / "one")["val_loss"] == pytest.approx(summary(runs / "fsdp")["val_loss"], abs=1e-4)


@pytest.mark.slow
def test_conversion_gives_identical_logits_and_a_resumable_checkpoint(runs, compose_cfg, token_data, tmp_path):
    out = tmp_path / "converted"
    shutil.copytree(runs / "fsdp", out)
    fsdp_main(["convert", str(out)])  # every *.dcp in the out_dir: ckpt.pt and best.pt beside them
    assert (out / "ckpt.pt").is_file() and (out / "best.pt").is_file()
    # the 2-rank shards loaded in one process (no process group) vs the converted file
    run = fsdp.load_run_state(out)
    from_shards = GPT(load_model(out / "ckpt.pt").config)
    fsdp.load_sharded(from_shards, None, run)
    x = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(from_shards.eval()(x)[0], load_model(out / "ckpt.pt")(x)[0])
    # the converted file is a regular training checkpoint: DDP resumes from it
    job = make_job(compose_cfg, token_data, out, **{**RUN, "logger": "[console]", "init_from": "resume",
                                                    "train.eval_only": "true", "train.final_eval": "false"})
    trainer = Trainer(job)
    assert trainer.iter_num == 12 and not trainer.sharded
    assert trainer.train()["val_loss"] == pytest.approx(summary(runs / "fsdp")["val_loss"], abs=1e-5)
    small = tmp_path / "weights.pt"
    fsdp_main(["convert", str(out / "best.dcp"), str(small), "--model-only"])
    assert "optimizer" not in load_checkpoint(small) and small.stat().st_size < (out / "best.pt").stat().st_size
