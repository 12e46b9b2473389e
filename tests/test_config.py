from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from nanogpt.config import CONFIG_DIR, TrainJob, to_dataclass
from nanogpt.errors import ConfigError

CONFIGS = Path(CONFIG_DIR)
TRAIN_PRESETS = ["train_gpt2", "finetune_shakespeare", "train_shakespeare_char", "train_shakespeare_char_cpu"]


@pytest.mark.parametrize("name", TRAIN_PRESETS)
def test_train_presets_compose_and_validate(compose_cfg, name):
    job = to_dataclass(compose_cfg(name))
    assert isinstance(job, TrainJob)
    assert job.optim.min_lr <= job.optim.lr


def test_every_shipped_yaml_is_covered(compose_cfg):
    """Each group option composes into a training job and validates against the schema."""
    for group in ("model", "data"):
        for path in sorted((CONFIGS / group).glob("*.yaml")):
            job = to_dataclass(compose_cfg("train_gpt2", [f"{group}={path.stem}"]))
            assert isinstance(job, TrainJob), path
    primaries = {p.stem for p in CONFIGS.glob("*.yaml") if not p.stem.startswith("_")}
    assert set(TRAIN_PRESETS) <= primaries


@pytest.mark.parametrize(
    "name,shape",
    [("gpt2", (12, 12, 768)), ("gpt2-medium", (24, 16, 1024)), ("gpt2-large", (36, 20, 1280)),
     ("gpt2-xl", (48, 25, 1600))],
)
def test_gpt2_model_shapes(compose_cfg, name, shape):
    m = to_dataclass(compose_cfg("finetune_shakespeare", [f"model={name}"])).model
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size, m.vocab_size) == (*shape, 1024, 50257)


def test_recipes_hold_their_numbers(compose_cfg):
    job = to_dataclass(compose_cfg("train_gpt2"))
    assert job.data.batch_size * job.model.block_size * job.train.grad_accum_steps == 491_520
    assert job.optim.lr_decay_iters == job.train.max_iters  # interpolated, one source of truth
    cpu = to_dataclass(compose_cfg("train_shakespeare_char_cpu"))
    m = cpu.model
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size, m.dropout) == (4, 4, 128, 64, 0.0)
    assert (cpu.data.batch_size, cpu.train.max_iters, cpu.optim.lr_decay_iters) == (12, 2000, 2000)
    assert (cpu.train.eval_interval, cpu.train.eval_iters, cpu.system.device) == (250, 20, "cpu")
    ft = to_dataclass(compose_cfg("finetune_shakespeare"))
    assert ft.init_from == "gpt2-xl" and ft.model.n_embd == 1600 and not ft.optim.decay_lr


def test_override_from_command_line(compose_cfg):
    job = to_dataclass(compose_cfg("train_gpt2", ["model=gpt2-medium", "data.batch_size=8"]))
    assert job.model.n_layer == 24 and job.data.batch_size == 8


def test_typo_and_wrong_type_fail_at_composition(compose_cfg):
    with pytest.raises(ConfigCompositionException, match="optim.lrr"):
        compose_cfg("train_gpt2", ["optim.lrr=1"])
    with pytest.raises((ConfigCompositionException, ValidationError)):
        compose_cfg("train_gpt2", ["optim.lr=fast"])
    with pytest.raises(ConfigError, match="lrr"):  # '+' appends past Hydra; the schema still refuses
        to_dataclass(compose_cfg("train_gpt2", ["+optim.lrr=1"]))


@pytest.mark.parametrize(
    "override,message",
    [
        ("optim.min_lr=1.0", "min_lr"),
        ("model.n_head=5", "divisible"),
        ("system.device=tpu", "system.device"),
        ("system.dtype=float8", "system.dtype"),
        ("data.batch_size=0", "batch_size"),
        ("data.sampler=shuffle", "sampler"),
        ("train.grad_accum_steps=0", "grad_accum_steps"),
        ("optim.warmup_iters=700000", "warmup_iters"),
        ("model.dropout=1.5", "dropout"),
    ],
)
def test_bad_values_rejected(compose_cfg, override, message):
    with pytest.raises(ConfigError, match=message):
        to_dataclass(compose_cfg("train_gpt2", [override]))
