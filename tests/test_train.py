"""The training run end to end: learning, files, exact resume, signals, NaN safety, bad input."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import DROPOUT, OPTIMIZERS, ROOT, OutputReader, cli_env, one_error_line, run_cli, tiny_run_config

from nanogpt_jax import loggers
from nanogpt_jax.checkpoint import Checkpointer, checkpoint_dir
from nanogpt_jax.errors import CheckpointError, ConfigError, DataError, UserError
from nanogpt_jax.train import train


def run_train_cli(*args, devices=8, **kwargs):
    return run_cli("run_train.py", "--config", str(ROOT / "configs/tiny.py"), *args, devices=devices, **kwargs)


def cli_args(data_dir, out_dir, **overrides) -> list[str]:
    items = {"data.data_dir": data_dir, "out_dir": out_dir, **overrides}
    return [f"--config.{k}={v}" for k, v in items.items()]


def restore_params(out_dir, step_=None):
    ckpt = Checkpointer(checkpoint_dir(out_dir), keep=2)
    s = step_ if step_ is not None else ckpt.latest_step()
    record = ckpt.record(s)
    from nanogpt_jax.model import GPT, GPTConfig, init_params

    model = GPT(GPTConfig(**record["model"]))
    abstract = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
    params, _ = ckpt.restore_params(abstract, s)
    ckpt.close()
    return jax.tree.map(np.asarray, params)


@pytest.fixture(scope="module")
def tiny_run(tiny_runs):
    """The tiny config for 20 steps with AdamW, dropout 0.1: checkpoints at 10 and 20, evaluations at 0, 10, 20."""
    return tiny_runs("adamw")


def saved_optimizer(out_dir) -> str:
    """optim.name of out_dir's latest checkpoint, as its record says."""
    with Checkpointer(checkpoint_dir(out_dir), read_only=True) as ckpt:
        return ckpt.record(ckpt.latest_step())["config"]["optim"]["name"]


def test_tiny_run_learns_and_writes_its_files(tiny_run):
    out, summary = tiny_run
    metrics = loggers.read_metrics(out)
    val = [v for v in metrics["val/loss"] if v is not None]
    assert len(val) == 3 and val[-1] < val[0] - 0.5, val  # evaluated at 0, 10, 20; it learns
    assert summary["iterations"] == 20 and summary["val_loss"] == pytest.approx(val[-1])
    assert summary["compilations"] == 1  # the step traced once
    # what ran: XLA attention on a CPU; 1 row per device x 32 tokens x 64-token vocabulary fits one chunk
    assert (summary["attention"], summary["loss"]) == ("xla", "chunked: 1 x 32 positions")
    assert set(summary) >= {"train_loss", "best_val_loss", "ms_per_step", "tokens_per_sec", "mfu", "wall_seconds",
                            "peak_device_memory_bytes", "flops_formula"}
    assert json.loads((out / "summary.json").read_text())["iterations"] == 20
    ckpt = Checkpointer(checkpoint_dir(out), keep=2)
    assert ckpt.latest_step() == 20
    record = ckpt.record(20)
    assert record["model"]["n_layer"] == 2 and record["data_dir"] and record["val_loss"] == pytest.approx(val[-1])
    ckpt.close()


def test_first_step_logs_its_compile_time_not_a_step_time(tiny_run):
    out, _ = tiny_run
    m = loggers.read_metrics(out)
    rows = [{k: v[i] for k, v in m.items() if v[i] is not None} for i in range(len(m["step"]))]
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [0, 5, 10, 15]  # log_interval 5
    first, *later = train_rows
    assert first["train/compile_seconds"] > 0
    assert not {"train/ms_per_step", "train/tokens_per_sec", "train/mfu"} & set(first)
    assert "eta" not in loggers.format_line(0, first, total_steps=20)
    for r in later:
        assert r["train/ms_per_step"] > 0 and r["train/tokens_per_sec"] > 0 and "train/compile_seconds" not in r
        assert "eta" in loggers.format_line(int(r["step"]), r, total_steps=20)


def test_tensorboard_events_read_back(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = tiny_run
    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"train/loss", "val/loss", "train/lr", "train/grad_norm", "train/tokens_per_sec"} <= set(tags)
    assert [e.step for e in acc.Scalars("val/loss")] == [0, 10, 20]


