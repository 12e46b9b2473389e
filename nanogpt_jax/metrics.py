"""Model FLOPs utilisation (MFU): the one FLOP formula, the one peak table, the CPU probe.

Every MFU figure of the project (console line, TensorBoard `train/mfu`, summary.json, run_bench.py)
comes from `mfu()` with a peak from `device_peak()`, so they agree and name their sources:

    mfu = flops_per_token * tokens_per_sec / (n_devices * peak_flops_per_device)

`flops_per_token` is `GPTConfig.flops_per_token(seq_len)`, see FLOPS_FORMULA. Peaks are dense
(never 2:4-sparsity) datasheet figures per JAX device for the dtype the matmuls really run in:
bfloat16/float16 on tensor cores / the MXU with float32 accumulation; float32 as JAX runs it, which
by default is TF32 on NVIDIA Ampere and later and one bfloat16 pass on TPU ("Matmul precision",
docs.jax.dev/en/latest/201/precision.html). An unknown chip or mode gives None: MFU is then
reported as unknown, never as a wrong number.

On a CPU there is no datasheet: the peak is measured by a short matmul probe once per machine and
dtype, then cached in `cpu_peak.json` under `cache_dir()` ($NANOGPT_CACHE_DIR, else
$XDG_CACHE_HOME/nanogpt_jax, else ~/.cache/nanogpt_jax), keyed by the CPU model, the cores this
process may use, the jax version and the dtype. So two runs on one machine divide by the same peak
and their MFU ratio equals their tokens/s ratio; the Peak's source names the file and when the
probe ran. Delete the file to measure again; `bench.peak_tflops` overrides any peak.

An MFU above 100% means the peak is too low (e.g. a probe on a busy machine). A training run on a
CPU that sees one probes again once (`remeasure_cpu_peak`; the cache keeps the higher figure). If
it stays above, the console shows "mfu >100% (peak too low?)" (`format_mfu`) and warns once; the
files (CSV, TensorBoard, summary.json, bench JSON) keep the raw fraction, so a reader can see what
was computed.
"""

from __future__ import annotations

import datetime
import functools
import json
import math
import os
import platform
import re
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
from absl import logging

from nanogpt_jax import download
from nanogpt_jax.errors import DataError

# The name printed beside every MFU figure, so a reader knows which convention produced it.
FLOPS_FORMULA = "6N + 12·L·d·T per token (nanoGPT/PaLM; N without position embeddings), full attention"

# Dense peak TFLOP/s per JAX device, per matmul kind. The first row whose pattern matches the
# normalised device_kind wins (lower case, '-' and '_' as spaces), so variants come before the
# generic name. Rows: (pattern, chip label, {kind: TFLOP/s}). Kinds: "bfloat16", "float16",
# "tf32" (float32 inputs on tensor cores), "float32" (true float32 arithmetic).
# A TPU v4 / v5p chip is one JAX device (megacore); v5e / v6e chips have one TensorCore.
PEAK_TFLOPS: tuple[tuple[str, str, dict[str, float]], ...] = (
    # cloud.google.com/tpu/docs/v6e: 918 TFLOP/s bf16 per chip; device_kind "TPU v6 lite"
    (r"\btpu v6( lite|e)\b", "TPU v6e", {"bfloat16": 918.0}),
    # cloud.google.com/tpu/docs/v5e: 197 TFLOP/s bf16 per chip; device_kind "TPU v5 lite"
    (r"\btpu v5( lite|e)\b", "TPU v5e", {"bfloat16": 197.0}),
    # cloud.google.com/tpu/docs/v5p: 459 TFLOP/s bf16 per chip; device_kind "TPU v5" (or "TPU v5p")
    (r"\btpu v5p?\b(?! lite)", "TPU v5p", {"bfloat16": 459.0}),
    # cloud.google.com/tpu/docs/v4: 275 TFLOP/s bf16 per chip; not "TPU v4 lite" (v4i, no Cloud figure)
    (r"\btpu v4\b(?! lite)", "TPU v4", {"bfloat16": 275.0}),
    # NVIDIA H100 datasheet (nvidia.com/en-us/data-center/h100): NVL, PCIe and SXM columns,
    # sparsity figures halved. H800 variants have the H100's compute; GH200 has the H100 SXM's.
    (r"\bh[18]00\b.*\bnvl\b", "H100 NVL", {"bfloat16": 835.5, "float16": 835.5, "tf32": 417.5, "float32": 60.0}),
    (r"\bh[18]00\b.*\bpcie\b", "H100 PCIe", {"bfloat16": 756.0, "float16": 756.0, "tf32": 378.0, "float32": 51.2}),
    (r"\bh[18]00\b|\bgh200\b", "H100 SXM", {"bfloat16": 989.4, "float16": 989.4, "tf32": 494.7, "float32": 66.9}),
    # NVIDIA H200 datasheet (nvidia.com/en-us/data-center/h200): NVL and SXM columns, sparsity halved
    (r"\bh200\b.*\bnvl\b", "H200 NVL", {"bfloat16": 835.5, "float16": 835.5, "tf32": 417.5, "float32": 60.0}),
    (r"\bh200\b", "H200 SXM", {"bfloat16": 989.4, "float16": 989.4, "tf32": 494.7, "float32": 66.9}),
    # NVIDIA A100 datasheet (nvidia.com/en-us/data-center/a100): SXM4 and PCIe, 40 and 80 GB alike
    (r"\ba[18]00\b", "A100", {"bfloat16": 312.0, "float16": 312.0, "tf32": 156.0, "float32": 19.5}),
    # NVIDIA L40S, L4 and A10 datasheets (dense columns). AWS's A10G has no NVIDIA datasheet: unknown.
    (r"\bl40s\b", "L40S", {"bfloat16": 362.05, "float16": 362.05, "tf32": 183.0, "float32": 91.6}),
    (r"\bl4\b", "L4", {"bfloat16": 121.0, "float16": 121.0, "tf32": 60.0, "float32": 30.3}),
    (r"\ba10\b", "A10", {"bfloat16": 125.0, "float16": 125.0, "tf32": 62.5, "float32": 31.2}),
)


