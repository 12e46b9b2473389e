"""MFU: the formula against a hand computation, the peak table by device_kind, the CPU probe."""

from __future__ import annotations

import math
from types import SimpleNamespace

import jax
import pytest

from nanogpt_jax import metrics
from nanogpt_jax.model import GPTConfig


def test_mfu_equals_hand_computation():
    # gpt2 124M: 124,439,808 parameters, of which the position embedding is 1024 x 768 = 786,432;
    # N = 123,653,376. Per token: 6N = 741,920,256 plus 12 * L * d * T = 12 * 12 * 768 * 1024 =
    # 113,246,208, so 855,166,464 FLOPs.
    config = GPTConfig.gpt2("gpt2")
    assert config.flops_per_token(1024) == 855_166_464
    # a step of 12 sequences of 1024 tokens in 0.1 s: 122,880 tokens/s; on 8 devices of 197 TFLOP/s
    # that is 855,166,464 * 122,880 = 1.05083e14 FLOP/s of 8 * 197e12 = 1.576e15, i.e. 6.6677%
    tokens_per_sec = 12 * 1024 / 0.1
    got = metrics.mfu(config.flops_per_token(1024), tokens_per_sec, 8, 197e12)
    assert got == pytest.approx(0.066677, abs=1e-6)
    assert got == pytest.approx(855_166_464 * 122_880 / 1.576e15, rel=1e-12)


def test_mfu_unknown_peak_is_none_and_bad_device_count_raises():
    assert metrics.mfu(1e9, 1e5, 8, None) is None
    assert metrics.mfu(1e9, 1e5, 8, 0.0) is None
    with pytest.raises(ValueError, match="n_devices"):
        metrics.mfu(1e9, 1e5, 0, 1e12)


def test_formula_is_named():
    assert "6N + 12·L·d·T" in metrics.FLOPS_FORMULA


@pytest.mark.parametrize(
    "kind, tflops",
    [
        ("TPU v4", 275),
        ("TPU v5 lite", 197),
        ("TPU v5e", 197),
        ("TPU v5", 459),
        ("TPU v5p", 459),
        ("TPU v6 lite", 918),
        ("NVIDIA H200", 989.4),
        ("NVIDIA H200 NVL", 835.5),
        ("NVIDIA H100 80GB HBM3", 989.4),
        ("NVIDIA H100 PCIe", 756),
        ("NVIDIA H100 NVL", 835.5),
        ("NVIDIA GH200 480GB", 989.4),
        ("NVIDIA A100-SXM4-40GB", 312),
        ("NVIDIA A100-SXM4-80GB", 312),
        ("NVIDIA A100 80GB PCIe", 312),
        ("NVIDIA L40S", 362.05),
        ("NVIDIA L4", 121),
    ],
)
def test_peak_table_bf16(kind, tflops):
    peak = metrics.peak_for_kind(kind, "bfloat16")
    assert peak.flops == pytest.approx(tflops * 1e12)
    assert "datasheet" in peak.source


@pytest.mark.parametrize(
    "kind", ["TPU v4 lite", "TPU v3", "TPU7x", "NVIDIA A10G", "Tesla V100-SXM2-16GB", "NVIDIA B200", "cpu", ""]
)
def test_unknown_device_kind_gives_none(kind):
    peak = metrics.peak_for_kind(kind, "bfloat16")
    assert peak.flops is None and peak.source


def test_float32_rows_follow_the_matmul_precision():
    # JAX's default runs float32 matmuls as TF32 on recent GPUs and one bf16 pass on TPUs
    assert metrics.peak_for_kind("NVIDIA H100 80GB HBM3", "float32").flops == pytest.approx(494.7e12)
    assert metrics.peak_for_kind("NVIDIA A100-SXM4-40GB", "float32").flops == pytest.approx(156e12)
    assert metrics.peak_for_kind("TPU v5 lite", "float32").flops == pytest.approx(197e12)
    with jax.default_matmul_precision("highest"):
        assert metrics.peak_for_kind("NVIDIA H100 80GB HBM3", "float32").flops == pytest.approx(66.9e12)
        assert metrics.peak_for_kind("TPU v5 lite", "float32").flops is None
    assert metrics.peak_for_kind("TPU v6 lite", "float16").flops is None  # no fp16 row on TPU


def test_peak_flops_of_accelerators_by_device_kind_and_override():
    h200 = SimpleNamespace(platform="gpu", device_kind="NVIDIA H200")
    assert metrics.peak_flops(h200, "bfloat16") == pytest.approx(989.4e12)
    # an H100 PCIe is not an SXM part: a realistic step never shows over 100%
    pcie = SimpleNamespace(platform="gpu", device_kind="NVIDIA H100 PCIe")
    assert metrics.mfu(855_166_464, 500_000, 1, metrics.peak_flops(pcie, "bfloat16")) < 1.0
    unknown = SimpleNamespace(platform="gpu", device_kind="NVIDIA Future 9000")
    assert metrics.peak_flops(unknown, "bfloat16") is None
    assert metrics.peak_flops(unknown, "bfloat16", override_tflops=100.0) == pytest.approx(100e12)
    assert metrics.device_peak(unknown, "bfloat16", 100.0).source.startswith("given")


def test_cpu_probe_is_positive_finite_and_cached():
    cpu = jax.devices("cpu")[0]
    flops = metrics.peak_flops(cpu, "float32")
    assert flops is not None and math.isfinite(flops) and flops > 0
    assert metrics.peak_flops(cpu, "float32") == flops  # measured once per process
    # the host's figure is split over its 8 fake devices: 8 x per-device = the host
    assert metrics.cpu_peak_flops("float32") * len(jax.local_devices(backend="cpu")) == pytest.approx(
        metrics._cpu_probe("float32", cpu)
    )
    assert metrics.device_peak(cpu, "float32").source == "CPU matmul probe, float32"