def test_resume_in_process_is_bit_identical(token_data, tmp_path, tiny_run):
    ref_out, _ = tiny_run
    out = tmp_path / "resumed"
    train(tiny_run_config(token_data, out, **{"train.max_iters": 10, **DROPOUT}))
    train(tiny_run_config(token_data, out, **{"init_from": "resume", **DROPOUT}))
    for a, b in zip(jax.tree.leaves(restore_params(out)), jax.tree.leaves(restore_params(ref_out)), strict=True):
        np.testing.assert_array_equal(a, b)
    assert loggers.read_metrics(out)["train/loss"] == loggers.read_metrics(ref_out)["train/loss"]


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_sigkill_then_resume_is_bit_identical(token_data, tmp_path, tiny_runs, optimizer):
    """A run killed (SIGKILL) once checkpoint 10 is on disk, at whatever step it had reached, resumes from its
    last checkpoint and ends bit for bit where the uninterrupted run does, logging each step once; with
    either optimizer (Muon's momentum is in the checkpoint, or the weights after the resume differ)."""
    run = {**DROPOUT, **OPTIMIZERS[optimizer]}
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(ROOT / "run_train.py"), "--config", str(ROOT / "configs/tiny.py"),
                             *cli_args(token_data, out, **{"train.max_iters": 100_000, **run})], cwd=ROOT,
                            env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not (checkpoint_dir(out) / "10").is_dir() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        proc.kill()
    with Checkpointer(checkpoint_dir(out), read_only=True) as ckpt:
        killed_at = ckpt.latest_step()
    n_steps = killed_at + 10  # one more checkpoint interval past the last checkpoint the killed run committed
    ref_out = tiny_runs(optimizer)[0]
    if n_steps != 20:  # a machine fast enough to pass checkpoint 20 before the kill: a reference that long
        ref_out = tmp_path / "reference"
        train(tiny_run_config(token_data, ref_out, **{"train.max_iters": n_steps, **run}))
    done = run_train_cli(*cli_args(token_data, out, init_from="resume", **{"train.max_iters": n_steps, **run}))
    assert done.returncode == 0, done.stderr[-2000:]
    assert saved_optimizer(out) == saved_optimizer(ref_out) == optimizer
    for a, b in zip(jax.tree.leaves(restore_params(out)), jax.tree.leaves(restore_params(ref_out)), strict=True):
        np.testing.assert_array_equal(a, b)
    got, want = loggers.read_metrics(out), loggers.read_metrics(ref_out)
    assert got["train/loss"] == want["train/loss"]
    assert got["step"] == want["step"]  # the rows the killed run logged past its checkpoint are not repeated


