import pytest
import torch

from nanogpt.config import OptimConfig
from nanogpt.optim import build_optimizer, lr_at


def test_schedule_warmup_cosine_floor():
    cfg = OptimConfig(lr=1.0, min_lr=0.1, warmup_iters=10, lr_decay_iters=110)
    assert lr_at(0, cfg) == pytest.approx(1 / 11)
    assert lr_at(9, cfg) == pytest.approx(10 / 11)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)  # half way down the cosine
    assert lr_at(110, cfg) == pytest.approx(0.1) and lr_at(10_000, cfg) == pytest.approx(0.1)
    values = [lr_at(i, cfg) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_constant_lr_after_warmup():
    cfg = OptimConfig(lr=3e-5, min_lr=3e-5, warmup_iters=0, decay_lr=False, lr_decay_iters=20)
    assert {lr_at(i, cfg) for i in range(50)} == {3e-5}


def test_decay_only_on_matrices(tiny_model):
    opt = build_optimizer(tiny_model, OptimConfig(weight_decay=0.1), "cpu")
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decayed["params"]) and all(p.dim() == 1 for p in plain["params"])
    n = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n == tiny_model.num_params()  # the tied embedding is counted once
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.9, 0.95)