@dataclass(frozen=True)
class Peak:
    """A peak in FLOP/s per device (None: unknown) and where it came from, printed beside MFU."""

    flops: float | None
    source: str


def mfu(
    flops_per_token: float, tokens_per_sec: float, n_devices: int, peak_flops_per_device: float | None
) -> float | None:
    """Model FLOPs utilisation as a fraction (0.5 = 50%); None when the peak is unknown.

    Args:
        flops_per_token: training FLOPs per token, forward + backward, from
            `GPTConfig.flops_per_token(seq_len)` (FLOPS_FORMULA: 6N + 12·L·d·T, nanoGPT's estimate_mfu
            after PaLM, Chowdhery et al. 2022, appendix B). It counts attention over the full T x T
            square; MaxText halves that term for the causal mask, so its MFU reads a little lower.
        tokens_per_sec: tokens processed per second by all devices together.
        n_devices: devices sharing that work (jax.device_count()).
        peak_flops_per_device: FLOP/s of one device, from `peak_flops()`; None or 0 = unknown.
    Raises:
        ValueError: n_devices < 1.
    """
    if n_devices < 1:
        raise ValueError(f"n_devices={n_devices} must be >= 1")
    if not peak_flops_per_device or peak_flops_per_device <= 0:
        return None
    return flops_per_token * tokens_per_sec / (n_devices * peak_flops_per_device)


def _normalise(device_kind: str) -> str:
    return " ".join(re.sub(r"[-_]", " ", device_kind.lower()).split())


def _float32_kind(platform: str) -> str | None:
    """What float32 matmuls really run as under `jax_default_matmul_precision`, or None if no
    datasheet figure fits (several bf16 passes on TPU, explicit dot algorithms)."""
    precision = jax.config.jax_default_matmul_precision
    precision = None if precision is None else str(precision).lower()
    fast = precision in (None, "default", "fastest", "bfloat16")
    if platform == "tpu":
        return "bfloat16" if fast else None  # "high"/"highest": 3 or 6 bf16 passes, no datasheet row
    if fast or precision in ("high", "tensorfloat32"):
        return "tf32"  # TF32 on Ampere and later (the only GPUs in the table)
    if precision in ("highest", "float32"):
        return "float32"
    return None


