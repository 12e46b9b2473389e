"""Compile the real train step for a TPU slice or NVIDIA GPUs on any machine, and see whether it fits.

    make install-aot                  # the TPU and GPU compilers, outside the venv's packages (README)
    python -m nanogpt_jax.aot --config configs/owt.py:gpt2-xl --config.mesh.data=1 --config.mesh.fsdp=8 \\
        --topology v5e-8
    python -m nanogpt_jax.aot --config configs/owt.py --config.mesh.data=8 --topology v5e-8 --sweep=8,16,24,32
    python -m nanogpt_jax.aot --config configs/owt.py --config.model.dtype=bfloat16 --config.mesh.data=1 \\
        --config.train.gradient_accumulation_steps=1 --topology h100-1 --sweep=8,16,32,64

JAX can compile for devices that are not there (`nanogpt_jax.targets`): this builds the mesh of the
config over the devices of `--topology`, lowers `step.make_train_step(...)` on abstract inputs (no
array is ever allocated) and compiles it with the TPU or GPU compiler. It prints the compiled
program's memory per device (`memory_analysis()`) beside `nanogpt_jax.memory`'s estimate, whether
that fits what a device gives the step (a TPU chip's HBM; a GPU's memory times JAX's allocator
fraction, 0.75 unless XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise), the FLOPs per device
(`cost_analysis()`), the attention and loss implementations compiled (and the fused-kernel calls
found in the compiled HLO), and the compile time. `--sweep` compiles a list of per-device batch
sizes and stops at the first that does not fit: the largest batch that fits. If XLA cannot fit the
program, compilation itself fails and the tool says so (exit status 1).

Where the compilers come from, the topology names, and what a GPU compile without a GPU cannot show
(no autotuning, no cuDNN graph): `nanogpt_jax.targets`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from absl import flags
from ml_collections import ConfigDict

from nanogpt_jax import memory, metrics, sharding, targets
from nanogpt_jax.errors import ConfigError, UserError
from nanogpt_jax.model import GPT, implementations
from nanogpt_jax.optim import OptimConfig, make_optimizer

GiB = targets.GiB


@dataclasses.dataclass
class Report:
    """What `compile_train_step` found; byte counts are per chip."""

    topology: str
    jax_topology: str
    platform: str  # "tpu" or "gpu"
    devices: int
    hbm_bytes: int  # what the step may use per device: a chip's HBM, a GPU's memory x JAX's fraction
    mesh: dict[str, int]
    model: dict[str, Any]
    params: int
    batch_size: int
    grad_accum: int
    tokens_per_step: int
    memory: dict[str, int] | None  # memory_analysis(); None when XLA could not fit the program
    estimate: dict[str, int]
    flops: float | None  # cost_analysis() FLOPs per chip, each loop body (micro-step, scanned layer) once
    model_flops: float  # 6N + 12 L d T per token (metrics.FLOPS_FORMULA) x tokens / chips
    peak_flops: float | None  # per chip, bf16 datasheet
    implementations: dict[str, str]  # the attention and the loss that ran (`model.implementations`)
    lower_seconds: float
    compile_seconds: float
    error: str | None = None
    device_kind: str = ""
    hosts: int = 1
    memory_note: str = ""  # where hbm_bytes comes from
    target_config: str | None = None  # GPUs: the target description compiled for
    kernels: dict[str, int] = dataclasses.field(default_factory=dict)  # fused-kernel calls in the compiled HLO
    limits: str = ""  # what a compile without the device cannot show

    @property
    def unit(self) -> str:
        return "chip" if self.platform == "tpu" else "GPU"

    @property
    def compiled_bytes(self) -> int | None:
        """Arguments + outputs not aliased to them + temporaries + code: the HBM the step occupies."""
        if self.memory is None:
            return None
        m = self.memory
        return (m["argument_size_in_bytes"] + m["output_size_in_bytes"] - m["alias_size_in_bytes"]
                + m["temp_size_in_bytes"] + m["generated_code_size_in_bytes"])

    @property
    def fits(self) -> bool:
        return self.compiled_bytes is not None and self.compiled_bytes <= self.hbm_bytes


def compile_train_step(config: ConfigDict, topology_name: str,
                       gpu_target_config: str | os.PathLike | None = None) -> Report:
    """AOT-compile the config's train step for the devices `topology_name` (a TPU slice such as v5e-8,
    or GPUs such as h100-8; see `targets.topology`) and measure it. Abstract inputs only: nothing is
    allocated. `gpu_target_config`: a GpuTargetConfigProto text file to compile for (a real GPU's, as
    device_check writes it) instead of the shipped description of the kind.

    Raises:
        ConfigError: a bad topology, mesh or batch; a compiler that is not installed.
    """
    from jax.experimental import mesh_utils
    from jax.sharding import AxisType, Mesh

    from nanogpt_jax import step

    topo = targets.topology(topology_name, gpu_target_config)
    n = len(topo.devices)
    shape = memory.mesh_shape_for(config, n)
    mesh = Mesh(mesh_utils.create_device_mesh(tuple(shape[a] for a in sharding.MESH_AXES), topo.devices),
                sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    dtype = "bfloat16" if config.model.dtype == "auto" else config.model.dtype
    gcfg, _ = memory.model_config(config, dtype)
    model = GPT(gcfg)
    B, A, T = config.train.batch_size, config.train.gradient_accumulation_steps, gcfg.block_size
    sharding.check_batch_size(B, shape["data"] * shape["fsdp"])
    optim_config = OptimConfig.from_section(config.optim)
    abstract = step.abstract_state(model, make_optimizer(optim_config, step.param_axes(model)), mesh)
    train_step = step.make_train_step(model, optim_config, mesh, abstract, grad_accum=A, seed=config.seed)
    x = jax.ShapeDtypeStruct((A, B, T), jnp.int32, sharding=sharding.batch_sharding(mesh, 3))
    t0 = time.perf_counter()
    with sharding.activate(mesh):
        lowered = train_step.jitted.lower(abstract, x, x)
    t1 = time.perf_counter()
    error = mem = cost = None
    kernels: dict[str, int] = {}
    try:
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 - XLA's out-of-memory is a result here, not a crash
        text = str(e)
        if "RESOURCE_EXHAUSTED" not in text and "memory" not in text.lower():
            raise
        error = " ".join(text.split("\n", 1)[0].split())[:300]
    t2 = time.perf_counter()
    if error is None:
        m = compiled.memory_analysis()
        mem = {k: int(getattr(m, k)) for k in dir(m) if k.endswith("_in_bytes")}
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        kernels = fused_kernels(compiled.as_text())
    n_params = sum(math.prod(p.shape) for p in jax.tree.leaves(abstract.params))
    est = memory.estimate(gcfg, batch_size=B, grad_accum=A, mesh_shape=shape, platform=topo.platform)
    kind = topo.devices[0].device_kind
    peak = metrics.peak_for_kind(kind, "bfloat16", topo.platform).flops
    return Report(
        topology=topology_name, jax_topology=topo.jax_name, platform=topo.platform, devices=n,
        hbm_bytes=topo.hbm_bytes, mesh=shape,
        model=dataclasses.asdict(gcfg), params=n_params, batch_size=B, grad_accum=A, tokens_per_step=A * B * T,
        memory=mem, estimate=dataclasses.asdict(est) | {"total": est.total},
        flops=float(cost["flops"]) if cost and "flops" in cost else None,
        model_flops=gcfg.flops_per_token(T) * A * B * T / n, peak_flops=peak,
        implementations=implementations(gcfg, topo.platform, B // (shape["data"] * shape["fsdp"]), T),
        lower_seconds=t1 - t0, compile_seconds=t2 - t1, error=error, device_kind=kind, hosts=topo.hosts,
        memory_note=topo.memory_note, target_config=topo.target_config, kernels=kernels,
        limits=targets.DEVICELESS_GPU_LIMITS if topo.platform == "gpu" else "")


# Custom calls that show a fused kernel made it into the compiled program (their HLO targets)
KERNEL_TARGETS = {"cudnn_attention": "__cudnn$fmha", "pallas_tpu": "tpu_custom_call"}


def fused_kernels(hlo_text: str) -> dict[str, int]:
    """How many custom calls of each KERNEL_TARGETS kind the compiled HLO text holds (forward and
    backward calls alike); kinds with none are left out."""
    found = {name: len(re.findall(rf'custom_call_target="{re.escape(t)}', hlo_text))
             for name, t in KERNEL_TARGETS.items()}
    return {k: v for k, v in found.items() if v}


def format_report(r: Report) -> str:
    """The report as the console shows it."""
    g = lambda b: f"{b / GiB:8.2f} GiB" if abs(b) >= GiB / 10 else f"{b / 2**20:8.1f} MiB"  # noqa: E731
    m = r.model
    lines = [
        f"{r.topology} ({r.jax_topology}{f', {r.hosts} hosts' if r.hosts > 1 else ''}): {r.devices} x "
        f"{r.device_kind}, {r.hbm_bytes / GiB:.1f} GiB per {r.unit} for the step ({r.memory_note}); mesh "
        + " ".join(f"{k}={v}" for k, v in r.mesh.items()),
        f"model: {m['n_layer']} layers x {m['n_embd']} wide, {metrics.format_params(r.params)} parameters, "
        f"{m['dtype']}, "
        f"remat={m['remat']}, scan_layers={m['scan_layers']}",
        f"attention: {r.implementations['attention']}; loss: {r.implementations['loss']}"
        + (f"; in the compiled HLO: {', '.join(f'{v} {k} calls' for k, v in r.kernels.items())}" if r.kernels
           else ""),
        f"batch: {r.grad_accum} micro-steps x {r.batch_size} sequences x {m['block_size']} tokens = "
        f"{r.tokens_per_step:,} tokens per step",
        "",
        f"{'per ' + r.unit:<28}{'estimate':>10}{'compiled':>14}",
    ]
    e, mem = r.estimate, r.memory
    compiled_rows = {}
    if mem:
        compiled_rows = {
            "params + opt_state + batch": mem["argument_size_in_bytes"],
            "temporaries": mem["temp_size_in_bytes"],
            "outputs not aliased": mem["output_size_in_bytes"] - mem["alias_size_in_bytes"],
            "code": mem["generated_code_size_in_bytes"],
        }
    est_rows = {
        "params + opt_state + batch": e["params"] + e["opt_state"] + e["batch"],
        "temporaries": e["grads"] + e["weights"] + e["activations"] + e["logits"],
    }
    for name in ("params + opt_state + batch", "temporaries", "outputs not aliased", "code"):
        est = g(est_rows[name]) if name in est_rows else f"{'':12}"
        comp = g(compiled_rows[name]) if name in compiled_rows else ""
        lines.append(f"{name:<28}{est}  {comp}")
    for name in ("params", "opt_state", "grads", "weights", "activations", "logits"):
        lines.append(f"  {name:<26}{g(e[name])}")
    total = r.compiled_bytes
    lines.append(f"{'total':<28}{g(e['total'])}  {g(total) if total is not None else '       -'}")
    if r.error:
        lines.append(f"does NOT fit: XLA could not compile it ({r.error})")
    else:
        lines.append(f"{'fits' if r.fits else 'does NOT fit'}: {100 * total / r.hbm_bytes:.0f}% of "
                     f"{r.hbm_bytes / GiB:.1f} GiB per {r.unit}")
    lines.append("")
    if r.flops is not None:
        lines.append(f"FLOPs per {r.unit} per step: {r.model_flops / 1e12:.3g} T by the model formula "
                     f"({metrics.FLOPS_FORMULA}); XLA's cost_analysis: {r.flops / 1e12:.3g} T, counting each loop "
                     "body once (the micro-step scan, and the layer scan with scan_layers)")
        if r.peak_flops:
            ms = r.model_flops / r.peak_flops * 1e3
            lines.append(f"at 100% MFU ({r.peak_flops / 1e12:.0f} TFLOP/s bf16 per {r.unit}): {ms:.0f} ms per step; "
                         f"at 50%: {2 * ms:.0f} ms")
    lines.append(f"lower {r.lower_seconds:.1f} s, compile {r.compile_seconds:.1f} s")
    if r.limits:
        lines.append(f"note: {r.limits}")
    return "\n".join(lines)


def sweep(config: ConfigDict, topology_name: str, per_chip: list[int],
          gpu_target_config: str | os.PathLike | None = None,
          progress: Callable[[Report], None] | None = None) -> list[Report]:
    """Compile the step for each per-device batch in `per_chip` (ascending), stopping after the first
    that does not fit: the largest batch that fits is the last fitting report's. Each size sets
    train.batch_size = size x mesh.data x mesh.fsdp; everything else is the config's. `progress` is
    called with each report as it is made."""
    reports: list[Report] = []
    shape = memory.mesh_shape_for(config, len(targets.topology(topology_name, gpu_target_config).devices))
    for size in sorted(per_chip):
        c = config.copy_and_resolve_references()
        c.train.batch_size = size * shape["data"] * shape["fsdp"]
        reports.append(compile_train_step(c, topology_name, gpu_target_config))
        if progress:
            progress(reports[-1])
        if not reports[-1].fits:
            break
    return reports


def _sweep_row(r: Report) -> str:
    used = f"{r.compiled_bytes / GiB:8.2f}  {100 * r.compiled_bytes / r.hbm_bytes:5.0f}%" if r.memory else \
        f"{'-':>8}  {'-':>6}"
    return (f"{r.batch_size // (r.mesh['data'] * r.mesh['fsdp']):>8}  {used}  {r.implementations['loss']:<34}"
            f"{r.compile_seconds:5.1f} s{'' if r.fits else '  does NOT fit'}")


def _sweep_head(r0: Report) -> list[str]:
    return [f"{r0.topology}: per-{r0.unit} batch sweep, block_size {r0.model['block_size']}, {r0.model['dtype']}, "
            f"remat={r0.model['remat']}, attention: {r0.implementations['attention']}; "
            f"{r0.hbm_bytes / GiB:.1f} GiB per {r0.unit} ({r0.memory_note})",
            f"{'per ' + r0.unit:>8}  {'GiB/' + r0.unit:>8}  {'of mem':>6}  {'loss':<34}compile"]


def format_sweep(reports: list[Report]) -> str:
    """One line per size tried, and the largest per-device batch that fits."""
    r0 = reports[0]
    divisor = r0.mesh["data"] * r0.mesh["fsdp"]
    lines = _sweep_head(r0) + [_sweep_row(r) for r in reports]
    fitting = [r.batch_size // divisor for r in reports if r.fits]
    lines.append(f"largest per-{r0.unit} batch that fits: {fitting[-1]}" if fitting else "no size tried fits")
    if r0.limits:
        lines.append(f"note: {r0.limits}")
    return "\n".join(lines)


def _write_json(path: str, reports: Report | list[Report]) -> None:
    one = lambda r: dataclasses.asdict(r) | {"compiled_bytes": r.compiled_bytes, "fits": r.fits}  # noqa: E731
    with open(path, "w") as f:
        json.dump([one(r) for r in reports] if isinstance(reports, list) else one(reports), f, indent=2)


def main(config: ConfigDict) -> Report | list[Report]:
    """`python -m nanogpt_jax.aot`: compile and print the report (and write --json); with --sweep,
    compile each per-device batch of the list, printing a line for each as it is done.

    Raises:
        UserError: the step does not fit the device's memory (after printing the report), so the CLI
            exits 1; ConfigError for a bad topology, target description, mesh or batch.
    """
    target = flags.FLAGS.gpu_target_config
    if flags.FLAGS.sweep is not None:
        try:
            sizes = [int(s) for s in flags.FLAGS.sweep.split(",")]
            if min(sizes) < 1:
                raise ValueError
        except ValueError:
            raise ConfigError(f"--sweep={flags.FLAGS.sweep!r}: give per-device batch sizes as positive integers, "
                              "e.g. --sweep=8,16,24,32") from None
        print(f"compiling {len(sizes)} sizes in turn until one does not fit (GPT-2 124M: about 10 s each for a GPU, "
              "1-4 min each for a TPU slice on 2 cores)", flush=True)

        def progress(r: Report) -> None:
            if len(reports_so_far) == 0:
                print("\n".join(_sweep_head(r)), flush=True)
            reports_so_far.append(r)
            print(_sweep_row(r), flush=True)

        reports_so_far: list[Report] = []
        reports = sweep(config, flags.FLAGS.topology, sizes, target, progress)
        print(format_sweep(reports).split("\n", len(reports) + 2)[-1], flush=True)  # the rows are out already
        if flags.FLAGS.json:
            _write_json(flags.FLAGS.json, reports)
        if not reports[0].fits:
            raise UserError(f"no per-{reports[0].unit} batch of --sweep fits {reports[0].topology}; try smaller sizes, "
                            "mesh.fsdp or model.remat=full")
        return reports
    report = compile_train_step(config, flags.FLAGS.topology, target)
    print(format_report(report), flush=True)
    if flags.FLAGS.json:
        _write_json(flags.FLAGS.json, report)
    if not report.fits:
        why = f"XLA: {report.error}" if report.error else f"{report.compiled_bytes / GiB:.1f} GiB per {report.unit}"
        raise UserError(f"the train step does not fit {report.topology}'s {report.hbm_bytes / GiB:.1f} GiB per "
                        f"{report.unit} ({why}); shard more (mesh.fsdp), lower train.batch_size (raise "
                        "gradient_accumulation_steps) or set model.remat=full")
    return report


if __name__ == "__main__":
    # absl flags are process-global: defined only when this module is the script, so that importing it
    # beside another module with a flag of the same name (e.g. --json) cannot fail
    flags.DEFINE_string("topology", "v5e-8", "TPU slice (v5e-8, v4-8, v5p-8, v6e-8, v5e:2x4, ...) or NVIDIA GPUs "
                        "(h100-1, h100-8, 8xH100, h200-8, a100-8, a100-40g-8, h100-16 = 2 hosts x 8, gpu-8)")
    flags.DEFINE_string("gpu_target_config", None, "GPUs: compile for this XLA target description (text "
                        "GpuTargetConfigProto, e.g. device_check's gpu_target_config.txtpb) instead of the kind's")
    flags.DEFINE_string("json", None, "also write the report to this JSON file")
    flags.DEFINE_string("sweep", None, "per-device batch sizes to try, ascending, e.g. 8,16,24,32: compiles each "
                        "(train.batch_size = size x mesh.data x mesh.fsdp) until one does not fit")
    from nanogpt_jax import cli

    cli.main(main)
