"""A run folder is never damaged: re-runs, no-op resumes, crashes, out-of-memory and failed saves.

The promise (README, Training): every check that can refuse a run happens before anything is
written; nothing is written until the first step has run; logs append across resumes; a failed
save ends the run within seconds with the last good checkpoint intact.
"""

import hashlib
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, cli_env, free_port, make_unwritable, one_error_line, run_cli, tiny_run_config

from nanogpt_jax import loggers, storage
from nanogpt_jax.checkpoint import Checkpointer, checkpoint_dir
from nanogpt_jax.errors import UserError
from nanogpt_jax.run_folder import RUN_FILES
from nanogpt_jax.train import train


def run_train_cli(data_dir, out_dir, *args, env=None, **overrides):
    items = {"data.data_dir": data_dir, "out_dir": out_dir, **overrides}
    return run_cli("run_train.py", "--config", str(ROOT / "configs/tiny.py"),
                   *[f"--config.{k}={v}" for k, v in items.items()], *args, env=env)


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (relative path -> sha256), and every folder (-> 'dir')."""
    out = {}
    for p in sorted(folder.rglob("*")):
        out[str(p.relative_to(folder))] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def finished_run(token_data, tmp_path_factory):
    """A finished tiny run (20 steps, checkpoints at 10 and 20)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train(tiny_run_config(token_data, out))
    return out


