"""TinyShakespeare with the GPT-2 BPE: 90/10 split by characters, 301,966 / 36,059 tokens."""

from __future__ import annotations

from pathlib import Path

from nanogpt.data.download import fetch
from nanogpt.data.prepare.text import prepare_text

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
MIRROR_PATH = "tinyshakespeare/input.txt"


def download(data_dir: str | Path) -> Path:
    """input.txt next to the bins (from the data mirror when one is set)."""
    return fetch(MIRROR_PATH, URL, Path(data_dir) / "input.txt")


def prepare(cfg) -> dict:
    """`nanogpt-prepare data=shakespeare`."""
    path = download(cfg.data_dir)
    return prepare_text([path], "gpt2", cfg.data_dir, cfg.val_fraction, f"tinyshakespeare:{URL}",
                        cfg.num_proc)
