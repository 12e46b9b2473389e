"""Benchmark reports: the figures of a run as JSON, a markdown table, ratios against an earlier run, a chart.

A report is one `run_bench.py` run:

    {"schema": "nanogpt_jax-bench/1", "mode": "train", "time": "2025-...Z",
     "env": {jax, jaxlib, flax, optax, python, backend, device_kind, device_count, process_count,
             cpu, cpu_count, load_avg_1m, xla_flags},
     "config": {the resolved config, every section},
     "rows": [{"settings": {what ran: shape, batch, dtype, ...}, "results": {what was measured}}, ...]}

`KEYS` lists the results every row of a mode holds (`check` enforces it, tests read it); `compare`
pairs the rows of two reports by their settings and prints new / old for the `METRICS` of the mode.
"""

from __future__ import annotations

import datetime
import io
import json
import math
import os
import platform
import statistics
import sys
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import jax
import numpy as np

from nanogpt_jax import metrics, storage
from nanogpt_jax.errors import DataError

SCHEMA = "nanogpt_jax-bench/1"
MODES = ("train", "generate", "data", "profile")

_TRAIN_KEYS = ("compile_s", "first_step_s", "ms_per_step", "ms_p10", "ms_p90", "tokens_per_s",
               "tokens_per_s_per_device", "flops_per_token", "flops_formula", "peak_flops_per_device",
               "peak_source", "mfu", "memory", "loss_first", "loss_last")
# results each row of a mode holds (None where a figure is unknown, e.g. MFU on an unknown chip)
KEYS: dict[str, tuple[str, ...]] = {
    "train": _TRAIN_KEYS,
    "profile": ("trace_dir", "trace_files", "ms_per_step", "op_ms_per_step", "top_ops", "top_sources"),
    "generate": ("compile_s", "prefill_ms", "decode_tokens_per_s", "decode_tokens_per_s_all_rows", "ms_per_token",
                 "call_s"),
    "data": ("host_ms_per_batch", "host_batches_per_s", "ms_per_batch", "batches_per_s", "tokens_per_s"),
}
# the figures `compare` prints ratios of: (key, label)
METRICS: dict[str, tuple[tuple[str, str], ...]] = {
    "train": (("ms_per_step", "ms/step"), ("tokens_per_s", "tokens/s"), ("mfu", "MFU"), ("compile_s", "compile s"),
              ("temp_bytes", "temp bytes")),
    "profile": (("ms_per_step", "ms/step"),),
    "generate": (("prefill_ms", "prefill ms"), ("decode_tokens_per_s", "decode tok/s"), ("compile_s", "compile s")),
    "data": (("host_ms_per_batch", "host ms/batch"), ("batches_per_s", "batches/s")),
}


# ---- figures ---------------------------------------------------------------------------------


def train_figures(step_times_s: Sequence[float], *, tokens_per_step: int, n_devices: int, flops_per_token: float,
                  peak: metrics.Peak) -> dict[str, Any]:
    """Step-time statistics, throughput and MFU of timed train steps.

    Args:
        step_times_s: wall seconds of each timed step (after compilation and warm-up).
        tokens_per_step: gradient_accumulation_steps x batch_size x block_size.
        n_devices: devices sharing the step (the mesh size).
        flops_per_token: `GPTConfig.flops_per_token(block_size)` (`metrics.FLOPS_FORMULA`).
        peak: `metrics.device_peak(...)` of one device; `peak.flops` None = unknown, so MFU is None.
    Returns:
        ms_per_step (median), ms_p10, ms_p90, tokens_per_s (from the median), tokens_per_s_per_device,
        flops_per_token, flops_formula, peak_flops_per_device, peak_source, mfu (a fraction, or None).
    """
    if not step_times_s:
        raise ValueError("no timed steps")
    median = statistics.median(step_times_s)
    tokens_per_s = tokens_per_step / median
    return {
        "ms_per_step": median * 1e3,
        "ms_p10": float(np.percentile(step_times_s, 10)) * 1e3,
        "ms_p90": float(np.percentile(step_times_s, 90)) * 1e3,
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_per_device": tokens_per_s / n_devices,
        "flops_per_token": flops_per_token,
        "flops_formula": metrics.FLOPS_FORMULA,
        "peak_flops_per_device": peak.flops,
        "peak_source": peak.source,
        "mfu": metrics.mfu(flops_per_token, tokens_per_s, n_devices, peak.flops),
    }


