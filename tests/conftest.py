"""Shared test set-up: offline data mirror, Hydra composition of the shipped configs, tiny models."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

# Offline copies of downloads (see README, "Offline use"); CI sets the same in .ci/run.
if SHARED_DATA.is_dir():
    os.environ.setdefault("NANOGPT_DATA_MIRROR", str(SHARED_DATA))
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED_DATA / "tiktoken_cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

torch.set_num_threads(min(2, torch.get_num_threads()))


def compose(config_name: str, overrides: list[str] | None = None):
    """Compose a shipped config exactly as the CLI does (schemas registered), as a DictConfig."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from nanogpt.config import CONFIG_DIR, register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides or [])


@pytest.fixture
def compose_cfg() -> Callable:
    return compose


@pytest.fixture
def tiny_config():
    from nanogpt.model import GPTConfig

    return GPTConfig(block_size=16, vocab_size=97, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture
def tiny_model(tiny_config):
    from nanogpt.model import GPT

    torch.manual_seed(0)
    return GPT(tiny_config).eval()


def write_token_data(folder: Path, vocab_size: int = 64, n_train: int = 20_000, n_val: int = 4_000,
                     seed: int = 0) -> Path:
    """A learnable synthetic dataset in the prepared format (train.bin, val.bin, meta.json):
    a random walk over a small vocabulary, so a tiny model's loss falls quickly."""
    import json

    import numpy as np

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, n in (("train", n_train), ("val", n_val)):
        steps = rng.choice([-1, 1, 2], size=n)
        tokens = (np.cumsum(steps) % vocab_size).astype(np.uint16)
        tokens.tofile(folder / f"{split}.bin")
        splits[split] = {"tokens": int(n)}
    meta = {"format": "nanogpt-bins/1", "tokenizer": "char", "vocab_size": vocab_size, "dtype": "uint16",
            "eot_token": None, "chars": [chr(0x41 + i) for i in range(vocab_size)], "splits": splits,
            "source": "synthetic test data"}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


@pytest.fixture(scope="session")
def token_data(tmp_path_factory) -> Path:
    return write_token_data(tmp_path_factory.mktemp("tokens"))


def tiny_train_overrides(data_dir: Path, out_dir: Path, **extra) -> list[str]:
    """Overrides that turn a shipped training preset into a seconds-long CPU run."""
    base = {"model": "tiny", "model.vocab_size": 64, "model.block_size": 32, "data.data_dir": str(data_dir),
            "out_dir": str(out_dir), "data.batch_size": 4, "system.device": "cpu", "system.compile": "false",
            "train.max_iters": 12, "train.eval_interval": 4, "train.eval_iters": 2, "train.log_interval": 1,
            "optim.warmup_iters": 2, "optim.lr": 1e-2, "optim.min_lr": 1e-3}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]
