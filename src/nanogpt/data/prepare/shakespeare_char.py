"""TinyShakespeare, one token per character: 65 symbols, 90/10 split, 1,003,854 / 111,540 tokens."""

from __future__ import annotations

from nanogpt.data.prepare.shakespeare import URL, download
from nanogpt.data.prepare.text import prepare_text


def prepare(cfg) -> dict:
    """`nanogpt-prepare data=shakespeare_char`."""
    path = download(cfg.data_dir)
    return prepare_text([path], "char", cfg.data_dir, cfg.val_fraction, f"tinyshakespeare:{URL}",
                        cfg.num_proc)