def memory_figures(compiled: Any, device: jax.Device) -> dict[str, int | None]:
    """Bytes per device of a compiled step (`compiled.memory_analysis()`: XLA's buffer assignment)
    and the device's peak bytes in use so far (`device.memory_stats()`; None where the backend,
    e.g. the CPU, does not report it)."""
    m = compiled.memory_analysis()

    def get(name: str) -> int | None:
        value = getattr(m, name, None) if m is not None else None
        return None if value is None else int(value)

    return {"argument_bytes": get("argument_size_in_bytes"), "output_bytes": get("output_size_in_bytes"),
            "alias_bytes": get("alias_size_in_bytes"), "temp_bytes": get("temp_size_in_bytes"),
            "generated_code_bytes": get("generated_code_size_in_bytes"),
            "compiled_peak_bytes": get("peak_memory_in_bytes"),
            "device_peak_bytes": metrics.peak_bytes_in_use(device)}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_version(package: str) -> str | None:
    """The installed version of a distribution (e.g. "jax", "orbax-checkpoint"), None when it is not installed."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    """What the figures depend on: library versions, devices, the host CPU and its load."""
    device = jax.devices()[0]
    return {
        **{name: package_version(name) for name in ("jax", "jaxlib", "flax", "optax", "numpy")},
        "python": platform.python_version(), "backend": jax.default_backend(),
        "device_kind": device.device_kind, "device_count": jax.device_count(),
        "process_count": jax.process_count(), "cpu": _cpu_name(), "cpu_count": os.cpu_count(),
        # other work on the same cores slows a CPU benchmark down: the 1-minute load average says how much
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def make_report(mode: str, rows: list[dict], config: dict, env: dict | None = None) -> dict[str, Any]:
    """A report dict (see the module docstring) from rows of {"settings": ..., "results": ...}."""
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return {"schema": SCHEMA, "mode": mode, "time": now, "env": env or environment(), "config": config,
            "rows": rows}


# ---- files -----------------------------------------------------------------------------------


def check(report: Any, where: str = "report") -> dict:
    """Raise DataError (one line) unless `report` is a bench report whose rows hold their mode's KEYS."""
    if not isinstance(report, dict) or report.get("schema") != SCHEMA:
        raise DataError(f"{where} is not a {SCHEMA} report (written by run_bench.py)")
    mode = report.get("mode")
    if mode not in KEYS:
        raise DataError(f"{where}: unknown mode {mode!r}")
    rows = report.get("rows")
    if not isinstance(rows, list) or not all(isinstance(r, dict) and isinstance(r.get("results"), dict)
                                             and isinstance(r.get("settings"), dict) for r in rows):
        raise DataError(f"{where}: rows must be a list of {{settings, results}} objects")
    for i, row in enumerate(rows):
        missing = [k for k in KEYS[mode] if k not in row["results"]]
        if missing:
            raise DataError(f"{where}: row {i} lacks {', '.join(missing)}")
    return report


def load(path: str | os.PathLike) -> dict:
    """A report read back from JSON and checked; DataError naming the file otherwise."""
    try:
        report = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DataError(f"bench.compare={str(path)!r}: no such file; give a result.json of an earlier run") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    return check(report, str(path))


def jsonable(x: Any) -> Any:
    """`x` with numpy scalars as Python numbers and non-finite floats as None (JSON has no NaN)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.integer, np.floating)):
        return x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write(report: dict, out: str | os.PathLike) -> list[Path]:
    """Write `out` (JSON), the markdown table beside it (.md) and, for two rows or more, a chart (.png)."""
    out = storage.path(out)  # a local path or a gs:// URL
    storage.write_atomic(out, json.dumps(jsonable(report), indent=1) + "\n")
    md = out.with_suffix(".md")
    storage.write_atomic(md, markdown(report))
    paths = [out, md]
    if len(report["rows"]) > 1 and report["mode"] != "profile":
        paths.append(chart(report, out.with_suffix(".png")))
    return paths


# ---- markdown --------------------------------------------------------------------------------


def num(digits: int) -> Callable[[Any], str]:
    """A table cell's format: thousands separated, `digits` decimals."""
    return lambda v: f"{v:,.{digits}f}"


def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def mib(v: float) -> str:
    """Bytes as a table cell in MiB."""
    return f"{v / 2**20:,.1f}"


def _mega(v: float) -> str:
    return f"{v / 1e6:.1f}M"