def peak_for_kind(device_kind: str, dtype: str, platform: str | None = None) -> Peak:
    """Datasheet peak of one device named `device_kind` (jax.Device.device_kind, e.g.
    "TPU v5 lite", "NVIDIA H100 80GB HBM3") for compute dtype `dtype` ("bfloat16", "float16",
    "float32"); flops None with the reason when the table has no figure. `platform` ("tpu", "gpu")
    picks how float32 matmuls run; None guesses it from the name."""
    dtype = jnp.dtype(dtype).name
    name = _normalise(device_kind)
    platform = platform or ("tpu" if name.startswith("tpu") else "gpu")
    kind = _float32_kind(platform) if dtype == "float32" else dtype
    for pattern, label, peaks in PEAK_TFLOPS:
        if re.search(pattern, name):
            if kind not in peaks:
                why = f"float32 at jax_default_matmul_precision={jax.config.jax_default_matmul_precision}"
                return Peak(None, f"{label} has no {why if kind is None else kind} peak in the table")
            what = "float32 as TF32" if dtype == "float32" and kind == "tf32" else kind
            return Peak(peaks[kind] * 1e12, f"{label} datasheet, {what} dense")
    return Peak(None, f"unknown device {device_kind!r}: set bench.peak_tflops for MFU")


CACHE_ENV = "NANOGPT_CACHE_DIR"  # where figures measured once per machine are kept (tests point it elsewhere)
CPU_PEAK_FILE = "cpu_peak.json"
_PROBE_VERSION = 1  # part of the cache key: a changed probe measures again


def cache_dir() -> Path:
    """This user's cache folder for figures measured once per machine: $NANOGPT_CACHE_DIR, else
    $XDG_CACHE_HOME/nanogpt_jax, else ~/.cache/nanogpt_jax (the XDG base directory convention)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "nanogpt_jax"


def _cpu_model() -> str:
    """The CPU's model name: /proc/cpuinfo's "model name" on Linux, else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _machine_key(dtype: str) -> str:
    """What the probe's result depends on: the CPU, the cores this process may run on (taskset and
    container limits included), the jax version (XLA's CPU matmuls), the dtype and the probe."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{_cpu_model()} | {cores} cores | jax {jax.__version__} | {dtype} | probe v{_PROBE_VERSION}"


def _read_cpu_peaks(path: Path) -> dict[str, dict]:
    """The cache file's entries; {} when it is missing, and (with a warning) when it is unreadable."""
    try:
        entries = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        logging.warning("CPU peak cache %s is unreadable (%s): measuring again", path, e)
        return {}
    if not isinstance(entries, dict):
        logging.warning("CPU peak cache %s holds no entries: measuring again", path)
        return {}
    return entries


def _valid(entry: object) -> bool:
    flops = entry.get("flops") if isinstance(entry, dict) else None
    return (isinstance(flops, (int, float)) and math.isfinite(flops) and flops > 0
            and isinstance(entry.get("measured"), str))


def _cpu_probe(dtype: str, device: jax.Device) -> float:
    """Best FLOP/s of a jitted square matmul on `device`, sized to take ~0.15 s, over up to 6 runs
    within about a second (other work on the same cores only ever slows a matmul down)."""
    dot = jax.jit(jnp.dot)
    n, seconds = 256, 0.0
    for _ in range(4):  # grow n until one matmul takes ~0.15 s (each size compiles once)
        a = jax.device_put(jax.random.normal(jax.random.key(0), (n, n), dtype), device)
        dot(a, a).block_until_ready()  # compile, warm the thread pool
        t0 = time.perf_counter()
        dot(a, a).block_until_ready()
        seconds = time.perf_counter() - t0
        if seconds >= 0.08 or n >= 4096:
            break
        n = min(4096, max(n + 256, 256 * round(n * (0.15 / max(seconds, 1e-4)) ** (1 / 3) / 256)))
    start = time.perf_counter()
    for _ in range(5):
        t0 = time.perf_counter()
        dot(a, a).block_until_ready()
        seconds = min(seconds, time.perf_counter() - t0)
        if time.perf_counter() - start > 1.0:
            break
    flops = 2 * n**3 / seconds
    logging.info("CPU matmul probe: %.1f GFLOP/s (%s, %dx%d)", flops / 1e9, dtype, n, n)
    return flops


