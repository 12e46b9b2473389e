"""The comparison report: a JSON file of records and a markdown table (one row per model)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nanogpt.hf import PRETRAINED

# how each kind of metric is shown in the table
DIGITS = {"_loss": 4, "_ppl": 2, "_acc": 4, "_acc_norm": 4}


def default_out(models: Sequence[str]) -> str:
    """Next to the checkpoint for one local model (<out_dir>/eval, <dir>/<file stem>_eval),
    else eval_report in the working directory."""
    if len(models) == 1 and models[0] not in PRETRAINED:
        path = Path(models[0])
        if path.is_dir():
            return str(path / "eval")
        if path.is_file():
            return str(path.with_name(f"{path.stem}_eval"))
    return "eval_report"


def _fmt(key: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    for suffix in sorted(DIGITS, key=len, reverse=True):  # _acc_norm before _acc
        if key.endswith(suffix):
            return f"{value:.{DIGITS[suffix]}f}"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def markdown_table(records: list[dict]) -> str:
    """Rows = models, columns = every metric any of them has (in first-seen order)."""
    columns: list[str] = []
    for r in records:
        columns += [k for k in r["metrics"] if k not in columns]
    lines = ["| model | params | " + " | ".join(columns) + " |",
             "|---|---:|" + "---:|" * len(columns)]
    for r in records:
        cells = [_fmt(c, r["metrics"].get(c)) for c in columns]
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.2f}M | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def samples_text(records: list[dict]) -> str:
    """The sample task's generations, for a human look."""
    parts = []
    for r in records:
        for s in r.get("samples", []):
            parts.append(f"--- {r['model']} | {s['prompt']!r}\n{s['prompt']}{s['text']}\n")
    return "\n".join(parts)


def write_report(records: list[dict], out: str | Path) -> tuple[Path, Path]:
    """Write <out>.json (the full records) and <out>.md (the table, then any samples)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out.with_name(out.name + ".json"), out.with_name(out.name + ".md")
    json_path.write_text(json.dumps(records, indent=2) + "\n")
    md = markdown_table(records)
    if any(r.get("samples") for r in records):
        md += "\n## Samples\n\n```\n" + samples_text(records) + "```\n"
    md_path.write_text(md)
    return json_path, md_path