Column = tuple[str, str, Callable[[Any], str]]  # header, key (in settings, results or results.memory), format
COLUMNS: dict[str, list[Column]] = {
    "train": [("model", "model", str), ("params", "params", _mega), ("batch", "batch_size", str),
              ("block", "block_size", str), ("accum", "grad_accum", str), ("dtype", "dtype", str),
              ("attention", "attention", str), ("loss", "loss", str),
              ("compile s", "compile_s", num(1)), ("ms/step", "ms_per_step", num(1)), ("p10", "ms_p10", num(1)),
              ("p90", "ms_p90", num(1)), ("tokens/s", "tokens_per_s", num(0)),
              ("tokens/s/device", "tokens_per_s_per_device", num(0)), ("MFU", "mfu", metrics.format_mfu),
              ("args MiB", "argument_bytes", mib), ("temp MiB", "temp_bytes", mib),
              ("device peak MiB", "device_peak_bytes", mib)],
    "profile": [("op", "name", str), ("jax op", "op_name", str), ("ms/step", "ms_per_step", num(2)),
                ("share", "share", _pct)],
    "profile_sources": [("jax op (all layers)", "source", str), ("ops", "ops", str),
                        ("ms/step", "ms_per_step", num(2)), ("share", "share", _pct)],
    "generate": [("model", "model", str), ("weights", "weights", str), ("batch", "batch_size", str),
                 ("dtype", "dtype", str),
                 ("KV cache", "kv_cache", lambda v: "yes" if v else "no"), ("prompt", "prompt_len", str),
                 ("new", "new_tokens", str), ("compile s", "compile_s", num(1)), ("prefill ms", "prefill_ms", num(1)),
                 ("decode tok/s", "decode_tokens_per_s", num(1)), ("ms/token", "ms_per_token", num(2)),
                 ("tok/s all rows", "decode_tokens_per_s_all_rows", num(1))],
    "data": [("source", "source", str), ("batch", "batch_size", str), ("block", "block_size", str),
             ("accum", "grad_accum", str), ("host ms/batch", "host_ms_per_batch", num(3)),
             ("host batches/s", "host_batches_per_s", num(0)), ("ms/batch to device", "ms_per_batch", num(3)),
             ("batches/s", "batches_per_s", num(0)), ("tokens/s", "tokens_per_s", num(0))],
}


def _cells(row: dict) -> dict[str, Any]:
    return {**row["settings"], **row["results"], **(row["results"].get("memory") or {})}


