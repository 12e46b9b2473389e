"""One command that proves a machine with an accelerator: what it runs, that it computes right, how fast.

    python -m nanogpt_jax.device_check --out=device_check                  # a GPU or TPU: sized for ~5 min
    python -m nanogpt_jax.device_check --out=dc --nanogpt=/tmp/nanoGPT     # + nanoGPT's bench.py beside ours
    python -m nanogpt_jax.device_check --out=dc --quick                    # tiny shapes: under a minute
    python -m nanogpt_jax.device_check --out=dc --batch_sizes=4,8          # other train rows (per device)

It writes OUT/device_check.json (every figure) and OUT/device_check.md (the same as tables, to paste
into an issue), rewritten after each section so that a run cut short keeps what it measured; prints
the markdown; and exits with status 1 when a correctness check failed (0 otherwise: a speed section
that could not run is reported, not fatal). Every section runs on its own: one that raises is
recorded as failed with its one-line reason, and the others still run. The sections below are
functions of nanogpt_jax.device_sections; this module runs them in order and writes the report.

- env: versions (python, jax, jaxlib, flax, optax, orbax-checkpoint, jax's accelerator plugins,
  cuDNN, torch) and devices (platform, kind, count, processes, the memory JAX may use per device).
- gpu_target_config (GPUs): XLA's description of this GPU (`GpuTargetConfigProto` in text form)
  written to OUT/gpu_target_config.txtpb, for compiling without it:
  `python -m nanogpt_jax.aot --topology=gpu-1 --gpu_target_config=OUT/gpu_target_config.txtpb`.
- checks, each pass/fail with its error and tolerance (`TOLERANCE`; errors are norm-wise relative,
  ||got - want|| / ||want|| over the output, and over every gradient together):
  attention: the kernel model.attention="auto" picks here (`attention.attention_impl`: cudnn on a GPU in
  bfloat16, splash on a TPU, xla on a CPU, where the check compares xla with itself) against the XLA
  attention, one GPT-2 attention layer's output and its gradients with respect to the input and the
  weights, in bfloat16 and float32. chunked_loss: model.loss="chunked" with a small loss_chunk (the
  last chunk padded) against model.loss="full", the mean loss and every parameter's gradient, in
  float32 and, on an accelerator, bfloat16.
  generation: greedy tokens of `generate` (KV cache) against `bench.generate.recompute_greedy` (a
  full forward per token), float32: identical or failed. The float32 checks run at
  jax_default_matmul_precision=float32: a GPU's default TF32 or a TPU's single bfloat16 pass would
  make rounding, not the algorithm, the difference.
- generate: `bench.generate.bench_case`, greedy with the KV cache, GPT-2 124M shape, batch 1 and 8:
  new tokens/s per row (prefill included) and over all rows.
- train (run last): `bench.train.train_row` (the real jitted step, random ids) for GPT-2 124M, block
  1024, bfloat16 at a few per-device batch sizes, ascending: ms/step, tokens/s, MFU (`metrics.mfu`),
  the device's peak bytes in use (the process's peak so far: rows ascend after everything else, so
  it is the row's) against the compiled step's memory_analysis(), and on a GPU the deviceless AOT
  figure of the largest batch (`aot.compile_train_step` for this GPU's dumped description).
- side_by_side (--nanogpt=DIR, a karpathy/nanoGPT checkout): scripts/nanogpt_side_by_side.py's step
  comparison, nanoGPT's bench.py (torch.compile on a GPU) against run_bench.py, tokens/s and MFU of
  both (a few minutes more). It runs first, before this process starts JAX's backend, so that each
  side's process has the accelerator's whole memory.

Quick mode (--quick, and always on a machine without an accelerator): a 2-layer, width-64 model,
block 64-128, a few steps, the whole command well under a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import jax
from absl import logging

from nanogpt_jax import cli, metrics, storage
from nanogpt_jax.bench import report
from nanogpt_jax.device_sections import (
    FULL,
    QUICK,
    check_nanogpt,
    environment,
    fresh_params,
    generate_rows,
    now,
    probe_platform,
    run_checks,
    run_section,
    save_gpu_target_config,
    side_by_side,
    train_rows,
)
from nanogpt_jax.errors import UserError, fail

SCHEMA = "nanogpt_jax-device-check/1"


# ---- the report -------------------------------------------------------------------------------


def _sci(v: float) -> str:
    return f"{v:.2e}"


def _env_lines(r: dict) -> list[str]:
    env = r["env"]
    if env["status"] != "ok":
        return [f"{env['status']}: {env['reason']}"]
    limit = f"{env['bytes_limit'] / 2**30:.1f} GiB usable per device (bytes_limit)" if env.get("bytes_limit") else \
        "not reported (CPU)"
    extra = {**env["packages"], **env["plugins"]}
    target = r["gpu_target_config"]
    target_cell = f"`{target['path']}` (`--gpu_target_config=` of `python -m nanogpt_jax.aot`)" if \
        target["status"] == "ok" else f"{target['status']}: {target['reason']}"
    rows = [("devices", f"{env['device_count']} x {env['device_kind']} ({env['platform']}), "
                        f"{env['process_count']} process(es)"), ("device memory", limit),
            ("python / jax / jaxlib", f"{env['python']} / {env['jax']} / {env['jaxlib']}"),
            ("flax / optax", f"{env['flax']} / {env['optax']}"),
            ("other packages", ", ".join(f"{k} {v}" for k, v in extra.items() if v) or "-"),
            ("host", f"{env['cpu']} ({env['cpu_count']} CPUs)" + (
                f", load average {env['load_avg_1m']:.1f}" if env.get("load_avg_1m") is not None else "")),
            ("XLA target description", target_cell)]
    return ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]


CHECK_COLUMNS: list[report.Column] = [
    ("check", "name", str), ("dtype", "dtype", str), ("compared", "compared", str),
    ("max abs error", "max_abs_error", _sci), ("relative error", "rel_error", _sci),
    ("tolerance", "tolerance", lambda v: "exact" if v == 0 else f"{v:g}"),
    ("result", "result", str), ("note", "note", str)]
TRAIN_COLUMNS: list[report.Column] = [
    ("batch/device", "batch_per_device", str), ("attention", "attention", str), ("loss", "loss", str),
    ("compile s", "compile_s", report.num(1)), ("ms/step", "ms_per_step", report.num(1)),
    ("tokens/s", "tokens_per_s", report.num(0)), ("MFU", "mfu_cell", str),
    ("device peak MiB", "device_peak_bytes", report.mib), ("compiled MiB", "compiled_bytes", report.mib),
    ("AOT MiB", "aot_bytes", report.mib), ("error", "error", str)]
GENERATE_COLUMNS: list[report.Column] = [
    ("model", "model", str), ("batch", "batch_size", str), ("dtype", "dtype", str), ("prompt", "prompt_len", str),
    ("new", "new_tokens", str), ("compile s", "compile_s", report.num(1)),
    ("tokens/s per row", "tokens_per_s", report.num(1)), ("tokens/s all rows", "tokens_per_s_all_rows", report.num(1))]


def _check_cells(c: dict) -> dict:
    return {**c, "result": "pass" if c["passed"] else "**FAIL**", "note": c.get("error") or c.get("note") or None}


def _train_cells(row: dict) -> dict:
    if row["status"] != "ok":
        return {"batch_per_device": row["batch_per_device"], "error": row["reason"]}
    r = row["results"]
    aot = row.get("aot") or {}
    mfu = "unknown" if r["mfu"] is None else metrics.format_mfu(r["mfu"])  # no peak for this chip
    return {"batch_per_device": row["batch_per_device"], **row["settings"], **r, **r["memory"], "mfu_cell": mfu,
            "aot_bytes": aot.get("compiled_bytes")}


def _section_lines(title: str, section: dict, table: Callable[[dict], list[str]]) -> list[str]:
    if section["status"] != "ok":
        return [f"## {title}", "", f"{section['status']}: {section['reason']}", ""]
    return [f"## {title}", "", *table(section), ""]


def _train_table(section: dict) -> list[str]:
    rows = section["rows"]
    first = next((r for r in rows if r["status"] == "ok"), None)
    head = []
    if first:
        s, res = first["settings"], first["results"]
        head = [f"{s['model']} ({metrics.format_params(s['params'])} parameters), {s['dtype']}, "
                f"block {s['block_size']}, "
                f"{s['mesh']['data']} device(s) data-parallel, {s['vocab_size']} vocabulary, random ids. MFU: "
                f"{res['flops_formula']}; peak: {res['peak_source']}. Device peak: the process's peak bytes in use "
                "after the row (rows run ascending, last); compiled: memory_analysis() arguments + outputs not "
                "aliased + temporaries + code; AOT: the same step compiled without the device.", ""]
    aot = section["aot"]
    if aot["status"] != "ok":
        tail = ["", f"AOT: {aot['status']}: {aot['reason']}"]
    else:
        tail = ["", f"AOT: the step compiled for `{aot['topology']}` without the device ({aot['compile_s']:.1f} s)"
                + (f"; XLA: {aot['error']}" if aot["error"] else "")]
    return head + report.markdown_table(TRAIN_COLUMNS, [_train_cells(r) for r in rows]) + tail


def _side_table(section: dict) -> list[str]:
    a, b = section["nanogpt"], section["ours"]
    pct = lambda v: "unknown" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    torch_side = "nanoGPT (torch.compile)" if section["nanogpt_compile"] else "nanoGPT (eager)"
    return [f"{section['shape']}, {section['dtype']}; MFU peak: {section['peak_source']}", "",
            f"| figure | {torch_side} | nanogpt_jax | ours / theirs |", "|---|---|---|---|",
            f"| tokens/s | {a['tokens_per_s']:,.0f} | {b['tokens_per_s']:,.0f} | "
            f"{b['tokens_per_s'] / a['tokens_per_s']:.2f}x |",
            f"| ms/step | {a['ms_per_step']:,.1f} | {b['ms_per_step']:,.1f} | |",
            f"| MFU | {pct(a['mfu'])} | {pct(b['mfu'])} | |"]


def markdown(r: dict) -> str:
    """The report as markdown: environment, checks, train step, generation and side-by-side tables."""
    env = r["env"]
    where = f"{env.get('device_count', '?')} x {env.get('device_kind', '?')}"
    checks = r["checks"]
    n_failed = sum(not c["passed"] for c in checks)
    verdict = f"all {len(checks)} passed" if not n_failed else f"{n_failed} of {len(checks)} FAILED"
    lines = [f"# Device check: {where}, {r['mode']} mode", "",
             f"{r['time']}; {r['quick_reason'] or 'full shapes'}; {r.get('seconds', 0):.0f} s", "",
             "## Environment", "", *_env_lines(r), "", f"## Correctness: {verdict}", "",
             *report.markdown_table(CHECK_COLUMNS, [_check_cells(c) for c in checks]), "",
             "Relative error: ||got - want|| / ||want|| over the output, and over all gradients together; "
             "float32 checks at jax_default_matmul_precision=float32.", ""]
    lines += _section_lines("Train step", r["train"], _train_table)
    lines += _section_lines("Generation (greedy, KV cache; prefill included)", r["generate"],
                            lambda s: report.markdown_table(GENERATE_COLUMNS, s["rows"]))
    lines += _section_lines("Side by side with nanoGPT", r["side_by_side"], _side_table)
    return "\n".join(lines).rstrip() + "\n"


def write(r: dict, out_dir: Path) -> list[Path]:
    """OUT/device_check.json and OUT/device_check.md from the report so far (each replaced whole)."""
    paths = [out_dir / "device_check.json", out_dir / "device_check.md"]
    storage.write_atomic(paths[0], json.dumps(report.jsonable(r), indent=1) + "\n")
    storage.write_atomic(paths[1], markdown(r))
    return paths


# ---- the command ------------------------------------------------------------------------------


def _pending(what: str) -> dict:
    return {"status": "not run", "reason": f"{what} had not run when this was written"}


def run(out_dir: Path, quick: bool = False, nanogpt: Path | None = None,
        batch_sizes: Sequence[int] | None = None) -> dict[str, Any]:
    """Run every section (see the module docstring) and write OUT/device_check.{json,md} after each.

    Args:
        out_dir: an existing folder for the report (and gpu_target_config.txtpb on a GPU).
        quick: tiny shapes (QUICK); forced on when the machine has no accelerator.
        nanogpt: a checked nanoGPT checkout (`check_nanogpt`), or None to skip the side by side.
        batch_sizes: train rows' sequences per device; default the mode's (FULL: 8, 16, 32).
    Returns:
        the report: {"schema", "time", "mode", "quick_reason", "seconds", "passed", "env",
        "gpu_target_config", "checks", "train", "generate", "side_by_side"}.
    """
    t0 = time.perf_counter()
    platform = probe_platform() if nanogpt else jax.devices()[0].platform  # the child leaves the backend unstarted
    reason = "--quick" if quick else ("no accelerator: quick mode" if platform == "cpu" else None)
    shapes = QUICK if reason else FULL
    r: dict[str, Any] = {"schema": SCHEMA, "time": now(), "mode": "quick" if reason else "full",
                         "quick_reason": reason, "passed": None, "env": _pending("environment"),
                         "gpu_target_config": _pending("the target description"), "checks": [],
                         "train": _pending("the train step"), "generate": _pending("generation"),
                         "side_by_side": {"status": "skipped", "reason": "--nanogpt not given"}}

    def train() -> dict:
        fresh_params.cache_clear()  # the earlier sections' weights leave the device: its peak is the steps'
        return train_rows(shapes, batch_sizes or shapes.batch_sizes, _target_path(r))

    # the order they run in: the side by side first, before this process's backend takes the
    # accelerator's memory; generation before the train rows, which measure the device's peak memory
    sections: list[tuple[str, Callable[[], Any]]] = [
        ("env", environment), ("gpu_target_config", lambda: save_gpu_target_config(out_dir)),
        ("checks", lambda: run_checks(shapes)), ("generate", lambda: generate_rows(shapes)), ("train", train)]
    if nanogpt:
        sections.insert(0, ("side_by_side", lambda: side_by_side(nanogpt, shapes, platform)))
    for key, fn in sections:
        r[key] = fn() if key == "checks" else run_section(key, fn)
        r["passed"] = all(c["passed"] for c in r["checks"]) if r["checks"] else None
        r["seconds"] = time.perf_counter() - t0
        write(r, out_dir)
    return r


def _target_path(r: dict) -> str | None:
    t = r["gpu_target_config"]
    return t["path"] if t.get("status") == "ok" else None


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, as every entry point of the project
        fail(f"{message} (see --help)")


def _batch_sizes(text: str) -> tuple[int, ...]:
    """--batch_sizes=8,16,32 -> (8, 16, 32); ArgumentTypeError (one line, from the parser) otherwise."""
    sizes = tuple(int(s) for s in text.split(",") if s.strip().isdigit())
    if not sizes or len(sizes) != len(text.split(",")) or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give sequences per device as positive integers, e.g. 8,16,32")
    return sizes


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m nanogpt_jax.device_check`: parse the flags, `run`, print the markdown; returns the exit
    status (1 when a correctness check failed). Bad input (an --out that is a file, a --nanogpt folder
    that is not a nanoGPT checkout) is one line, `error: ...`, exit status 1, before anything runs."""
    p = _Parser(prog="python -m nanogpt_jax.device_check", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for device_check.json, .md (and gpu_target_config.txtpb)")
    p.add_argument("--quick", action="store_true", help="tiny shapes (always on without an accelerator)")
    p.add_argument("--nanogpt", help="a karpathy/nanoGPT checkout: run its bench.py beside ours")
    p.add_argument("--batch_sizes", type=_batch_sizes, help="train rows: sequences per device, e.g. 8,16,32")
    args = p.parse_args(argv)
    logging.use_absl_handler()
    logging.get_absl_handler().addFilter(cli._quiet_libraries)  # jax's and orbax's own INFO lines stay out
    logging.set_verbosity(logging.INFO)
    try:
        out_dir = Path(args.out)
        if out_dir.exists() and not out_dir.is_dir():
            raise UserError(f"--out={args.out!r} is a file; give a folder for the report")
        checkout = check_nanogpt(args.nanogpt)
        out_dir.mkdir(parents=True, exist_ok=True)
        r = run(out_dir, args.quick, checkout, args.batch_sizes)
    except UserError as e:
        fail(str(e))
    except KeyboardInterrupt:
        fail("interrupted")
    sys.stdout.write(markdown(r) + f"\nwrote {out_dir / 'device_check.json'}, {out_dir / 'device_check.md'}\n")
    return 0 if r["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