@pytest.mark.slow
def test_sigterm_saves_and_exits_zero(token_data, tmp_path):
    out = tmp_path / "term"
    proc = subprocess.Popen([sys.executable, str(ROOT / "run_train.py"), "--config", str(ROOT / "configs/tiny.py"),
                             *cli_args(token_data, out, **{"train.max_iters": 100_000, "train.eval_interval": 50_000,
                                                           "train.log_interval": 1})],
                            cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        try:
            if len(loggers.read_metrics(out).get("train/loss", [])) >= 3:
                break
        except DataError:  # no metrics yet
            pass
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, output[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_by_signal"] and summary["iterations"] >= 3
    ckpt = Checkpointer(checkpoint_dir(out), keep=2)
    assert ckpt.latest_step() == summary["iterations"]  # saved where it stopped
    ckpt.close()


def test_two_quick_ctrl_cs_stop_at_once(token_data, tmp_path):
    """The second of two Ctrl-Cs 50 ms apart, sent while steps run, stops at once: `error: interrupted`, exit 1,
    no traceback (the first alone finishes the step, saves and exits 0: test_sigterm_saves_and_exits_zero)."""
    out = tmp_path / "int"
    proc = subprocess.Popen([sys.executable, str(ROOT / "run_train.py"), "--config", str(ROOT / "configs/tiny.py"),
                             *cli_args(token_data, out, **{"train.max_iters": 100_000, "train.eval_interval": 50_000,
                                                           "train.log_interval": 1, "train.batch_size": 512})],
                            cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        stdout = OutputReader(proc.stdout)
        stdout.wait_for(r"step 2/100000 \| loss", timeout=240)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=240)
        output = stdout.text(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 1 and output.strip().splitlines()[-1] == "error: interrupted", output[-2000:]
    assert "Traceback" not in output, output[-2000:]


def test_two_ctrl_cs_during_one_long_c_call_count_as_two():
    """CPython runs a handler once for two signals that arrive while the main thread is in C (an XLA step,
    here a BLAS matmul); counted from the wakeup fd, the second still stops at once (CI saw it read as one)."""
    from nanogpt_jax.train import _StopFlag

    started = threading.Event()

    def press_twice():
        started.wait()
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    a = np.random.default_rng(0).standard_normal((3000, 3000))
    presser = threading.Thread(target=press_twice)
    presser.start()
    with pytest.raises(KeyboardInterrupt), _StopFlag() as stop:
        started.set()
        a @ a  # one C call of ~1 s with the GIL released: both Ctrl-Cs arrive inside it
        raise AssertionError(f"still running after both Ctrl-Cs (stop flag: {stop.signal})")
    presser.join()
    assert signal.set_wakeup_fd(-1) == -1  # __exit__ put the previous wakeup fd back


def test_an_mfu_above_100_percent_on_a_cpu_probes_the_peak_again(token_data, tmp_path, monkeypatch):
    """A cached CPU peak too low to be true (a probe on a busy machine) is measured again at the first MFU
    above 100%: the run logs no such MFU, and the cache holds the new figure for later runs."""
    from nanogpt_jax import metrics

    monkeypatch.setenv(metrics.CACHE_ENV, str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    path, key = tmp_path / "cache" / metrics.CPU_PEAK_FILE, metrics._machine_key("float32")
    path.write_text(json.dumps({key: {"flops": 1e3, "measured": "busy"}}))  # 1 kFLOP/s
    metrics._cpu_host_peak.cache_clear()
    try:
        train(tiny_run_config(token_data, tmp_path / "run", **{"train.max_iters": 4, "train.log_interval": 1}))
    finally:
        metrics._cpu_host_peak.cache_clear()
    mfus = [v for v in loggers.read_metrics(tmp_path / "run")["train/mfu"] if v is not None]
    assert len(mfus) == 3 and all(0 < v <= 1 for v in mfus), mfus  # steps 1-3 (step 0 compiles)
    assert json.loads(path.read_text())[key]["flops"] > 1e9


def test_nan_never_reaches_a_checkpoint(token_data, tmp_path, nan_training_loss):
    out = tmp_path / "nan"
    with pytest.raises(UserError, match=r"3 steps in a row up to step 2 had a non-finite loss"):
        train(tiny_run_config(token_data, out, **{"train.max_skipped": 3, "train.eval_interval": 2}))
    ckpt = Checkpointer(checkpoint_dir(out), keep=2)
    assert ckpt.all_steps() == [2]  # saved at the evaluation of step 2, before step 2 ran (step 0 is never saved)
    ckpt.close()
    # every update was skipped: what was saved is the untouched initial weights
    assert all(np.isfinite(p).all() for p in jax.tree.leaves(restore_params(out, 2)))


@pytest.mark.slow
def test_checkpoint_from_8_devices_resumes_on_1(token_data, tmp_path):
    out = tmp_path / "fsdp8"
    train(tiny_run_config(token_data, out, **{"train.max_iters": 10, "mesh.data": 1, "mesh.fsdp": 8}))
    saved = Checkpointer(checkpoint_dir(out), keep=2).record(10)["val_loss"]
    done = run_train_cli(*cli_args(token_data, out, init_from="resume", **{"train.max_iters": 12}), devices=1)
    assert done.returncode == 0, done.stderr[-2000:]
    val = loggers.read_metrics(out)["val/loss"]
    steps = loggers.read_metrics(out)["step"]
    assert val[steps.index(10)] == pytest.approx(saved, abs=1e-5)  # same weights, re-evaluated on 1 device


@pytest.mark.parametrize("overrides,error,message", [
    ({"train.batch_size": 12}, ConfigError, r"train.batch_size=12: must be divisible by mesh.data x mesh.fsdp = 8"),
    ({"mesh.data": 3}, ConfigError, r"mesh: data=3 x fsdp=1 x tensor=1 = 3 devices, but there are 8"),
    ({"init_from": "resume"}, CheckpointError, r"init_from=resume: no checkpoint in .*; train first"),
    ({"data.data_dir": "/nonexistent/data"}, DataError, r"data dir /nonexistent/data does not exist"),
    ({"model.block_size": 5000}, DataError, r"block_size"),
])
def test_bad_input_fails_before_training(token_data, tmp_path, overrides, error, message):
    out = tmp_path / "bad"
    with pytest.raises(error, match=message):
        train(tiny_run_config(token_data, out, **overrides))
    assert not (out / "summary.json").exists()
    if "model.block_size" not in overrides:  # found before out_dir is touched: nothing is written at all
        assert not out.exists()


def test_unwritable_out_dir(token_data, tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match=r"out_dir=.*file/out' is not writable"):
        train(tiny_run_config(token_data, tmp_path / "file" / "out"))


def test_truncated_checkpoint_is_a_one_line_error(token_data, tmp_path, tiny_run):
    """Checkpoint 20's state files cut in half (a disk that filled, a copy interrupted): resuming it is a
    CheckpointError in the library and one line through the CLI, naming the step and the folder."""
    import shutil

    out = tmp_path / "trunc"
    shutil.copytree(tiny_run[0] / "checkpoints", out / "checkpoints")
    damaged = sorted(p for p in (out / "checkpoints" / "20").rglob("*") if p.is_file() and p.stat().st_size > 0)
    for p in damaged:
        if "state" in str(p):
            p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(CheckpointError):  # max_iters past the checkpoint: the resume reads it
        train(tiny_run_config(token_data, out, init_from="resume", **{"train.max_iters": 30, **DROPOUT}))
    line = one_error_line(run_train_cli(*cli_args(token_data, out, init_from="resume",
                                                  **{"train.max_iters": 30, **DROPOUT})))
    assert "20" in line and str(out / "checkpoints") in line, line
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing written or removed


@pytest.mark.slow
@pytest.mark.parametrize("args,message", [
    (["--config.model.n_layers=4"], r"unknown config key 'n_layers' \(did you mean 'n_layer'\?\)"),
    (["--config.model.n_embd=33"], r"model.n_embd=33: must be divisible by model.n_head=2"),
    (["--config.data.data_dir=/nonexistent"], r"data dir /nonexistent does not exist"),
    (["--config.init_from=gpt5"], r"init_from='gpt5'"),
    (["--config.train.batch_size=0"], r"train.batch_size=0: must be > 0"),
])
def test_cli_errors_are_one_line(args, message, tmp_path):
    line = one_error_line(run_train_cli(f"--config.out_dir={tmp_path / 'out'}", *args))
    assert re.search(message, line), line


def test_cli_resume_without_a_checkpoint_is_one_line_and_writes_nothing(token_data, tmp_path):
    out = tmp_path / "never_trained"
    line = one_error_line(run_train_cli(*cli_args(token_data, out, init_from="resume")))
    assert "init_from=resume: no checkpoint in" in line and not out.exists()


@pytest.mark.parametrize("args,message", [
    (["--config", "configs/nope.py", "--config.out_dir=x"], r"^error: no config file 'configs/nope.py'; pass one of"),
    (["--config", "configs/nope.py"], r"no config file 'configs/nope.py'"),
    (["--config", "configs"], r"^error: cannot load --config: --config 'configs' is a folder; pass one of its files"),
    (["--config", "configs/shakespeare_char.py:gpu"], r"^error: configs/shakespeare_char.py: unknown variant 'gpu'"),
    (["--config", "configs/tiny.py", "--max_iters=5"], r"unknown flag --max_iters; .*--config.train.max_iters="),
    (["--config.train.max_iters=5"], r"^error: --config FILE is missing: --config.train.max_iters overrides"),
    (["--config", "configs/tiny.py", "--config.train.batch_size=abc"], r"'abc'$"),
])
def test_cli_config_file_and_flag_errors_are_one_line(args, message, tmp_path):
    line = one_error_line(run_cli("run_train.py", *args))
    assert re.search(message, line) and "Traceback" not in line, line


@pytest.mark.slow
def test_finetune_shakespeare_runs_from_a_local_hf_model(tmp_path):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from configs import finetune_shakespeare
    from nanogpt_jax import prepare

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=64, vocab_size=50257))
    hf.save_pretrained(tmp_path / "hf")
    prepare.shakespeare(tmp_path / "shakespeare")
    c = finetune_shakespeare.get_config()
    c.init_from, c.data.data_dir, c.out_dir = str(tmp_path / "hf"), str(tmp_path / "shakespeare"), str(tmp_path / "o")
    c.model.block_size = 32
    c.train.update(max_iters=2, batch_size=8, gradient_accumulation_steps=2, eval_interval=2, eval_iters=1)
    summary = train(c)
    assert summary["iterations"] == 2 and np.isfinite(summary["val_loss"])
    assert Path(c.out_dir, "checkpoints").is_dir()
