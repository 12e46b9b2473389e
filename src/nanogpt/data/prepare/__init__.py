"""`nanogpt-prepare`'s datasets: one module each, every one a `prepare(cfg: DataConfig) -> meta` function."""

from __future__ import annotations

from nanogpt.data.prepare import openwebtext, shakespeare, shakespeare_char, text
from nanogpt.errors import ConfigError

DATASETS = {
    "shakespeare_char": shakespeare_char.prepare,
    "shakespeare": shakespeare.prepare,
    "openwebtext": openwebtext.prepare,
    "text": text.prepare,
}


def prepare(cfg) -> dict:
    """Tokenize dataset `cfg.name` into cfg.data_dir/{train,val}.bin + meta.json; returns the meta."""
    if cfg.name not in DATASETS:
        raise ConfigError(f"data.name={cfg.name!r} is not a dataset nanogpt-prepare knows; "
                          f"use one of {', '.join(DATASETS)} (data=text for your own files)")
    return DATASETS[cfg.name](cfg)


__all__ = ["DATASETS", "prepare"]
