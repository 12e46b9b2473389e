"""Benchmark records: JSON files, markdown tables, comparisons of two files and a chart of a sweep.

A record is one configuration: {"schema", "mode", "time", "settings" (what ran), "results"
(what was measured), "env" (hardware and software)}. A file holds {"schema", "records": [...]}.
"""

from __future__ import annotations

import datetime
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nanogpt.errors import DataError

log = logging.getLogger(__name__)

SCHEMA = "nanogpt-bench/1"
# the results each mode must hold (what compare and the chart read)
METRICS: dict[str, list[tuple[str, str]]] = {
    "train": [("ms_per_iter", "ms/iter"), ("tokens_per_s", "tokens/s"), ("mfu", "MFU"),
              ("peak_memory_mb", "peak MB")],
    "generate": [("prefill_tokens_per_s", "prefill tok/s"), ("decode_tokens_per_s", "decode tok/s"),
                 ("peak_memory_mb", "peak MB")],
    "data": [("tokens_per_s", "tokens/s")],
    "profile": [("trace_dir", "trace")],
}
CHART_METRIC = {"train": "tokens_per_s", "generate": "decode_tokens_per_s", "data": "tokens_per_s"}
NOT_MATCHED = {"data", "num_proc"}  # settings that name a path or a core count, not the work done


def make_record(mode: str, settings: dict[str, Any], results: dict[str, Any], env: dict[str, Any]) -> dict:
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return {"schema": SCHEMA, "mode": mode, "time": now, "settings": settings, "results": results, "env": env}


def check_record(record: Any, where: str = "record") -> None:
    """Raise DataError unless record follows the schema."""
    if not isinstance(record, dict) or record.get("schema") != SCHEMA:
        raise DataError(f"{where} is not a {SCHEMA} record")
    if record.get("mode") not in METRICS:
        raise DataError(f"{where}: unknown mode {record.get('mode')!r}")
    for part in ("settings", "results", "env"):
        if not isinstance(record.get(part), dict):
            raise DataError(f"{where}: {part} must be an object")
    missing = [k for k, _ in METRICS[record["mode"]] if k not in record["results"]]
    missing += [k for k in ("torch", "device_name", "threads") if k not in record["env"]]
    if missing:
        raise DataError(f"{where} lacks {', '.join(missing)}")


def save_records(records: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"schema": SCHEMA, "records": records}, indent=2) + "\n")
    return path


def load_records(path: str | Path) -> list[dict]:
    """Records of a bench JSON file, checked against the schema."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    records = data.get("records") if isinstance(data, dict) else data
    if not isinstance(records, list) or not records:
        raise DataError(f"{path} holds no nanogpt-bench records")
    for i, record in enumerate(records):
        check_record(record, f"{path} record {i}")
    return records


def label(record: dict) -> str:
    """A short name for a record's configuration."""
    s, mode = record["settings"], record["mode"]
    if mode == "data":
        if s.get("kind") == "prepare":
            return f"prepare {s['dataset']} {s['tokenizer']}"
        return f"loader {s['sampler']} B{s['batch_size']} T{s['block_size']}"
    base = f"{s['model']} B{s['batch_size']}"
    if mode == "generate":
        cache = "cache" if s["cache"] else "no cache"
        return f"{base} {s['prompt_tokens']}+{s['new_tokens']} {s['dtype']} {cache}"
    return f"{base} T{s['block_size']} {s['dtype']}" + (" compiled" if s["compile"] else "")


# ---- markdown -------------------------------------------------------------------------------


def _num(digits: int) -> Callable[[Any], str]:
    return lambda v: f"{v:,.{digits}f}"


def _yes(v: Any) -> str:
    return "yes" if v else "no"


def _pct(v: Any) -> str:
    return f"{100 * v:.1f}%"


def _mega(v: Any) -> str:
    return f"{v / 1e6:.2f}M"


Column = tuple[str, str, Callable[[Any], str]]  # header, key (results, settings or env), format
MODEL: list[Column] = [("model", "model", str), ("params", "params", _mega), ("batch", "batch_size", str)]
COLUMNS: dict[str, list[Column]] = {
    "train": [*MODEL, ("block", "block_size", str), ("dtype", "dtype", str), ("compile", "compile", _yes),
              ("ms/iter", "ms_per_iter", _num(1)), ("min ms", "ms_per_iter_min", _num(1)),
              ("tokens/s", "tokens_per_s", _num(0)), ("MFU", "mfu", _pct), ("compile s", "compile_s", _num(1)),
              ("peak MB", "peak_memory_mb", _num(0)), ("threads", "threads", str)],
    "generate": [*MODEL, ("prompt", "prompt_tokens", str), ("new", "new_tokens", str),
                 ("dtype", "dtype", str), ("KV cache", "cache", _yes),
                 ("prefill tok/s", "prefill_tokens_per_s", _num(0)),
                 ("decode tok/s", "decode_tokens_per_s", _num(1)), ("ms/token", "ms_per_token", _num(1)),
                 ("peak MB", "peak_memory_mb", _num(0)), ("threads", "threads", str)],
    "data": [("kind", "kind", str), ("sampler", "sampler", str), ("tokenizer", "tokenizer", str),
             ("batch", "batch_size", str), ("block", "block_size", str),
             ("tokens/s", "tokens_per_s", _num(0)), ("batches/s", "batches_per_s", _num(1)),
             ("MB/s", "mb_per_s", _num(2)), ("peak RSS MB", "peak_rss_mb", _num(0))],
    "profile": [("operator", "name", str), ("calls", "calls", str), ("self ms", "self_ms", _num(2)),
                ("total ms", "total_ms", _num(2))],
}


