"""Every shipped config loads and validates; impossible values fail naming the key."""

import importlib
from pathlib import Path

import pytest

from nanogpt_jax.config import gpt_config, validate
from nanogpt_jax.errors import ConfigError

CONFIGS = sorted(p.stem for p in (Path(__file__).parents[1] / "configs").glob("*.py") if p.stem != "__init__")
VARIANTS = {"owt": ["gpt2-medium", "gpt2-large", "gpt2-xl"], "shakespeare_char": ["cpu", "cpu_muon"]}


def load(name, arg=None):
    return importlib.import_module(f"configs.{name}").get_config(arg)


@pytest.mark.parametrize("name,arg", [(n, None) for n in CONFIGS] + [(n, a) for n, vs in VARIANTS.items() for a in vs])
def test_every_config_loads_and_validates(name, arg):
    config = load(name, arg)
    validate(config)
    gpt_config(config)


def test_default_declares_every_section():
    c = load("default")
    assert set(c) >= {"seed", "out_dir", "init_from", "model", "data", "train", "optim", "mesh", "log", "sample",
                      "eval", "bench", "dist"}


def test_owt_recipe_is_nanogpts():
    c = load("owt")
    assert c.train.batch_size * c.model.block_size * c.train.gradient_accumulation_steps == 491_520
    assert (c.optim.learning_rate, c.optim.min_lr, c.optim.warmup_iters, c.optim.lr_decay_iters) == (
        6e-4, 6e-5, 2000, 600_000)
    assert (load("owt", "gpt2-xl").model.n_layer, load("owt", "gpt2-xl").model.n_embd) == (48, 1600)


@pytest.mark.parametrize("key,value,message", [
    ("model.n_embd", 100, "model.n_embd=100: must be divisible by model.n_head=12"),
    ("model.dropout", 1.5, "model.dropout=1.5"),
    ("model.dtype", "int8", "model.dtype='int8'"),
    ("model.remat", "sometimes", "model.remat"),
    ("train.batch_size", 0, "train.batch_size=0: must be > 0"),
    ("optim.min_lr", 1.0, "optim.min_lr=1.0: must be <= optim.learning_rate"),
    ("init_from", "gpt3", "init_from='gpt3'"),
    ("mesh.fsdp", 0, "mesh.fsdp=0"),
    ("sample.top_p", 1.5, "sample.top_p=1.5"),
])
def test_impossible_values_name_the_key(key, value, message):
    c = load("default")
    section, _, leaf = key.rpartition(".")
    (c[section] if section else c)[leaf] = value
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        validate(c)


def test_block_size_beyond_gpt2_weights_is_refused():
    c = load("gpt2")
    c.model.block_size = 2048
    with pytest.raises(ConfigError, match="model.block_size=2048: GPT-2 weights cover 1024 positions"):
        validate(c)


def test_every_library_module_imports_in_one_process():
    """Importing the whole library together works: no absl flag (a process-global name) is defined
    twice, e.g. a module's script flags colliding with another's."""
    import importlib
    import pkgutil

    import nanogpt_jax

    names = [m.name for m in pkgutil.walk_packages(nanogpt_jax.__path__, "nanogpt_jax.")]
    assert {"nanogpt_jax.aot", "nanogpt_jax.memory", "nanogpt_jax.bench.data", "nanogpt_jax.bench.eval"} <= set(names)
    for name in names:
        importlib.import_module(name)
