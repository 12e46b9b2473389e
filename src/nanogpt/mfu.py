"""Model FLOPs utilisation: achieved FLOP/s over the device's real peak for the dtype used.

Every MFU figure in the project (trainer logs, summary.json, nanogpt-bench) comes from here.

GPU peaks are the vendors' datasheet numbers for dense matmuls (never the 2:4-sparsity figures).
bfloat16/float16 are tensor-core peaks with FP32 accumulation, which is what PyTorch's matmuls use
(GeForce cards run that at half their FP16-accumulate rate, so their row shows the lower number).
float32 is the plain (non-tensor-core) FP32 peak, because PyTorch does not use TF32 unless asked;
when TF32 is enabled (`torch.set_float32_matmul_precision("high")`) the TF32 tensor-core peak is
used instead. On a CPU there is no trustworthy datasheet, so the peak is measured on the spot by a
short matmul probe: CPU MFU is the fraction of what this CPU's own matmul reaches.
"""

from __future__ import annotations

import functools
import logging
import re
import time
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

T = 1e12
# (regex on the lower-cased device name with - and _ as spaces, label, dense peak FLOP/s by dtype).
# Order matters: the first match wins, so the specific variants come before the generic name.
GPU_PEAKS: list[tuple[str, str, dict[str, float]]] = [
    (r"\bh100\b.*\bnvl\b", "H100 NVL", {"float32": 60 * T, "tf32": 417.5 * T, "bfloat16": 835.5 * T,
                                        "float16": 835.5 * T}),
    (r"\bh[18]00\b.*(\bpcie\b|hbm2e)", "H100 PCIe", {"float32": 51.2 * T, "tf32": 378 * T,
                                                      "bfloat16": 756 * T, "float16": 756 * T}),
    (r"\bh[18]00\b|\bgh200\b", "H100 SXM", {"float32": 66.9 * T, "tf32": 494.7 * T, "bfloat16": 989.4 * T,
                                            "float16": 989.4 * T}),
    (r"\bh200\b.*\bnvl\b", "H200 NVL", {"float32": 60 * T, "tf32": 417.5 * T, "bfloat16": 835.5 * T,
                                        "float16": 835.5 * T}),
    (r"\bh200\b", "H200 SXM", {"float32": 66.9 * T, "tf32": 494.7 * T, "bfloat16": 989.4 * T,
                               "float16": 989.4 * T}),
    # SXM and PCIe A100s (40 and 80 GB) have the same compute peaks
    (r"\ba[18]00\b", "A100", {"float32": 19.5 * T, "tf32": 156 * T, "bfloat16": 312 * T, "float16": 312 * T}),
    # NVIDIA publishes no A10G datasheet: the A10's numbers are used
    (r"\ba10g?\b", "A10", {"float32": 31.2 * T, "tf32": 62.5 * T, "bfloat16": 125 * T, "float16": 125 * T}),
    (r"\bl40s\b", "L40S", {"float32": 91.6 * T, "tf32": 183 * T, "bfloat16": 362 * T, "float16": 362 * T}),
    (r"\bl40\b", "L40", {"float32": 90.5 * T, "tf32": 90.5 * T, "bfloat16": 181 * T, "float16": 181 * T}),
    (r"\bl4\b", "L4", {"float32": 30.3 * T, "tf32": 60 * T, "bfloat16": 121 * T, "float16": 121 * T}),
    (r"\brtx a6000\b", "RTX A6000", {"float32": 38.7 * T, "tf32": 77.4 * T, "bfloat16": 154.8 * T,
                                     "float16": 154.8 * T}),
    (r"\b4090\b", "RTX 4090", {"float32": 82.6 * T, "tf32": 82.6 * T, "bfloat16": 165.2 * T,
                               "float16": 165.2 * T}),
    (r"\b3090 ti\b", "RTX 3090 Ti", {"float32": 40 * T, "tf32": 40 * T, "bfloat16": 80 * T,
                                   "float16": 80 * T}),
    (r"\b3090\b", "RTX 3090", {"float32": 35.6 * T, "tf32": 35.6 * T, "bfloat16": 71 * T, "float16": 71 * T}),
    # Volta and Turing have fp16 tensor cores but no bf16 (bf16 is emulated: no peak, no MFU)
    (r"\bv100s\b", "V100S PCIe", {"float32": 16.4 * T, "float16": 130 * T}),
    (r"\bv100\b.*\bpcie\b", "V100 PCIe", {"float32": 14 * T, "float16": 112 * T}),
    (r"\bv100\b", "V100 SXM2", {"float32": 15.7 * T, "float16": 125 * T}),
    (r"\bt4\b", "T4", {"float32": 8.1 * T, "float16": 65 * T}),
    (r"\bmi300x\b", "MI300X", {"float32": 163.4 * T, "tf32": 653.7 * T, "bfloat16": 1307.4 * T,
                               "float16": 1307.4 * T}),
]