def _table(columns: list[Column], rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| " + " | ".join(h for h, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [fmt(row[key]) if row.get(key) is not None else "-" for _, key, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _footer(records: list[dict]) -> str:
    env = records[0]["env"]
    memory = sorted({r["results"]["memory_kind"] for r in records if "memory_kind" in r["results"]})
    peaks = sorted({r["results"]["peak_source"] for r in records if r["results"].get("peak_source")})
    threads = f"{env['threads']} thread" + ("s" if env["threads"] != 1 else "")
    parts = [f"{env['device_name']} ({env['device']}), {threads} of {env['cpu_count']} cores, torch {env['torch']}"]
    if env.get("load_avg_1min") is not None and env["device"] == "cpu":
        parts.append(f"load average {env['load_avg_1min']:.1f}")
    parts += [f"memory: {', '.join(memory)}"] if memory else []
    parts += [f"MFU peak: {'; '.join(peaks)}"] if peaks else []
    return "; ".join(parts)


def markdown(records: list[dict]) -> str:
    """A markdown table of records (all of one mode), with the hardware underneath."""
    mode = records[0]["mode"]
    if mode == "profile":
        r = records[0]["results"]
        lines = _table(COLUMNS["profile"], r["top_ops"]) + ["", f"trace: {r['trace_dir']}"]
    else:
        rows = [{**r["env"], **r["settings"], **r["results"]} for r in records]
        lines = _table(COLUMNS[mode], rows)
    return "\n".join([*lines, "", _footer(records)]) + "\n"


# ---- compare --------------------------------------------------------------------------------


def _key(record: dict) -> tuple:
    settings = {k: v for k, v in record["settings"].items() if k not in NOT_MATCHED}
    return record["mode"], json.dumps(settings, sort_keys=True)


def compare(a: list[dict], b: list[dict], a_name: str = "a", b_name: str = "b") -> str:
    """A markdown table of b / a for every metric of the configurations both files hold (matched by
    settings; when none match and both hold as many records, matched in order)."""
    by_key = {_key(r): r for r in a}
    pairs = [(by_key[_key(r)], r) for r in b if _key(r) in by_key]
    note = ""
    if not pairs and len(a) == len(b):
        pairs, note = list(zip(a, b, strict=True)), "\n(no identical settings: records paired in order)"
    if not pairs:
        raise DataError(f"no configuration of {b_name} matches one of {a_name}")
    lines = [f"a: {a_name} ({a[0]['env']['device_name']}, torch {a[0]['env']['torch']})",
             f"b: {b_name} ({b[0]['env']['device_name']}, torch {b[0]['env']['torch']})", "",
             "| configuration | metric | a | b | b/a |", "|---|---|---|---|---|"]
    for ra, rb in pairs:
        for key, name in METRICS[ra["mode"]]:
            va, vb = ra["results"].get(key), rb["results"].get(key)
            if not isinstance(va, (int, float)) or not isinstance(vb, (int, float)):
                continue
            ratio = f"{vb / va:.2f}x" if va else "-"
            lines.append(f"| {label(rb)} | {name} | {va:,.4g} | {vb:,.4g} | {ratio} |")
    return "\n".join(lines) + note + "\n"


def compare_files(a: str | Path, b: str | Path) -> str:
    return compare(load_records(a), load_records(b), str(a), str(b))


# ---- chart and files ------------------------------------------------------------------------


def chart(records: list[dict], path: str | Path) -> Path:
    """A horizontal bar chart of the mode's main throughput, one bar per configuration."""
    from matplotlib.figure import Figure  # lazy, and no pyplot: renders with Agg, needs no display

    mode = records[0]["mode"]
    metric = CHART_METRIC[mode]
    values = [r["results"].get(metric) or 0.0 for r in records]
    fig = Figure(figsize=(8, 1.2 + 0.45 * len(records)), layout="constrained")
    ax = fig.subplots()
    bars = ax.barh([label(r) for r in records], values, color="C0")
    if mode == "train":  # MFU next to each bar
        notes = [f"MFU {_pct(r['results']['mfu'])}" if r["results"].get("mfu") else "" for r in records]
        ax.bar_label(bars, notes, padding=3, fontsize="small")
    ax.invert_yaxis()  # first configuration on top, as in the table
    ax.set(xlabel=metric.replace("_per_s", "/s").replace("_", " "),
           title=f"nanogpt-bench {mode}: {records[0]['env']['device_name']}")
    ax.grid(axis="x", alpha=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def write_outputs(records: list[dict], out: str | Path, name: str, with_chart: bool = True) -> list[Path]:
    """<out>/<name>.json, .md and, for a sweep of two or more configurations, .png."""
    out = Path(out)
    paths = [save_records(records, out / f"{name}.json")]
    md = out / f"{name}.md"
    md.write_text(markdown(records))
    paths.append(md)
    if with_chart and len(records) > 1 and records[0]["mode"] in CHART_METRIC:
        try:
            paths.append(chart(records, out / f"{name}.png"))
        except ImportError:
            log.warning("no chart: matplotlib is not installed (pip install 'nanogpt[loggers]')")
    return paths
