"""Regenerate docs/scaling.md's tables of TPU and GPU memory per device: compile each case for its devices.

    .venv/bin/python scripts/aot_table.py [--only 124m|xl|plan|gpu]     # after make install-aot

Each row is `python -m nanogpt_jax.aot` with the row's settings (bf16, block 1024, scan_layers on,
the config files' other values), compiled on this machine for the TPU slice, with the old step
(model.attention=xla, model.loss=full: float32 T x T scores and (B, T, V) logits) and the new one
(attention=auto, i.e. splash on TPUs, and the chunked loss). Per chip is XLA's `memory_analysis()`:
arguments + outputs not aliased + temporaries + code. A case that does not fit shows what XLA said
it needed. Takes about 10-20 minutes on 2 CPU cores.

`--only gpu` makes the GPU tables instead (about 5 minutes): the same step (new only: cuDNN attention,
chunked loss) compiled for H100s and A100s without a GPU; a GPU gives the step JAX's 75% of its
memory. A deviceless GPU compile has no autotuning and builds no cuDNN graph (nanogpt_jax.targets).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import importlib  # noqa: E402

from nanogpt_jax import aot  # noqa: E402

GiB = 2**30
OLD = {"model.attention": "xla", "model.loss": "full"}
NEW = {"model.attention": "auto", "model.loss": "chunked"}
COMMON = {"model.dtype": "bfloat16", "model.scan_layers": True, "model.block_size": 1024}


def cases(only: str | None) -> list[tuple[str, str, str, dict]]:
    """(group, config file, topology, overrides) of every row."""
    rows = []
    if only in (None, "124m"):
        for per_chip in (6, 8, 16, 24, 32):
            rows.append(("124m", "configs/owt.py", "v5e-8", {"mesh.data": 8, "train.batch_size": 8 * per_chip,
                                                            "train.gradient_accumulation_steps": 1}))
    if only in (None, "xl"):
        for topo, fsdp in (("v5e-8", 8), ("v4-8", 4)):
            for remat in ("none", "dots_with_no_batch_dims_saveable", "full"):
                rows.append(("xl", "configs/finetune_shakespeare.py", topo,
                             {"mesh.data": 1, "mesh.fsdp": fsdp, "train.batch_size": 32,
                              "train.gradient_accumulation_steps": 1, "model.remat": remat}))
    if only in (None, "plan"):  # the 124M OpenWebText plan of docs/clusters.md: 480 sequences per step
        rows.append(("plan", "configs/owt.py", "v5e-16", {"mesh.data": 16, "train.batch_size": 480,
                                                          "train.gradient_accumulation_steps": 1}))
        rows.append(("plan", "configs/owt.py", "v4-32", {"mesh.data": 16, "train.batch_size": 480,
                                                         "train.gradient_accumulation_steps": 1}))
    return rows


def gpu_sweep() -> None:
    """GPT-2 124M on one H100, block 1024, bf16, no remat: per-GPU batches until one does not fit."""
    config = load("configs/owt.py", {**COMMON, "model.scan_layers": False, "mesh.data": 1,
                                     "train.gradient_accumulation_steps": 1})
    print("| per-GPU batch | tokens per step | per GPU (of 59.3 GiB) | estimate | loss | compile |")
    print("| --- | --- | --- | --- | --- | --- |", flush=True)
    def row(r: aot.Report) -> None:
        print(f"| {r.batch_size} | {r.tokens_per_step:,} | {cell(r)} | {r.estimate['total'] / GiB:.2f} GiB | "
              f"{r.implementations['loss']} | {r.compile_seconds:.0f} s |", flush=True)

    aot.sweep(config, "h100-1", [8, 16, 32, 64, 96, 128, 160, 192, 224, 256, 320], progress=row)


def gpu_cases() -> list[tuple[str, str, str, dict]]:
    """(row name, config file, topology, overrides): gpt2-xl finetunes and the OpenWebText plan."""
    rows = []
    for topo, mesh, batch, accum in (("h100-1", {"mesh.data": 1}, 8, 4), ("h100-8", {"mesh.data": 1, "mesh.fsdp": 8},
                                                                          32, 1)):
        for remat in ("none", "dots_with_no_batch_dims_saveable", "full"):
            rows.append(("gpt2-xl finetune", "configs/finetune_shakespeare.py", topo,
                         {**mesh, "train.batch_size": batch, "train.gradient_accumulation_steps": accum,
                          "model.remat": remat}))
    for topo, data, batch, accum in (("h100-8", 8, 96, 5), ("h100-8", 8, 480, 1), ("h100-16", 16, 480, 1),
                                     ("a100-8", 8, 480, 1), ("a100-40g-8", 8, 96, 5), ("a100-40g-8", 8, 240, 2)):
        rows.append(("gpt2 124M, OWT plan", "configs/owt.py", topo,
                     {"mesh.data": data, "train.batch_size": batch, "train.gradient_accumulation_steps": accum}))
    return rows


def gpu_tables() -> None:
    gpu_sweep()
    print("\n| model | GPUs | mesh | batch x accum | remat | attention, loss | per GPU |")
    print("| --- | --- | --- | --- | --- | --- | --- |", flush=True)
    for model, path, topo, overrides in gpu_cases():
        r = aot.compile_train_step(load(path, {**COMMON, **overrides, **NEW}), topo)
        mesh = " ".join(f"{k}={v}" for k, v in r.mesh.items() if v > 1)
        impl = f"{r.implementations['attention']}, {r.implementations['loss']}"
        print(f"| {model} | {topo} | {mesh} | {r.batch_size} x {r.grad_accum} | {r.model['remat']} | {impl} | "
              f"**{cell(r)}** |", flush=True)


def load(path: str, overrides: dict):
    config = importlib.import_module(path.removesuffix(".py").replace("/", ".")).get_config()
    for key, value in overrides.items():
        section, name = key.split(".")
        config[section][name] = value
    return config


def cell(r: aot.Report) -> str:
    if r.memory is None:
        needed = r.error.split("required for HLO temporaries (")[-1].split(")")[0] if r.error else "?"
        return f"does not fit (temporaries {needed})"
    share = 100 * r.compiled_bytes / r.hbm_bytes
    text = f"{r.compiled_bytes / GiB:.2f} GiB ({share:.0f}%)"  # of what the device gives the step
    return text if r.fits else f"does not fit ({text})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("124m", "xl", "plan", "gpu"))
    args = parser.parse_args()
    if args.only == "gpu":
        return gpu_tables()
    print("| model | slice | mesh | batch x accum | remat | old: xla attention + full logits | "
          "new: attention, loss | new per chip |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |", flush=True)
    for group, path, topo, overrides in cases(args.only):
        old = aot.compile_train_step(load(path, {**COMMON, **overrides, **OLD}), topo)
        new = aot.compile_train_step(load(path, {**COMMON, **overrides, **NEW}), topo)
        mesh = " ".join(f"{k}={v}" for k, v in new.mesh.items() if v > 1)
        model = {"124m": "gpt2 124M", "xl": "gpt2-xl finetune", "plan": "gpt2 124M (plan)"}[group]
        impl = f"{new.implementations['attention']}, {new.implementations['loss']}"
        print(f"| {model} | {topo} | {mesh} | {new.batch_size} x {new.grad_accum} | {new.model['remat']} | "
              f"{cell(old)} | {impl} | **{cell(new)}** |", flush=True)


if __name__ == "__main__":
    main()
