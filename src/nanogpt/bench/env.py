"""What a benchmark ran on, and how it reads clocks and memory honestly on GPUs and CPUs."""

from __future__ import annotations

import gc
import os
import platform
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def cpu_model() -> str:
    """The CPU's marketing name (from /proc/cpuinfo on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model() if device.type == "cpu" else device.type


def environment(device: torch.device) -> dict[str, Any]:
    """Hardware and software of this run, stored with every record."""
    return {
        "device": str(device), "device_name": device_name(device), "cpu": cpu_model(),
        "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
        # other processes busy on the same cores make CPU timings slower and noisier
        "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "gpu_count": torch.cuda.device_count(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "python": platform.python_version(), "platform": platform.platform(),
    }


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so the clock measures it (CPU work is already synchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds fn takes, including the device work it queues."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def free_memory() -> None:
    """Drop what the previous configuration left, so the next one starts clean."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def reset_peak_memory(device: torch.device) -> str:
    """Start a new peak-memory window; returns what peak_memory_mb will measure.

    GPU: the tensors allocated by PyTorch (torch.cuda.max_memory_allocated). CPU: the resident
    memory of the whole process (python and torch included). Linux can reset the process's
    high-water mark; elsewhere the peak is since the process started.
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return "cuda_max_allocated"
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak RSS
        return "cpu_peak_rss"
    except OSError:
        return "cpu_peak_rss_since_start"


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, kB on Linux
