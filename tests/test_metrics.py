"""MFU: the formula against a hand computation, the peak table by device_kind, the CPU probe."""

from __future__ import annotations

import json
import logging
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
    flops = metrics.peak_flops(cpu, "float32")  # the real probe, cached in conftest's session folder
    assert flops is not None and math.isfinite(flops) and flops > 0
    assert metrics.peak_flops(cpu, "float32") == flops
    source = metrics.device_peak(cpu, "float32").source
    assert source.startswith("CPU matmul probe, float32, measured ") and "cached in" in source


@pytest.fixture
def fake_probe(tmp_path, monkeypatch):
    """The CPU peak cached in tmp_path, measured by a fake probe that counts its calls (8e10 FLOP/s);
    the process's own cache is emptied before and after, as if each call were a new process."""
    calls = []

    def probe(dtype, device):
        calls.append(dtype)
        return 8e10

    monkeypatch.setenv(metrics.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(metrics, "_cpu_probe", probe)
    metrics._cpu_host_peak.cache_clear()
    yield calls
    metrics._cpu_host_peak.cache_clear()


def test_cpu_peak_is_measured_once_per_machine(fake_probe, tmp_path):
    cpu = jax.devices("cpu")[0]
    first = metrics.device_peak(cpu, "float32")
    metrics._cpu_host_peak.cache_clear()  # a second run on the same machine
    second = metrics.device_peak(cpu, "float32")
    assert fake_probe == ["float32"]  # the second run read the file
    assert first == second  # the same peak and source: MFU ratios equal tokens/s ratios
    assert first.flops == pytest.approx(8e10 / len(jax.local_devices(backend="cpu")))
    assert f"cached in {tmp_path / metrics.CPU_PEAK_FILE}" in first.source
    (key,) = json.loads((tmp_path / metrics.CPU_PEAK_FILE).read_text())
    assert "float32" in key and f"jax {jax.__version__}" in key and "cores" in key
    metrics.device_peak(cpu, "bfloat16")  # another dtype is its own entry
    assert fake_probe == ["float32", "bfloat16"]
    assert len(json.loads((tmp_path / metrics.CPU_PEAK_FILE).read_text())) == 2
    # bench.peak_tflops still wins, without a probe
    assert metrics.device_peak(cpu, "float16", 0.5) == metrics.Peak(0.5e12, "given (bench.peak_tflops)")
    assert fake_probe == ["float32", "bfloat16"]


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"KEY": {"flops": -1, "measured": "then"}}'])
def test_corrupt_cpu_peak_cache_is_measured_again(fake_probe, tmp_path, content):
    path = tmp_path / metrics.CPU_PEAK_FILE
    key = metrics._machine_key("float32")
    path.write_text(content.replace("KEY", key))
    assert metrics.device_peak(jax.devices("cpu")[0], "float32").flops > 0
    assert fake_probe == ["float32"]
    assert json.loads(path.read_text())[key]["flops"] == 8e10  # and repaired
    assert not list(tmp_path.glob("*.tmp"))


def test_a_peak_measured_on_a_busy_machine_is_raised_by_a_new_probe(fake_probe, tmp_path):
    """remeasure_cpu_peak (a run saw an MFU above 100%) probes again; the cache keeps the higher figure."""
    path, key = tmp_path / metrics.CPU_PEAK_FILE, metrics._machine_key("float32")
    n = len(jax.local_devices(backend="cpu"))
    path.write_text(json.dumps({key: {"flops": 1e9, "measured": "busy"}}))
    assert metrics.device_peak(jax.devices("cpu")[0], "float32").flops == pytest.approx(1e9 / n)
    assert metrics.remeasure_cpu_peak("float32").flops == pytest.approx(8e10 / n)
    assert json.loads(path.read_text())[key]["flops"] == 8e10 and fake_probe == ["float32"]
    assert metrics.device_peak(jax.devices("cpu")[0], "float32").flops == pytest.approx(8e10 / n)  # from now on
    path.write_text(json.dumps({key: {"flops": 2e11, "measured": "quiet"}}))  # a new probe that is lower: kept
    assert metrics.remeasure_cpu_peak("float32").flops == pytest.approx(2e11 / n)
    assert json.loads(path.read_text())[key] == {"flops": 2e11, "measured": "quiet"}


def test_unwritable_cpu_peak_cache_keeps_the_measured_peak(fake_probe, tmp_path, monkeypatch, caplog):
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv(metrics.CACHE_ENV, str(tmp_path / "a_file" / "cache"))  # cannot become a folder
    with caplog.at_level(logging.WARNING):
        peak = metrics.device_peak(jax.devices("cpu")[0], "float32")
    assert peak.flops == pytest.approx(8e10 / len(jax.local_devices(backend="cpu")))
    assert peak.source.endswith("not cached")
    assert any("cannot cache the CPU peak" in r.getMessage() for r in caplog.records)


def test_mfu_above_100_percent_is_flagged_once(caplog):
    metrics._warn_above_100.cache_clear()
    assert metrics.format_mfu(0.5123) == "51.2%"
    assert metrics.format_mfu(1.0) == "100.0%"
    with caplog.at_level(logging.WARNING):
        assert metrics.format_mfu(1.37) == ">100% (peak too low?)"
        assert metrics.format_mfu(2.0) == ">100% (peak too low?)"
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "above 100%" in warning and "bench.peak_tflops" in warning


def test_parameter_counts_read_at_any_size():
    assert [metrics.format_params(n) for n in (12, 28_544, 10_650_000, 124_439_808, 1_557_611_200)] == [
        "12", "28.54k", "10.65M", "124.4M", "1.558B"]  # a tiny model is not "0.0M"