@functools.cache
def _cpu_host_peak(dtype: str, remeasure: bool = False) -> tuple[float, str]:
    """(FLOP/s of this host's CPU in `dtype`, its source): the cached probe when cpu_peak.json holds
    this machine's entry, else a new probe (about a second), stored there for the next run. With
    `remeasure`, a new probe whose figure replaces the cached one only if it is higher (other work
    only ever slows a probe down). A cache folder that cannot be written is warned about; the
    measured figure is used all the same."""
    path = cache_dir() / CPU_PEAK_FILE
    key = _machine_key(dtype)
    entries = _read_cpu_peaks(path)
    entry = entries.get(key)
    if remeasure or not _valid(entry):
        flops = _cpu_probe(dtype, jax.local_devices(backend="cpu")[0])
        if _valid(entry) and entry["flops"] >= flops:
            return entry["flops"], f"CPU matmul probe, {dtype}, measured {entry['measured']}, cached in {path}"
        now = datetime.datetime.now(datetime.timezone.utc)
        entry = entries[key] = {"flops": flops, "measured": now.strftime("%Y-%m-%d %H:%M UTC")}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            download.write_text_atomic(path, json.dumps(entries, indent=2, sort_keys=True) + "\n")
        except (OSError, DataError) as e:
            logging.warning("cannot cache the CPU peak in %s (%s): the next run measures again", path, e)
            return flops, f"CPU matmul probe, {dtype}, measured {entry['measured']}, not cached"
    return entry["flops"], f"CPU matmul probe, {dtype}, measured {entry['measured']}, cached in {path}"


def cpu_peak(dtype: str = "float32") -> Peak:
    """Matmul FLOP/s of this host's CPU in `dtype` (cached per machine, see the module docstring),
    split over its JAX CPU devices (with --xla_force_host_platform_device_count=8 the 8 fake
    devices share one CPU, so n_devices x this = the host's figure)."""
    flops, source = _cpu_host_peak(jnp.dtype(dtype).name)
    return Peak(flops / len(jax.local_devices(backend="cpu")), source)


def remeasure_cpu_peak(dtype: str = "float32") -> Peak:
    """`cpu_peak`, probed again: for a run that measured an MFU above 100% against the cached figure,
    which can only mean the cached probe ran while other work shared the cores. The cache keeps the
    higher of the two figures, so every later run divides by it too (about a second)."""
    name = jnp.dtype(dtype).name
    flops, source = _cpu_host_peak(name, remeasure=True)
    _cpu_host_peak.cache_clear()  # later calls in this process read the file, now holding the higher figure
    logging.info("CPU peak measured again (an MFU above 100%%): %.1f GFLOP/s", flops / 1e9)
    return Peak(flops / len(jax.local_devices(backend="cpu")), source)


def device_peak(device: jax.Device, dtype: str, override_tflops: float | None = None) -> Peak:
    """Peak FLOP/s of one `device` for compute dtype `dtype`, with its source.

    `override_tflops` (bench.peak_tflops) wins; a CPU is measured once per machine (`cpu_peak`);
    accelerators come from PEAK_TFLOPS by `device.device_kind`. flops is None when unknown.
    """
    if override_tflops:
        return Peak(float(override_tflops) * 1e12, "given (bench.peak_tflops)")
    if device.platform == "cpu":
        return cpu_peak(dtype)
    return peak_for_kind(device.device_kind, dtype, device.platform)


def peak_flops(device: jax.Device, dtype: str, override_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of one device for `dtype` (see `device_peak`), or None (then warned once)."""
    peak = device_peak(device, dtype, override_tflops)
    if peak.flops is None or not math.isfinite(peak.flops):
        _warn_once(peak.source)
        return None
    return peak.flops


@functools.cache
def _warn_once(reason: str) -> None:
    logging.warning("MFU unknown: %s", reason)


def format_params(n: int) -> str:
    """A parameter count as the console shows it, to 3-4 significant figures: 85.0k, 10.65M, 1.558B
    (a tiny test model is not "0.0M")."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            value = n / scale
            return f"{value:.{3 if value < 10 else 2 if value < 100 else 1}f}{unit}"
    return str(n)


def format_mfu(fraction: float) -> str:
    """An MFU fraction as the console shows it: '51.2%', or '>100% (peak too low?)' above 1, which
    only a peak set too low can give (warned once per process: the raw figure stays in the files)."""
    if fraction <= 1:
        return f"{100 * fraction:.1f}%"
    _warn_above_100()
    return ">100% (peak too low?)"


@functools.cache
def _warn_above_100() -> None:
    logging.warning("MFU above 100%% is impossible: the peak FLOP/s it divides by is too low (on a CPU, a "
                    "probe on a busy machine: delete %s to measure again), or set bench.peak_tflops; the "
                    "files keep the raw figure", cache_dir() / CPU_PEAK_FILE)


def peak_bytes_in_use(device: jax.Device) -> int | None:
    """The device's peak bytes in use so far (`device.memory_stats()`), where the backend reports it
    (GPU, TPU); None on the CPU."""
    return (device.memory_stats() or {}).get("peak_bytes_in_use")
