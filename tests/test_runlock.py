"""One live run per out_dir (nanogpt_jax.runlock): a local folder (an OS file lock) and a bucket (a lock object
created with a precondition, on the fake GCS server)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, OutputReader

from nanogpt_jax import runlock
from nanogpt_jax.errors import UserError
from nanogpt_jax.runlock import RunLock

HOLD = """
import sys, time
from nanogpt_jax.runlock import RunLock
lock = RunLock(sys.argv[1])
lock.acquire()
print("held", flush=True)
time.sleep(600)
"""


def _hold_in_another_process(out_dir) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out_dir)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        OutputReader(proc.stdout).wait_for("^held$", timeout=120)
    except BaseException:
        proc.kill()
        raise
    return proc


def test_a_local_folder_is_held_by_one_process_and_freed_when_it_dies(tmp_path):
    out = tmp_path / "run"
    holder = _hold_in_another_process(out)
    try:
        with pytest.raises(UserError) as e:
            RunLock(out).acquire()
        line = str(e.value)
        assert f"out_dir {str(out)!r} is in use by the run of pid {holder.pid} on host " in line, line
        assert "started 20" in line and "choose another --config.out_dir" in line and "\n" not in line
    finally:
        holder.send_signal(signal.SIGKILL)  # no clean-up runs: the kernel frees the lock
        holder.wait(30)
    with RunLock(out) as lock:  # the dead run's lock file is still there, and no obstacle
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
        with pytest.raises(UserError, match="is in use by the run of pid"):
            RunLock(out).acquire()  # a second lock in one process is refused too (flock is per open file)
    RunLock(out).acquire()  # released


def test_a_run_into_a_held_folder_is_refused_before_it_compiles(token_data, tmp_path):
    """check_free, at start-up: a live run's folder refuses a new run at once (not after its compile), through
    the CLI in one line; it creates nothing in a new folder and leaves a free folder free."""
    from test_run_folder import one_error_line, run_train_cli

    runlock.check_free(tmp_path / "new")
    assert not (tmp_path / "new").exists()
    out = tmp_path / "run"
    holder = _hold_in_another_process(out)
    try:
        with pytest.raises(UserError, match=f"is in use by the run of pid {holder.pid} on host "):
            runlock.check_free(out)
        done = run_train_cli(token_data, out, **{"train.max_iters": 5})
        assert f"is in use by the run of pid {holder.pid}" in one_error_line(done)
        assert "compile" not in done.stdout + done.stderr  # refused before the first step
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)
    runlock.check_free(out)  # the dead run's lock file is no obstacle
    RunLock(out).acquire()


def test_an_unwritable_folder_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match=r"out_dir=.*file/run' is not writable \(Not a directory\)"):
        RunLock(tmp_path / "file" / "run").acquire()


def test_a_bucket_lock_refuses_a_live_run_and_is_taken_over_from_a_dead_one(gcs_server, monkeypatch):
    monkeypatch.setattr(runlock, "REFRESH_S", 0.3)
    monkeypatch.setattr(runlock, "STALE_S", 2.0)
    out = gcs_server() + "/runs/a"
    first = RunLock(out)
    first.acquire()
    started = time.time()
    with pytest.raises(UserError) as e:  # the holder rewrites its lock: alive
        RunLock(out).acquire()
    assert time.time() - started < 2.0  # seen alive before the lock could go stale
    line = str(e.value)
    assert f"out_dir {out!r} is in use by the run of pid {os.getpid()} on host " in line and "\n" not in line, line
    first.release()
    second = RunLock(out)
    second.acquire()  # freed by release
    # the holder dies without releasing: its lock is not rewritten, goes stale, and a new run takes it over
    second._stop.set()
    generation = second._generation
    started = time.time()
    third = RunLock(out)
    third.acquire()
    assert runlock.STALE_S - 0.5 < time.time() - started < runlock.STALE_S + 3.0
    assert third._generation != generation
    with pytest.raises(UserError, match="is in use by"):
        RunLock(out).acquire()  # the new holder rewrites its lock
    third.release()