def markdown_table(columns: list[Column], rows: list[dict[str, Any]],
                   unknown: dict[str, str] | None = None) -> list[str]:
    """The lines of a markdown table: one column per (header, key, format), one line per row dict;
    a missing or None cell shows `unknown[key]`, else "-"."""
    lines = ["| " + " | ".join(h for h, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [fmt(row[key]) if row.get(key) is not None else (unknown or {}).get(key, "-")
                 for _, key, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def footer(report: dict) -> str:
    """One line on the machine, the software, the load and (train) the FLOP formula and peak."""
    env = report["env"]
    parts = [f"{env['device_count']} x {env['device_kind']} ({env['backend']}), {env['cpu']} "
             f"({env['cpu_count']} CPUs)", f"jax {env['jax']}, flax {env['flax']}, optax {env['optax']}"]
    if env.get("load_avg_1m") is not None:
        parts.append(f"load average {env['load_avg_1m']:.1f}")
    parts.append(report["time"])
    lines = ["; ".join(parts)]
    if report["mode"] == "train":
        peaks = sorted({r["results"]["peak_source"] for r in report["rows"]})
        lines.append(f"MFU = flops_per_token x tokens/s / (devices x peak); flops_per_token: {metrics.FLOPS_FORMULA}; "
                     f"peak: {'; '.join(peaks)}")
    return "\n".join(lines)


def markdown(report: dict) -> str:
    """The report as a markdown table (one row per configuration) with the environment underneath."""
    mode = report["mode"]
    if mode == "profile":
        lines = []
        for row in report["rows"]:
            r = row["results"]
            lines += [f"trace of {row['settings']['steps']} steps ({r['ms_per_step']:.1f} ms/step traced, "
                      f"{r['op_ms_per_step']:.1f} ms/step in compiled operations over all threads): "
                      f"{r['trace_dir']}", ""]
            lines += markdown_table(COLUMNS["profile_sources"], r["top_sources"]) + [""]
            lines += markdown_table(COLUMNS["profile"], r["top_ops"])
    else:
        lines = markdown_table(COLUMNS[mode], [_cells(r) for r in report["rows"]], unknown={"mfu": "unknown"})
    return "\n".join([*lines, "", footer(report)]) + "\n"


# ---- compare ---------------------------------------------------------------------------------


# settings that name a place or the weights' values, not the work done
_NOT_MATCHED = ("data_dir", "weights")


def _key(row: dict) -> str:
    return json.dumps({k: v for k, v in row["settings"].items() if k not in _NOT_MATCHED}, sort_keys=True)


def label(row: dict) -> str:
    """A short name for a row's configuration, e.g. `4x4x128 B12 T64 float32`."""
    s = row["settings"]
    parts = [s.get("model", s.get("source", "")), f"B{s['batch_size']}"]
    if "kv_cache" in s:  # generate: prompt + new tokens
        parts.append(f"{s['prompt_len']}+{s['new_tokens']}")
    elif "block_size" in s:
        parts.append(f"T{s['block_size']}")
    if "dtype" in s:
        parts.append(s["dtype"])
    if "kv_cache" in s:
        parts.append("cache" if s["kv_cache"] else "no cache")
    if s.get("grad_accum", 1) > 1:
        parts.append(f"x{s['grad_accum']}")
    return " ".join(p for p in parts if p)


def compare(old: dict, new: dict, old_name: str = "old", new_name: str = "new") -> str:
    """A markdown table of new / old for each figure of `METRICS` in the rows both reports hold,
    paired by their settings (or in order when none match and both have as many rows).

    Raises DataError when the reports are of different modes or share no configuration.
    """
    if old["mode"] != new["mode"]:
        raise DataError(f"cannot compare a {new['mode']} run with a {old['mode']} report ({old_name})")
    by_key = {_key(r): r for r in old["rows"]}
    pairs = [(by_key[_key(r)], r) for r in new["rows"] if _key(r) in by_key]
    note = ""
    if not pairs and len(old["rows"]) == len(new["rows"]):
        pairs = list(zip(old["rows"], new["rows"], strict=True))
        note = "\n(no configuration matches exactly: rows paired in order)"
    if not pairs:
        raise DataError(f"no configuration of this run matches one in {old_name}; compare runs of the same config")
    lines = [f"old: {old_name} ({old['time']}, {old['env']['device_kind']}, jax {old['env']['jax']})",
             f"new: {new_name} ({new['time']}, {new['env']['device_kind']}, jax {new['env']['jax']})", "",
             "| configuration | figure | old | new | new/old |", "|---|---|---|---|---|"]
    for a, b in pairs:
        ca, cb = _cells(a), _cells(b)
        for key, name in METRICS[new["mode"]]:
            va, vb = ca.get(key), cb.get(key)
            if not isinstance(va, (int, float)) or not isinstance(vb, (int, float)):
                continue
            ratio = f"{vb / va:.2f}x" if va else "-"
            lines.append(f"| {label(b)} | {name} | {va:,.4g} | {vb:,.4g} | {ratio} |")
    return "\n".join(lines) + note + "\n"


# ---- chart -----------------------------------------------------------------------------------

_CHART = {"train": ("tokens_per_s", "tokens/s"), "generate": ("decode_tokens_per_s", "decode tokens/s per row"),
          "data": ("batches_per_s", "batches/s (with the copy to the devices)")}


def chart(report: dict, path: str | os.PathLike) -> Path:
    """A horizontal bar chart of the mode's main throughput, one bar per row (e.g. a sweep over
    bench.batch_sizes), MFU written beside each training bar."""
    from matplotlib.figure import Figure  # no pyplot: renders with Agg, needs no display

    mode, rows = report["mode"], report["rows"]
    key, xlabel = _CHART[mode]
    values = [r["results"].get(key) or 0.0 for r in rows]
    fig = Figure(figsize=(8, 1.4 + 0.45 * len(rows)), layout="constrained")
    ax = fig.subplots()
    bars = ax.barh([label(r) for r in rows], values, color="C0")
    if mode == "train":
        notes = [f"MFU {metrics.format_mfu(r['results']['mfu'])}" if r["results"].get("mfu") is not None
                 else "MFU unknown" for r in rows]
        ax.bar_label(bars, notes, padding=3, fontsize="small")
    ax.invert_yaxis()  # first row on top, as in the table
    env = report["env"]
    ax.set(xlabel=xlabel, title=f"run_bench.py {mode}: {env['device_count']} x {env['device_kind']}")
    ax.grid(axis="x", alpha=0.3)
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=110)
    storage.write_atomic(path, image.getvalue())
    path = storage.path(path)
    return path


def print_report(report: dict, paths: Sequence[Path] = (), comparison: str | None = None) -> None:
    """The markdown table to stdout, where the files went, then the comparison (if any)."""
    sys.stdout.write(markdown(report))
    if paths:
        sys.stdout.write("\nwrote " + ", ".join(str(p) for p in paths) + "\n")
    if comparison:
        sys.stdout.write("\n" + comparison)
    sys.stdout.flush()