@dataclass(frozen=True)
class Peak:
    """A peak FLOP/s figure and where it came from (shown next to every MFU the bench reports)."""

    flops: float | None
    source: str


def gpu_peak(name: str, dtype: str, tf32: bool = False) -> Peak:
    """Datasheet peak for a GPU named like torch.cuda.get_device_name ('NVIDIA H100 80GB HBM3')."""
    key = re.sub(r"[-_]", " ", name.lower())
    kind = "tf32" if dtype == "float32" and tf32 else dtype
    for pattern, label, peaks in GPU_PEAKS:
        if re.search(pattern, key):
            if kind not in peaks:
                return Peak(None, f"{label} has no {kind} peak in the table")
            return Peak(peaks[kind], f"{label} datasheet, {kind} dense")
    return Peak(None, f"unknown GPU {name!r}: pass a peak to get MFU")


@functools.cache
def _probe(dtype: str, n: int, repeats: int, threads: int, budget_s: float = 1.0) -> float:
    t = getattr(torch, dtype)
    a, b = torch.randn(n, n, dtype=t), torch.randn(n, n, dtype=t)
    a @ b  # warm-up: thread pool start-up, page faults
    best, start = float("inf"), time.perf_counter()
    # best of many: other processes on the same cores only ever slow a matmul down, so more tries
    # (within a time budget, for CPUs where a dtype is slow) give a truer peak
    for i in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
        if i >= 2 and time.perf_counter() - start > budget_s:
            break
    flops = 2 * n**3 / best
    log.info("CPU matmul probe: %.1f GFLOP/s (%s, threads=%d)", flops / 1e9, dtype, threads)
    return flops


def cpu_peak_flops(dtype: str = "float32", n: int = 1024, repeats: int = 20) -> float:
    """Measure this CPU's matmul FLOP/s on the spot (best of up to `repeats` n x n matmuls, about a
    second at most); cached per dtype and thread count, so it runs once per process."""
    return _probe(dtype, n, repeats, torch.get_num_threads())


def device_peak(device: torch.device | str, dtype: str, override: float | None = None) -> Peak:
    """Peak FLOP/s for `device` at `dtype` with its source; flops is None when unknown."""
    if override:
        return Peak(float(override), "given")
    device = torch.device(device)
    if device.type == "cpu":
        return Peak(cpu_peak_flops(dtype), f"CPU matmul probe, {dtype}, threads={torch.get_num_threads()}")
    if device.type == "cuda":
        tf32 = bool(torch.backends.cuda.matmul.allow_tf32)
        return gpu_peak(torch.cuda.get_device_name(device), dtype, tf32)
    return Peak(None, f"no peak known for {device.type}: pass a peak to get MFU")


def device_peak_flops(device: torch.device | str, dtype: str, override: float | None = None) -> float | None:
    """Peak FLOP/s for `device` at `dtype`; None when unknown (MFU is then not reported)."""
    peak = device_peak(device, dtype, override)
    if peak.flops is None:
        _warn_once(peak.source)
    return peak.flops


@functools.cache
def _warn_once(message: str) -> None:
    log.warning("MFU not reported: %s", message)


def mfu(flops_per_token: float, tokens_per_sec: float, peak_flops: float | None) -> float | None:
    """Fraction of peak achieved by a training run processing tokens_per_sec."""
    if not peak_flops:
        return None
    return flops_per_token * tokens_per_sec / peak_flops
