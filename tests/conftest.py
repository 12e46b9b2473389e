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
