"""Model FLOPs utilisation: achieved FLOP/s over the device's real peak for the dtype used."""

from __future__ import annotations

import functools
import time

import torch

# Dense (no sparsity) peak FLOP/s by GPU name fragment and dtype, from the vendors' datasheets.
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "h200": {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12},
    "h100": {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12},  # SXM
    "a100": {"bfloat16": 312e12, "float16": 312e12, "float32": 19.5e12},
}


@functools.lru_cache(maxsize=None)
def cpu_peak_flops(dtype: str = "float32", n: int = 1024, repeats: int = 5) -> float:
    """Measure this CPU's matmul FLOP/s on the spot (best of a few n x n matmuls)."""
    t = getattr(torch, dtype)
    a, b = torch.randn(n, n, dtype=t), torch.randn(n, n, dtype=t)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def device_peak_flops(device: torch.device | str, dtype: str, override: float | None = None) -> float | None:
    """Peak FLOP/s for `device` at `dtype`; None when unknown (MFU is then not reported)."""
    if override:
        return override
    device = torch.device(device)
    if device.type == "cpu":
        return cpu_peak_flops(dtype)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        for key, peaks in PEAK_FLOPS.items():
            if key in name:
                return peaks.get(dtype)
    return None


def mfu(flops_per_token: float, tokens_per_sec: float, peak_flops: float | None) -> float | None:
    """Fraction of peak achieved by a training run processing tokens_per_sec."""
    if not peak_flops:
        return None
    return flops_per_token * tokens_per_sec / peak_flops