def test_the_same_command_again_leaves_every_file_and_compiles_nothing(token_data, finished_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    before = snapshot(out)
    assert {"metrics.csv", "summary.json", "loss.png", "checkpoints/20"} <= set(before)
    done = run_train_cli(token_data, out, env=cli_env(JAX_LOG_COMPILES="1"))  # a compile would log a line
    line = one_error_line(done)
    assert "already holds a run (checkpoint step 20, metrics.csv" in line
    assert "--config.init_from=resume" in line and "new --config.out_dir" in line
    assert snapshot(out) == before


def _write_run_file(out, name: str) -> None:
    """One of run_folder.RUN_FILES as a run leaves it (TensorBoard's is a folder of event files); `out` is a
    local folder or a gs:// URL."""
    content = {"metrics.csv": "step,train/loss\n0,4.0\n", "summary.json": '{"iterations": 3}',
               "loss.png": b"\x89PNG\r\n\x1a\n", loggers.TB_DIR: b"events"}[name]
    target = storage.path(storage.join(str(out), name))
    if name == loggers.TB_DIR:
        target = target / "events.out.tfevents.1.host"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(content) if isinstance(content, bytes) else target.write_text(content)


def _bucket_snapshot(server, url: str) -> dict[str, str]:
    """Every object under `url` (name -> MD5 and generation), asked of the server directly."""
    import json
    import urllib.request

    bucket, _, prefix = url.removeprefix("gs://").partition("/")
    with urllib.request.urlopen(f"{server.url}/storage/v1/b/{bucket}/o?prefix={prefix}") as r:
        return {o["name"]: f"{o['md5Hash']} {o['generation']}" for o in json.load(r).get("items", [])}


@pytest.mark.parametrize("name", RUN_FILES)
@pytest.mark.parametrize("init_from", ["scratch", "resume"])
def test_the_logs_of_a_run_killed_before_its_first_checkpoint_are_kept(token_data, tmp_path, init_from, name):
    """Any one run file without a checkpoint (a run killed before its first save) refuses both a new run
    and a resume, in one message naming the file and the way out, and nothing in the folder changes."""
    out = tmp_path / "logs_only"
    (out / "checkpoints").mkdir(parents=True)  # a SIGKILL leaves the folder the checkpointer made
    _write_run_file(out, name)
    before = snapshot(out)
    # one message for both ways in, naming the way out (not "resume" from scratch and "scratch" from resume)
    with pytest.raises(UserError, match=rf"holds the logs of a run that saved no checkpoint \({re.escape(name)}\); "
                                        r"it cannot be resumed: delete the folder \(rm -r .*logs_only\)"):
        train(tiny_run_config(token_data, out, init_from=init_from))
    assert snapshot(out) == before


@pytest.mark.parametrize("name", RUN_FILES)
def test_a_new_run_into_a_folder_with_a_checkpoint_and_any_run_file_is_refused(token_data, finished_run, tmp_path,
                                                                             name):
    out = tmp_path / "run"
    shutil.copytree(finished_run / "checkpoints", out / "checkpoints")
    _write_run_file(out, name)
    before = snapshot(out)
    with pytest.raises(UserError, match=rf"already holds a run \(checkpoint step 20, {re.escape(name)}\); continue"):
        train(tiny_run_config(token_data, out))
    assert snapshot(out) == before


@pytest.mark.parametrize("name", RUN_FILES)
def test_a_bucket_out_dir_with_any_run_file_is_refused_and_left_alone(gcs_server, token_data, name):
    out = f"{gcs_server()}/run"
    _write_run_file(out, name)
    before = _bucket_snapshot(gcs_server, out)
    assert before
    with pytest.raises(UserError, match=rf"holds the logs of a run that saved no checkpoint \({re.escape(name)}\)"):
        train(tiny_run_config(token_data, out))
    assert _bucket_snapshot(gcs_server, out) == before


def test_a_resume_with_nothing_left_to_train_writes_nothing(token_data, finished_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    before = snapshot(out)
    summary = train(tiny_run_config(token_data, out, init_from="resume"))
    assert summary["iterations"] == 20 and summary["val_loss"] is not None  # the run's own summary.json
    assert snapshot(out) == before


def test_make_demo_twice(tmp_path):
    """The README's `make demo`, twice, with the tiny config: the second run resumes, finds nothing
    to train, leaves the run as it was and samples again; both exit 0."""
    out, data = tmp_path / "demo", tmp_path / "data"
    cmd = ["make", "-C", str(ROOT), "demo", f"PY={sys.executable}", "DEMO_DEPS=", f"DEMO_OUT={out}",
           f"DEMO_DATA={data}", "DEMO_CONFIG=configs/tiny.py",
           "DEMO_ARGS=--config.train.max_iters=4 --config.train.eval_interval=2 --config.sample.max_new_tokens=8"]
    first = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    before = snapshot(out)
    assert {"checkpoints/4", "summary.json", "loss.png", "metrics.csv"} <= set(before)
    second = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "nothing left to train" in second.stderr and "--config.init_from=resume" in second.stdout
    assert snapshot(out) == before
    assert "ROMEO:" in second.stdout  # sampled again


def test_kill_and_resume_logs_every_step_once(token_data, finished_run, tmp_path):
    """A run killed after its step-10 checkpoint logged steps past 10; the resume drops those rows
    and logs them again, so the CSV equals the uninterrupted run's: every step exactly once."""
    out = tmp_path / "killed"
    shutil.copytree(finished_run, out)
    shutil.rmtree(checkpoint_dir(out) / "20")  # as if killed after step 15 was logged, before the save at 20
    for name in ("summary.json", "loss.png"):
        (out / name).unlink()
    with open(out / "metrics.csv") as f:  # rows up to step 15, and half a row cut by the kill
        lines = f.read().splitlines(keepends=True)
    kept = [ln for ln in lines if not re.match(r"20[,.]", ln)]
    (out / "metrics.csv").write_text("".join(kept) + "20,2.")
    train(tiny_run_config(token_data, out, init_from="resume"))
    got, want = loggers.read_metrics(out), loggers.read_metrics(finished_run)
    assert got["step"] == want["step"] and len(set(got["step"])) == len(got["step"]) - 2  # 0, 10 and 20 twice:
    # (an evaluation row and a step row at each eval step, as in the uninterrupted run)
    assert got["train/loss"] == want["train/loss"] and got["val/loss"] == want["val/loss"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("val/loss")] == [0, 10, 20]  # TensorBoard shows each step once too


def test_an_impossible_shape_is_one_line_and_writes_nothing(token_data, tmp_path):
    """4M sequences per step: hundreds of GB of activations, far past this machine's memory. The memory
    estimator refuses it before compiling, in one line that names the fix, and nothing is written. (With
    train.check_memory=False, XLA's own RESOURCE_EXHAUSTED is the same one line: tests/test_oom.py injects
    it, since a real allocation that large depends on the host: with vm.overcommit_memory=1 the kernel's
    OOM killer ends the process instead.)"""
    out = tmp_path / "too_big"
    done = run_train_cli(token_data, out, **{"train.batch_size": 2**22, "mesh.data": 1}, env=cli_env(devices=1))
    line = one_error_line(done)
    assert line.startswith("error: out of device memory ("), line
    assert re.search(r"the memory estimator gives the train step [\d,.]+ GiB per device; [\d,.]+ GiB is "
                     r"(available on this host|left under this cgroup)", line), line
    assert "--config.train.check_memory=False" in line and "RESOURCE_EXHAUSTED" not in line, line
    assert all(key in line for key in ("train.batch_size", "model.block_size", "model.remat", "mesh.fsdp",
                                       "python -m nanogpt_jax.memory")), line
    assert not out.exists()


def test_a_run_that_fails_before_its_first_save_leaves_no_checkpoints_folder(token_data, tmp_path,
                                                                              nan_training_loss):
    out = tmp_path / "nan_early"
    with pytest.raises(UserError, match=r"non-finite.*\(no checkpoint yet\) is untouched"):
        train(tiny_run_config(token_data, out, **{"train.max_skipped": 2}))
    assert out.is_dir() and not checkpoint_dir(out).exists()


# ---- a failed save ends the run -------------------------------------------------------------------


def _wait_for(predicate, procs, seconds: float = 300) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("the run ended or stalled before the test could act: " +
                         " | ".join((p.communicate()[0] or "")[-1500:] for p in procs if p.poll() is not None))


def _restorable_steps(out) -> list[int]:
    with Checkpointer(checkpoint_dir(out), read_only=True) as ckpt:
        steps = ckpt.all_steps()
        ckpt.record(steps[-1])  # readable
    return steps


def _launch(data_dir, out_dir, n_processes: int, **overrides) -> list[subprocess.Popen]:
    port, procs = free_port(), []
    for i in range(n_processes):
        items = {"data.data_dir": data_dir, "out_dir": out_dir, **overrides}
        if n_processes > 1:
            items.update({"dist.coordinator_address": f"localhost:{port}", "dist.num_processes": n_processes,
                          "dist.process_id": i})
        procs.append(subprocess.Popen(
            [sys.executable, str(ROOT / "run_train.py"), "--config", str(ROOT / "configs/tiny.py"),
             *[f"--config.{k}={v}" for k, v in items.items()]],
            cwd=ROOT, env=cli_env(devices=8 // n_processes), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True))
    return procs


@pytest.mark.slow
@pytest.mark.parametrize("n_processes", [1, 2])
def test_a_save_that_fails_ends_the_run_on_every_process(token_data, tmp_path, n_processes):
    """The checkpoints folder stops taking writes during a run (as after lost permissions or a
    read-only remount): every process exits 1 within seconds with one error line naming the save,
    and the checkpoints saved before are intact."""
    out = tmp_path / "run"
    procs = _launch(token_data, out, n_processes, **{"train.max_iters": 100_000, "train.eval_interval": 10,
                                                      "train.log_interval": 1})
    restore = None
    try:
        _wait_for(lambda: (checkpoint_dir(out) / "10").is_dir(), procs)
        restore = make_unwritable(checkpoint_dir(out))
        outputs = [p.communicate(timeout=120)[0] for p in procs]  # a hang fails here
    finally:
        for p in procs:
            p.kill()
        if restore:
            restore()
    for i, (p, output) in enumerate(zip(procs, outputs, strict=True)):
        assert p.returncode == 1, f"process {i}:\n{output[-3000:]}"
        errors = [ln for ln in output.splitlines() if ln.startswith("error: ")]
        assert len(errors) == 1 and re.search(r"saving checkpoint step \d+ to .* failed \(", errors[0]), \
            f"process {i}:\n{output[-3000:]}"
        assert re.search(r"the committed checkpoints \([\d, ]*10[\d, ]*\) are intact", errors[0]), errors[0]
    assert 10 in _restorable_steps(out)


def test_a_background_save_failure_is_seen_without_a_new_save_and_exits(tmp_path):
    """The write probe before each save passes, then the save fails inside orbax's background
    thread: `check()` reports it without blocking, and the CLI's exit does not wait on the
    threads orbax leaves waiting for a signal that never comes."""
    code = f"""
import sys, time
import jax.numpy as jnp
from nanogpt_jax import checkpoint, checkpoint_faults, cli
from nanogpt_jax.errors import CheckpointError
sys.path.insert(0, {str(ROOT / "tests")!r})
from conftest import make_unwritable
ckpt = checkpoint.Checkpointer({str(tmp_path / "ck")!r})
ckpt.save(1, {{"w": jnp.ones(4)}}, record={{}})
ckpt.wait()
make_unwritable(ckpt._path)
checkpoint_faults.write_problem = lambda path: None  # as if the folder failed only after the probe
ckpt.save(2, {{"w": jnp.ones(4)}}, record={{}})
deadline = time.time() + 60
while time.time() < deadline:
    try:
        ckpt.check()
    except CheckpointError as e:
        print("seen by check()", flush=True)
        cli._fail_without_waiting(str(e))
    time.sleep(0.05)
print("never seen", flush=True)
"""
    try:
        done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=cli_env(devices=1), capture_output=True,
                              text=True, timeout=120)
    finally:
        make_unwritable(tmp_path / "ck", undo=True)
    assert done.returncode == 1 and "seen by check()" in done.stdout, done.stdout + done.stderr[-3000:]
    assert re.search(r"^error: saving checkpoint step 2 to .* failed", done.stderr, re.M), done.stderr[-3000:]
    assert (tmp_path / "ck" / "1").is_dir() and not (tmp_path / "ck" / "2").exists()


def test_eval_only_evaluates_and_writes_nothing(token_data, finished_run, tmp_path):
    out = tmp_path / "new"
    summary = train(tiny_run_config(token_data, out, **{"train.eval_only": True}))
    assert summary["iterations"] == 0 and summary["val_loss"] > 3.0  # the random initial model
    assert not out.exists()
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = snapshot(run)
    resumed = train(tiny_run_config(token_data, run, init_from="resume", **{"train.eval_only": True}))
    assert resumed["iterations"] == 20 and resumed["val_loss"] < summary["val_loss"] - 0.5  # the trained model
    assert snapshot(run) == before


@pytest.mark.slow
def test_two_runs_started_into_one_new_folder_one_trains_the_other_is_refused(token_data, tmp_path):
    """The same command twice at once (a second terminal, a job submitted twice): both pass the start-up checks
    of an empty folder; the first to run a step holds the folder, the other exits 1 in one line naming it (or,
    if the first has already finished, saying the folder holds a run), and the logs are one run's."""
    out = tmp_path / "run"
    procs = [_launch(token_data, out, 1, **{"train.max_iters": 200, "train.eval_interval": 100})[0]
             for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 1], "\n---\n".join(o[-3000:] for o in outputs)
    winner = next(p for p in procs if p.returncode == 0)
    refused = outputs[[p.returncode for p in procs].index(1)]
    errors = [line for line in refused.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in refused, refused[-3000:]
    assert (f"is in use by the run of pid {winner.pid} on host " in errors[0]
            or "already holds a run" in errors[0]), errors[0]
    rows = (out / loggers.CSV_NAME).read_text().splitlines()[1:]
    kinds = [(row.split(",")[0], tuple(bool(v) for v in row.split(",")[1:])) for row in rows]  # step, columns set
    assert len(kinds) == len(set(kinds)), rows  # one evaluation row and one training row per logged step at most
    assert not any(re.fullmatch(r"\d+,*", row) for row in rows), rows  # no blank rows such as "0,,,,,,"
    assert 200 in _restorable_steps(out)
