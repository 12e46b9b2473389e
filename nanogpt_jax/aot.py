"""Compile the real train step for a TPU slice on any machine, and see whether it fits.

    pip install -e .[tpu]          # libtpu, the TPU compiler; it runs on any x86-64 Linux machine
    python -m nanogpt_jax.aot --config configs/owt.py:gpt2-xl --config.mesh.data=1 --config.mesh.fsdp=8 \\
        --topology v5e-8
    python -m nanogpt_jax.aot --config configs/owt.py --config.mesh.data=8 --topology v5e-8 --sweep=8,16,24,32

JAX can compile for TPU devices that are not there (`jax.experimental.topologies`): this builds the
mesh of the config over the devices of `--topology`, lowers `step.make_train_step(...)` on
abstract inputs (no array is ever allocated) and compiles it with the TPU compiler. It prints the
compiled program's memory per chip (`memory_analysis()`) beside `nanogpt_jax.memory`'s estimate,
whether that fits the chip's HBM, the FLOPs per chip (`cost_analysis()`), the attention and loss
implementations compiled, and the compile time. `--sweep` compiles a list of per-chip batch sizes
and stops at the first that does not fit: the largest batch that fits.
If XLA cannot fit the program, compilation itself fails and the tool says so (exit status 1).

Off a TPU VM, an importable libtpu makes every JAX program try the (absent) TPU first and print
libtpu's warnings; to keep it out of the way, install it elsewhere and name it for this tool only:
`pip install --target ~/libtpu libtpu` and `TPU_LIBRARY_PATH=~/libtpu/libtpu/libtpu.so` (as
`make test` does).

Topologies: Cloud TPU accelerator types (v4-8, v4-32, v5p-8, v5e-8 or v5litepod-8, v6e-8, ...)
or JAX topology names (v5e:2x4, v4:2x2x1). A v4 or v5p chip has two TensorCores that JAX drives
as one device (megacore), so v4-8 is 4 devices of 32 GiB; v5e and v6e chips are one device each.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
from absl import flags, logging
from ml_collections import ConfigDict

from nanogpt_jax import memory, metrics, sharding
from nanogpt_jax.errors import ConfigError, UserError
from nanogpt_jax.model import GPT, implementations
from nanogpt_jax.optim import make_optimizer

GiB = 1024**3

# HBM per chip (= per JAX device) in GiB, from the Cloud TPU system architecture pages
# (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e).
HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
# Chips of a slice -> its JAX topology shape. v5e/v6e: accelerator type = chips, 2-D torus;
# v4/v5p: accelerator type = TensorCores = 2 x chips, 3-D torus (Cloud TPU docs, "topologies").
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
              512: "8x8x8"}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6litepod": "v6e"}


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # as given
    generation: str  # v4, v5e, v5p, v6e
    jax_name: str  # e.g. v5e:2x4
    devices: list

    @property
    def hbm_bytes(self) -> int:
        return HBM_GIB[self.generation] * GiB


def topology(name: str) -> Topology:
    """The compile-only TPU devices of a slice named like `v5e-8`, `v4-32` or `v5e:2x4`.

    Raises:
        ConfigError: an unknown name or size, or libtpu is not installed.
    """
    m = re.fullmatch(r"(v\d+[a-z]*)[-:]([\dx]+)", name.strip().lower())
    gen = _ALIASES.get(m.group(1), m.group(1)) if m else None
    if gen not in HBM_GIB:
        raise ConfigError(f"--topology={name!r}: not a TPU slice; use e.g. v5e-8, v4-8, v5p-8, v6e-8 or a JAX "
                          "topology such as v5e:2x4")
    megacore = gen in ("v4", "v5p")
    size = m.group(2)
    if "x" in size:
        shape = size
    else:
        chips = int(size) // 2 if megacore else int(size)
        shape = (_SHAPES_3D if megacore else _SHAPES_2D).get(chips)
        if shape is None:
            raise ConfigError(f"--topology={name!r}: no slice of that size in the table; give its shape, e.g. "
                              f"{gen}:2x2x4")
    from jax.experimental import topologies

    _off_a_tpu_vm()
    kwargs = {"chip_config_name": "megacore"} if megacore else {}
    try:
        devices = topologies.get_topology_desc(f"{gen}:{shape}", "tpu", **kwargs).devices
    except RuntimeError as e:
        if "not installed" in str(e):
            raise ConfigError("compiling for a TPU needs libtpu (it runs on any x86-64 Linux machine): pip install "
                              "-e .[tpu], or install it elsewhere and set TPU_LIBRARY_PATH to its libtpu.so") from None
        raise ConfigError(f"--topology={name!r}: {str(e).splitlines()[0]}") from None
    return Topology(name, gen, f"{gen}:{shape}", list(devices))


def _off_a_tpu_vm() -> None:
    """libtpu asks the TPU VM's metadata for its slice and prints warnings when there is none, and
    lets one process at a time use it (a lock file); off a TPU VM, where it only compiles, tell it
    the answers (the compile-only topology does not depend on them) and drop the lock."""
    import os

    try:
        from jax._src import cloud_tpu_init  # private: set at `import jax` when TPU chips are attached

        if cloud_tpu_init.running_in_cloud_tpu_vm:
            return  # a real TPU VM: leave its environment alone
    except ImportError:
        return
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


@dataclasses.dataclass
class Report:
    """What `compile_train_step` found; byte counts are per chip."""

    topology: str
    jax_topology: str
    devices: int
    hbm_bytes: int
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


def compile_train_step(config: ConfigDict, topology_name: str) -> Report:
    """AOT-compile the config's train step for the TPU slice `topology_name` (see `topology`)."""
    from jax.experimental import mesh_utils
    from jax.sharding import AxisType, Mesh

    from nanogpt_jax import step, train

    topo = topology(topology_name)
    n = len(topo.devices)
    shape = memory.mesh_shape_for(config, n)
    mesh = Mesh(mesh_utils.create_device_mesh(tuple(shape[a] for a in sharding.MESH_AXES), topo.devices),
                sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    dtype = "bfloat16" if config.model.dtype == "auto" else config.model.dtype
    gcfg, _ = memory.model_config(config, dtype)
    model = GPT(gcfg)
    B, A, T = config.train.batch_size, config.train.gradient_accumulation_steps, gcfg.block_size
    sharding.check_batch_size(B, shape["data"] * shape["fsdp"])
    optim_config = train.optim_config(config)
    abstract = step.abstract_state(model, make_optimizer(optim_config), mesh)
    train_step = step.make_train_step(model, optim_config, mesh, abstract, grad_accum=A, seed=config.seed)
    x = jax.ShapeDtypeStruct((A, B, T), jnp.int32, sharding=sharding.batch_sharding(mesh, 3))
    t0 = time.perf_counter()
    with sharding.activate(mesh):
        lowered = train_step.jitted.lower(abstract, x, x)
    t1 = time.perf_counter()
    error = mem = cost = None
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
    n_params = sum(math.prod(p.shape) for p in jax.tree.leaves(abstract.params))
    est = memory.estimate(gcfg, batch_size=B, grad_accum=A, mesh_shape=shape, platform="tpu")
    peak = metrics.peak_for_kind(topo.devices[0].device_kind, "bfloat16", "tpu").flops
    return Report(
        topology=topology_name, jax_topology=topo.jax_name, devices=n, hbm_bytes=topo.hbm_bytes, mesh=shape,
        model=dataclasses.asdict(gcfg), params=n_params, batch_size=B, grad_accum=A, tokens_per_step=A * B * T,
        memory=mem, estimate=dataclasses.asdict(est) | {"total": est.total},
        flops=float(cost["flops"]) if cost and "flops" in cost else None,
        model_flops=gcfg.flops_per_token(T) * A * B * T / n, peak_flops=peak,
        implementations=implementations(gcfg, "tpu", B // (shape["data"] * shape["fsdp"]), T),
        lower_seconds=t1 - t0, compile_seconds=t2 - t1, error=error)


def format_report(r: Report) -> str:
    """The report as the console shows it."""
    g = lambda b: f"{b / GiB:8.2f} GiB" if abs(b) >= GiB / 10 else f"{b / 2**20:8.1f} MiB"  # noqa: E731
    m = r.model
    lines = [
        f"{r.topology} ({r.jax_topology}): {r.devices} chips x {r.hbm_bytes // GiB} GiB HBM; mesh "
        + " ".join(f"{k}={v}" for k, v in r.mesh.items()),
        f"model: {m['n_layer']} layers x {m['n_embd']} wide, {r.params / 1e6:.1f}M parameters, {m['dtype']}, "
        f"remat={m['remat']}, scan_layers={m['scan_layers']}",
        f"attention: {r.implementations['attention']}; loss: {r.implementations['loss']}",
        f"batch: {r.grad_accum} micro-steps x {r.batch_size} sequences x {m['block_size']} tokens = "
        f"{r.tokens_per_step:,} tokens per step",
        "",
        f"{'per chip':<28}{'estimate':>10}{'compiled':>14}",
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
                     f"{r.hbm_bytes // GiB} GiB HBM per chip")
    lines.append("")
    if r.flops is not None:
        lines.append(f"FLOPs per chip per step: {r.model_flops / 1e12:.3g} T by the model formula "
                     f"({metrics.FLOPS_FORMULA}); XLA's cost_analysis: {r.flops / 1e12:.3g} T, counting each loop "
                     "body once (the micro-step scan, and the layer scan with scan_layers)")
        if r.peak_flops:
            ms = r.model_flops / r.peak_flops * 1e3
            lines.append(f"at 100% MFU ({r.peak_flops / 1e12:.0f} TFLOP/s bf16 per chip): {ms:.0f} ms per step; "
                         f"at 50%: {2 * ms:.0f} ms")
    lines.append(f"lower {r.lower_seconds:.1f} s, compile {r.compile_seconds:.1f} s")
    return "\n".join(lines)


def sweep(config: ConfigDict, topology_name: str, per_chip: list[int]) -> list[Report]:
    """Compile the step for each per-chip batch in `per_chip` (ascending), stopping after the first
    that does not fit: the largest batch that fits is the last fitting report's. Each size sets
    train.batch_size = size x mesh.data x mesh.fsdp; everything else is the config's."""
    reports: list[Report] = []
    shape = memory.mesh_shape_for(config, len(topology(topology_name).devices))
    for size in sorted(per_chip):
        c = config.copy_and_resolve_references()
        c.train.batch_size = size * shape["data"] * shape["fsdp"]
        reports.append(compile_train_step(c, topology_name))
        logging.info("per-chip batch %d: %s", size, "fits" if reports[-1].fits else "does not fit")
        if not reports[-1].fits:
            break
    return reports


def format_sweep(reports: list[Report]) -> str:
    """One line per size tried, and the largest per-chip batch that fits."""
    r0 = reports[0]
    divisor = r0.mesh["data"] * r0.mesh["fsdp"]
    lines = [f"{r0.topology}: per-chip batch sweep, block_size {r0.model['block_size']}, {r0.model['dtype']}, "
             f"remat={r0.model['remat']}, attention: {r0.implementations['attention']}",
             f"{'per chip':>8}  {'GiB/chip':>8}  {'of HBM':>6}  {'loss':<34}compile"]
    for r in reports:
        used = f"{r.compiled_bytes / GiB:8.2f}  {100 * r.compiled_bytes / r.hbm_bytes:5.0f}%" if r.memory else \
            f"{'-':>8}  {'-':>6}"
        lines.append(f"{r.batch_size // divisor:>8}  {used}  {r.implementations['loss']:<34}"
                     f"{r.compile_seconds:5.1f} s{'' if r.fits else '  does NOT fit'}")
    fitting = [r.batch_size // divisor for r in reports if r.fits]
    lines.append(f"largest per-chip batch that fits: {fitting[-1]}" if fitting else "no size tried fits")
    return "\n".join(lines)


def main(config: ConfigDict) -> Report | list[Report]:
    """`python -m nanogpt_jax.aot`: compile and print the report (and write --json); with --sweep,
    compile each per-chip batch of the list and print one line for each.

    Raises:
        UserError: the step does not fit the chip's HBM (after printing the report), so the CLI
            exits 1; ConfigError for a bad topology, mesh or batch.
    """
    if flags.FLAGS.sweep is not None:
        try:
            sizes = [int(s) for s in flags.FLAGS.sweep.split(",")]
            if min(sizes) < 1:
                raise ValueError
        except ValueError:
            raise ConfigError(f"--sweep={flags.FLAGS.sweep!r}: give per-chip batch sizes as positive integers, e.g. "
                              "--sweep=8,16,24,32") from None
        reports = sweep(config, flags.FLAGS.topology, sizes)
        print(format_sweep(reports), flush=True)
        if flags.FLAGS.json:
            with open(flags.FLAGS.json, "w") as f:
                json.dump([dataclasses.asdict(r) | {"compiled_bytes": r.compiled_bytes, "fits": r.fits}
                           for r in reports], f, indent=2)
        if not reports[0].fits:
            raise UserError(f"no per-chip batch of --sweep fits {reports[0].topology}; try smaller sizes, "
                            "mesh.fsdp or model.remat=full")
        return reports
    report = compile_train_step(config, flags.FLAGS.topology)
    print(format_report(report), flush=True)
    if flags.FLAGS.json:
        with open(flags.FLAGS.json, "w") as f:
            json.dump(dataclasses.asdict(report) | {"compiled_bytes": report.compiled_bytes, "fits": report.fits},
                      f, indent=2)
    if not report.fits:
        why = f"XLA: {report.error}" if report.error else f"{report.compiled_bytes / GiB:.1f} GiB per chip"
        raise UserError(f"the train step does not fit {report.topology}'s {report.hbm_bytes // GiB} GiB per chip "
                        f"({why}); shard more (mesh.fsdp), lower train.batch_size (raise "
                        "gradient_accumulation_steps) or set model.remat=full")
    return report


if __name__ == "__main__":
    # absl flags are process-global: defined only when this module is the script, so that importing it
    # beside another module with a flag of the same name (e.g. --json) cannot fail
    flags.DEFINE_string("topology", "v5e-8", "TPU slice: v5e-8, v4-8, v5p-8, v6e-8, ... or v5e:2x4")
    flags.DEFINE_string("json", None, "also write the report to this JSON file")
    flags.DEFINE_string("sweep", None, "per-chip batch sizes to try, ascending, e.g. 8,16,24,32: compiles each "
                        "(train.batch_size = size x mesh.data x mesh.fsdp) until one does not fit")
    from nanogpt_jax import cli

    cli.main(main)
