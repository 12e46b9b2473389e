"""Multi-process runs: start-up settings, and 2 real processes x 4 CPU devices (jax.distributed over
gloo on localhost) against 1 process x 8 devices: same losses, a SIGTERM to one process saves the
same step on both, and that checkpoint resumes in one process."""

import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import DROPOUT, OPTIMIZERS, ROOT, free_port, tiny_run_config

from nanogpt_jax import distributed, loggers
from nanogpt_jax.checkpoint import Checkpointer, checkpoint_dir
from nanogpt_jax.config import validate
from nanogpt_jax.errors import ConfigError, DataError
from nanogpt_jax.model import GPT, GPTConfig, init_params
from nanogpt_jax.train import train


@pytest.fixture
def no_cluster_env(monkeypatch):
    for name in (*distributed.ENV_VARS.values(), "SLURM_JOB_ID", "SLURM_NTASKS", "OMPI_MCA_orte_hnp_uri"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_config_wins_over_environment(no_cluster_env, token_data, tmp_path):
    no_cluster_env.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.2:1234")
    no_cluster_env.setenv("JAX_NUM_PROCESSES", "4")
    no_cluster_env.setenv("JAX_PROCESS_ID", "3")
    c = tiny_run_config(token_data, tmp_path, **{"dist.process_id": 1})
    assert distributed.explicit_params(c) == {"coordinator_address": "10.0.0.2:1234", "num_processes": 4,
                                              "process_id": 1}
    no_cluster_env.setenv("JAX_NUM_PROCESSES", "four")
    with pytest.raises(ConfigError, match=r"JAX_NUM_PROCESSES='four': must be an integer"):
        distributed.explicit_params(c)


def test_one_process_is_left_alone(no_cluster_env, token_data, tmp_path):
    assert distributed.detected_cluster() is None
    assert not distributed.initialize(tiny_run_config(token_data, tmp_path))
    assert not distributed.initialize(tiny_run_config(token_data, tmp_path, **{"dist.num_processes": 1}))
    assert not jax.distributed.is_initialized() and jax.process_count() == 1
    assert not distributed.preemption_sync_point(5)


@pytest.mark.parametrize("dist,message", [
    ({"dist.num_processes": 0}, r"dist.num_processes=0: must be >= 1"),
    ({"dist.num_processes": 2, "dist.process_id": 2}, r"dist.process_id=2: must be in \[0, dist.num_processes=2\)"),
    ({"dist.coordinator_address": "localhost"}, r"dist.coordinator_address='localhost': must be host:port"),
])
def test_bad_dist_config(token_data, tmp_path, dist, message):
    with pytest.raises(ConfigError, match=message):
        validate(tiny_run_config(token_data, tmp_path, **dist))


def test_devices_used_before_initialize_is_a_clear_error(no_cluster_env, token_data, tmp_path):
    c = tiny_run_config(token_data, tmp_path, **{"dist.coordinator_address": "localhost:1", "dist.num_processes": 2,
                                                 "dist.process_id": 0})
    with pytest.raises(ConfigError, match=r"JAX's devices were used before distributed.initialize"):
        distributed.initialize(c)  # this test process has long used its 8 devices


class _Filter:
    def __init__(self, dropped: str):
        self.dropped = dropped


@pytest.mark.parametrize("said, expected", [
    ("E1207 coordination_service.cc:1] tasks stopped sending heartbeats: 1\n", r"^process 1 stopped \(found by JAX"),
    ("E1207 client.cc:1] Failed to send RPC to coordination service\n", r"^process 0, which coordinates the run"),
    ("", r"^process 1 stopped \(found by JAX's coordination service; its last heartbeat \d+ s ago\)$"),
])
def test_why_jax_stopped_names_the_lost_process(monkeypatch, said, expected):
    """What JAX's runtime said before aborting names who was lost; when it said nothing the stderr filter
    could read in time (a busy host: CI's failure), the heartbeat that stood still names the process."""
    monkeypatch.setattr(distributed, "REPORT_WAIT_S", 0.2)
    monkeypatch.setattr(distributed._StderrFilter, "active", _Filter(said))
    beats = distributed._Heartbeats.__new__(distributed._Heartbeats)
    beats.poll_s, now = 1.0, time.monotonic()
    beats.counters = {1: ("7", now - 5.0), 2: ("9", now)}  # process 1 quiet for 5 s, process 2 beating
    monkeypatch.setattr(distributed._Heartbeats, "active", beats)
    assert re.search(expected, distributed._why_jax_stopped())
    beats.counters = {1: ("7", now), 2: ("9", now)}  # everyone beating, nothing said: JAX's words, or none
    if not said:
        assert distributed._why_jax_stopped() == "JAX's distributed runtime stopped the run (no reason given)"


def test_compilation_cache_is_written(tmp_path):
    code = ("import sys, jax; from configs import tiny; from nanogpt_jax import distributed\n"
            "c = tiny.get_config(); c.compilation_cache_dir = sys.argv[1]; distributed.initialize(c)\n"
            "jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)\n"
            "jax.jit(lambda x: x * 2 + 1)(jax.numpy.ones(3)).block_until_ready()")
    cache = tmp_path / "xla_cache"
    done = subprocess.run([sys.executable, "-c", code, str(cache)], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu"), timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert any(p.is_file() for p in cache.rglob("*")), "nothing was written to the compilation cache"


# ---- two real processes ------------------------------------------------------------------------


def _launch_two_processes(data_dir, out_dir, **overrides) -> list[subprocess.Popen]:
    """run_train.py as processes 0 and 1 of one run, 4 CPU devices each, coordinated on localhost."""
    port = free_port()
    procs = []
    for i in range(2):
        items = {"data.data_dir": data_dir, "out_dir": out_dir, "dist.coordinator_address": f"localhost:{port}",
                 "dist.num_processes": 2, "dist.process_id": i, **overrides}
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", PYTHONPATH=str(ROOT),
                   JAX_PLATFORMS="cpu")
        procs.append(subprocess.Popen(
            [sys.executable, str(ROOT / "run_train.py"), "--config", str(ROOT / "configs/tiny.py"),
             *[f"--config.{k}={v}" for k, v in items.items()]],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def _logged_steps(out_dir) -> list[int]:
    try:
        m = loggers.read_metrics(out_dir)
    except DataError:  # no metrics.csv yet
        return []
    return [s for s, v in zip(m["step"], m.get("train/loss", []), strict=False) if v is not None]


def _by_step(out_dir, name) -> dict[int, float]:
    m = loggers.read_metrics(out_dir)
    return {s: v for s, v in zip(m["step"], m[name], strict=True) if v is not None}


def _final_params(out_dir, step):
    with Checkpointer(checkpoint_dir(out_dir), read_only=True) as ckpt:
        model = GPT(GPTConfig(**ckpt.record(step)["model"]))
        abstract = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
        params, _ = ckpt.restore_params(abstract, step)
    return jax.tree.map(np.asarray, params)


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_two_processes_equal_one_then_sigterm_saves_one_step_and_resumes_in_one(token_data, tmp_path, optimizer):
    """The tiny run (dropout on) as 2 processes x 4 devices: its losses are those of 1 process x 8 devices;
    a SIGTERM to process 1 alone makes both processes save the same step and exit 0; one process resumes
    that checkpoint and ends where the uninterrupted 1-process run ends. The SIGTERM lands at whatever step
    the run has reached past its checkpoint at 10; the 1-process reference is trained after, to match.
    With either optimizer."""
    common = {"train.log_interval": 1, **DROPOUT, **OPTIMIZERS[optimizer]}
    out = tmp_path / "two_processes"
    # dtype auto: config validation must not start JAX's backend before jax.distributed.initialize
    procs = _launch_two_processes(token_data, out, **{"train.max_iters": 100_000, "model.dtype": "auto", **common})
    try:
        deadline = time.time() + 300
        while time.time() < deadline and all(p.poll() is None for p in procs):
            if max(_logged_steps(out), default=-1) >= 11:  # past the evaluation and checkpoint at step 10
                break
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGTERM)
        outputs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for i, (p, output) in enumerate(zip(procs, outputs, strict=True)):
        assert p.returncode == 0, f"process {i}:\n{output[-3000:]}"
    assert "| loss " in outputs[0] and "| loss " not in outputs[1]  # only process 0 logs (console, CSV, TensorBoard)
    saved = [re.findall(r"saved step (\d+) after SIGTERM", output) for output in outputs]
    assert saved[0] and saved[0] == saved[1], saved  # one save, the same step, on both processes
    stop = int(saved[0][0])
    assert stop > 11, stop
    with Checkpointer(checkpoint_dir(out), read_only=True) as ckpt:
        assert ckpt.all_steps()[-1] == stop  # the SIGTERM save
        assert ckpt.record(stop)["config"]["optim"]["name"] == optimizer
    assert {p.name for p in (checkpoint_dir(out) / str(stop) / "state").glob("ocdbt.process_*")} == {
        "ocdbt.process_0", "ocdbt.process_1"}  # each process wrote its own shards

    # the reference: one process, 8 devices, on to the next evaluation after the stop and one more
    n_steps = 10 * (stop // 10) + 20
    ref = tmp_path / "one_process"
    train(tiny_run_config(token_data, ref, **{"train.max_iters": n_steps, **common}))
    ref_loss, ref_val = _by_step(ref, "train/loss"), _by_step(ref, "val/loss")
    assert loggers.read_metrics(out)["step"].count(1) == 1  # one writer: no step logged twice
    loss, val = _by_step(out, "train/loss"), _by_step(out, "val/loss")
    # the step the stop lands on is evaluated first when it is an evaluation step (eval_interval 10)
    assert sorted(loss) == list(range(stop)) and sorted(val) == list(range(0, stop + 1, 10))
    np.testing.assert_allclose([loss[s] for s in range(stop)], [ref_loss[s] for s in range(stop)], rtol=1e-5)
    np.testing.assert_allclose([val[s] for s in sorted(val)], [ref_val[s] for s in sorted(val)], rtol=1e-5)

    summary = train(tiny_run_config(token_data, out, **{"init_from": "resume", "train.max_iters": n_steps, **common}))
    assert summary["iterations"] == n_steps
    loss, val = _by_step(out, "train/loss"), _by_step(out, "val/loss")
    assert sorted(loss) == list(range(n_steps)) and sorted(val) == list(range(0, n_steps + 1, 10))
    np.testing.assert_allclose([loss[s] for s in range(n_steps)], [ref_loss[s] for s in range(n_steps)], rtol=1e-5)
    np.testing.assert_allclose([val[s] for s in sorted(val)], [ref_val[s] for s in sorted(val)], rtol=1e-5)
    got, want = _final_params(out, n_steps), _final_params(ref, n_steps)
    for layer in ("h_0", "h_1"):
        # The key bias's gradient is zero in exact arithmetic (a constant added to every key leaves the softmax
        # unchanged), so it is pure round-off, which Adam scales up to lr-sized steps whose sign depends on the
        # order of summation across processes. Everything else is compared.
        for tree in (got, want):
            tree[layer]["attn"]["c_attn"]["bias"] = tree[layer]["attn"]["c_attn"]["bias"][[0, 2]]
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
